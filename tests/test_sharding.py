"""Mesh construction, the rule table, and a real sharded train step on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import multihost_worker as w
from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import Transformer, abstract_params, get_model_config

STEPS = 2


def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh((1, -1, 2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.make_mesh("2,2,2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh({"shape": (-1, 1, 1)}).shape)["data"] == 8
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert mesh.devices.size == 1
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  for bad, match in [((2, 2), "expected 3 sizes"), ((3, -1, 1), "multiple of 3 devices"),
                     ((2, 2, 1), "4 slots but there are 8"), ("1,x,1", "three integers"),
                     ((-1, -1, 1), "at most one -1"), ((0, 8, 1), "positive")]:
    with pytest.raises(UserError, match=match) as e:
      sharding.make_mesh(bad)
    assert str(e.value).startswith("mesh.shape:") and "\n" not in str(e.value)


def test_rule_table_and_divisibility_fallback():
  mesh = (1, 4, 2)
  assert sharding.resolve_spec((2, 64, 4, 16), ("layers", "embed", "heads", "head_dim"), mesh)[0] \
      == P(None, "fsdp", "tensor")
  assert sharding.resolve_spec((512, 64), ("vocab", "embed"), mesh)[0] == P("tensor", "fsdp")
  # tiny: 2 kv heads on tensor=2 shard; smollm2: 9 heads / 3 kv heads on tensor=2 replicate.
  assert sharding.resolve_spec((2, 64, 2, 16), ("layers", "embed", "kv_heads", "head_dim"),
                               mesh)[0] == P(None, "fsdp", "tensor")
  spec, fallbacks = sharding.resolve_spec((30, 576, 9, 64), ("layers", "embed", "heads", "head_dim"),
                                          mesh)
  assert spec == P(None, "fsdp") and fallbacks[0].describe() == (
      "heads=9 not divisible by tensor; replicated")
  # Batch over data x fsdp, cut to the part of the mesh that divides it.
  assert sharding.resolve_spec((4, 32), ("batch", "length"), (2, 4, 1))[0] == P("data")
  boxed = abstract_params(get_model_config("smollm2-135m"), boxed=True)
  assert sharding.sharding_fallbacks(boxed, mesh) == [
      "heads=9 not divisible by tensor; replicated", "kv_heads=3 not divisible by tensor; replicated"]
  # One table for every head: the scalar head's kernel follows 'embed' like the rest.
  scalar = abstract_params(get_model_config("tiny"), head="scalar", boxed=True)
  specs = sharding.logical_to_mesh_spec(scalar, mesh)
  assert specs["scalar_head"]["kernel"] == P("fsdp") and specs["embed"] == P("tensor", "fsdp")


def test_batch_sharding_and_process_rows():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert sharding.process_batch_rows(mesh, 8) == slice(0, 8)
  with pytest.raises(UserError, match="batch_size: 6 must be a multiple of data x fsdp = 4"):
    sharding.batch_sharding(mesh, batch_size=6)


def test_activation_constraints_follow_the_rules():
  cfg = get_model_config("tiny")
  mesh = sharding.make_mesh((2, 2, 2))
  params = abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])
  plain = fwd.lower(params, tokens).as_text()
  with sharding.activate(mesh):
    constrained = fwd.lower(params, tokens).as_text()
  assert "sharding_constraint" not in plain
  assert "sharding_constraint" in constrained


def _sgd():
  """SGD with momentum, no clipping: updates are linear in the raw gradient, so a gradient off by
  any factor on some mesh moves the weights by a wrong amount (AdamW would normalise it away), and
  the momentum buffer is an optimizer state sharded like the weights."""
  return optax.sgd(0.1, momentum=0.9)


def _host_state():
  cfg, tx = w.model_config(), _sgd()
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state = w.init_state(cfg, tx, w.state_shardings(cfg, tx, mesh))
  return jax.device_get(dict(state, rng=jax.random.key_data(state["rng"])))


def _train_on(mesh_shape, host_state):
  """STEPS steps of the worker's LM step from `host_state` on a mesh, with SGD: (final state,
  per-step losses, per-step gradient norms)."""
  cfg, tx = w.model_config(), _sgd()
  devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  shardings = w.state_shardings(cfg, tx, mesh)
  state = dict(host_state, params=jax.device_put(host_state["params"], shardings["params"]),
               opt_state=jax.device_put(host_state["opt_state"], shardings["opt_state"]),
               step=jax.device_put(host_state["step"], shardings["step"]),
               rng=jax.device_put(jax.random.wrap_key_data(host_state["rng"]), shardings["rng"]))
  step_fn = w.jit_step(cfg, tx, mesh, shardings)
  losses, grad_norms = [], []
  with sharding.activate(mesh):
    for i in range(STEPS):
      state, metrics = step_fn(state, sharding.global_batch(w.make_batch(i), mesh, w.BATCH_SIZE))
      losses.append(float(jax.device_get(metrics["loss"])))
      grad_norms.append(float(jax.device_get(metrics["grad_norm"])))
  return state, losses, grad_norms


@pytest.mark.slow
def test_train_step_on_meshes_matches_one_device():
  """Per step the same loss and gradient norm on every mesh, and the same SGD updates of every
  weight (to 2e-5 of the leaf's largest update, plus float32 rounding of the weight)."""
  host = _host_state()
  ref_state, ref_losses, ref_norms = _train_on((1, 1, 1), host)
  ref = jax.device_get(ref_state)
  # (layers, embed, heads, head_dim) q kernel, (vocab, embed) embedding: per-device shard shapes.
  expected_shards = {(8, 1, 1): ((2, 64, 4, 16), (512, 64)), (1, 8, 1): ((2, 8, 4, 16), (512, 8)),
                     (2, 2, 2): ((2, 32, 2, 16), (256, 32)), (1, 4, 2): ((2, 16, 2, 16), (256, 16))}
  for mesh_shape, (q_shard, embed_shard) in expected_shards.items():
    state, losses, norms = _train_on(mesh_shape, host)
    params = state["params"]
    assert params["layers"]["attn"]["q"]["kernel"].addressable_shards[0].data.shape == q_shard
    assert params["embed"].addressable_shards[0].data.shape == embed_shard
    trace = state["opt_state"][0].trace["layers"]["attn"]["q"]["kernel"]   # the momentum buffer
    assert trace.addressable_shards[0].data.shape == q_shard
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(mesh_shape))
    np.testing.assert_allclose(norms, ref_norms, rtol=2e-5, err_msg=str(mesh_shape))
    got = jax.device_get(state)
    for path, x in jax.tree_util.tree_flatten_with_path(got["params"])[0]:
      y, x0 = ref["params"], host["params"]
      for k in path:
        y, x0 = y[k.key], x0[k.key]
      x0 = np.asarray(x0, np.float64)
      update, ref_update = np.asarray(x, np.float64) - x0, np.asarray(y, np.float64) - x0
      tol = 2e-5 * np.abs(ref_update).max() + 4 * np.finfo(np.float32).eps * np.abs(x0).max()
      np.testing.assert_allclose(update, ref_update, rtol=0, atol=tol,
                                 err_msg=f"{mesh_shape} {jax.tree_util.keystr(path)}")
    assert int(got["step"]) == STEPS
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(ref["rng"]))
