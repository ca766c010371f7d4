r"""Memory planner: ONE answer per job, what each stage needs per device, before renting devices.

  python -m rlhf_jax.plan                                         # every config preset, estimated
  python -m rlhf_jax.plan --model=6.7b                            # = --config=configs/ppo_ptx.py:6.7b
  python -m rlhf_jax.plan --config=configs/ppo_ptx.py:6.7b --topology=v5e:16x16
  python -m rlhf_jax.plan --config=configs/sft.py:1.3b --topology=v5e:4x4 --mesh=1,-1,2
  python -m rlhf_jax.plan --model=1.3b --topology=v5e:4x4 --config.ppo.ptx_micro_batches=16

The job is a stage config. A PPO config (configs/ppo_ptx.py) is the whole pipeline and plans its
stages sft (`config.sft`), rm (`config.rm`) and ppo (the config itself; 'ppo_ptx' with ptx_coef >
0); a pretrain/SFT/RM config plans its own stage. Batches are the configs' own: sft batch_size rows
of seq_len tokens (in grad_accum_steps micro-batches); rm batch_size prompts x K responses of
seq_len (K = config.k_max, or the paper's 9 when 0); ppo ppo.batch_size episodes of prompt_len +
response_len tokens, updated in ppo.minibatches minibatches, each with ptx_per_episode x its
episodes pretraining rows of ptx_seq_len tokens (in ptx_micro_batches chunks), the rollout in
rollout_micro_batches chunks. `--config.<field>=` overrides any of them.

Devices: --topology (a TPU slice name, `plan_compile.topology_devices`), else --num_devices, else
the preset's reference slice (`REFERENCE_DEVICES`). The mesh of each stage: --mesh, else the
config's mesh.shape when its batches split over it, else fsdp over as many devices as every batch
allows and tensor over the rest (`plan_compile.choose_mesh`). attention_impl 'auto' is resolved
for --platform (default tpu: the splash kernel, no attention scores in memory).

Estimate (per device, from `jax.eval_shape` shapes and the sharding rule table; a dimension the
mesh does not divide counts replicated and is listed under "notes"). P = the trained model's
parameters on this device, in bytes of their dtype (float32):
  params P, grads P, opt 2P (AdamW moments) + the step count;
  frozen (ppo) the reference policy and reward model in ppo.frozen_dtype;
  value (ppo) the value model's params, grads and moments; ema (ppo) one more copy of the policy;
  act: the peak of what the step holds besides those (`train_activation_bytes`, `rollout_bytes`,
  `ppo_activation_bytes`): activations of the forward/backward under the remat policy, the
  float32 logits, a layer's gathered weights, the KV cache and the optimizer's temporaries.
ppo: the iteration is one jitted function, so its peak is the largest of its phases: rollout,
scoring, the update (PPO term on a minibatch, then the ptx term on its pretraining rows, with
both policy gradients alive at once).

Compiled (--topology): `plan_compile.compile_stage`, the stage's real jitted step compiled by
the TPU compiler for that slice; compiled bytes = the compiler's peak per chip; fits = compiled
bytes <= the chip's HBM (`plan_compile.HBM_BYTES`), false when the compiler refuses the step for
lack of memory (`compile_error`). rollout_layout 'auto' is resolved with that chip memory.
The last line is `RESULT {json}`: per stage mesh, estimate_bytes, compiled_bytes, sum_bytes,
hbm_bytes, fits. --markdown prints the rows of the README's fit table.
"""
import dataclasses
import json
import math
import os
from typing import Optional

from absl import flags
from ml_collections import config_flags

from rlhf_jax.errors import UserError, run_cli

STAGES = ("sft", "rm", "ppo")
CONFIG_PRESETS = ("tiny", "smollm2", "1.3b", "6.7b", "175b")
# Devices a preset is planned on without --topology/--num_devices: the slices the README's table
# compiles for (v5e:4x4, v5e:16x16, v5p:8x8x16); 8 for the small ones (the tests' fake devices).
REFERENCE_DEVICES = {"tiny": 8, "smollm2": 8, "1.3b": 16, "6.7b": 256, "175b": 1024}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class Plan:
  """One stage's estimated bytes per device, by part."""
  stage: str
  mesh: tuple
  shape: str      # the batch, in words
  params: int
  grads: int
  opt: int
  frozen: int
  value: int
  ema: int
  act: int
  notes: list

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt + self.frozen + self.value + self.ema + self.act


