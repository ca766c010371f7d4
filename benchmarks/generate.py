"""Generation speed: rlhf_jax's sampler vs transformers `generate` vs tunix's sampler, same shapes.

  python benchmarks/generate.py [--rounds=3] [--shapes=small-b1,small-b8,small-b32,gpt2-b8]
                                [--repeats=3] [--prompt_len=64] [--new_tokens=64]
                                [--only=ours,ours_int8,hf,tunix] [--peak_n=2048] [--bandwidth_mb=512]
                                [--tunix_python=/path/to/venv/bin/python]

Each measurement runs in its own subprocess (ours, transformers, tunix), interleaved round by round
(A B C A B C ...) so a busy moment on a shared machine hits all of them; the report is the median
over rounds with min-max, and each ratio is the median over rounds of the ratio within a round. Models are random-initialised GPT-2 shapes (tunix has no GPT-2: it runs
Qwen2 at the same width/depth/vocabulary). Every run generates exactly --new_tokens tokens per row
after a --prompt_len token prompt: sampling at temperature 1, top-k/top-p off, no EOS. A side that
is not in --only, or cannot run (transformers/torch not importable here, no tunix interpreter), is
skipped with a one-line note on stderr and null in RESULT. The shape `tiny` (1 x 32, vocabulary 64,
batch 2) is a smoke test, not a measurement: tests/test_benchmarks.py runs `--shapes=tiny
--rounds=1 --repeats=1 --prompt_len=8 --new_tokens=8 --peak_n=128` with ours only and tunix
pointed at a missing interpreter.

Sides: ours (float32, the default), ours_int8 (the opt-in int8 decoding of `generate --int8`,
rlhf_jax/models/int8.py; not exact, see tests/test_int8.py), transformers, tunix. Our weights are
prepared once before timing, as `generate` does at load (`sampling.decode_weights`: split per
layer and transposed for the feature-major decode step; int8: quantized), as the peers' models
hold theirs in the layout they decode from.

Rooflines, from machine figures measured in the same run: this machine's float32 matmul peak
(jnp.dot 2048^2, both cores; --peak_n) and its read bandwidth (a jitted sum over --bandwidth_mb
MiB, `machine.read_bandwidth`). Compute: FLOPs per generated token = 2 x (non-embedding matmul
params + d_model x vocab) + attention over the cache (4 x layers x context x d_model at the mean
context); roofline_fraction = ours tok/s x FLOPs/token / peak. Bandwidth: a decode step reads
every matmul weight once (4 bytes, 1 for int8) and the KV cache at the mean context
(`bytes_per_step`); bandwidth_roofline_fraction = ours tok/s / (batch x bandwidth / bytes per
step), and int8_bandwidth_roofline_fraction the same for ours_int8 with its 1-byte weights.
These whole-call figures mix the two phases (tok/s counts the prefill's time too), so ours is
also timed per phase: the prefill alone (the same call with one new token; FLOPs in
`prefill_flops`) against the compute roofline, and a decode step, (call - prefill) / (new
tokens - 1), against the bandwidth roofline.

The last line is `RESULT {json}` with matmul_peak_gflops [before, after], read_gb_s and, per
shape name: ours_tok_s, ours_int8_tok_s, hf_tok_s, tunix_tok_s, ratio_vs_hf, ratio_vs_tunix,
int8_ratio_vs_hf, int8_ratio_vs_tunix (each null when a side did not run), roofline_fraction,
bandwidth_roofline_fraction, int8_bandwidth_roofline_fraction, bytes_per_step, rounds, and
ours_phases / ours_int8_phases: prefill_s, decode_step_s, prefill_roofline_fraction,
decode_bandwidth_roofline_fraction.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from machine import matmul_peak, read_bandwidth  # benchmarks/machine.py (this script's folder)
from peers.worker_io import read_result  # noqa: E402

SHAPES = {
    "small-b1": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=1),
    "small-b8": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=8),
    "small-b32": dict(layers=4, d_model=256, heads=4, vocab=8192, batch=32),
    "gpt2-b8": dict(layers=12, d_model=768, heads=12, vocab=50257, batch=8),
    "tiny": dict(layers=1, d_model=32, heads=2, vocab=64, batch=2),
}
SIDES = ("ours", "ours_int8", "hf", "tunix")
DEFAULT_TUNIX = os.path.expanduser(os.environ.get("RLHF_JAX_TUNIX_PYTHON",
                                                  "/work/peers/tunix/bin/python"))
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- workers

def _prompts(shape, prompt_len, seed=0):
  import numpy as np
  rng = np.random.RandomState(seed)
  return rng.randint(1, shape["vocab"], (shape["batch"], prompt_len)).astype("int32")


def worker_ours(shape, repeats, prompt_len, new, dtype=""):
  """(seconds per call, seconds per prefill-only call) of our sampler on weights prepared once
  beforehand (`sampling.decode_weights`, as `generate` does at load); dtype 'int8': quantized
  (`generate --int8`)."""
  import jax
  import numpy as np
  from rlhf_jax.models import get_model_config, init_params
  from rlhf_jax.sampling import SamplingConfig, decode_weights, sample
  cfg = get_model_config("gpt2-small", num_layers=shape["layers"], d_model=shape["d_model"],
                         num_heads=shape["heads"], num_kv_heads=shape["heads"],
                         head_dim=shape["d_model"] // shape["heads"], d_ff=4 * shape["d_model"],
                         vocab_size=shape["vocab"], max_len=max(512, prompt_len + new))
  # Prepared once before timing, as `generate` does at load: split per layer, transposed for the
  # feature-major step (int8: quantized).
  cfg, params = decode_weights(init_params(cfg, jax.random.key(0)), cfg, dtype)
  tokens = _prompts(shape, prompt_len)
  seg = np.ones_like(tokens)
  sc = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_token_id=None)

  def timed(sc):
    """Seconds of `repeats` calls (after one that compiles) and the last call's samples."""
    sample(params, cfg, tokens, seg, jax.random.key(0), sc).tokens.block_until_ready()
    times = []
    for i in range(repeats):
      t = time.perf_counter()
      out = sample(params, cfg, tokens, seg, jax.random.key(i + 1), sc)
      out.tokens.block_until_ready()
      times.append(time.perf_counter() - t)
    return times, out
  times, out = timed(sc)
  assert int(out.mask.sum()) == shape["batch"] * new
  # The prefill alone: the same call with one new token (prefill + choosing it, no decode step).
  return times, timed(dataclasses.replace(sc, max_new_tokens=1))[0]


