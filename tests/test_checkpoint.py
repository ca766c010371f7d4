"""Checkpoints: full state round trip, restore onto another mesh, bit-identical resume, keep/every,
atomicity (interrupted saves are ignored), refusal of foreign directories and mismatched models."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multihost_worker as w
from rlhf_jax import checkpoint, sharding
from rlhf_jax.errors import UserError


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if checkpoint._is_key(x) else x),
                      tree)


def _assert_identical(a, b):
  for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
    np.testing.assert_array_equal(x, y)


def _target(mesh):
  cfg, tx = w.model_config(), w.optimizer()
  shardings = w.state_shardings(cfg, tx, mesh)
  abstract = jax.eval_shape(lambda: w.init_state(cfg, tx, shardings))
  return sharding.abstract_with_sharding(abstract, shardings)


@pytest.mark.slow
def test_save_222_restore_181_and_resume(tmp_path):
  mesh_a = sharding.make_mesh((2, 2, 2))
  mesh_b = sharding.make_mesh((1, 8, 1))
  state, _ = w.run(mesh_a, 2)
  saved = _host(state)
  with checkpoint.CheckpointManager(str(tmp_path / "ckpt"), save_every=2, keep=2) as mngr:
    assert mngr.save(2, state, meta={"data": {"next_batch": 2}, "kl_coef": 0.02})
    # The save is asynchronous; the state can be donated to the next step at once.
    state, losses = w.run(mesh_a, 2, start_state=state, start=2)
    final = _host(state)

  mngr = checkpoint.CheckpointManager(str(tmp_path / "ckpt"))
  assert mngr.latest_step() == 2
  assert mngr.read_meta() == {"data": {"next_batch": 2}, "kl_coef": 0.02}
  restored, meta = mngr.restore(_target(mesh_b))
  _assert_identical(restored, saved)
  assert checkpoint._is_key(restored["rng"])
  kernel = restored["params"]["layers"]["mlp"]["up"]["kernel"]          # (layers, embed, mlp)
  assert kernel.sharding.mesh.shape == mesh_b.shape
  assert kernel.addressable_shards[0].data.shape == (2, 64 // 8, 192)
  mu = restored["opt_state"][0].mu["layers"]["mlp"]["up"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (2, 64 // 8, 192)

  # Same mesh: resuming is bit-identical to never having stopped.
  again, _ = mngr.restore(_target(mesh_a))
  again, losses_again = w.run(mesh_a, 2, start_state=again, start=meta["data"]["next_batch"])
  assert losses_again == losses
  _assert_identical(again, final)
  # Other mesh: the same run up to float32 reduction order.
  other, losses_other = w.run(mesh_b, 2, start_state=restored, start=2)
  np.testing.assert_allclose(losses_other, losses, atol=1e-5)
  for x, y in zip(jax.tree.leaves(_host(other["params"])), jax.tree.leaves(final["params"])):
    np.testing.assert_allclose(x, y, atol=1e-5)
  mngr.close()


def _small_state(mesh):
  rep = sharding.replicated(mesh)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  return {"w": jax.device_put(jnp.arange(16.0), row), "step": jax.device_put(jnp.int32(0), rep),
          "rng": jax.random.key(3)}


def test_every_n_keep_k_and_interrupted_saves_are_ignored(tmp_path):
  mesh = sharding.make_mesh((1, 8, 1))
  state = _small_state(mesh)
  directory = tmp_path / "ckpt"
  with checkpoint.CheckpointManager(str(directory), save_every=2, keep=2) as mngr:
    started = [mngr.save(s, dict(state, step=jnp.int32(s)), meta={"pos": s}) for s in range(1, 7)]
    assert started == [False, True, False, True, False, True]
    mngr.wait()
    assert mngr.all_steps() == [4, 6]
  # A crash in the middle of saving step 8: orbax had written everything into the tmp directory
  # but never renamed it. It must not count as a checkpoint.
  os.system(f"cp -r {directory / '6'} {directory / '8.orbax-checkpoint-tmp-1234567'}")
  # A save step directory that was never finished: only the tmp name exists, nothing else.
  (directory / "10.orbax-checkpoint-tmp-7654321").mkdir()
  mngr = checkpoint.CheckpointManager(str(directory), save_every=2, keep=2)
  assert mngr.latest_step() == 6 and mngr.all_steps() == [4, 6]
  restored, meta = mngr.restore(state)
  assert meta == {"pos": 6} and int(restored["step"]) == 6
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0))
  mngr.close()


def test_refuses_directory_that_is_not_ours(tmp_path):
  (tmp_path / "notes.txt").write_text("my experiment")
  with pytest.raises(UserError, match="not an rlhf_jax checkpoint directory") as e:
    checkpoint.CheckpointManager(str(tmp_path))
  assert "\n" not in str(e.value)
  (tmp_path / checkpoint.MARKER).write_text("{}")
  with pytest.raises(UserError, match="marker"):
    checkpoint.CheckpointManager(str(tmp_path))


def test_restore_into_a_different_model_is_a_user_error(tmp_path):
  mesh = sharding.make_mesh((1, 8, 1))
  state = _small_state(mesh)
  with checkpoint.CheckpointManager(str(tmp_path), async_save=False) as mngr:
    mngr.save(1, state, force=True)
    wrong = dict(jax.eval_shape(lambda: state), w=jax.ShapeDtypeStruct((32,), jnp.float32))
    with pytest.raises(UserError, match=r"\['w'\] is float32\(16,\) in the checkpoint, "
                       r"float32\(32,\) expected") as e:
      mngr.restore(wrong)
    assert "\n" not in str(e.value)
    missing = dict(jax.eval_shape(lambda: state), ema=jax.ShapeDtypeStruct((16,), jnp.float32))
    with pytest.raises(UserError, match=r"no \['ema'\]"):
      mngr.restore(missing)
