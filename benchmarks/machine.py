"""This machine's measured float32 matmul peak and memory read bandwidth: the denominators of
every roofline fraction (compute-bound phases against the peak, weight-streaming decode against
the bandwidth).

  python benchmarks/machine.py [--n=2048] [--repeats=10] [--mb=512]

Imported by the other benchmarks (`from machine import matmul_peak, read_bandwidth`); run on its
own it prints both and, last, `RESULT {json}` with matmul_peak_gflops, read_gb_s, n, mb, repeats,
platform and device_count.
tests/test_benchmarks.py runs it with `--n=128 --repeats=2 --mb=4`.
"""
import argparse
import json
import statistics
import time


def _median_seconds(f, a, repeats):
  """Median wall time of `repeats` calls f(a) (after one untimed call that compiles)."""
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak(repeats=10, n=2048):
  """FLOP/s of a jitted float32 `x @ x` (n x n, all cores), median of `repeats` timed calls."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  return 2 * n ** 3 / _median_seconds(jax.jit(lambda x: x @ x), a, repeats)


def read_bandwidth(repeats=10, mb=512):
  """Bytes/s of a jitted float32 sum over an `mb` MiB array (all cores; read once per call, far
  larger than the caches), median of `repeats` timed calls: what streaming weights can reach."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
  return a.nbytes / _median_seconds(jax.jit(jnp.sum), a, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048, help="matrix size")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls (median)")
  parser.add_argument("--mb", type=int, default=512, help="MiB read by the bandwidth probe")
  args = parser.parse_args()
  import jax
  peak = matmul_peak(args.repeats, args.n)
  bandwidth = read_bandwidth(args.repeats, args.mb)
  print(f"matmul peak (float32 {args.n}^2, {jax.devices()[0].platform}): {peak / 1e9:.1f} GFLOP/s")
  print(f"read bandwidth (float32 sum over {args.mb} MiB): {bandwidth / 1e9:.1f} GB/s")
  print("RESULT " + json.dumps({"matmul_peak_gflops": peak / 1e9, "read_gb_s": bandwidth / 1e9,
                                "mb": args.mb, "n": args.n,
                                "repeats": args.repeats, "platform": jax.devices()[0].platform,
                                "device_count": jax.device_count()}))


if __name__ == "__main__":
  main()
