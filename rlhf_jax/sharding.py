"""Device mesh and the ONE logical-axis rule table shared by every model in the pipeline.

Mesh axes are ('data', 'fsdp', 'tensor'):
  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    data parallelism with parameters, gradients and optimizer state split along 'embed'
          (ZeRO-3 style); the batch is split over data x fsdp.
  tensor  Megatron-style model parallelism over heads, kv_heads, mlp and vocab.

The model names logical axes only (see rlhf_jax/models/transformer.py); `LOGICAL_AXIS_RULES` maps them
to mesh axes for the policy, the frozen reference, the reward model and the value model alike.
A dimension that the mesh axes of its rule do not divide is not sharded over them: `resolve_spec`
keeps the longest prefix of the rule's mesh axes that divides it (usually none, i.e. replicated) and
reports the fallback, so a 9-head model on tensor=2 runs (with replicated heads) instead of crashing;
`python -m rlhf_jax.plan` lists every such fallback.
"""
import contextlib
import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (a tuple means the product of those axes; None means replicated).
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed_act", None),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", None),
    ("mlp", ("tensor",)),
    ("layers", None),
    ("cache_length", None),     # the KV cache's slots (transformer.CACHE_AXES)
)

# The decode layout (`decode_param_shardings`): the same table with the weights' 'embed' axis
# replicated, so a decode step reads local weights (tensor-parallel only) instead of
# all-gathering FSDP shards for every token.
DECODE_AXIS_RULES = tuple((name, None if name == "embed" else axes)
                          for name, axes in LOGICAL_AXIS_RULES)


# ----------------------------------------------------------------------------- mesh

def parse_mesh_shape(shape: Any, field: str = "mesh.shape") -> tuple:
  """A mesh shape from '1,8,1', [1, 8, 1] or (1, -1, 1) as a tuple of three ints."""
  if isinstance(shape, str):
    parts = [p.strip() for p in shape.replace("(", "").replace(")", "").split(",") if p.strip()]
    try:
      shape = [int(p) for p in parts]
    except ValueError:
      raise UserError(f"{field}: expected three integers 'data,fsdp,tensor' (e.g. 1,8,1), "
                      f"got {shape!r}") from None
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    raise UserError(f"{field}: expected three integers (data, fsdp, tensor), got {shape!r}") from None
  if len(shape) != len(MESH_AXES):
    raise UserError(f"{field}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {shape}")
  if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise UserError(f"{field}: sizes must be positive, with at most one -1 ('the rest'), got {shape}")
  return shape


def resolve_mesh_shape(shape: Any, num_devices: int, field: str = "mesh.shape") -> tuple:
  """The concrete mesh shape for `num_devices` devices; -1 becomes 'the rest'."""
  shape = parse_mesh_shape(shape, field)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"{field}: {shape} needs a multiple of {known} devices, there are "
                      f"{num_devices}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise UserError(f"{field}: {shape} has {math.prod(shape)} slots but there are {num_devices} "
                    f"devices (the product must equal the device count; use -1 for 'the rest')")
  return shape


def _mesh_shape_of(mesh_cfg: Any) -> Any:
  """The shape from a mesh config (ConfigDict or dict with a `shape` field) or the shape itself."""
  if isinstance(mesh_cfg, Mapping):
    return mesh_cfg["shape"]
  if isinstance(mesh_cfg, (tuple, list, str)) or not hasattr(mesh_cfg, "shape"):
    return mesh_cfg
  return mesh_cfg.shape


