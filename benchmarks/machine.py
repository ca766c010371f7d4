"""This machine's measured float32 matmul peak, the denominator of every roofline fraction.

  python benchmarks/machine.py [--n=2048] [--repeats=10]

Imported by the other benchmarks (`from machine import matmul_peak`); run on its own it prints
the peak and, last, `RESULT {json}` with matmul_peak_gflops, n, repeats, platform and
device_count.
tests/test_benchmarks.py runs it with `--n=128 --repeats=2`.
"""
import argparse
import json
import statistics
import time


def matmul_peak(repeats=10, n=2048):
  """FLOP/s of a jitted float32 `x @ x` (n x n, all cores), median of `repeats` timed calls."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048, help="matrix size")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls (median)")
  args = parser.parse_args()
  import jax
  peak = matmul_peak(args.repeats, args.n)
  print(f"matmul peak (float32 {args.n}^2, {jax.devices()[0].platform}): {peak / 1e9:.1f} GFLOP/s")
  print("RESULT " + json.dumps({"matmul_peak_gflops": peak / 1e9, "n": args.n,
                                "repeats": args.repeats, "platform": jax.devices()[0].platform,
                                "device_count": jax.device_count()}))


if __name__ == "__main__":
  main()
