"""Sample completions from any model `rlhf_jax.convert` can read: one prompt, a JSONL file, or
prompts typed (or piped) on stdin.

  python -m rlhf_jax.generate --model=PATH --prompt=TEXT [--chat] [--max_new_tokens=N]
      [--greedy | --temperature=T --top_k=K --top_p=P --seed=S] [--tokenizer=PATH]
  python -m rlhf_jax.generate --model=PATH --input=prompts.jsonl --output=completions.jsonl
      [--chat] [--batch_size=B] ...
  python -m rlhf_jax.generate --model=PATH [--chat]          (prompts from stdin, one a line)

PATH: Hugging Face directory, GGUF file, rlhf_jax model directory, or `smollm2-135m`. The tokenizer
comes with the model unless --tokenizer names one.

--chat wraps each prompt as a user message in the tokenizer's chat template with the assistant's
turn opened (transformers' `apply_chat_template(messages, add_generation_prompt=True)`), so greedy
output is token for token what transformers' `generate` gives on the same template. Without
--chat the prompt is tokenized as text (with the tokenizer's own special tokens, e.g. BOS).

Batch mode: every line of --input is a JSON object with a string "prompt" (with --chat it may
instead hold "messages", a list of {"role", "content"}); --output gets one object per input
line, in order: the input's fields plus "completion" (text up to EOS), "num_tokens" (generated,
EOS included) and "finish_reason" ("eos" or "length"). Every line is checked before the model is
loaded, and the output is written to a temporary file renamed into place at the end, so a bad line
(named by its number) leaves no output. Prompts are sampled --batch_size at a time, left-padded
to the longest prompt of the file (one compiled shape).

Interactive mode (no --prompt, no --input): each stdin line is a prompt, each completion one line on
stdout (its newlines written as \\n), until EOF; with --chat the conversation is kept (each line is
the next user turn).
A model without any tokenizer takes prompts as space-separated token ids and prints ids.
"""
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Optional

from absl import flags
import jax

from rlhf_jax.convert import load_model
from rlhf_jax.errors import UserError, run_cli
from rlhf_jax.sampling import SamplingConfig, decode_weights, left_pad, sample

_MODEL = flags.DEFINE_string("model", None, "Model path (HF dir, GGUF, rlhf_jax dir) or smollm2-135m.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (else --input, else stdin).")
_CHAT = flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template (a user turn).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of {\"prompt\": ...} objects.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file the completions are written to.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts sampled together in batch mode.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Number of tokens to generate at most.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the model's).")
_INT8 = flags.DEFINE_bool("int8", False, "Decode with int8 weights and activations "
                          "(rlhf_jax/models/int8.py): faster at batch >= 8 on CPU, not exact.")

INTERACTIVE_BUCKET = 64   # interactive prompts are left-padded to a multiple of this (fewer compiles)


@dataclasses.dataclass
class Generator:
  """A loaded model, its tokenizer (None: prompts are token ids) and the sampling settings."""
  params: Any
  cfg: Any
  tok: Optional[Any]
  sc: SamplingConfig
  chat: bool = False

  def ids(self, prompt, where: str) -> list:
    """Token ids of a prompt (text, or with --chat text or a messages list), checked to fit."""
    ids = (_chat_ids(self.tok, prompt, where) if self.chat else _encode(self.tok, prompt, where))
    if not ids:
      raise UserError(f"{where}: empty after tokenization")
    if bad := [i for i in ids if not 0 <= i < self.cfg.vocab_size]:
      raise UserError(f"{where}: token id {bad[0]} outside the model's vocabulary of "
                      f"{self.cfg.vocab_size}")
    if len(ids) + self.sc.max_new_tokens > self.cfg.max_len:
      raise UserError(f"{where}: {len(ids)} prompt tokens + {self.sc.max_new_tokens} new tokens "
                      f"exceed the model's context of {self.cfg.max_len}")
    return ids

  def complete(self, id_lists, rng, width=None, rows=None):
    """[(completion ids without EOS, finished with EOS)] of each prompt, sampled in one call:
    left-padded to `width` (default: the longest), `rows` rows (padding rows repeat prompt 0)."""
    rows = rows or len(id_lists)
    batch = list(id_lists) + [id_lists[0]] * (rows - len(id_lists))
    tokens, seg = left_pad(batch, self.cfg.pad_token_id, width)
    out = sample(self.params, self.cfg, tokens, seg, rng, self.sc)
    results = []
    for row, n in zip(jax.device_get(out.tokens)[:len(id_lists)],
                      jax.device_get(out.lengths)[:len(id_lists)]):
      ids = [int(t) for t in row[:int(n)]]
      ended = bool(ids) and ids[-1] == self.sc.eos_token_id
      results.append((ids[:-1] if ended else ids, ended))
    return results

  def text(self, ids) -> str:
    if self.tok is None:
      return " ".join(map(str, ids))
    return self.tok.decode(ids, skip_special_tokens=True)