def make_mesh(mesh_cfg: Any = (1, -1, 1), devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over all devices (of every process) or `devices`.

  mesh_cfg: a config with `.shape` (or `['shape']`), or the shape itself ('1,8,1', (2, -1, 2)).
  Axis types are Auto (jax.make_mesh defaults to Explicit), so sharding follows the jit shardings
  and `nn.with_logical_constraint`, as on every other platform. On a TPU slice the mesh is laid
  out on the physical axes, split where a mesh axis is smaller than one (tensor 2 on a 4x4x4 v4
  slice); jax.make_mesh allows that split on v5e only and refuses such a mesh elsewhere.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(_mesh_shape_of(mesh_cfg), len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(mesh: Any) -> dict:
  """{axis name: size} of a Mesh, an AbstractMesh or a (data, fsdp, tensor) tuple."""
  if isinstance(mesh, (tuple, list)):
    return dict(zip(MESH_AXES, (int(s) for s in mesh)))
  return dict(mesh.shape)


# ----------------------------------------------------------------------------- logical -> mesh

class Fallback(NamedTuple):
  """A dimension that was not sharded as its rule asked, because the mesh does not divide it."""
  logical: str
  size: int
  wanted: tuple
  used: tuple

  def describe(self) -> str:
    wanted = "x".join(self.wanted)
    used = "x".join(self.used) if self.used else "replicated"
    return f"{self.logical}={self.size} not divisible by {wanted}; {used}"


def _rule_table(rules: Iterable) -> dict:
  table = {}
  for logical, mesh_axes in rules:
    if logical not in table:     # first rule wins, as in flax
      table[logical] = () if mesh_axes is None else (
          (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
  return table


def resolve_spec(shape: Sequence[int], names: Sequence[Optional[str]], mesh: Any,
                 rules: Iterable = LOGICAL_AXIS_RULES) -> tuple:
  """(PartitionSpec, [Fallback]) for an array of `shape` whose dimensions carry logical `names`.

  Each dimension gets the mesh axes of its rule (size-1 axes and axes already used by an earlier
  dimension left out), cut to the longest prefix whose size product divides the dimension.
  Unknown names and None replicate.
  """
  sizes, table = mesh_sizes(mesh), _rule_table(rules)
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{len(shape)} array")
  used, spec, fallbacks = set(), [], []
  for dim, name in zip(shape, names):
    wanted = tuple(a for a in table.get(name, ()) if sizes.get(a, 1) > 1 and a not in used)
    axes = wanted
    while axes and dim % math.prod(sizes[a] for a in axes):
      axes = axes[:-1]
    if axes != wanted:
      fallbacks.append(Fallback(name, int(dim), wanted, axes))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec), fallbacks


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _leaf_shape(x):
  return tuple(getattr(x, "shape", np.shape(x)))


def logical_to_mesh_spec(boxed_tree: Any, mesh: Any, rules: Iterable = LOGICAL_AXIS_RULES):
  """PartitionSpec tree (unboxed structure) of a tree of flax LogicallyPartitioned leaves.

  Leaves without logical names (e.g. an optimizer step count) are replicated.
  """
  def one(x):
    if _is_box(x):
      return resolve_spec(_leaf_shape(x.value), x.names, mesh, rules)[0]
    return PartitionSpec()
  return jax.tree.map(one, boxed_tree, is_leaf=_is_box)


def sharding_fallbacks(boxed_tree: Any, mesh: Any, rules: Iterable = LOGICAL_AXIS_RULES) -> list:
  """Sorted, de-duplicated descriptions of every dimension that could not be sharded as ruled."""
  found = set()
  for x in jax.tree.leaves(boxed_tree, is_leaf=_is_box):
    if _is_box(x):
      found.update(f.describe() for f in resolve_spec(_leaf_shape(x.value), x.names, mesh, rules)[1])
  return sorted(found)


def logical_to_mesh_sharding(boxed_tree: Any, mesh: jax.sharding.Mesh,
                             rules: Iterable = LOGICAL_AXIS_RULES):
  """NamedSharding tree (unboxed structure) for a boxed tree (params or optimizer state)."""
  specs = logical_to_mesh_spec(boxed_tree, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh, rules: Iterable = LOGICAL_AXIS_RULES):
  """Shardings of a model's parameters, from `abstract_params(cfg, head, boxed=True)`."""
  return logical_to_mesh_sharding(boxed_params, mesh, rules)


def opt_state_shardings(tx, boxed_params: Any, mesh: jax.sharding.Mesh,
                        rules: Iterable = LOGICAL_AXIS_RULES):
  """Shardings of `tx.init(params)`: moment tensors follow their parameter, scalars replicate.

  optax builds its state with tree maps over the parameters, so initialising it (abstractly, with
  `jax.eval_shape`) on the boxed parameters keeps each parameter's logical names on its moments.
  """
  return logical_to_mesh_sharding(jax.eval_shape(tx.init, boxed_params), mesh, rules)


def decode_param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh):
  """Shardings of a model's parameters for decoding (`DECODE_AXIS_RULES`: tensor-parallel,
  replicated over 'data' and 'fsdp'), from `abstract_params(cfg, head, boxed=True)`."""
  return logical_to_mesh_sharding(boxed_params, mesh, DECODE_AXIS_RULES)


# rollout_layout 'auto' decodes in the decode layout when that copy takes at most this fraction of
# a device's memory (`decode_layout_fits`; the planner's estimate uses the same rule).
DECODE_LAYOUT_FRACTION = 0.25


def decode_layout_fits(boxed_params: Any, dtype: str, mesh: jax.sharding.Mesh,
                       fraction: float = DECODE_LAYOUT_FRACTION) -> bool:
  """Whether each device's part of the decode copy of the weights (`decode_param_shardings`,
  in `dtype`) is at most `fraction` of its memory (`plan_compile.device_memory`: the allocator's
  limit, or for a TPU topology's compile-only devices the HBM of their kind, so the planner
  compiles the program a real slice would run); False where the memory is unknown (CPU)."""
  from rlhf_jax.plan_compile import device_memory  # pylint: disable=g-import-not-at-top (cycle)
  limit = device_memory(mesh.devices.flat[0])
  if not limit:
    return False
  shardings = decode_param_shardings(boxed_params, mesh)
  shapes = jax.tree.leaves(nn.unbox(boxed_params))
  per_device = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(dtype).itemsize
                   for x, s in zip(shapes, jax.tree.leaves(shardings)))
  return per_device <= fraction * limit


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put(tree: Any, shardings: Any):
  """Places a pytree of host or device arrays onto `shardings`, one tensor at a time.

  One process: `jax.device_put`. Several processes, for a sharding that spans them: an array
  already global is kept (or resharded under jit); a host array (or one on this process's
  devices) gives each device its own slice (`jax.make_array_from_callback`), so nothing is
  checked or copied across processes. Every process must pass the same values.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding == s else jax.jit(lambda y: y, out_shardings=s)(x)
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def init_sharded(init_fn, shardings: Any, *args):
  """Runs `init_fn(*args)` under jit straight into `shardings`: no host or single-device copy.

  Works across processes (each process computes only its own shards), unlike `jax.device_put` of
  host arrays, and is how a large model should be initialised.
  """
  return jax.jit(init_fn, out_shardings=shardings)(*args)


def abstract_with_sharding(tree: Any, shardings: Any):
  """ShapeDtypeStructs carrying `shardings`: a restore target or an AOT-compile argument."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_leaf_shape(x), x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------- batches

def batch_spec(ndim: int = 2) -> PartitionSpec:
  return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def check_batch_size(batch_size: int, mesh: Any, field: str = "batch_size") -> None:
  """Raises UserError unless `batch_size` is a multiple of data x fsdp."""
  sizes = mesh_sizes(mesh)
  n = math.prod(sizes[a] for a in BATCH_AXES)
  if batch_size % n:
    raise UserError(f"{field}: {batch_size} must be a multiple of data x fsdp = {n} "
                    f"(mesh {tuple(sizes[a] for a in MESH_AXES)})")


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2,
                   batch_size: Optional[int] = None) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  if batch_size is not None:
    check_batch_size(batch_size, mesh)
  return NamedSharding(mesh, batch_spec(ndim))


def process_batch_rows(mesh: jax.sharding.Mesh, global_batch_size: int) -> slice:
  """The rows of the global batch that this process's devices hold: the data this host must read.

  The rows of one process are contiguous for meshes from `make_mesh`; anything else is a bug.
  """
  check_batch_size(global_batch_size, mesh)
  index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                 for idx in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}")
  return slice(start, stop)


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, global_batch_size: int):
  """Assembles each process's rows (`process_batch_rows`) into global arrays sharded over the batch."""
  def one(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:])
  return jax.tree.map(one, local_batch)


# ----------------------------------------------------------------------------- activations

@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Iterable = LOGICAL_AXIS_RULES):
  """Within it, `nn.with_logical_constraint` in the model maps to `mesh` through `rules`.

  Wrap both the tracing of a step (its jit call) and anything that traces the model.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield mesh
