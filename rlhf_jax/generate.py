"""Sample a completion from any model `rlhf_jax.convert` can read.

  python -m rlhf_jax.generate --model=PATH --prompt=TEXT --max_new_tokens=N
      [--greedy | --temperature=T --top_k=K --top_p=P --seed=S] [--tokenizer=PATH]

PATH: Hugging Face directory, GGUF file, rlhf_jax model directory, or `smollm2-135m`. The tokenizer
comes with the model unless --tokenizer names one. Prints the completion text only on stdout (up to
the EOS token). A model without any tokenizer takes --prompt as space-separated token ids and prints
ids.
"""
import dataclasses
import sys

from absl import flags
import jax

from rlhf_jax.convert import load_model
from rlhf_jax.errors import UserError, run_cli
from rlhf_jax.sampling import SamplingConfig, left_pad, sample

_MODEL = flags.DEFINE_string("model", None, "Model path (HF dir, GGUF, rlhf_jax dir) or smollm2-135m.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Number of tokens to generate at most.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the model's).")


def _tokenizer(path):
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise UserError(f"--tokenizer={path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


def _encode(tok, prompt):
  if tok is not None:
    return tok(prompt, add_special_tokens=True)["input_ids"]
  try:
    return [int(t) for t in prompt.split()]
  except ValueError:
    raise UserError("--prompt: this model has no tokenizer; pass --tokenizer=PATH or give the "
                    "prompt as space-separated token ids") from None


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if not _MODEL.value or _PROMPT.value is None:
    raise UserError("--model and --prompt are required")
  sc = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value)
  model = load_model(_MODEL.value, head="lm")
  cfg = model.cfg
  tok_path = _TOKENIZER.value or model.tokenizer_dir
  tok = _tokenizer(tok_path) if tok_path else None
  ids = _encode(tok, _PROMPT.value)
  if not ids:
    raise UserError("--prompt: empty after tokenization")
  if bad := [i for i in ids if not 0 <= i < cfg.vocab_size]:
    raise UserError(f"--prompt: token id {bad[0]} outside the model's vocabulary of {cfg.vocab_size}")
  if len(ids) + sc.max_new_tokens > cfg.max_len:
    raise UserError(f"--prompt: {len(ids)} prompt tokens + {sc.max_new_tokens} new tokens exceed "
                    f"the model's context of {cfg.max_len}")
  eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else cfg.eos_token_id
  sc = dataclasses.replace(sc, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
  tokens, seg = left_pad([ids], cfg.pad_token_id)
  out = sample(model.params, cfg, tokens, seg, jax.random.key(_SEED.value), sc)
  completion = [int(t) for t in out.tokens[0, :int(out.lengths[0])]]
  if completion and completion[-1] == eos:
    completion = completion[:-1]
  if tok is None:
    sys.stdout.write(" ".join(map(str, completion)) + "\n")
  else:
    sys.stdout.write(tok.decode(completion, skip_special_tokens=True) + "\n")


if __name__ == "__main__":
  run_cli(main)