def worker_hf(shape, repeats, prompt_len, new):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=shape["layers"], n_embd=shape["d_model"], n_head=shape["heads"],
      vocab_size=shape["vocab"], n_positions=max(512, prompt_len + new), bos_token_id=0,
      eos_token_id=0)).eval()
  tokens = torch.tensor(_prompts(shape, prompt_len), dtype=torch.long)
  kw = dict(use_cache=True, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            min_new_tokens=new, max_new_tokens=new, pad_token_id=0,
            attention_mask=torch.ones_like(tokens))
  times = []
  with torch.no_grad():
    model.generate(tokens, **kw)      # warm-up
    for _ in range(repeats):
      t = time.perf_counter()
      out = model.generate(tokens, **kw)
      times.append(time.perf_counter() - t)
  assert out.shape[1] == prompt_len + new
  return times


def bytes_per_step(shape, prompt_len, new, weight_bytes=4):
  """Bytes one decode step must read: every matmul weight once (`weight_bytes` each: 4 float32,
  1 int8) and the float32 KV cache at the mean context, 2 x layers x batch x context x d_model."""
  d, layers, v = shape["d_model"], shape["layers"], shape["vocab"]
  weights = (layers * 12 * d * d + d * v) * weight_bytes
  return weights + 2 * layers * shape["batch"] * (prompt_len + new / 2) * d * 4


def prefill_flops(shape, prompt_len):
  """FLOPs of the prefill: every prompt token through the layers' matmuls and causal attention
  (2 x layers x prompt_len x d_model per token on average, scores and values), the LM head at
  the last position only (all the first new token needs)."""
  d, layers, v, b = shape["d_model"], shape["layers"], shape["vocab"], shape["batch"]
  per_token = 2 * layers * 12 * d * d + 2 * layers * prompt_len * d
  return b * prompt_len * per_token + b * 2 * d * v


def flops_per_token(shape, prompt_len, new):
  d, layers, v = shape["d_model"], shape["layers"], shape["vocab"]
  matmul_params = layers * 12 * d * d + d * v
  mean_context = prompt_len + new / 2
  return 2 * matmul_params + 4 * layers * mean_context * d


# ----------------------------------------------------------------------------- orchestration

def _run(cmd, env=None):
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
  result = read_result(r.stdout)
  if r.returncode != 0 or result is None:
    sys.stderr.write(f"[benchmark] {' '.join(cmd[:4])} failed:\n{r.stderr[-2000:]}\n")
  return result if r.returncode == 0 else None


PROBES = {"hf": "import torch, transformers; transformers.GPT2LMHeadModel"}