def _tokenizer(path):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise UserError(f"--tokenizer={path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


def _encode(tok, prompt, where):
  if not isinstance(prompt, str):
    raise UserError(f"{where}: expected a text prompt")
  if tok is not None:
    return tok(prompt, add_special_tokens=True)["input_ids"]
  try:
    return [int(t) for t in prompt.split()]
  except ValueError:
    raise UserError(f"{where}: this model has no tokenizer; pass --tokenizer=PATH or give the "
                    "prompt as space-separated token ids") from None


def messages_of(prompt):
  """The chat messages of a prompt: a text is one user turn; a list is taken as it is."""
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _chat_ids(tok, prompt, where):
  """transformers' `apply_chat_template(messages, add_generation_prompt=True)` ids."""
  out = tok.apply_chat_template(messages_of(prompt), add_generation_prompt=True, tokenize=True,
                                return_dict=True)
  return list(out["input_ids"])


def check_chat(tok, tok_path):
  """UserError unless the tokenizer has a chat template (what --chat needs)."""
  if tok is None:
    raise UserError("--chat: the model has no tokenizer (pass --tokenizer=PATH)")
  if not getattr(tok, "chat_template", None):
    raise UserError(f"--chat: the tokenizer at {tok_path} has no chat template")


# ----------------------------------------------------------------------------- JSONL batch mode

def _record(line: str, number: int, chat: bool) -> dict:
  """One checked input record; a UserError naming `--input: line <number>` otherwise."""
  where = f"--input: line {number}"
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object with a string \"prompt\"")
  if chat and "messages" in record:
    msgs = record["messages"]
    if not (isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)):
      raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, "
                      "\"content\": str}} objects")
    return record
  if not isinstance(record.get("prompt"), str):
    raise UserError(f"{where}: expected a string \"prompt\", got "
                    f"{type(record.get('prompt')).__name__ if 'prompt' in record else 'none'}")
  return record


