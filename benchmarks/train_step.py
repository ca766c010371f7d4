"""Achieved FLOP/s of the SFT and reward-model train steps as a fraction of this machine's matmul peak.

  python benchmarks/train_step.py [--shapes=4x256,gpt2-small] [--repeats=3] [--seq_len=512]
                                  [--peak_n=2048]

The steps are the real ones (`rlhf_jax.train.step.make_train_step` with the SFT / RM losses,
AdamW, jitted with shardings and donated state) on one device (all cores), random GPT-2 shapes:
  4x256        4 layers x 256, 4 heads, vocabulary 8192 (benchmarks/generate.py's small shape)
  gpt2-small   12 x 768, 12 heads, vocabulary 50257
  tiny         1 x 32, 2 heads, vocabulary 64 (a smoke test, not a measurement:
               `--shapes=tiny --seq_len=16 --repeats=1 --peak_n=128`, tests/test_benchmarks.py)
Batches: SFT rows of seq_len tokens (one packed segment each, loss on every token); RM prompts with
K = 2 responses of seq_len tokens each (B*K sequences forwarded once). No dropout.

FLOPs per step = 6 x N_matmul x tokens + 12 x layers x T^2 x d_model per sequence (attention
scores and values, forward + backward), where N_matmul counts the weights used in matmuls: the
layers' projections, plus the tied unembedding (d x V) for SFT or the scalar head (d x 1) for RM.
Peak = float32 `jnp.dot` of two 2048^2 matrices (--peak_n sets the size), timed in the same run
(median), before and after the steps; the larger is used.
fraction_of_peak = FLOPs per step / step time (median) / peak.

Where time goes: each step is also timed as forward only (the loss), forward + backward
(value_and_grad) and the full step, so backward = grad - forward and optimizer = step - grad; for
SFT the LM head + cross-entropy (forward + backward on fixed hidden states) is timed on its own.

Last line: `RESULT {json}` with peak_gflops, seq_len, fraction_of_peak {"<shape>/<sft|rm>": x} and
details {"<shape>/<sft|rm>": {fraction_of_peak, step_s, tflops, flops, sequences, compile_s,
forward_s, forward_backward_s, backward_s, backward_over_forward, optimizer_s, and for SFT
lm_head_and_loss_s}}.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from machine import matmul_peak  # benchmarks/machine.py (this script's folder)

SHAPES = {
    "4x256": dict(layers=4, d_model=256, heads=4, vocab=8192, sft_batch=8, rm_prompts=4),
    "gpt2-small": dict(layers=12, d_model=768, heads=12, vocab=50257, sft_batch=4, rm_prompts=2),
    "tiny": dict(layers=1, d_model=32, heads=2, vocab=64, sft_batch=2, rm_prompts=2),
}
K = 2


def model_config(shape, seq_len):
  from rlhf_jax.models import get_model_config
  d = shape["d_model"]
  return get_model_config("gpt2-small", num_layers=shape["layers"], d_model=d,
                          num_heads=shape["heads"], num_kv_heads=shape["heads"],
                          head_dim=d // shape["heads"], d_ff=4 * d, vocab_size=shape["vocab"],
                          max_len=max(seq_len, 1024))


def step_flops(cfg, kind, sequences, seq_len):
  d, L = cfg.d_model, cfg.num_layers
  per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim  # q, k, v
  per_layer += cfg.num_heads * cfg.head_dim * d + 2 * d * cfg.d_ff       # o, up, down
  head = d * cfg.vocab_size if kind == "sft" else d
  n_matmul = L * per_layer + head
  tokens = sequences * seq_len
  return 6 * n_matmul * tokens + 12 * L * seq_len ** 2 * d * sequences


def sft_batch(cfg, rows, seq_len, rng):
  tokens = rng.integers(3, cfg.vocab_size, size=(rows, seq_len)).astype(np.int32)
  ones = np.ones((rows, seq_len), np.int32)
  pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
  return {"tokens": tokens, "segment_ids": ones, "positions": pos,
          "loss_mask": ones.astype(np.float32)}


def rm_batch(cfg, prompts, seq_len, rng):
  tokens = rng.integers(3, cfg.vocab_size, size=(prompts, K, seq_len)).astype(np.int32)
  ones = np.ones((prompts, K, seq_len), np.int32)
  pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ones.shape).copy()
  return {"tokens": tokens, "segment_ids": ones, "positions": pos,
          "last_index": np.full((prompts, K), seq_len - 1, np.int32),
          "ranks": np.tile(np.arange(K, dtype=np.int32), (prompts, 1)),
          "response_valid": np.ones((prompts, K), np.float32)}


def bench_step(cfg, kind, batch, repeats):
  import ml_collections
  from rlhf_jax import sharding
  from rlhf_jax.models import init_params
  from rlhf_jax.train import optim, rm, sft
  from rlhf_jax.train.step import jit_train_step, make_train_step
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  opt = ml_collections.ConfigDict({"lr": 1e-4, "warmup_steps": 0, "final_lr_fraction": 0.1,
                                   "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                   "grad_clip": 1.0})
  head = "lm" if kind == "sft" else "scalar"
  loss_fn = (sft if kind == "sft" else rm).make_loss_fn(cfg)
  tx, schedule = optim.make_optimizer(opt, 1000)
  shardings = optim.state_shardings(cfg, head, tx, mesh)
  state = optim.create_state(init_params(cfg, jax.random.key(0), head), tx, shardings)
  step = jit_train_step(make_train_step(loss_fn, tx, schedule, 1, mesh), shardings, batch, mesh)
  rng = jax.random.key(1)
  out = {}
  with sharding.activate(mesh):
    gbatch = sharding.global_batch(batch, mesh, len(batch["tokens"]))
    holder = {"state": state}

    def run_step():
      holder["state"], metrics = step(holder["state"], gbatch, rng)
      return metrics
    t0 = time.perf_counter()
    jax.block_until_ready(run_step())
    out["compile_s"] = time.perf_counter() - t0
    fwd = jax.jit(lambda p, b: loss_fn(p, b, rng)[0])
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, rng)[0]))
    parts = {"step_s": run_step,
             "forward_s": lambda: fwd(holder["state"]["params"], gbatch),
             "forward_backward_s": lambda: grad(holder["state"]["params"], gbatch)}
    if kind == "sft":
      from rlhf_jax import losses
      h = jax.random.normal(jax.random.key(2), batch["tokens"].shape + (cfg.d_model,))

      def head_loss(e, h):
        logits = jnp.einsum("btd,vd->btv", h, e, preferred_element_type=jnp.float32)
        return losses.lm_loss(logits, gbatch["tokens"], gbatch["loss_mask"])[0]
      head_grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
      parts["lm_head_and_loss_s"] = lambda: head_grad(holder["state"]["params"]["embed"], h)
    for fn in parts.values():        # compile everything first
      jax.block_until_ready(fn())
    # Interleaved (step, forward, grad, ...) x repeats, so a busy moment on a shared machine hits
    # every part alike; medians.
    times = {name: [] for name in parts}
    for _ in range(repeats):
      for name, fn in parts.items():
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t)
    out.update({name: statistics.median(v) for name, v in times.items()})
    out["backward_s"] = out["forward_backward_s"] - out["forward_s"]
    out["backward_over_forward"] = out["backward_s"] / out["forward_s"]
    out["optimizer_s"] = out["step_s"] - out["forward_backward_s"]
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4x256,gpt2-small")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak matmul")
  args = parser.parse_args()
  unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
  if unknown:
    parser.error(f"--shapes: unknown shape(s) {unknown}; expected a comma list of {list(SHAPES)}")
  peak = matmul_peak(n=args.peak_n)
  print(f"matmul peak (float32 {args.peak_n}^2, {jax.device_count()} device, "
        f"{jax.devices()[0].platform}): "
        f"{peak / 1e9:.1f} GFLOP/s", flush=True)
  rng = np.random.default_rng(0)
  results = {}
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    cfg = model_config(shape, args.seq_len)
    for kind in ("sft", "rm"):
      if kind == "sft":
        batch = sft_batch(cfg, shape["sft_batch"], args.seq_len, rng)
        sequences = shape["sft_batch"]
      else:
        batch = rm_batch(cfg, shape["rm_prompts"], args.seq_len, rng)
        sequences = shape["rm_prompts"] * K
      r = bench_step(cfg, kind, batch, args.repeats)
      flops = step_flops(cfg, kind, sequences, args.seq_len)
      r.update(flops=flops, sequences=sequences, tflops=flops / r["step_s"] / 1e12)
      results[f"{name}/{kind}"] = r
      print(f"{name} {kind}: {sequences} x {args.seq_len} tokens, step {r['step_s']:.3f} s "
            f"(forward {r['forward_s']:.3f}, backward {r['backward_s']:.3f} = "
            f"{r['backward_over_forward']:.2f} x forward, optimizer "
            f"{r['optimizer_s']:.3f}"
            + (f", LM head + loss fwd+bwd {r['lm_head_and_loss_s']:.3f}" if kind == "sft" else "")
            + f"), {flops / r['step_s'] / 1e9:.1f} GFLOP/s", flush=True)
  peak_after = matmul_peak(n=args.peak_n)
  best = max(peak, peak_after)
  print(f"matmul peak after: {peak_after / 1e9:.1f} GFLOP/s; using {best / 1e9:.1f}")
  print("\n| shape | step | step s | GFLOP/s | fraction of peak | backward / forward |\n"
        "|---|---|---|---|---|---|")
  summary = {"peak_gflops": best / 1e9, "seq_len": args.seq_len, "fraction_of_peak": {}}
  for key, r in results.items():
    r["fraction_of_peak"] = r["flops"] / r["step_s"] / best
    summary["fraction_of_peak"][key] = round(r["fraction_of_peak"], 4)
    shape, kind = key.split("/")
    print(f"| {shape} | {kind} | {r['step_s']:.3f} | {r['flops'] / r['step_s'] / 1e9:.1f} | "
          f"{r['fraction_of_peak']:.1%} | {r['backward_over_forward']:.2f} |")
  summary["details"] = {k: {n: (round(v, 4) if isinstance(v, float) else v) for n, v in r.items()}
                        for k, r in results.items()}
  print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
  main()
