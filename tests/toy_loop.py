"""A stage of the real training loop (`loop.run_loop`) with a toy step: known losses, no model, so
the console, metrics.jsonl, TensorBoard and W&B outputs of a stage can be checked in seconds.

  python tests/toy_loop.py <workdir> <num_steps> <log_every> [<wandb project> <wandb mode>]

runs it as a script (tests/test_logs.py puts its stderr on a pseudo-terminal). The loss of step s
(1-based) is 1 / s; an evaluation (eval_every) after s steps reports eval loss 2 / max(s, 1).
"""
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rlhf_jax import sharding  # noqa: E402  pylint: disable=g-import-not-at-top
from rlhf_jax.train import loop  # noqa: E402  pylint: disable=g-import-not-at-top


class Batches:
  """Batch i is {'x': i + 1}; resumable like the stages' loaders."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return {"x": float(self.i)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def step(state, batch, rng):
  del rng
  new = {"params": {"w": state["params"]["w"] + 1.0}}
  return new, {"loss": jnp.float32(1.0 / batch["x"]), "nonfinite": jnp.float32(0.0)}


def config(project="", mode=""):
  """The fields of a stage config the loop reads (W&B's section as configs/models.py has it)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_nonfinite_steps = 3
  c.wandb = ml_collections.ConfigDict({"project": project, "entity": "", "name": "toyrun",
                                       "mode": mode})
  return c


def run(workdir, num_steps, log_every, project="", mode="", eval_every=0):
  """Runs stage 'toy' under `workdir`; returns (state, last eval, history)."""
  c = config(project, mode)
  task = loop.Task(name="toy", step=step, train_batches=Batches, rng=jax.random.key(0),
                   record=loop.config_record(c), config=c,
                   evaluate=lambda params: {"loss": 2.0 / max(float(params["w"]), 1.0)})
  cadence = loop.Cadence(num_steps=num_steps, log_every=log_every, checkpoint_every=10_000,
                         keep_checkpoints=1, max_nonfinite_steps=3, eval_every=eval_every)
  state = {"params": {"w": jnp.float32(0.0)}}
  return loop.run_loop(task, state, cadence, workdir, sharding.make_mesh((1, 1, 1),
                                                                 jax.devices()[:1]))


if __name__ == "__main__":
  run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
