r"""The compiler's answer: per-chip bytes of each stage's REAL jitted step, compiled (not run).

The steps are built by the same code training runs (`step.TrainStep` with `sft.make_loss_fn` /
`rm.make_loss_fn`, `ppo.IterationStep` with `ppo_iteration.make_iteration`: rollout, scoring and
the minibatch updates with the ptx term in ONE jitted function), on abstract arguments
(`jax.ShapeDtypeStruct`s carrying the training shardings), then lowered and compiled by XLA for:

  a TPU topology   `topology_devices('v5e:16x16')`: the devices of that slice from libtpu's
                   compile-only client (`jax.experimental.topologies.get_topology_desc`; libtpu
                   installs on a CPU machine with `pip install -e ".[tpu]"`), so the TPU compiler
                   itself says what one chip needs, without the chip;
  the devices in use  before training (`check_fits`): the step about to run, against each
                   device's memory (`memory_stats()['bytes_limit']`); a no-op on CPU.

Per-chip bytes (`compiled_bytes`): on TPU the compiler's own peak, `peak_memory_in_bytes` of
`compiled.memory_analysis()` (the most bytes live at once: arguments and outputs, the donated state
updated in place, and the temporaries live at that moment). Also reported, `sum_bytes`: arguments
+ outputs - aliased + all temporaries, the sum MaxText's train_compile prints. On TPU the sum is an
upper bound, not what the chip needs: its temporaries total more than are ever live at once
(1.3b reward model on v5e:4x4 at batch 96: sum 17.7 GiB, peak 12.0 GiB, and the TPU compiler
accepts it for a 16 GiB chip; at batch 160 it refuses at compile time, "the total memory required
for HLO temporaries (16.88G) exceeds available HBM (15.75G)"). A step the TPU compiler refuses
that way does not fit (`compile_stage` reports the compiler's line instead of bytes). Elsewhere
`compiled_bytes` is the sum (XLA:CPU's peak counts only the arguments).
"""
import math
import os
import time

import jax
import jax.numpy as jnp

from rlhf_jax import sharding
from rlhf_jax.errors import UserError
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.models.transformer import target_platform

GIB = 2**30
# HBM per device (one jax device: a chip; v4 and v5p as megacore chips) by device_kind.
HBM_BYTES = {"TPU v2": 8 * GIB, "TPU v3": 16 * GIB, "TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB,
             "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}
# Chips whose two TensorCores form one device (megacore), as on their TPU VMs.
_MEGACORE = ("v4", "v5p")
# What to turn when a stage does not fit (the one-line refusal names them).
KNOBS = {
    "sft": "config.batch_size, config.grad_accum_steps, config.seq_len, config.model.remat "
           "(full), config.mesh.shape (more fsdp/tensor), or more devices",
    "rm": "config.batch_size, config.grad_accum_steps, config.k_max, config.seq_len, "
          "config.model.remat (full), config.mesh.shape (more fsdp/tensor), or more devices",
    "ppo": "config.ppo.rollout_micro_batches, config.ppo.ptx_micro_batches, config.ppo.minibatches, "
           "config.ppo.frozen_dtype (bfloat16), config.model.remat (full), config.mesh.shape "
           "(more fsdp/tensor), or more devices",
}


# ----------------------------------------------------------------------------- devices

def quiet_libtpu():
  """Environment that keeps libtpu from probing for a TPU VM on a CPU host (call before jax
  touches libtpu)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only: no chip is opened, so several planners (and a TPU job) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str):
  """The devices of TPU slice `name` ('v5e:4x4', 'v4:4x4x4', 'v5p:8x8x16', ...), compile-only.

  v4 and v5p chips are one device each (megacore), as on their TPU VMs."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top  (libtpu)
  quiet_libtpu()
  kwargs = {"chip_config_name": "megacore"} if name.split(":")[0] in _MEGACORE else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or a bad name)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"--topology: cannot build TPU topology {name!r} ({first}); expected a name "
                    "like v5e:4x4, v4:4x4x4, v5p:8x8x16, v6e:16x16, with libtpu installed "
                    "(pip install -e \".[tpu]\")") from None


