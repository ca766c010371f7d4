"""`python -m rlhf_jax.main` on ONE process whose cross-device sums go through gloo, as they do on
several processes (a one-process `jax.distributed` runtime; XLA's own in-process all-reduce adds
the devices' partial sums in another order, which moves trained weights by ~1e-7).

  python tests/one_process_gloo.py --port=P <rlhf_jax.main flags>

tests/test_multihost_pipeline.py runs the pipeline this way next to a 2-process run and compares
the two bit for bit.
"""
import os
import sys


def main():
  port = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--port="))
  argv = [a for a in sys.argv[1:] if not a.startswith("--port=")]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
  from rlhf_jax import main as rlhf_main  # pylint: disable=g-import-not-at-top
  from rlhf_jax.errors import run_cli  # pylint: disable=g-import-not-at-top
  sys.argv = ["rlhf_jax.main"] + argv
  run_cli(rlhf_main.main)


if __name__ == "__main__":
  main()
