"""rlhf_jax.generate: --chat (greedy == transformers generate on apply_chat_template), JSONL batch
mode, interactive mode, bad input."""
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from rlhf_jax import generate
from rlhf_jax.errors import UserError
from rlhf_jax.sampling import SamplingConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# SmolLM2-135M-Instruct's chat template, as its tokenizer (the `smollm2` fixture) carries it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  """A random tiny Llama (sharpened, so argmax is well separated) with a byte-level tokenizer
  that carries SmolLM2's chat template: (directory, transformers model, tokenizer)."""
  from rlhf_jax.data.tokenizer import train_byte_bpe
  path = str(tmp_path_factory.mktemp("chat_model"))
  tok = train_byte_bpe(["user assistant system: what is 2+2? name a colour, say hi"] * 4, path,
                       vocab_size=300).hf
  tok.chat_template = SMOLLM2_TEMPLATE
  tok.save_pretrained(path)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id))
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(4.0 if p.ndim > 1 else 1.0)
  model.eval().save_pretrained(path)
  return path, model, transformers.AutoTokenizer.from_pretrained(path)


def _hf_chat_greedy(model, tok, prompt, n):
  """transformers: apply_chat_template(..., add_generation_prompt=True), greedy generate, cut
  after EOS (excluded)."""
  ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)["input_ids"]
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
  new = [int(t) for t in out[0, ids.shape[1]:]]
  return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def _generator(path, chat=True, n=10):
  return generate.load_generator(path, None, SamplingConfig(max_new_tokens=n, greedy=True), chat)


def test_chat_greedy_equals_transformers_and_batching_changes_nothing(chat_model):
  path, model, tok = chat_model
  gen = _generator(path)
  ids = [gen.ids(p, "test") for p in PROMPTS]
  assert ids[0] == tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                           add_generation_prompt=True)["input_ids"]
  assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
  ref = [_hf_chat_greedy(model, tok, p, 10) for p in PROMPTS]
  alone = [gen.complete([i], jax.random.key(0))[0][0] for i in ids]
  batched = [c for c, _ in gen.complete(ids, jax.random.key(0), width=max(map(len, ids)) + 3,
                                        rows=4)]
  assert alone == ref and batched == ref
  assert min(map(len, ref)) > 0


def test_batch_jsonl_in_order_with_fields(chat_model, tmp_path):
  path, model, tok = chat_model
  src = tmp_path / "prompts.jsonl"
  src.write_text("\n".join([json.dumps({"prompt": PROMPTS[0], "id": 7}), "",
                            json.dumps({"prompt": PROMPTS[1]}),
                            json.dumps({"messages": [{"role": "user", "content": PROMPTS[2]}]})])
                 + "\n")
  gen = _generator(path)
  records = generate.read_prompts(str(src), chat=True)
  assert [n for n, _ in records] == [1, 3, 4]
  out = tmp_path / "completions.jsonl"
  assert generate.run_batch(gen, records, str(out), batch_size=2, seed=0) == 3
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows[0]["id"] == 7 and rows[0]["prompt"] == PROMPTS[0] and "messages" in rows[2]
  for row, prompt in zip(rows, PROMPTS):
    ref = _hf_chat_greedy(model, tok, prompt, 10)
    assert row["completion"] == tok.decode(ref, skip_special_tokens=True)
    ended = row["finish_reason"] == "eos"
    assert row["num_tokens"] == len(ref) + ended and (ended or len(ref) == 10)
  assert sorted(os.listdir(tmp_path)) == ["completions.jsonl", "prompts.jsonl"]