def device_memory(device):
  """Bytes one device can hold: its allocator's limit when it runs here, else the HBM of its
  kind (`HBM_BYTES`); None for a CPU (no limit worth checking)."""
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (compile-only devices have no allocator)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return HBM_BYTES.get(device.device_kind)


def compiled_bytes(memory, platform: str) -> int:
  """Per-device bytes of a compiled step: on TPU the compiler's `peak_memory_in_bytes`; elsewhere
  `sum_bytes` (XLA:CPU's peak counts the arguments only, and the GPU's is unchecked here)."""
  if platform == "tpu" and memory.peak_memory_in_bytes:
    return int(memory.peak_memory_in_bytes)
  return sum_bytes(memory)


def sum_bytes(memory) -> int:
  """arguments + outputs - aliased + temporaries of a compiled step (an upper bound of its peak)."""
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def compile_or_refusal(lowered):
  """(compiled, None), or (None, the compiler's one line) when it refuses the step for lack of
  device memory (XLA's RESOURCE_EXHAUSTED at compile time); other errors propagate."""
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    text = str(e).strip()
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    return None, text.splitlines()[0].replace("RESOURCE_EXHAUSTED: ", "")


# ----------------------------------------------------------------------------- abstract inputs

def _spec(shape, dtype, mesh):
  """A batch input: leading axis over data x fsdp."""
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                              sharding=sharding.batch_sharding(mesh, len(shape)))


