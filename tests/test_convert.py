"""Weights in and out: logit parity with transformers on the same weights, export, bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.convert import load_model, save_model  # noqa: E402
from rlhf_jax.models import Transformer, get_model_config, init_params  # noqa: E402

VOCAB = 96


def _hf_gpt2():
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(cfg)


def _hf_llama(tied=False, rope=None):
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=tied,
                                 rope_parameters=rope or {"rope_type": "default", "rope_theta": 5e4},
                                 bos_token_id=1, eos_token_id=2)
  return transformers.LlamaForCausalLM(cfg)


HF_MODELS = {
    "gpt2": _hf_gpt2,
    "llama-gqa": _hf_llama,
    "llama-tied-llama3rope": lambda: _hf_llama(tied=True, rope={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_dir(request, tmp_path_factory):
  torch.manual_seed(0)
  model = HF_MODELS[request.param]().eval()
  with torch.no_grad():     # random (not ~zero) norms and biases, so a mix-up would show
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return path


def _batch():
  tokens = np.random.RandomState(0).randint(3, VOCAB, (3, 12))
  mask = np.ones_like(tokens)
  mask[1, :4] = 0      # left padding
  mask[2, :9] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.float().numpy()


def _our_logits(cfg, params, tokens, mask):
  logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                     segment_ids=jnp.asarray(mask, jnp.int32))
  return np.asarray(logits)


def test_import_matches_transformers_logits(hf_dir):
  tokens, mask = _batch()
  ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(), tokens, mask)
  m = load_model(hf_dir)
  ours = _our_logits(m.cfg, m.params, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() < 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_export_loads_in_transformers_with_equal_logits(preset, tmp_path):
  cfg = get_model_config(preset, tie_embeddings=preset == "tiny-gpt2")
  params = init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  out = str(tmp_path / "hf")
  save_model(out, cfg, params, fmt="hf")
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info   # no missing / unexpected / mismatched weights
  tokens, mask = _batch()
  tokens = tokens % cfg.vocab_size
  ref = _hf_logits(model.eval(), tokens, mask)
  ours = _our_logits(cfg, params, tokens, mask)
  assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4


def test_native_round_trip_and_reexport(hf_dir, tmp_path):
  m = load_model(hf_dir)
  save_model(str(tmp_path / "ours"), m.cfg, m.params, fmt="rlhf_jax")
  back = load_model(str(tmp_path / "ours"))
  assert back.cfg == m.cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               m.params, back.params)
  save_model(str(tmp_path / "hf2"), back.cfg, back.params, fmt="hf")
  again = load_model(str(tmp_path / "hf2"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               m.params, again.params)


def test_scalar_head_model_round_trips_natively(tmp_path):
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0), head="scalar")
  save_model(str(tmp_path / "rm"), cfg, params, fmt="rlhf_jax", head="scalar")
  back = load_model(str(tmp_path / "rm"), head="scalar")
  np.testing.assert_array_equal(back.params["scalar_head"]["kernel"], params["scalar_head"]["kernel"])


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_and_exports(smollm2, smollm2_transformers, tmp_path):
  m, ref_model = smollm2, smollm2_transformers      # load_model("smollm2-135m"), conftest.py
  assert m.cfg == get_model_config("smollm2-135m", norm_eps=m.cfg.norm_eps)
  tok = transformers.AutoTokenizer.from_pretrained(m.tokenizer_dir)
  prompts = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nHi!<|im_end|>"]
  enc = [tok(p)["input_ids"] for p in prompts]
  n = max(map(len, enc))
  tokens = np.array([[m.cfg.pad_token_id] * (n - len(e)) + e for e in enc])
  mask = np.array([[0] * (n - len(e)) + [1] * len(e) for e in enc])
  ref = _hf_logits(ref_model, tokens, mask)
  ours = _our_logits(m.cfg, m.params, tokens, mask)
  assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-3
  assert tok.decode(ours[0, -1].argmax()).strip() == "Paris"

  # Export: transformers loads it with no missing/unexpected weights; tokenizer travels along.
  out = str(tmp_path / "smollm2-hf")
  save_model(out, m.cfg, m.params, fmt="hf", tokenizer_dir=m.tokenizer_dir)
  exported, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  assert transformers.AutoTokenizer.from_pretrained(out)(prompts[0])["input_ids"] == enc[0]
  # Same float32 weights; 30 layers of different summation order in torch and XLA give ~1e-4 on
  # logits of magnitude ~30 (the random-model export test holds the 1e-4 bound).
  assert np.abs(_hf_logits(exported.eval(), tokens, mask) - ours)[mask.astype(bool)].max() < 1e-3


# ----------------------------------------------------------------------------- bad input

def _cli(*args, cwd):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "rlhf_jax.convert", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_clean_failure(result, needle, parent):
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, result.stderr
  assert needle in lines[0], lines[0]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(parent, "out"))
  assert not [f for f in os.listdir(parent) if f.startswith(".out.")], os.listdir(parent)


def _bad_inputs(tmp, good_hf):
  """name -> (src path, text the one-line error must contain)."""
  cases = {"missing file": (os.path.join(tmp, "nope"), "no such file")}
  bert = os.path.join(tmp, "bert")
  shutil.copytree(good_hf, bert)
  cfg = json.load(open(os.path.join(bert, "config.json")))
  json.dump(dict(cfg, model_type="bert"), open(os.path.join(bert, "config.json"), "w"))
  cases["unsupported architecture"] = (bert, "model_type 'bert' is not supported")

  truncated = os.path.join(tmp, "truncated")
  shutil.copytree(good_hf, truncated)
  st = os.path.join(truncated, "model.safetensors")
  data = open(st, "rb").read()
  open(st, "wb").write(data[:len(data) // 2])
  cases["truncated safetensors"] = (truncated, "truncated or corrupt")

  garbage = os.path.join(tmp, "garbage")
  shutil.copytree(good_hf, garbage)
  open(os.path.join(garbage, "model.safetensors"), "wb").write(b"\xff" * 64)
  cases["corrupt safetensors"] = (garbage, "model.safetensors")

  gguf_bad = os.path.join(tmp, "bad.gguf")
  open(gguf_bad, "wb").write(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
  cases["truncated gguf"] = (gguf_bad, "bad.gguf")

  mismatch = os.path.join(tmp, "mismatch")
  shutil.copytree(good_hf, mismatch)
  json.dump(dict(cfg, intermediate_size=cfg["intermediate_size"] + 8),
            open(os.path.join(mismatch, "config.json"), "w"))
  cases["shape mismatch"] = (mismatch, "mlp.gate_proj.weight")

  pickle = os.path.join(tmp, "pickle")
  os.makedirs(pickle)
  json.dump(cfg, open(os.path.join(pickle, "config.json"), "w"))
  open(os.path.join(pickle, "pytorch_model.bin"), "wb").write(b"not read")
  cases["pickle only"] = (pickle, "never unpickles")
  return cases


def test_convert_cli_bad_input(tmp_path):
  torch.manual_seed(0)
  good = str(tmp_path / "good")
  _hf_llama().save_pretrained(good)
  cases = _bad_inputs(str(tmp_path), good)
  for name, (src, needle) in cases.items():
    result = _cli(f"--src={src}", "--dst=out", cwd=str(tmp_path))
    _assert_clean_failure(result, needle, str(tmp_path))
  # A bad flag value and a missing flag are user errors too.
  _assert_clean_failure(_cli(f"--src={good}", "--dst=out", "--dst_format=onnx", cwd=str(tmp_path)),
                        "dst_format", str(tmp_path))
  _assert_clean_failure(_cli("--dst=out", cwd=str(tmp_path)), "--src", str(tmp_path))


def test_convert_cli_writes_and_refuses_to_overwrite(tmp_path):
  torch.manual_seed(0)
  good = str(tmp_path / "good")
  _hf_llama().save_pretrained(good)
  ok = _cli(f"--src={good}", "--dst=out", "--dst_format=rlhf_jax", cwd=str(tmp_path))
  assert ok.returncode == 0, ok.stderr
  assert "wrote out" in ok.stdout
  before = sorted(os.listdir(tmp_path / "out"))
  again = _cli(f"--src={good}", "--dst=out", cwd=str(tmp_path))
  assert again.returncode == 2 and "already exists" in again.stderr
  assert sorted(os.listdir(tmp_path / "out")) == before


# ----------------------------------------------------------------------------- reward models

def _random_rm(preset, **overrides):
  """A scalar-head model with every weight random (not ~zero) and a head bias far from 0."""
  cfg = get_model_config(preset, **overrides)
  params = init_params(cfg, jax.random.key(0), head="scalar")
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape))
                                     for x, k in zip(leaves, keys)])
  params["scalar_head"]["bias"] = np.asarray([0.7], np.float32)
  return cfg, params


def _small_tokenizer(path):
  from rlhf_jax.data.tokenizer import train_byte_bpe
  return train_byte_bpe(["the quick brown fox", "jumps over 12 lazy dogs"] * 4, path,
                        vocab_size=300)


def _rm_rows(cfg, pad_id, lengths, width, left=True):
  """(tokens, mask) of rows `[bos] random ... [eos]` of the given lengths, padded with pad_id."""
  rng = np.random.RandomState(0)
  tokens = np.full((len(lengths), width), pad_id, np.int64)
  mask = np.zeros((len(lengths), width), np.int64)
  for i, n in enumerate(lengths):
    row = [cfg.bos_token_id] + list(rng.randint(3, 300, n - 2)) + [cfg.eos_token_id]
    cols = slice(width - n, width) if left else slice(0, n)
    tokens[i, cols], mask[i, cols] = row, 1
  return tokens, mask


def _our_scores(cfg, params, tokens, mask):
  """Our reward of each row: the scalar head at its last real token."""
  values, _ = Transformer(cfg, head="scalar").apply(
      {"params": params}, jnp.asarray(tokens, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32))
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  return np.asarray(values)[np.arange(len(last)), last]


def _hf_scores(model, tokens, mask, positions=True):
  kwargs = {"position_ids": torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))} if positions else {}
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask), **kwargs)
  return out.logits[:, 0].float().numpy()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_reward_model_export_scores_like_ours_and_reimports(preset, tmp_path):
  from rlhf_jax.models import hf_reward
  from rlhf_jax.train import stage_io
  cfg, params = _random_rm(preset, **({"tie_embeddings": False} if preset == "tiny" else {}))
  tok_dir = str(tmp_path / "tok")
  _small_tokenizer(tok_dir)
  out = str(tmp_path / "rm_hf")
  save_model(out, cfg, params, fmt="hf", tokenizer_dir=tok_dir, head="scalar")
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info   # no missing / unexpected / mismatched weights
  model.eval()
  assert type(model).__name__ == hf_reward.ARCHITECTURES[cfg.flavour]
  hf_cfg = model.config
  assert hf_cfg.num_labels == 1 and hf_cfg.pad_token_id == 0
  # GPT-2: the head's bias lives in ln_f's bias, HF's raw logits are our scores; Llama: the bias
  # rides in config.json.
  bias = hf_cfg.rlhf_jax_score_bias
  assert bias == (0.0 if cfg.flavour == "gpt2" else pytest.approx(0.7))

  left = _rm_rows(cfg, hf_cfg.pad_token_id, [12, 7, 3, 9], 12, left=True)
  right = _rm_rows(cfg, hf_cfg.pad_token_id, [12, 7, 3, 9], 12, left=False)
  ours = _our_scores(cfg, params, *left)
  assert np.abs(ours - _our_scores(cfg, params, *right)).max() < 1e-5
  assert np.abs(_hf_scores(model, *left) + bias - ours).max() < 1e-4
  assert np.abs(_hf_scores(model, *right, positions=False) + bias - ours).max() < 1e-4
  if cfg.flavour == "llama":      # RoPE is relative: left padding needs no position_ids
    assert np.abs(_hf_scores(model, *left, positions=False) + bias - ours).max() < 1e-4
  # The exported tokenizer pads with the id HF's classifier skips.
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.pad_token_id == hf_cfg.pad_token_id

  # Back in: as a model directory, and as PPO's reward_model= / value_from= reads it.
  back = load_model(out)
  assert back.head == "scalar" and back.tokenizer_dir == out
  assert np.abs(_our_scores(back.cfg, back.params, *left) - ours).max() < 1e-5
  rm_cfg, rm_params = stage_io.load_scalar_model(out, cfg, "reward_model")
  assert np.abs(_our_scores(rm_cfg, rm_params, *left) - ours).max() < 1e-5
  from rlhf_jax import sharding
  mesh = sharding.make_mesh((2, 2, 2))      # as PPO loads it: placed on the mesh, same values
  _, placed = stage_io.load_scalar_model(out, cfg, "value_from", mesh)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), placed, rm_params)
  save_model(str(tmp_path / "native"), back.cfg, back.params, fmt="rlhf_jax", head="scalar")
  again = load_model(str(tmp_path / "native"), head="scalar")
  assert np.abs(_our_scores(again.cfg, again.params, *left) - ours).max() < 1e-5


def test_export_pad_id_never_a_real_token():
  from rlhf_jax.models import hf_reward
  from tokenizers import Tokenizer, models
  cfg = get_model_config("tiny", pad_token_id=2)      # pads with EOS, like SmolLM2
  backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, "<unk>"))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                             eos_token="</s>", pad_token="</s>", unk_token="<unk>")
  assert hf_reward.export_pad_id(cfg, tok) == 0       # the lowest special id not BOS/EOS
  tok.pad_token = "a"
  assert hf_reward.export_pad_id(cfg, tok) == 3
  assert hf_reward.export_pad_id(cfg.replace(pad_token_id=5), None) == 5
  with pytest.raises(hf_reward.UserError, match="score the token before EOS"):
    hf_reward.export_pad_id(cfg, None)


def test_fold_bias_into_layernorm():
  from rlhf_jax.models import hf_reward
  rng = np.random.RandomState(0)
  beta, w, b = rng.randn(16).astype(np.float32), rng.randn(16, 1).astype(np.float32), 1.7
  folded = hf_reward.fold_bias(beta, w, np.float32(b))
  h = rng.randn(5, 16).astype(np.float64)
  np.testing.assert_allclose((h + folded) @ w[:, 0], (h + beta) @ w[:, 0] + b, atol=1e-5)


@pytest.mark.slow
def test_reward_model_cli_export_and_bad_input(tmp_path):
  """The CLI exports an RM; wrong targets and non-reward HF directories are one line, exit 2,
  nothing written."""
  from rlhf_jax.train import stage_io
  from rlhf_jax.errors import UserError
  tmp = str(tmp_path)
  cfg, params = _random_rm("tiny")
  save_model(os.path.join(tmp, "rm"), cfg, params, fmt="rlhf_jax", head="scalar")
  lm_cfg = get_model_config("tiny")
  save_model(os.path.join(tmp, "lm"), lm_cfg, init_params(lm_cfg, jax.random.key(0)),
             fmt="rlhf_jax")
  torch.manual_seed(0)
  _hf_llama().save_pretrained(os.path.join(tmp, "hf_lm"))
  two = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                 num_labels=2, pad_token_id=0)
  transformers.LlamaForSequenceClassification(two).save_pretrained(os.path.join(tmp, "hf_2"))
  no_score = os.path.join(tmp, "no_score")
  shutil.copytree(os.path.join(tmp, "hf_lm"), no_score)
  hf_cfg = json.load(open(os.path.join(no_score, "config.json")))
  json.dump(dict(hf_cfg, architectures=["LlamaForSequenceClassification"], num_labels=1,
                 id2label={"0": "LABEL_0"}), open(os.path.join(no_score, "config.json"), "w"))

  ok = _cli("--src=rm", "--dst=rm_hf", "--head=scalar", cwd=tmp)
  assert ok.returncode == 0, ok.stderr
  assert "sequence classifier" in ok.stdout
  cases = [
      (("--src=rm", "--dst=rm_hf"), "already exists", "rm_hf"),
      (("--src=lm", "--dst=out", "--head=scalar"), "--head=scalar", "out"),
      (("--src=rm", "--dst=out", "--head=lm"), "--head=lm", "out"),
      (("--src=hf_lm", "--dst=out", "--head=scalar"), "holds a language model", "out"),
      (("--src=hf_2", "--dst=out"), "with 2 labels", "out"),
      (("--src=no_score", "--dst=out"), "no tensor 'score.weight'", "out"),
  ]
  for args, needle, dst in cases:
    before = sorted(os.listdir(tmp))
    result = _cli(*args, cwd=tmp)
    assert result.returncode == 2, (args, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, \
        (args, result.stderr)
    assert sorted(os.listdir(tmp)) == before, args   # nothing written (no out, no .out.tmp-*)
  # PPO's reward_model= / value_from= refuse a language model in one line too.
  with pytest.raises(UserError, match="config.value_from: .* expected a reward model"):
    stage_io.load_scalar_model(os.path.join(tmp, "hf_lm"), cfg, "value_from")


@pytest.mark.slow
def test_smollm2_reward_model_exports_with_a_pad_token_that_is_not_eos(smollm2, tmp_path):
  """SmolLM2 pads with EOS (<|im_end|>); the export pads with <|endoftext|>, so HF scores the
  last real token (EOS) of left-padded rows, as we do."""
  m = smollm2
  params = {k: v for k, v in m.params.items() if k != "lm_head"}
  params["scalar_head"] = {"kernel": np.random.RandomState(0).randn(m.cfg.d_model, 1).astype(
      np.float32) / np.sqrt(m.cfg.d_model), "bias": np.asarray([0.3], np.float32)}
  out = str(tmp_path / "rm")
  save_model(out, m.cfg, params, fmt="hf", tokenizer_dir=m.tokenizer_dir, head="scalar")
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert m.cfg.pad_token_id == m.cfg.eos_token_id != model.config.pad_token_id == tok.pad_token_id
  texts = [("What is 2+2?", "4"), ("Name a colour.", "Blue, like the sky.")]
  rows = [[m.cfg.bos_token_id] + tok(p + "\n" + r, add_special_tokens=False)["input_ids"]
          + [m.cfg.eos_token_id] for p, r in texts]
  width = max(map(len, rows))
  tokens = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
  mask = (np.arange(width)[None] >= width - np.array([len(r) for r in rows])[:, None]).astype(int)
  ours = _our_scores(m.cfg, params, tokens, mask)
  theirs = _hf_scores(model.eval(), tokens, mask) + model.config.rlhf_jax_score_bias
  assert np.abs(theirs - ours).max() < 1e-4, (theirs, ours)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_made_reward_model_imports(kind, tmp_path):
  """A sequence classifier saved by transformers itself (as TRL's reward models are) reads in
  as a scalar-head model that scores as transformers does."""
  torch.manual_seed(0)
  base = (_hf_gpt2() if kind == "gpt2" else _hf_llama()).config
  base.num_labels, base.pad_token_id = 1, 0
  model = transformers.AutoModelForSequenceClassification.from_config(base).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(tmp_path))
  tokens = np.random.RandomState(0).randint(3, VOCAB, (3, 10))
  mask = np.ones_like(tokens)
  mask[1, :4] = mask[2, :7] = 0
  tokens[mask == 0] = 0
  m = load_model(str(tmp_path))
  assert m.head == "scalar"
  assert np.abs(_our_scores(m.cfg, m.params, tokens, mask) - _hf_scores(model, tokens, mask)
                ).max() < 1e-4


@pytest.mark.slow
def test_ppo_from_an_exported_reward_model_equals_ppo_from_ours(tmp_path, offline_data_dir):
  """PPO-ptx with reward_model= and value_from= an exported Hugging Face sequence classifier ends
  bit-identical to the same run from our own RM directory (the import is exact)."""
  import kill_resume as kr
  tok = os.path.join(offline_data_dir, "tokenizer")
  lm = kr.save_random_model(str(tmp_path / "lm"), tok, num_layers=1)
  rm = kr.save_random_model(str(tmp_path / "rm"), tok, head="scalar", seed=1, num_layers=1)
  back = load_model(rm)
  back.params["scalar_head"]["bias"] = np.asarray([0.7], np.float32)   # a bias to carry
  save_model(str(tmp_path / "rm_b"), back.cfg, back.params, fmt="rlhf_jax", head="scalar",
             tokenizer_dir=tok)
  save_model(str(tmp_path / "rm_hf"), back.cfg, back.params, fmt="hf", head="scalar",
             tokenizer_dir=tok)
  finals = []
  for name in ("rm_b", "rm_hf"):
    path = str(tmp_path / name)
    cmd = ["-m", "rlhf_jax.main", "--config=configs/ppo_ptx.py", "--workdir={workdir}",
           "--config.pipeline=False", f"--config.data.dir={offline_data_dir}",
           f"--config.init_from={lm}", f"--config.reward_model={path}",
           f"--config.value_from={path}", "--config.model.num_layers=1",
           "--config.ppo.num_iterations=2", "--config.ppo.batch_size=16",
           "--config.ppo.minibatches=2", "--config.ppo.response_len=8",
           "--config.ppo.ptx_seq_len=32"]
    work = str(tmp_path / f"work_{name}")
    kr.run_to_completion(cmd, work)
    finals.append(kr.model_dir(work, "ppo_ptx"))
  kr.assert_same_params(*finals)
  # The reward itself (a bias lost on the way would shift it; the policy update would not see a
  # constant shift of reward and value alike).
  rewards = [[r["reward"] for r in map(json.loads, open(os.path.join(
      os.path.dirname(final), "metrics.jsonl"))) if "reward" in r] for final in finals]
  assert rewards[0] and rewards[0] == rewards[1], rewards

  # The trained value network comes out of the run's checkpoints (only params/value is read),
  # as a scalar-head model with value_from's config, and exports like a reward model.
  import orbax.checkpoint as ocp
  ckpts = os.path.join(os.path.dirname(finals[1]), "checkpoints")
  value = load_model(ckpts)
  assert value.head == "scalar" and value.cfg == load_model(str(tmp_path / "rm_hf")).cfg
  step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  with ocp.PyTreeCheckpointer() as ckptr:    # everything the checkpoint holds, as saved
    saved = ckptr.restore(os.path.join(ckpts, str(step), "state"))["params"]["value"]
  jax.tree.map(np.testing.assert_array_equal, value.params, jax.tree.map(np.asarray, saved))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), value.params,
                       back.params)
  assert max(jax.tree.leaves(moved)) > 0      # PPO trained it
  out = str(tmp_path / "value_hf")
  save_model(out, value.cfg, value.params, fmt="hf", head="scalar",
             tokenizer_dir=value.tokenizer_dir)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  rows = _rm_rows(value.cfg, model.config.pad_token_id, [12, 5], 12)
  assert np.abs(_hf_scores(model.eval(), *rows) + model.config.rlhf_jax_score_bias
                - _our_scores(value.cfg, value.params, *rows)).max() < 1e-4


def test_value_export_refuses_checkpoints_without_a_value_network(tmp_path):
  from rlhf_jax.checkpoint import CheckpointManager
  from rlhf_jax.errors import UserError
  for name, record in (("sft", {"init_from": "x"}), ("ppo", {"value_from": "auto"})):
    path = str(tmp_path / name / "checkpoints")
    with CheckpointManager(path, save_every=1) as ckpt:
      ckpt.save(1, {"params": {"w": np.zeros(2, np.float32)}}, meta={"config": record})
    with pytest.raises(UserError, match="not PPO" if name == "sft" else "rm/model"):
      load_model(path)
