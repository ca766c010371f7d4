"""What the SFT and RM step tests share: the optimizer config, the meshes, a few sharded steps."""
import jax
import ml_collections

from rlhf_jax import sharding
from rlhf_jax.train import common

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def opt_config(lr=1e-4):
  return ml_collections.ConfigDict({"lr": lr, "warmup_steps": 0, "final_lr_fraction": 0.1,
                                    "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                    "grad_clip": 1.0})


def run_train_steps(cfg, head, loss_fn, params, batches, mesh, accum, batch_size):
  """The stage's jitted train step on `mesh` over host `batches`: (final state, step metrics)."""
  tx, schedule = common.make_optimizer(opt_config(), 10)
  shardings = common.state_shardings(cfg, head, tx, mesh)
  state = common.create_state(params, tx, shardings)
  step = common.jit_train_step(common.make_train_step(loss_fn, tx, schedule, accum, mesh),
                               shardings, batches[0], mesh)
  metrics = []
  with sharding.activate(mesh):
    for i, b in enumerate(batches):
      state, m = step(state, sharding.global_batch(b, mesh, batch_size), jax.random.key(i))
      metrics.append(jax.device_get(m))
  return state, metrics