def abstract_rng(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def abstract_train_state(cfg, head, tx, shardings):
  """{'params', 'opt_state', 'step'} of `optim.create_state`, as ShapeDtypeStructs."""
  params = abstract_params(cfg, head)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  return sharding.abstract_with_sharding(state, shardings)


def sft_batch(rows, seq_len, mesh):
  """An SFT/pretrain batch (`sft.TRAIN_KEYS`), as the packed loader gives it."""
  return {"tokens": _spec((rows, seq_len), "int32", mesh),
          "segment_ids": _spec((rows, seq_len), "int32", mesh),
          "positions": _spec((rows, seq_len), "int32", mesh),
          "loss_mask": _spec((rows, seq_len), "float32", mesh)}


def rm_batch(prompts, k, seq_len, mesh):
  """A comparisons batch (`rm.TRAIN_KEYS`): `prompts` x `k` responses of `seq_len` tokens."""
  out = {name: _spec((prompts, k, seq_len), "int32", mesh)
         for name in ("tokens", "segment_ids", "positions")}
  out.update({"last_index": _spec((prompts, k), "int32", mesh),
              "ranks": _spec((prompts, k), "int32", mesh),
              "response_valid": _spec((prompts, k), "float32", mesh)})
  return out


def ppo_batch(s, ptx_seq_len, mesh):
  """One iteration's host batch without 'index' (`ppo._Batches`): prompts and ptx rows."""
  out = {"prompts": _spec((s.batch_size, s.prompt_len), "int32", mesh),
         "prompt_segment_ids": _spec((s.batch_size, s.prompt_len), "int32", mesh)}
  if s.use_ptx:
    shape = (s.ptx_rows, ptx_seq_len)
    out.update({"ptx_tokens": _spec(shape, "int32", mesh),
                "ptx_segment_ids": _spec(shape, "int32", mesh),
                "ptx_positions": _spec(shape, "int32", mesh),
                "ptx_loss_mask": _spec(shape, "float32", mesh)})
  return out


# ----------------------------------------------------------------------------- the steps

def rm_k(config) -> int:
  """Responses per prompt a reward-model batch is planned with: config.k_max, or the paper's
  largest K (9) when it is 0 (the data's largest)."""
  return config.k_max or 9


def train_step(config, mesh, head):
  """(the stage's `TrainStep`, abstract state, abstract batch) of a pretrain/SFT (head 'lm') or
  RM (head 'scalar') config: the objects `sft.run` / `rm.run` train with."""
  # pylint: disable=g-import-not-at-top  (train imports this module for its check)
  from rlhf_jax.train import optim, rm, sft
  from rlhf_jax.train.step import TrainStep
  cfg = ModelConfig.from_dict(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, max(int(config.num_steps), 1))
  state = abstract_train_state(cfg, head, tx, optim.state_shardings(cfg, head, tx, mesh))
  if head == "lm":
    loss_fn, batch = sft.make_loss_fn(cfg), sft_batch(config.batch_size, config.seq_len, mesh)
  else:
    loss_fn = rm.make_loss_fn(cfg)
    batch = rm_batch(config.batch_size, rm_k(config), config.seq_len, mesh)
  step = TrainStep(loss_fn, tx, schedule, config.grad_accum_steps, mesh, config.batch_size)
  return step, state, batch


def ppo_models(config):
  """(policy, value, reward) model configs of a PPO config, dropout off: the value function and
  reward model are the pipeline's reward model (`config.rm.model`) when the config has one."""
  off = {"dropout_resid": 0.0, "dropout_attn": 0.0}
  policy = ModelConfig.from_dict(config.model).replace(**off)
  rm_cfg = ModelConfig.from_dict(config.rm.model).replace(**off) if "rm" in config else policy
  return policy, rm_cfg, rm_cfg


def ppo_step(config, mesh):
  """(the `ppo.IterationStep`, abstract state, frozen models, batch) of a PPO config."""
  from rlhf_jax.train import ppo, ppo_iteration  # pylint: disable=g-import-not-at-top
  cfg, value_cfg, rm_cfg = ppo_models(config)
  s = ppo.settings_from_config(config)
  txs = ppo.make_optimizers(config, s)
  shardings = ppo.state_shardings(cfg, value_cfg, txs, mesh, ema=s.ema_decay > 0)
  params = {"policy": abstract_params(cfg, "lm"), "value": abstract_params(value_cfg, "scalar")}
  state = {"params": params, "opt_state": {k: jax.eval_shape(txs[k].init, params[k])
                                           for k in params},
           "step": jax.ShapeDtypeStruct((), jnp.int32),
           "kl_coef": jax.ShapeDtypeStruct((), jnp.float32)}
  if s.ema_decay > 0:
    state["ema"] = params["policy"]
  state = sharding.abstract_with_sharding(state, shardings)
  frozen_sh = {"ref": shardings["params"]["policy"],
               "rm": sharding.param_shardings(abstract_params(rm_cfg, "scalar", boxed=True), mesh)}
  dtype = jnp.dtype(config.ppo.frozen_dtype)
  frozen = {"ref": abstract_params(cfg, "lm"), "rm": abstract_params(rm_cfg, "scalar")}
  frozen = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh),
                        frozen, frozen_sh)
  iteration = ppo_iteration.make_iteration(cfg, value_cfg, rm_cfg, s, txs, mesh)
  step = ppo.IterationStep(iteration, shardings, frozen, frozen_sh, mesh, s)
  return step, state, frozen, ppo_batch(s, config.ppo.ptx_seq_len, mesh)


def lowered_stage(stage, config, mesh, platform=None):
  """The stage's jitted step lowered on abstract arguments (traced under the mesh's logical
  rules, attention_impl 'auto' resolved for `platform`, default the mesh's devices' platform; the
  abstract arguments are built outside it: nothing may run on compile-only devices)."""
  rng = abstract_rng(mesh)
  platform = platform or mesh.devices.flat[0].platform
  if stage == "ppo":
    step, state, frozen, batch = ppo_step(config, mesh)
    with sharding.activate(mesh), target_platform(platform):
      return step.jitted(batch).lower(state, frozen, batch, rng)
  step, state, batch = train_step(config, mesh, "scalar" if stage == "rm" else "lm")
  with sharding.activate(mesh), target_platform(platform):
    return step.jitted(state, batch).lower(state, batch, rng)