@pytest.mark.parametrize("line, needle", [
    ("{\"prompt\": \"a\"", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ("{\"text\": \"a\"}", "line 2: expected a string \"prompt\", got none"),
    ("{\"prompt\": 3}", "line 2: expected a string \"prompt\", got int"),
    ("{\"messages\": [{\"role\": \"user\"}]}", "line 2: \"messages\" must be"),
])
def test_bad_jsonl_line_is_named(tmp_path, line, needle):
  src = tmp_path / "p.jsonl"
  src.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
  with pytest.raises(UserError, match="--input: " + needle.replace("[", r"\[")):
    generate.read_prompts(str(src), chat=True)


def test_interactive_keeps_the_conversation_with_chat(chat_model):
  path, model, tok = chat_model
  gen = _generator(path, n=6)
  written = []
  generate.run_interactive(gen, io.StringIO("What is 2+2?\n\nSay hi\n"), written.append, seed=0)
  assert len(written) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in written)
  first = gen.complete([gen.ids("What is 2+2?", "t")], jax.random.key(0))[0][0]
  second_prompt = [{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": gen.text(first)},
                   {"role": "user", "content": "Say hi"}]
  second = gen.complete([gen.ids(second_prompt, "t")], jax.random.key(0))[0][0]
  assert written == [gen.text(c).replace("\n", "\\n") + "\n" for c in (first, second)]


def test_chat_needs_a_template(chat_model, tmp_path):
  from rlhf_jax.convert import load_model, save_model
  m = load_model(chat_model[0])
  save_model(str(tmp_path / "m"), m.cfg, m.params, fmt="rlhf_jax")     # no tokenizer
  with pytest.raises(UserError, match="--chat: the model has no tokenizer"):
    _generator(str(tmp_path / "m"))
  from rlhf_jax.data.tokenizer import train_byte_bpe
  train_byte_bpe(["abc"], str(tmp_path / "tok"), vocab_size=300)
  with pytest.raises(UserError, match="has no chat template"):
    generate.load_generator(str(tmp_path / "m"), str(tmp_path / "tok"), SamplingConfig(), True)


# ----------------------------------------------------------------------------- the CLI

def _cli(*args, stdin=None, cwd=None):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "rlhf_jax.generate", *args], env=env, cwd=cwd,
                        input=stdin, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_batch_interactive_and_bad_input(chat_model, tmp_path):
  path, model, tok = chat_model
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  common = (f"--model={path}", "--chat", "--greedy", "--max_new_tokens=10")
  ok = _cli(*common, "--input=in.jsonl", "--output=out.jsonl", "--batch_size=2",
            cwd=str(tmp_path))
  assert ok.returncode == 0, ok.stderr
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["completion"] for r in rows] == [
      tok.decode(_hf_chat_greedy(model, tok, p, 10), skip_special_tokens=True) for p in PROMPTS]

  piped = _cli(*common, stdin="What is 2+2?\nSay hi\n")
  assert piped.returncode == 0, piped.stderr
  assert len(piped.stdout.splitlines()) == 2 and piped.stderr == ""

  (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
  cases = [
      (("--input=bad.jsonl", "--output=new.jsonl"), "--input: line 2: not valid JSON"),
      (("--input=in.jsonl",), "--input and --output go together"),
      (("--input=in.jsonl", "--output=new.jsonl", "--prompt=x"), "give one of them"),
      (("--input=missing.jsonl", "--output=new.jsonl"), "cannot read"),
  ]
  for args, needle in cases:
    before = sorted(os.listdir(tmp_path))
    r = _cli(*common, *args, cwd=str(tmp_path))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
    assert sorted(os.listdir(tmp_path)) == before, args      # no output, no temporary file


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_chat_greedy_equals_transformers(smollm2, smollm2_transformers):
  """SmolLM2-Instruct's own chat template (its tokenizer carries one): our greedy tokens equal
  transformers' `generate` on `apply_chat_template(..., add_generation_prompt=True)`."""
  m, hf = smollm2, smollm2_transformers
  tok = transformers.AutoTokenizer.from_pretrained(m.tokenizer_dir)
  assert tok.chat_template
  sc = SamplingConfig(max_new_tokens=12, greedy=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=m.cfg.pad_token_id)
  gen = generate.Generator(m.params, m.cfg, tok, sc, chat=True)
  prompts = ["What is the capital of France?", "Write one word: a colour."]
  ids = [gen.ids(p, "test") for p in prompts]
  ours = [c for c, _ in gen.complete(ids, jax.random.key(0))]
  ref = [_hf_chat_greedy(hf, tok, p, 12) for p in prompts]
  assert ours == ref, ([tok.decode(o) for o in ours], [tok.decode(r) for r in ref])
  assert "Paris" in tok.decode(ours[0])
