"""This machine's measured float32 matmul peak, the denominator of every roofline fraction."""
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