# ----------------------------------------------------------------------------- bytes of trees

def shard_shape(shape, spec, sizes: dict) -> tuple:
  """Per-device shape of an array of `shape` laid out by PartitionSpec `spec` on a mesh of `sizes`."""
  out = list(shape)
  for i, axes in enumerate(spec):
    if axes is not None:
      axes = (axes,) if isinstance(axes, str) else axes
      out[i] = -(-out[i] // math.prod(sizes[a] for a in axes))
  return tuple(out)


def tree_bytes(boxed_tree, mesh_shape: tuple, float_dtype: Optional[str] = None) -> int:
  """Per-device bytes of a boxed abstract tree; float leaves counted in `float_dtype` if given."""
  import jax  # pylint: disable=g-import-not-at-top  (the CLI sets JAX_PLATFORMS first)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rlhf_jax import sharding  # pylint: disable=g-import-not-at-top
  sizes = sharding.mesh_sizes(mesh_shape)
  is_box = lambda x: hasattr(x, "names") and hasattr(x, "value")
  total = 0
  for x in jax.tree.leaves(boxed_tree, is_leaf=is_box):
    value, spec = x, ()
    if is_box(x):
      value = x.value
      spec = sharding.resolve_spec(value.shape, x.names, mesh_shape)[0]
    itemsize = jnp.dtype(value.dtype).itemsize
    if float_dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
      itemsize = _DTYPE_BYTES[float_dtype]
    total += math.prod(shard_shape(value.shape, spec, sizes)) * itemsize
  return total


def model_bytes(cfg, head: str, mesh_shape: tuple):
  """(params, AdamW state, [sharding fallback notes]) bytes per device of one trained model."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rlhf_jax import sharding  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import abstract_params  # pylint: disable=g-import-not-at-top
  boxed = abstract_params(cfg, head=head, boxed=True)
  opt = tree_bytes(jax.eval_shape(optax.adamw(1e-4).init, boxed), mesh_shape)
  return tree_bytes(boxed, mesh_shape), opt, sharding.sharding_fallbacks(boxed, mesh_shape)


# ----------------------------------------------------------------------------- activations

def _split(n: int, t: int) -> float:
  """n over the tensor axis if it divides n, else replicated."""
  return n / t if n % t == 0 else n


def scores_kept(cfg, seq_len: int, platform: str) -> bool:
  """Whether attention materialises (B, H, T, T) scores: the einsum reference and XLA's
  dot_product_attention do; the fused kernels (splash, cuDNN) and the blocked CPU attention
  (which recomputes them block by block in its backward pass) do not."""
  return _attention(cfg, seq_len, platform) in ("einsum", "xla")


def _attention(cfg, seq_len: int, platform: str) -> str:
  from rlhf_jax.models.transformer import attention_impl  # pylint: disable=g-import-not-at-top
  return attention_impl(cfg, seq_len, cached=False, dropout=bool(cfg.dropout_attn),
                        platform=platform)


def layer_bytes_per_token(cfg, seq_len: int, tensor: int, platform: str) -> float:
  """Bytes one layer keeps for its backward pass, per token, a = bytes of cfg.dtype,
  h/k/f = heads, kv heads, d_ff over the tensor axis (where it divides them):
    2*4*d (the norms' float32 inputs; norms and activations are checkpointed, so their
    statistics are recomputed) + 2*a*d (the norms' outputs) + a*(h + 2k)*hd (q, k, v)
    + a*h*hd (attention output) + m*a*f (MLP: up and its activation, m = 2; llama adds the gate,
    m = 3) + a*h*hd + 4*h (the blocked attention's own copy of its output, head-major, and its
    log-sum-exp)
    + (4 + a)*h*s (float32 scores and probs, when attention materialises them: `scores_kept`)
    + 2d (residual dropout masks) + h*s (attention dropout mask)."""
  a = _DTYPE_BYTES[cfg.dtype]
  d, hd = cfg.d_model, cfg.head_dim
  h, k, f = _split(cfg.num_heads, tensor), _split(cfg.num_kv_heads, tensor), _split(cfg.d_ff, tensor)
  mlp = 2 if cfg.flavour == "gpt2" else 3
  saved = 2 * 4 * d + 2 * a * d + a * (h + 2 * k) * hd + a * h * hd + mlp * a * f
  impl = _attention(cfg, seq_len, platform)
  if impl == "blocked":
    saved += a * h * hd + 4 * h
  if impl in ("einsum", "xla"):
    saved += (4 + a) * h * seq_len
  if cfg.dropout_resid:
    saved += 2 * d
  if cfg.dropout_attn:
    saved += h * seq_len
  return saved


def shared_bytes_per_token(cfg, seq_len: int, tensor: int, platform: str) -> float:
  """Kept through the whole backward pass: embeddings, and the attention mask (built once): its
  float32 broadcast over the heads when attention materialises scores, the (T, T) booleans the
  blocked attention recomputes its blocks from."""
  out = 2 * _DTYPE_BYTES[cfg.dtype] * cfg.d_model
  if scores_kept(cfg, seq_len, platform):
    out += 5 * _split(cfg.num_heads, tensor) * seq_len
  elif _attention(cfg, seq_len, platform) == "blocked":
    out += seq_len
  return out


def head_bytes(cfg, head: str, rows: int, positions: int, tensor: int) -> float:
  """The head on `positions` positions of `rows` rows: the final norm (4d per position) and, for
  the LM head, the float32 logits and their gradient, 2*4*V per position (V = the padded
  vocabulary over the tensor axis where it divides it), for at most cfg.logits_chunk positions at
  a time when the logits are chunked."""
  out = rows * positions * 4 * cfg.d_model
  if head == "lm":
    vocab = _split(getattr(cfg, "padded_vocab", cfg.vocab_size), tensor)
    chunk = getattr(cfg, "logits_chunk", 0) or positions
    out += rows * min(chunk, positions) * 2 * 4 * vocab
  return out


def layer_weight_bytes(cfg, tensor: int) -> float:
  """One layer's weights gathered over fsdp (split over tensor), float32: what the scanned layer
  holds while it runs (forward and backward: twice)."""
  d, hd = cfg.d_model, cfg.head_dim
  h, k, f = _split(cfg.num_heads, tensor), _split(cfg.num_kv_heads, tensor), _split(cfg.d_ff, tensor)
  mlp = (3 if cfg.flavour == "llama" else 2) * d * f
  return 4 * (d * (2 * h + 2 * k) * hd + mlp)


def train_activation_bytes(cfg, head: str, rows: int, seq_len: int, tensor: int, platform: str,
                           head_len: Optional[int] = None) -> int:
  """Peak activation bytes per device of a forward+backward pass on `rows` local sequences of
  seq_len tokens, the head on the last `head_len` positions (all by default):
    no remat:  rows * s * (L * saved_layer + shared) + max(head, attention backward)
    remat:     rows * s * (L * a*d + shared)
               + max(rows * s * saved_layer + attention backward, head)
               (the layer inputs stay; one layer's residuals are rebuilt at a time, after the
               head's buffers are gone; `attention_backward_bytes`)
  plus 2 gathered layers of weights (`layer_weight_bytes`)."""
  layer = layer_bytes_per_token(cfg, seq_len, tensor, platform)
  shared = shared_bytes_per_token(cfg, seq_len, tensor, platform)
  top = head_bytes(cfg, head, rows, seq_len if head_len is None else head_len, tensor)
  tokens = rows * seq_len
  scratch = attention_backward_bytes(cfg, rows, seq_len, tensor, platform)
  if cfg.remat != "none":
    act = tokens * (cfg.num_layers * _DTYPE_BYTES[cfg.dtype] * cfg.d_model + shared)
    act += max(tokens * layer + scratch, top)
  else:
    act = tokens * (cfg.num_layers * layer + shared) + max(top, scratch)
  return int(act + 2 * layer_weight_bytes(cfg, tensor))


def attention_backward_bytes(cfg, rows: int, seq_len: int, tensor: int, platform: str) -> int:
  """The blocked attention's backward working set, one query block at a time: its scores,
  probabilities and their two gradients, 4 float32 (rows, h, block, s) arrays (0 for the other
  implementations, whose kept scores `layer_bytes_per_token` counts)."""
  if _attention(cfg, seq_len, platform) != "blocked":
    return 0
  from rlhf_jax.models.blocked_attention import default_block  # pylint: disable=g-import-not-at-top
  return 4 * 4 * rows * _split(cfg.num_heads, tensor) * default_block(seq_len) * seq_len


def rollout_bytes(cfg, rows: int, seq_len: int, tensor: int, weights: int = 0) -> int:
  """The rollout: the KV cache, 2 * L * rows * s * k * hd * a, a layer's weights, the logits of
  one decode step, and `weights`: the decode copy of the policy (`decode_copy_bytes`)."""
  a = _DTYPE_BYTES[cfg.dtype]
  cache = 2 * cfg.num_layers * rows * seq_len * _split(cfg.num_kv_heads, tensor) * cfg.head_dim * a
  return int(cache + 2 * layer_weight_bytes(cfg, tensor) + head_bytes(cfg, "lm", rows, 1, tensor)
             + weights)


def decode_copy_bytes(ppo_config, policy_params: int, dp: int, hbm: Optional[int] = None) -> int:
  """The policy's weights as the rollout decodes them (`sampling.decode_weights`): one copy in
  ppo.rollout_dtype, laid out as in training ('train') or replicated over data x fsdp
  ('decode'); 'auto' is 'decode' where that copy takes at most a quarter of the device memory
  `hbm` (as `sharding.decode_layout_fits` decides on the devices; 'train' when hbm is unknown).
  `policy_params`: the policy's float32 bytes per device in the training layout."""
  dtype = ppo_config.get("rollout_dtype", "float32")
  layout = ppo_config.get("rollout_layout", "train")
  one = policy_params * _DTYPE_BYTES[dtype] / 4
  if layout == "auto":
    from rlhf_jax.sharding import DECODE_LAYOUT_FRACTION  # pylint: disable=g-import-not-at-top
    layout = "decode" if hbm and one * dp <= DECODE_LAYOUT_FRACTION * hbm else "train"
  return int(one * (dp if layout == "decode" else 1))


def scoring_bytes(cfg, rows: int, seq_len: int, head_len: int, tensor: int, platform: str) -> int:
  """A scoring pass (inference): one layer's forward and the logits of `head_len` positions."""
  per_token = (layer_bytes_per_token(cfg, seq_len, tensor, platform)
               + shared_bytes_per_token(cfg, seq_len, tensor, platform))
  return int(rows * seq_len * per_token + head_bytes(cfg, "lm", rows, head_len, tensor)
             + 2 * layer_weight_bytes(cfg, tensor))


# ----------------------------------------------------------------------------- stages

def _dp_tensor(mesh_shape):
  return mesh_shape[0] * mesh_shape[1], mesh_shape[2]


def train_plan(stage, config, mesh_shape, platform) -> Plan:
  """Estimate of a pretrain/SFT (lm head) or RM (scalar head) step."""
  from rlhf_jax import plan_compile  # pylint: disable=g-import-not-at-top
  from rlhf_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(config.model)
  dp, tensor = _dp_tensor(mesh_shape)
  head = "scalar" if stage == "rm" else "lm"
  params, opt, notes = model_bytes(cfg, head, mesh_shape)
  rows = config.batch_size // config.grad_accum_steps
  k = plan_compile.rm_k(config) if stage == "rm" else 1
  act = train_activation_bytes(cfg, head, rows * k // dp, config.seq_len, tensor, platform)
  shape = (f"{config.batch_size} x {k} x {config.seq_len}" if stage == "rm"
           else f"{config.batch_size} x {config.seq_len}")
  grads = params * (2 if config.grad_accum_steps > 1 else 1)   # + the accumulator
  return Plan(stage, tuple(mesh_shape), shape, params, grads, opt, 0, 0, 0, act, notes)


def ppo_activation_bytes(config, cfg, value_cfg, mesh_shape, platform, policy_params,
                         hbm=None) -> int:
  """Peak of the iteration's phases besides the models: max(rollout chunk, scoring chunk,
  update) where update = PPO term (policy + value) on a minibatch, or the ptx term on one chunk
  of its pretraining rows, whichever is larger."""
  p = config.ppo
  dp, tensor = _dp_tensor(mesh_shape)
  seq = p.prompt_len + p.response_len
  minibatch = p.batch_size // p.minibatches
  rollout = rollout_bytes(cfg, p.batch_size // p.rollout_micro_batches // dp, seq, tensor,
                          decode_copy_bytes(p, policy_params, dp, hbm))
  scoring = scoring_bytes(cfg, p.batch_size // max(p.minibatches, p.rollout_micro_batches) // dp,
                          seq, p.response_len + 1, tensor, platform)
  update = (train_activation_bytes(cfg, "lm", minibatch // dp, seq, tensor, platform,
                                   p.response_len + 1)
            + train_activation_bytes(value_cfg, "scalar", minibatch // dp, seq, tensor, platform))
  if p.ptx_coef:
    rows = p.ptx_per_episode * minibatch // p.ptx_micro_batches // dp
    update = max(update, train_activation_bytes(cfg, "lm", rows, p.ptx_seq_len, tensor, platform))
  return max(rollout, scoring, update)


def ppo_plan(config, mesh_shape, platform, hbm=None) -> Plan:
  """Estimate of one PPO(-ptx) iteration: the four models, the EMA, the phases' peak."""
  from rlhf_jax import plan_compile  # pylint: disable=g-import-not-at-top
  cfg, value_cfg, rm_cfg = plan_compile.ppo_models(config)
  p = config.ppo
  params, opt, notes = model_bytes(cfg, "lm", mesh_shape)
  v_params, v_opt, _ = model_bytes(value_cfg, "scalar", mesh_shape)
  r_params, _, _ = model_bytes(rm_cfg, "scalar", mesh_shape)
  scale = _DTYPE_BYTES[p.frozen_dtype] / 4
  frozen = int((params + r_params) * scale)
  # Both policy gradients (PPO and ptx terms) are alive when they are clipped and summed, and
  # chunked ptx rows accumulate into a third.
  grads = params * ((2 + (p.ptx_micro_batches > 1)) if p.ptx_coef else 1)
  ema = params if p.ema_decay else 0
  act = ppo_activation_bytes(config, cfg, value_cfg, mesh_shape, platform, params, hbm)
  shape = (f"{p.batch_size} x {p.prompt_len}+{p.response_len}, mb {p.batch_size // p.minibatches}"
           + (f", ptx {p.ptx_per_episode}/ep x {p.ptx_seq_len}" if p.ptx_coef else ""))
  return Plan("ppo", tuple(mesh_shape), shape, params, grads, opt, frozen,
              2 * v_params + v_opt, ema, act, notes)


def estimate(stage, config, mesh_shape, platform="cpu", hbm=None) -> Plan:
  """The estimated bytes per device of `stage` of `config` on a (data, fsdp, tensor) mesh of
  devices with `hbm` bytes each (None: unknown)."""
  from rlhf_jax import plan_compile, sharding  # pylint: disable=g-import-not-at-top
  for rows in plan_compile.batch_rows(stage, config):
    sharding.check_batch_size(rows, mesh_shape, f"{stage} batch rows per step")
  if stage == "ppo":
    return ppo_plan(config, mesh_shape, platform, hbm)
  return train_plan(stage, config, mesh_shape, platform)


# ----------------------------------------------------------------------------- the job

def stage_configs(config) -> dict:
  """{stage: its config} of a job: a PPO config's pipeline (sft, rm from its sub-configs, then
  ppo itself), or the one stage of a pretrain/SFT/RM config."""
  if "ppo" in config:
    out = {name: config[name] for name in ("sft", "rm") if name in config}
    out["ppo"] = config
    return out
  stage = config.get("stage")
  if stage not in ("pretrain", "sft", "rm"):
    raise UserError(f"--config: stage {stage!r} is not planned (expected a pretrain, sft, rm or "
                    "ppo config)")
  return {"rm" if stage == "rm" else "sft": config}


def stage_label(stage, config) -> str:
  """The RESULT key of a stage: 'sft', 'rm', 'ppo_ptx' (PPO with the pretraining term), 'ppo'."""
  return "ppo_ptx" if stage == "ppo" and config.ppo.ptx_coef else stage


def paper_config(name: str):
  """configs/ppo_ptx.py:<name> (the whole pipeline of a config preset)."""
  from rlhf_jax import config_files  # pylint: disable=g-import-not-at-top
  if name not in CONFIG_PRESETS:
    raise UserError(f"--model: expected a config preset ({', '.join(CONFIG_PRESETS)}), got "
                    f"{name!r}; other shapes: --config=... --config.model.<field>=...")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_files.get_config(os.path.join(root, "configs", "ppo_ptx.py"), name)


def _devices(opts, name):
  """(devices or None, their number, the platform the estimate resolves attention for)."""
  if opts.get("topology"):
    from rlhf_jax import plan_compile  # pylint: disable=g-import-not-at-top
    devices = plan_compile.topology_devices(opts["topology"])
    return devices, len(devices), "tpu"
  n = opts.get("num_devices") or REFERENCE_DEVICES.get(name)
  if n is None:
    import jax  # pylint: disable=g-import-not-at-top
    n = jax.device_count()
  return None, n, opts.get("platform") or "tpu"


def plan_job(config, opts: dict, name: str = "") -> dict:
  """The RESULT of one job: per stage its mesh, estimate and, with devices, the compiler's
  figure and the verdict. opts: the flags by name (topology, mesh, num_devices, stage)."""
  from rlhf_jax import plan_compile, sharding  # pylint: disable=g-import-not-at-top
  devices, n, platform = _devices(opts, name)
  hbm = plan_compile.device_memory(devices[0]) if devices else None
  stages = {}
  for stage, sub in stage_configs(config).items():
    if opts.get("stage") and opts["stage"] != stage:
      continue
    shape = plan_compile.choose_mesh(stage, sub, n, opts.get("mesh"))
    est = estimate(stage, sub, shape, platform, hbm)
    row = {"mesh": list(shape), "batch": est.shape, "estimate_bytes": est.total,
           "estimate_parts": {k: getattr(est, k) for k in ("params", "grads", "opt", "frozen",
                                                           "value", "ema", "act")},
           "notes": est.notes, "compiled_bytes": None, "hbm_bytes": hbm, "fits": None}
    if devices:
      mesh = sharding.make_mesh(shape, devices)
      row.update(plan_compile.compile_stage(stage, sub, mesh, platform))
      if row["compiled_bytes"] is None:    # the compiler refused it: out of memory
        row["fits"] = False
      else:
        row["fits"] = hbm is not None and row["compiled_bytes"] <= hbm
        row["estimate_over_compiled"] = round(est.total / row["compiled_bytes"], 3)
    stages[stage_label(stage, sub)] = row
  return {"job": name, "topology": opts.get("topology"), "num_devices": n,
          "device_kind": devices[0].device_kind if devices else None, "stages": stages}


# ----------------------------------------------------------------------------- the table

def human(n) -> str:
  if n is None:
    return "-"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def format_table(results) -> str:
  """Aligned text table, one row per stage of every job; sharding fallbacks as notes below."""
  head = ("job", "stage", "mesh d,f,t", "chips", "batch", "params+opt", "act", "estimate",
          "compiled", "HBM", "fits", "compile s")
  rows, notes = [], []
  for r in results:
    for stage, s in r["stages"].items():
      parts = s["estimate_parts"]
      fits = "-" if s["fits"] is None else "yes" if s["fits"] else "NO"
      rows.append((r["job"], stage, ",".join(map(str, s["mesh"])), str(r["num_devices"]),
                   s["batch"], human(s["estimate_bytes"] - parts["act"]), human(parts["act"]),
                   human(s["estimate_bytes"]), human(s["compiled_bytes"]), human(s["hbm_bytes"]),
                   fits, str(s.get("compile_seconds", "-"))))
      if s.get("compile_error"):
        notes.append((r["job"], stage, "the compiler refused it", (s["compile_error"],)))
      found = (r["job"], stage, "sharding fallbacks", tuple(s["notes"]))
      if s["notes"] and found not in notes:
        notes.append(found)
  widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
  line = lambda row: "  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
  out = [line(head), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
  for job, stage, what, found in notes:
    out.append(f"note: {job} {stage}: {what}: " + "; ".join(found))
  return "\n".join(out)


def format_markdown(results) -> str:
  """The README's fit table: one markdown row per stage compiled for a topology (the compiler's
  peak per chip, the sum MaxText prints, the verdict, the estimate's ratio to the peak)."""
  head = ("preset", "slice (chips, HBM/chip)", "stage", "mesh d,f,t", "estimate",
          "compiled/chip (peak)", "sum/chip", "fits", "estimate/compiled", "compile")
  rows = [head, ("---",) * len(head)]
  for r in results:
    for stage, s in r["stages"].items():
      where = (f"{r['topology']} ({r['num_devices']}, {human(s['hbm_bytes']).replace('.00', '')})"
               if r["topology"] else f"{r['num_devices']} devices")
      fits = "-" if s["fits"] is None else "yes" if s["fits"] else "**no**"
      compiled = (f"refused by the compiler: {s['compile_error']}" if s.get("compile_error")
                  else human(s["compiled_bytes"]))
      rows.append((r["job"], where, stage, ",".join(map(str, s["mesh"])),
                   human(s["estimate_bytes"]), compiled, human(s.get("sum_bytes")), fits,
                   str(s.get("estimate_over_compiled", "-")),
                   f"{s['compile_seconds']:.0f} s" if "compile_seconds" in s else "-"))
  return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# ----------------------------------------------------------------------------- command line

def define_flags() -> dict:
  """The command line's flags (defined only when run as a program: importing has no effects)."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Stage config file (path.py[:preset]); a PPO config plans the pipeline.",
          lock_config=False),
      "model": flags.DEFINE_string("model", None, "Config preset: --config=configs/ppo_ptx.py:"
                                   "<model> (default without --config: every preset)."),
      "stage": flags.DEFINE_enum("stage", None, STAGES, "Only this stage (default: all)."),
      "topology": flags.DEFINE_string(
          "topology", None, "TPU slice to compile every stage for (v5e:4x4, v4:4x4x4, "
          "v5p:8x8x16, v6e:16x16, ...; needs libtpu: pip install -e \".[tpu]\")."),
      "mesh": flags.DEFINE_string("mesh", None, "data,fsdp,tensor mesh shape; -1 = the rest "
                                  "(default: the config's when the batches split over it)."),
      "num_devices": flags.DEFINE_integer(
          "num_devices", None, "Devices to plan for without --topology (default: the preset's "
          "reference slice, REFERENCE_DEVICES)."),
      "markdown": flags.DEFINE_bool("markdown", False, "Print the table as markdown rows (the "
                                    "README's fit table) instead of aligned text."),
      "platform": flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"],
                                    "Kernels the estimate assumes for attention_impl 'auto' "
                                    "(default tpu: splash; gpu: cuDNN; cpu: einsum)."),
  }


def jobs(opts: dict):
  """[(name, config)] the flags ask for."""
  config = opts.get("config")
  if config is not None:
    if "model" not in config:
      raise UserError("--config: the config has no 'model' field")
    return [(str(config.get("name", "config")), config)]
  names = [opts["model"]] if opts.get("model") else list(CONFIG_PRESETS)
  return [(name, paper_config(name)) for name in names]


def main(argv, f: dict):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; use --model/--config and flags")
  opts = {k: v.value for k, v in f.items()}
  if opts.get("topology"):
    from rlhf_jax import plan_compile  # pylint: disable=g-import-not-at-top
    plan_compile.quiet_libtpu()
  results = [plan_job(config, opts, name) for name, config in jobs(opts)]
  print(format_markdown(results) if opts.get("markdown") else format_table(results))
  out = results[0] if len(results) == 1 else {"jobs": results}
  print("RESULT " + json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _flags = define_flags()
  run_cli(lambda argv: main(argv, _flags))
