"""What the SFT and RM step tests share: the optimizer configs, the meshes, a few sharded steps, and
the sharded-vs-one-device comparison."""
import jax
import ml_collections
import numpy as np
import optax

from rlhf_jax import sharding
from rlhf_jax.train import optim
from rlhf_jax.train.step import jit_train_step, make_train_step

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


def opt_config(lr=1e-4):
  return ml_collections.ConfigDict({"lr": lr, "warmup_steps": 0, "final_lr_fraction": 0.1,
                                    "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                    "grad_clip": 1.0})


def sgd(lr=0.1):
  """SGD with momentum and no clipping: every update is linear in the raw gradients (a wrong
  gradient scale moves the weights by a wrong amount, which AdamW and global-norm clipping would
  normalise away), and the momentum buffer is a per-parameter optimizer state that is sharded like
  the weights."""
  return optax.sgd(lr, momentum=0.9)


def run_train_steps(cfg, head, loss_fn, params, batches, mesh, accum, batch_size, tx=None):
  """The stage's jitted train step on `mesh` over host `batches`: (final state, step metrics).
  tx: the optimizer (default: the stages' AdamW + clipping + cosine schedule)."""
  default_tx, schedule = optim.make_optimizer(opt_config(), 10)
  tx = default_tx if tx is None else tx
  shardings = optim.state_shardings(cfg, head, tx, mesh)
  state = optim.create_state(params, tx, shardings)
  step = jit_train_step(make_train_step(loss_fn, tx, schedule, accum, mesh),
                        shardings, batches[0], mesh)
  metrics = []
  with sharding.activate(mesh):
    for i, b in enumerate(batches):
      state, m = step(state, sharding.global_batch(b, mesh, batch_size), jax.random.key(i))
      metrics.append(jax.device_get(m))
  return state, metrics


def assert_same_training(params, metrics, ref_params, ref_metrics, init, keys=("loss",),
                         rtol=2e-5):
  """Two runs of the same steps from the same `init` agree: per step the loss (and `keys`) and the
  global gradient norm to `rtol`, and per parameter the total update (params - init) to `rtol` of
  that leaf's largest reference update. With SGD a gradient off by any factor fails both."""
  assert len(metrics) == len(ref_metrics)
  for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
    for k in ("grad_norm",) + tuple(keys):
      np.testing.assert_allclose(m[k], r[k], rtol=rtol, err_msg=f"step {i} {k}")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ref_flat, init_flat = jax.tree.leaves(ref_params), jax.tree.leaves(init)
  assert len(flat) == len(ref_flat) == len(init_flat)
  for (path, p), r, p0 in zip(flat, ref_flat, init_flat):
    p0 = np.asarray(p0, np.float64)
    update, ref_update = np.asarray(p, np.float64) - p0, np.asarray(r, np.float64) - p0
    # + float32 rounding of the weights themselves (norm scales are near 1), and leaves whose
    # gradient is 0 up to rounding (the RM head's bias: the ranking loss is invariant to it)
    tol = rtol * np.abs(ref_update).max() + 4 * np.finfo(np.float32).eps * np.abs(p0).max() + 1e-8
    np.testing.assert_allclose(update, ref_update, rtol=0, atol=tol,
                               err_msg=jax.tree_util.keystr(path))