def compile_stage(stage, config, mesh, platform="tpu"):
  """{'compiled_bytes', 'sum_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes',
  'compile_seconds'} per device of the stage's step compiled for the devices of `mesh`, traced
  for `platform` (fused attention resolved for it); {'compiled_bytes': None, 'compile_error':
  the compiler's line, 'compile_seconds'} when the compiler refuses it for lack of memory."""
  t0 = time.time()
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)   # no TPU executables in a CPU cache
  try:
    compiled, refusal = compile_or_refusal(lowered_stage(stage, config, mesh, platform))
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  if refusal:
    return {"compiled_bytes": None, "compile_error": refusal,
            "compile_seconds": round(time.time() - t0, 1)}
  m = compiled.memory_analysis()
  return {"compiled_bytes": compiled_bytes(m, mesh.devices.flat[0].platform),
          "sum_bytes": sum_bytes(m),
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes), "compile_seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- meshes

def batch_rows(stage, config) -> list:
  """Every batch size of the stage that must split evenly over data x fsdp."""
  if stage == "ppo":
    p = config.ppo
    rows = [p.batch_size // p.minibatches, p.batch_size // p.rollout_micro_batches]
    if p.ptx_coef:
      rows.append(p.ptx_per_episode * p.batch_size // p.minibatches // p.ptx_micro_batches)
    return rows
  return [config.batch_size // config.grad_accum_steps]


def choose_mesh(stage, config, num_devices, mesh_flag=None) -> tuple:
  """The (data, fsdp, tensor) mesh of a stage on `num_devices`: `mesh_flag`, else the config's
  mesh.shape when its batches split over it, else fsdp = the largest divisor of every batch size
  that divides the devices, tensor = the rest."""
  rows = batch_rows(stage, config)
  if mesh_flag:
    return sharding.resolve_mesh_shape(mesh_flag, num_devices, "--mesh")
  try:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
    if all(r % (shape[0] * shape[1]) == 0 for r in rows):
      return shape
  except UserError:
    pass
  fsdp = math.gcd(num_devices, *rows)
  return (1, fsdp, num_devices // fsdp)


def check_fits(lowered_fn, what, knobs, devices):
  """Refuses a step that cannot fit: compiles `lowered_fn()` (a `jax.stages.Lowered`) and
  raises a one-line UserError when its per-device bytes exceed the smallest device memory among
  `devices` (`device_memory`); nothing on CPU, where there is no limit worth checking (nothing
  is lowered or compiled). Returns (needed, available) bytes, or None on CPU."""
  limits = [device_memory(d) for d in devices]
  if any(x is None for x in limits):
    return None
  available = min(limits)
  compiled, refusal = compile_or_refusal(lowered_fn())
  if refusal:
    raise UserError(f"{what}: the compiler says the step does not fit a {devices[0].device_kind} "
                    f"({refusal}); turn down {knobs}")
  needed = compiled_bytes(compiled.memory_analysis(), devices[0].platform)
  if needed > available:
    raise UserError(f"{what}: the compiled step needs {needed / GIB:.1f} GiB per device, a "
                    f"{devices[0].device_kind} has {available / GIB:.1f} GiB; turn down {knobs}")
  return needed, available


def train_memory_check(step, stage, batch, mesh):
  """A `loop.Task.check_memory` for a pretrain/SFT/RM stage: `check_fits` of its `TrainStep`
  on the state about to train and the abstract global `batch` (the compilation is reused by the
  first step: the same jitted function, arguments and shardings)."""
  def check(state):
    def lower():
      with sharding.activate(mesh):
        return step.jitted(state, batch).lower(state, batch, abstract_rng(mesh))
    return check_fits(lower, f"{stage}: memory", KNOBS["rm" if stage == "rm" else "sft"],
                      list(mesh.devices.flat))
  return check


def ppo_memory_check(step, frozen, batch, mesh):
  """A `loop.Task.check_memory` for PPO: `check_fits` of its `IterationStep` on the state and
  frozen models about to train and the abstract iteration `batch`."""
  def check(state):
    def lower():
      with sharding.activate(mesh):
        return step.jitted(batch).lower(state, frozen, batch, abstract_rng(mesh))
    return check_fits(lower, "ppo: memory", KNOBS["ppo"], list(mesh.devices.flat))
  return check