def probe(kind, tunix_python):
  """None when side `kind` can run here, else a one-line reason."""
  if kind == "tunix":
    return None if os.path.exists(tunix_python) else f"interpreter {tunix_python} not found"
  if kind not in PROBES:
    return None
  r = subprocess.run([sys.executable, "-c", PROBES[kind]], capture_output=True, text=True,
                     env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
  if r.returncode != 0:
    lines = r.stderr.strip().splitlines()
    return f"`{PROBES[kind]}` failed: {lines[-1] if lines else 'no output'}"
  return None


def measure(kind, shape_name, repeats, tunix_python, prompt_len, new):
  """The worker's result ({'tok_s', ...; ours also 'prefill_s', 'decode_step_s'}) or None."""
  shape = SHAPES[shape_name]
  if kind == "tunix":
    return _run([tunix_python, os.path.join(HERE, "peers", "tunix_generate.py"),
                 f"--layers={shape['layers']}", f"--d_model={shape['d_model']}",
                 f"--heads={shape['heads']}", f"--kv_heads={shape['heads']}",
                 f"--d_ff={4 * shape['d_model']}", f"--vocab={shape['vocab']}",
                 f"--batch={shape['batch']}", f"--prompt_len={prompt_len}",
                 f"--new_tokens={new}", f"--repeats={repeats}"])
  return _run([sys.executable, os.path.abspath(__file__), f"--worker={kind}",
               f"--shapes={shape_name}", f"--repeats={repeats}", f"--prompt_len={prompt_len}",
               f"--new_tokens={new}"],
              env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _round_ratio(res, peer, side="ours"):
  """Median over rounds of side / peer measured in the same round (robust to a busy moment)."""
  pairs = [(o, p) for o, p in zip(res.get(side, []), res.get(peer, [])) if o and p]
  return statistics.median(o / p for o, p in pairs) if pairs else None


def _fmt(values):
  if not values:
    return "n/a"
  return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="small-b1,small-b8,small-b32,gpt2-b8")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per worker run")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--only", default=",".join(SIDES), help="comma list of ours,hf,tunix")
  parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak matmul")
  parser.add_argument("--bandwidth_mb", type=int, default=512,
                      help="MiB read by the bandwidth probe (machine.read_bandwidth)")
  parser.add_argument("--tunix_python", default=DEFAULT_TUNIX)
  parser.add_argument("--worker", choices=["ours", "ours_int8", "hf"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  shapes = args.shapes.split(",")
  unknown = sorted(set(shapes) - set(SHAPES))
  if unknown:
    parser.error(f"--shapes: unknown shape(s) {unknown}; expected a comma list of {list(SHAPES)}")
  new = args.new_tokens

  if args.worker:
    shape = SHAPES[shapes[0]]
    if args.worker == "hf":
      times = worker_hf(shape, args.repeats, args.prompt_len, new)
      print("RESULT " + json.dumps({"tok_s": shape["batch"] * new / statistics.median(times),
                                    "times_s": times}))
    else:
      times, prefill = worker_ours(shape, args.repeats, args.prompt_len, new,
                                   "int8" if args.worker == "ours_int8" else "")
      call, pre = statistics.median(times), statistics.median(prefill)
      # a decode step: what the call takes beyond the prefill, per further token
      print("RESULT " + json.dumps({"tok_s": shape["batch"] * new / call, "times_s": times,
                                    "prefill_s": pre,
                                    "decode_step_s": (call - pre) / max(new - 1, 1)}))
    return

  wanted = [k.strip() for k in args.only.split(",") if k.strip()]
  unknown = sorted(set(wanted) - set(SIDES))
  if unknown:
    parser.error(f"--only: unknown side(s) {unknown}; expected a comma list of {list(SIDES)}")
  kinds = []
  for kind in SIDES:
    if kind not in wanted:
      continue
    reason = probe(kind, args.tunix_python)
    if reason:
      sys.stderr.write(f"[benchmark] {kind} not available: {reason}\n")
    else:
      kinds.append(kind)
  peak = matmul_peak(n=args.peak_n)
  bandwidth = read_bandwidth(mb=args.bandwidth_mb)
  results = {s: {k: [] for k in kinds} for s in shapes}
  phases = {s: {k: [] for k in kinds if k.startswith("ours")} for s in shapes}
  for r in range(args.rounds):
    for s in shapes:
      for kind in kinds:
        res = measure(kind, s, args.repeats, args.tunix_python, args.prompt_len, new)
        tok_s = res and res["tok_s"]
        results[s][kind].append(tok_s)      # None when the run failed (kept: rounds stay aligned)
        if res and kind in phases[s]:
          phases[s][kind].append((res["prefill_s"], res["decode_step_s"]))
        sys.stderr.write(f"[round {r + 1}/{args.rounds}] {s} {kind}: {tok_s}\n")
  peak_after = matmul_peak(n=args.peak_n)

  summary = {"matmul_peak_gflops": [round(peak / 1e9, 1), round(peak_after / 1e9, 1)],
             "read_gb_s": round(bandwidth / 1e9, 2)}
  print(f"\nmatmul peak (float32, {args.peak_n}^2): {peak / 1e9:.0f} GFLOP/s before, "
        f"{peak_after / 1e9:.0f} after; read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt "
        f"{args.prompt_len}, {new} new tokens, sampling T=1\n")
  print("| shape | ours tok/s | ours int8 tok/s | transformers tok/s | tunix tok/s | ours/hf | "
        "ours/tunix | int8/hf | int8/tunix | compute roofline | bandwidth roofline (int8) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  best_peak = max(peak, peak_after)
  for s in shapes:
    ok = {k: [x for x in v if x] for k, v in results[s].items()}
    med = {k: (statistics.median(v) if v else None) for k, v in ok.items()}
    ours, hf, tunix = med.get("ours"), med.get("hf"), med.get("tunix")
    ours8 = med.get("ours_int8")
    ratio_hf = _round_ratio(results[s], "hf")
    ratio_tunix = _round_ratio(results[s], "tunix")
    shape = SHAPES[s]
    roof = ours * flops_per_token(shape, args.prompt_len, new) / best_peak if ours else None
    # tokens/s if every step read its bytes at the measured bandwidth: batch x bandwidth / bytes
    bw_roof = (ours * bytes_per_step(shape, args.prompt_len, new) / (shape["batch"] * bandwidth)
               if ours else None)
    bw_roof8 = (ours8 * bytes_per_step(shape, args.prompt_len, new, 1) /
                (shape["batch"] * bandwidth) if ours8 else None)
    summary[s] = {"ours_tok_s": ours, "ours_int8_tok_s": ours8, "hf_tok_s": hf,
                  "tunix_tok_s": tunix, "ratio_vs_hf": ratio_hf, "ratio_vs_tunix": ratio_tunix,
                  "int8_ratio_vs_hf": _round_ratio(results[s], "hf", "ours_int8"),
                  "int8_ratio_vs_tunix": _round_ratio(results[s], "tunix", "ours_int8"),
                  "roofline_fraction": roof, "bandwidth_roofline_fraction": bw_roof,
                  "int8_bandwidth_roofline_fraction": bw_roof8,
                  "bytes_per_step": bytes_per_step(shape, args.prompt_len, new),
                  "rounds": results[s]}
    for kind, weight_bytes in (("ours", 4), ("ours_int8", 1)):   # our two phases
      done = phases[s].get(kind)
      if done:
        pre = statistics.median(p for p, _ in done)
        step = statistics.median(d for _, d in done)
        summary[s][f"{kind}_phases"] = {
            "prefill_s": pre, "decode_step_s": step,
            "prefill_roofline_fraction": prefill_flops(shape, args.prompt_len) / (pre * best_peak),
            "decode_bandwidth_roofline_fraction": (
                bytes_per_step(shape, args.prompt_len, new, weight_bytes) / (step * bandwidth))}
    f = lambda x, p=2: "n/a" if x is None else f"{x:.{p}f}"
    print(f"| {s} ({shape['layers']}x{shape['d_model']}, vocab {shape['vocab']}, "
          f"batch {shape['batch']}) | {_fmt(ok.get('ours', []))} | "
          f"{_fmt(ok.get('ours_int8', []))} | {_fmt(ok.get('hf', []))} | "
          f"{_fmt(ok.get('tunix', []))} | {f(ratio_hf)} | {f(ratio_tunix)} | "
          f"{f(summary[s]['int8_ratio_vs_hf'])} | {f(summary[s]['int8_ratio_vs_tunix'])} | "
          f"{f(roof, 3)} | {f(bw_roof, 3)} ({f(bw_roof8, 3)}) |")
  print("\nPer phase (ours, median over rounds): the prefill (a call with one new token) against "
        "the compute roofline, a decode step ((call - prefill) / (new tokens - 1)) against the "
        "bandwidth roofline\n")
  print("| shape | side | prefill ms | of the matmul peak | decode step ms | of the read bandwidth |")
  print("|---|---|---|---|---|---|")
  for s in shapes:
    for kind in ("ours", "ours_int8"):
      ph = summary[s].get(f"{kind}_phases")
      if ph:
        print(f"| {s} | {kind} | {1e3 * ph['prefill_s']:.1f} | "
              f"{ph['prefill_roofline_fraction']:.3f} | {1e3 * ph['decode_step_s']:.2f} | "
              f"{ph['decode_bandwidth_roofline_fraction']:.3f} |")
  print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
  main()
