"""Generation speed: rlhf_jax's sampler vs transformers `generate` vs tunix's sampler, same shapes.

  python benchmarks/generate.py [--rounds=3] [--shapes=small-b1,small-b8,small-b32,gpt2-b8]
                                [--tunix_python=/path/to/venv/bin/python]

Each measurement runs in its own subprocess (ours, transformers, tunix), interleaved round by round
(A B C A B C ...) so a busy moment on a shared machine hits all of them; the report is the median
over rounds with min-max, and each ratio is the median over rounds of the ratio within a round. Models are random-initialised GPT-2 shapes (tunix has no GPT-2: it runs
Qwen2 at the same width/depth/vocabulary). Every run generates exactly `new` tokens per row: sampling
at temperature 1, top-k/top-p off, no EOS.

Roofline: this machine's float32 matmul peak is measured in the same run (jnp.dot 2048^2, both
cores); FLOPs per generated token = 2 x (non-embedding matmul params + d_model x vocab) + attention
over the cache (4 x layers x context x d_model at the mean context). roofline_fraction =
ours tok/s x FLOPs/token / peak.

The last line is `RESULT {json}` with, per shape: ours_tok_s, hf_tok_s, tunix_tok_s, ratio_vs_hf,
ratio_vs_tunix (null when tunix is not importable), roofline_fraction.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from machine import matmul_peak  # benchmarks/machine.py (this script's folder)
from peers.worker_io import read_result  # noqa: E402

SHAPES = {
    "small-b1": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=1),
    "small-b8": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=8),
    "small-b32": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=32),
    "gpt2-b8": dict(layers=12, d_model=768, heads=12, vocab=50257, batch=8),
}
PROMPT, NEW = 64, 64
DEFAULT_TUNIX = os.path.expanduser(os.environ.get("RLHF_JAX_TUNIX_PYTHON",
                                                  "/work/peers/tunix/bin/python"))
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- workers

def _prompts(shape, seed=0):
  import numpy as np
  rng = np.random.RandomState(seed)
  return rng.randint(1, shape["vocab"], (shape["batch"], PROMPT)).astype("int32")


def worker_ours(shape, repeats):
  import jax
  import numpy as np
  from rlhf_jax.models import get_model_config, init_params
  from rlhf_jax.sampling import SamplingConfig, sample
  cfg = get_model_config("gpt2-small", num_layers=shape["layers"], d_model=shape["d_model"],
                         num_heads=shape["heads"], num_kv_heads=shape["heads"],
                         head_dim=shape["d_model"] // shape["heads"], d_ff=4 * shape["d_model"],
                         vocab_size=shape["vocab"], max_len=512)
  params = init_params(cfg, jax.random.key(0))
  tokens = _prompts(shape)
  seg = np.ones_like(tokens)
  sc = SamplingConfig(max_new_tokens=NEW, temperature=1.0, eos_token_id=None)
  out = sample(params, cfg, tokens, seg, jax.random.key(0), sc)   # compile
  out.tokens.block_until_ready()
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    out = sample(params, cfg, tokens, seg, jax.random.key(i + 1), sc)
    out.tokens.block_until_ready()
    times.append(time.perf_counter() - t)
  assert int(out.mask.sum()) == shape["batch"] * NEW
  return times


def worker_hf(shape, repeats):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=shape["layers"], n_embd=shape["d_model"], n_head=shape["heads"],
      vocab_size=shape["vocab"], n_positions=512, bos_token_id=0, eos_token_id=0)).eval()
  tokens = torch.tensor(_prompts(shape), dtype=torch.long)
  kw = dict(use_cache=True, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            min_new_tokens=NEW, max_new_tokens=NEW, pad_token_id=0,
            attention_mask=torch.ones_like(tokens))
  times = []
  with torch.no_grad():
    model.generate(tokens, **kw)      # warm-up
    for _ in range(repeats):
      t = time.perf_counter()
      out = model.generate(tokens, **kw)
      times.append(time.perf_counter() - t)
  assert out.shape[1] == PROMPT + NEW
  return times


def flops_per_token(shape):
  d, layers, v = shape["d_model"], shape["layers"], shape["vocab"]
  matmul_params = layers * 12 * d * d + d * v
  mean_context = PROMPT + NEW / 2
  return 2 * matmul_params + 4 * layers * mean_context * d


# ----------------------------------------------------------------------------- orchestration

def _run(cmd, env=None):
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
  result = read_result(r.stdout)
  if r.returncode != 0 or result is None:
    sys.stderr.write(f"[benchmark] {' '.join(cmd[:4])} failed:\n{r.stderr[-2000:]}\n")
  return result if r.returncode == 0 else None


def measure(kind, shape_name, repeats, tunix_python):
  shape = SHAPES[shape_name]
  if kind == "tunix":
    res = _run([tunix_python, os.path.join(HERE, "peers", "tunix_generate.py"),
                f"--layers={shape['layers']}", f"--d_model={shape['d_model']}",
                f"--heads={shape['heads']}", f"--kv_heads={shape['heads']}",
                f"--d_ff={4 * shape['d_model']}", f"--vocab={shape['vocab']}",
                f"--batch={shape['batch']}", f"--prompt_len={PROMPT}", f"--new_tokens={NEW}",
                f"--repeats={repeats}"])
    return None if res is None else res["tok_s"]
  res = _run([sys.executable, os.path.abspath(__file__), f"--worker={kind}",
              f"--shapes={shape_name}", f"--repeats={repeats}"],
             env=dict(os.environ, HF_HUB_OFFLINE="1"))
  return None if res is None else res["tok_s"]


def _round_ratio(res, peer):
  """Median over rounds of ours / peer measured in the same round (robust to a busy moment)."""
  pairs = [(o, p) for o, p in zip(res.get("ours", []), res.get(peer, [])) if o and p]
  return statistics.median(o / p for o, p in pairs) if pairs else None


def _fmt(values):
  if not values:
    return "n/a"
  return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per worker run")
  parser.add_argument("--tunix_python", default=DEFAULT_TUNIX)
  parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  shapes = args.shapes.split(",")

  if args.worker:
    shape = SHAPES[shapes[0]]
    times = (worker_ours if args.worker == "ours" else worker_hf)(shape, args.repeats)
    print("RESULT " + json.dumps({"tok_s": shape["batch"] * NEW / statistics.median(times),
                                  "times_s": times}))
    return

  have_tunix = os.path.exists(args.tunix_python)
  kinds = ["ours", "hf"] + (["tunix"] if have_tunix else [])
  peak = matmul_peak()
  results = {s: {k: [] for k in kinds} for s in shapes}
  for r in range(args.rounds):
    for s in shapes:
      for kind in kinds:
        tok_s = measure(kind, s, args.repeats, args.tunix_python)
        results[s][kind].append(tok_s)      # None when the run failed (kept: rounds stay aligned)
        sys.stderr.write(f"[round {r + 1}/{args.rounds}] {s} {kind}: {tok_s}\n")
  peak_after = matmul_peak()

  summary = {"matmul_peak_gflops": [round(peak / 1e9, 1), round(peak_after / 1e9, 1)]}
  print(f"\nmatmul peak (float32, 2048^2): {peak / 1e9:.0f} GFLOP/s before, "
        f"{peak_after / 1e9:.0f} after; prompt {PROMPT}, {NEW} new tokens, sampling T=1\n")
  print("| shape | ours tok/s | transformers tok/s | tunix tok/s | ours/hf | ours/tunix | roofline |")
  print("|---|---|---|---|---|---|---|")
  best_peak = max(peak, peak_after)
  for s in shapes:
    ok = {k: [x for x in v if x] for k, v in results[s].items()}
    med = {k: (statistics.median(v) if v else None) for k, v in ok.items()}
    ours, hf, tunix = med.get("ours"), med.get("hf"), med.get("tunix")
    ratio_hf = _round_ratio(results[s], "hf")
    ratio_tunix = _round_ratio(results[s], "tunix")
    roof = ours * flops_per_token(SHAPES[s]) / best_peak if ours else None
    summary[s] = {"ours_tok_s": ours, "hf_tok_s": hf, "tunix_tok_s": tunix,
                  "ratio_vs_hf": ratio_hf, "ratio_vs_tunix": ratio_tunix,
                  "roofline_fraction": roof, "rounds": results[s]}
    f = lambda x, p=2: "n/a" if x is None else f"{x:.{p}f}"
    print(f"| {s} ({SHAPES[s]['layers']}x{SHAPES[s]['d_model']}, vocab {SHAPES[s]['vocab']}, "
          f"batch {SHAPES[s]['batch']}) | {_fmt(ok['ours'])} | {_fmt(ok['hf'])} | "
          f"{_fmt(ok.get('tunix', []))} | {f(ratio_hf)} | {f(ratio_tunix)} | {f(roof, 3)} |")
  print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
  main()