def read_prompts(path: str, chat: bool) -> list:
  """[(line number, record)] of a JSONL file (blank lines skipped), every line checked."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--input: cannot read {path} ({e.__class__.__name__}: {e})") from None
  records = [(i + 1, _record(line, i + 1, chat)) for i, line in enumerate(lines) if line.strip()]
  if not records:
    raise UserError(f"--input: {path} holds no prompts")
  return records


def write_jsonl_atomic(path: str, records) -> None:
  """Writes the records as JSONL into a temporary sibling file, then renames it to `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def run_batch(gen: Generator, records, output: str, batch_size: int, seed: int) -> int:
  """Completes every (line number, record) in batches of `batch_size`; writes `output`."""
  ids = [gen.ids(r["messages"] if gen.chat and "messages" in r else r["prompt"],
                 f"--input: line {n}") for n, r in records]
  width = max(map(len, ids))
  out = []
  for start in range(0, len(ids), batch_size):
    rng = jax.random.fold_in(jax.random.key(seed), start // batch_size)
    chunk = gen.complete(ids[start:start + batch_size], rng, width, batch_size)
    for (_, record), (completion, ended) in zip(records[start:start + batch_size], chunk):
      out.append(dict(record, completion=gen.text(completion), num_tokens=len(completion) + ended,
                      finish_reason="eos" if ended else "length"))
  write_jsonl_atomic(output, out)
  return len(out)


# ----------------------------------------------------------------------------- interactive

def run_interactive(gen: Generator, lines, write, seed: int, ask=None) -> None:
  """Each line of `lines` is a prompt (with --chat the next user turn of one conversation); each
  completion is passed to `write` as one line. `ask()` is called before each read (a "> " on a
  terminal)."""
  messages = []
  for turn, line in enumerate(iter_lines(lines, ask)):
    if not line.strip():
      continue
    prompt = line
    if gen.chat:
      messages.append({"role": "user", "content": line})
      prompt = messages
    ids = gen.ids(prompt, f"stdin line {turn + 1}")
    width = -(-len(ids) // INTERACTIVE_BUCKET) * INTERACTIVE_BUCKET
    (completion, _), = gen.complete([ids], jax.random.fold_in(jax.random.key(seed), turn), width)
    text = gen.text(completion)
    if gen.chat:
      messages.append({"role": "assistant", "content": text})
    write(text.replace("\n", "\\n") + "\n")


def iter_lines(stream, ask=None):
  """Lines of `stream` without their newline, calling `ask()` before each read."""
  while True:
    if ask is not None:
      ask()
    line = stream.readline()
    if not line:
      return
    yield line.rstrip("\n")


# ----------------------------------------------------------------------------- CLI

def _check_modes():
  if _INPUT.value is not None and _PROMPT.value is not None:
    raise UserError("--prompt and --input: give one of them")
  if (_INPUT.value is None) != (_OUTPUT.value is None):
    raise UserError("--input and --output go together (JSONL in, JSONL out)")
  if _BATCH_SIZE.value < 1:
    raise UserError(f"--batch_size must be a positive integer, got {_BATCH_SIZE.value}")
  if _OUTPUT.value is not None and os.path.isdir(_OUTPUT.value):
    raise UserError(f"--output: {_OUTPUT.value} is a directory, expected a file path")
  if _OUTPUT.value is not None and not os.path.isdir(os.path.dirname(os.path.abspath(
      _OUTPUT.value))):
    raise UserError(f"--output: the folder of {_OUTPUT.value} does not exist")


def load_generator(model_path, tokenizer_path, sc: SamplingConfig, chat: bool,
                   int8: bool = False) -> Generator:
  """The model (LM head), its tokenizer and the sampling settings with its EOS and pad ids; the
  weights prepared once for decoding (`sampling.decode_weights`: split per layer and, on CPU,
  transposed for the feature-major step; with `int8` quantized for int8 decoding), so that each
  `sample` call reuses them."""
  model = load_model(model_path, head="lm")
  tok_path = tokenizer_path or model.tokenizer_dir
  tok = _tokenizer(tok_path) if tok_path else None
  if chat:
    check_chat(tok, tok_path)
  cfg = model.cfg
  eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else cfg.eos_token_id
  sc = dataclasses.replace(sc, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
  cfg, params = decode_weights(model.params, cfg, "int8" if int8 else "")
  return Generator(params, cfg, tok, sc, chat)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if not _MODEL.value:
    raise UserError("--model is required")
  _check_modes()
  sc = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value)
  records = read_prompts(_INPUT.value, _CHAT.value) if _INPUT.value else None
  gen = load_generator(_MODEL.value, _TOKENIZER.value, sc, _CHAT.value, _INT8.value)
  if records is not None:
    n = run_batch(gen, records, _OUTPUT.value, _BATCH_SIZE.value, _SEED.value)
    print(f"wrote {n} completions to {_OUTPUT.value}")
  elif _PROMPT.value is not None:
    ids = gen.ids(_PROMPT.value, "--prompt")
    (completion, _), = gen.complete([ids], jax.random.key(_SEED.value))
    sys.stdout.write(gen.text(completion) + "\n")
  else:
    ask = (lambda: sys.stderr.write("> ") and sys.stderr.flush()) if sys.stdin.isatty() else None
    run_interactive(gen, sys.stdin, lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                    _SEED.value, ask)


if __name__ == "__main__":
  run_cli(main)
