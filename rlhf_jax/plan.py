r"""Memory planner: per-device bytes of a stage on a mesh, before renting the mesh.

  python -m rlhf_jax.plan                                      # every preset, every stage
  python -m rlhf_jax.plan --model=6.7b --stage=ppo --mesh=1,16,4 --batch_size=512 --seq_len=2048
  python -m rlhf_jax.plan --config=configs/ppo_ptx.py:6.7b [--mesh=1,-1,8 --num_devices=256]

Nothing is allocated: parameter and optimizer shapes come from `jax.eval_shape`, their per-device
shards from the same rule table training uses (`rlhf_jax.sharding`), so a dimension the mesh does not
divide is counted replicated and listed under "notes".

Columns: act/param/opt are the dtypes of activations, weights and AdamW moments; then bytes per
device:
  params  the trained model (policy for sft/ppo, reward model for rm), in param_dtype.
  grads   its gradients (param_dtype), alive during the update.
  opt     AdamW state: two moments per parameter in --optimizer_dtype (+ a step count).
  frozen  ppo: the reference policy (lm head) and the reward model (scalar head), params only.
  value   ppo: value model params + gradients + AdamW state.
  act     peak transient memory of the step's activations (formula below).
  total   params + grads + opt + frozen + value + act.

Activation formula. b = batch rows per device = batch / (data * fsdp), s = seq_len, d = d_model,
a = bytes of cfg.dtype, h = num_heads / t_h, k = num_kv_heads / t_k, f = d_ff / t_f, v = vocab / t_v
where t_x is the tensor-axis size if it divides that dimension, else 1 (replicated). Per layer and
token, the backward pass keeps what `jax.ad_checkpoint.print_saved_residuals` lists for this model:
  saved_layer = 6*4*d (the two norms' float32 inputs, statistics, outputs) + 2*a*d (their casts to
                dtype, when a < 4) + a*(h + 2k)*hd (q, k, v) + (4 + a)*h*s (softmax output in
                float32 and probs in dtype) + a*h*hd (attention output)
                + 6*a*f (MLP: SwiGLU gate, up, sigmoid, silu, product; GELU-tanh intermediates)
                + 2d (residual dropout masks, with dropout_resid) + h*s (attention dropout mask)
  shared, per token, kept through the whole backward pass: 2*a*d (embeddings) + 5*h*s (the
  attention mask and masked scores, built once for all layers).
  head, per token: 4d (final norm) and, for the LM head, 3*4*v (float32 logits, log-softmax, and
  their gradient); freed before the layers' backward starts.
  no remat:  act = b * s * (L * saved_layer + shared + head)
  remat:     act = b * s * (L * a*d + shared + max(saved_layer, head))
             (the layer inputs stay; one layer's residuals are rebuilt at a time, after the head's
             buffers are gone)
sft and rm train on the whole batch (rm: batch = responses, each forwarded once; scalar head, no
logits). ppo = max(rollout, update): the rollout holds the policy's KV cache,
2 * L * b * s * k * hd * a, plus one layer's forward and float32 logits of the scoring passes
(reference, reward, value: inference only); the update holds the policy's and the value model's
training activations for one minibatch (--minibatch_size) at once. The pretraining (ptx) term is
accumulated over minibatches of the same size and adds nothing to the peak.

With --config, a PPO config (one with `ppo`) gives batch = ppo.batch_size episodes, seq_len =
ppo.prompt_len + ppo.response_len and minibatch = batch / ppo.minibatches; the other stage configs
give their top-level batch_size and seq_len. Flags override the config.
"""
import dataclasses
import math
import os
from typing import Optional

from absl import flags
from ml_collections import config_flags

from rlhf_jax.errors import UserError, run_cli

STAGES = ("sft", "rm", "ppo")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# preset -> (mesh, batch_size, seq_len, remat, model overrides): a sensible first run of each shape,
# used when the planner prints every preset. The large ones compute in bfloat16 (float32 weights).
_BF16 = {"dtype": "bfloat16"}
DEFAULTS = {
    "tiny": ((1, 8, 1), 32, 256, False, {}),
    "tiny-gpt2": ((1, 8, 1), 32, 256, False, {}),
    "125m": ((1, 8, 1), 64, 1024, False, {}),
    "gpt2-small": ((1, 8, 1), 64, 1024, False, {}),
    "smollm2-135m": ((1, 8, 1), 64, 2048, True, {}),
    "350m": ((1, 8, 1), 64, 2048, True, {}),
    "1.3b": ((1, 8, 1), 64, 2048, True, _BF16),
    "llama3-1b": ((1, 8, 1), 64, 2048, True, _BF16),
    "6.7b": ((1, 32, 4), 128, 2048, True, _BF16),
    "llama3-8b": ((1, 32, 4), 128, 2048, True, _BF16),
    "175b": ((1, 64, 16), 128, 2048, True, _BF16),
}
_FALLBACK_DEFAULT = ((1, 8, 1), 64, 2048, True, {})


@dataclasses.dataclass
class Plan:
  """One row of the table: per-device bytes of each part of a stage's memory."""
  model: str
  stage: str
  mesh: tuple
  batch_size: int
  seq_len: int
  remat: bool
  dtypes: str
  params: int
  grads: int
  opt: int
  frozen: int
  value: int
  act: int
  notes: list

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt + self.frozen + self.value + self.act


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
  import jax
  import jax.numpy as jnp
  from rlhf_jax import sharding
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


def model_bytes(cfg, head: str, mesh_shape: tuple, optimizer_dtype: str):
  """(params, grads, opt state, [fallback notes]) per device for one model."""
  import jax
  import optax
  from rlhf_jax import sharding
  from rlhf_jax.models import abstract_params
  boxed = abstract_params(cfg, head=head, boxed=True)
  params = tree_bytes(boxed, mesh_shape)
  opt = tree_bytes(jax.eval_shape(optax.adamw(1e-4).init, boxed), mesh_shape, optimizer_dtype)
  return params, params, opt, sharding.sharding_fallbacks(boxed, mesh_shape)


# ----------------------------------------------------------------------------- activations

def _split(n: int, t: int) -> float:
  """n over the tensor axis if it divides n, else replicated."""
  return n / t if n % t == 0 else n


def layer_bytes_per_token(cfg, seq_len: int, tensor: int) -> float:
  """Bytes one layer keeps for its backward pass, per token (saved_layer in the module doc)."""
  a = _DTYPE_BYTES[cfg.dtype]
  d, hd = cfg.d_model, cfg.head_dim
  h, k, f = _split(cfg.num_heads, tensor), _split(cfg.num_kv_heads, tensor), _split(cfg.d_ff, tensor)
  norms = 6 * 4 * d + (2 * a * d if a < 4 else 0)
  attention = a * (h + 2 * k) * hd + (4 + a) * h * seq_len + a * h * hd
  saved = norms + attention + 6 * a * f
  if cfg.dropout_resid:
    saved += 2 * d
  if cfg.dropout_attn:
    saved += h * seq_len
  return saved


def shared_bytes_per_token(cfg, seq_len: int, tensor: int) -> float:
  """Kept through the whole backward pass: embeddings and the attention mask (built once)."""
  return 2 * _DTYPE_BYTES[cfg.dtype] * cfg.d_model + 5 * _split(cfg.num_heads, tensor) * seq_len


def head_bytes_per_token(cfg, head: str, tensor: int) -> float:
  """Final norm and, for the LM head, float32 logits, log-softmax and their gradient."""
  out = 4 * cfg.d_model
  if head == "lm":
    out += 3 * 4 * _split(cfg.vocab_size, tensor)
  return out


def train_activation_bytes(cfg, head: str, rows: int, seq_len: int, tensor: int,
                           remat: bool) -> int:
  """Peak activation bytes per device of a forward+backward pass on `rows` local sequences."""
  layer = layer_bytes_per_token(cfg, seq_len, tensor)
  shared = shared_bytes_per_token(cfg, seq_len, tensor)
  top = head_bytes_per_token(cfg, head, tensor)
  if remat:
    per_token = cfg.num_layers * _DTYPE_BYTES[cfg.dtype] * cfg.d_model + shared + max(layer, top)
  else:
    per_token = cfg.num_layers * layer + shared + top
  return int(rows * seq_len * per_token)


def rollout_bytes(cfg, rows: int, seq_len: int, tensor: int) -> int:
  """PPO rollout + scoring: the policy's KV cache, one layer's forward, float32 logits."""
  a = _DTYPE_BYTES[cfg.dtype]
  cache = 2 * cfg.num_layers * rows * seq_len * _split(cfg.num_kv_heads, tensor) * cfg.head_dim * a
  scoring = rows * seq_len * (layer_bytes_per_token(cfg, seq_len, tensor)
                              + shared_bytes_per_token(cfg, seq_len, tensor)
                              + head_bytes_per_token(cfg, "lm", tensor))
  return int(cache + scoring)


# ----------------------------------------------------------------------------- a plan

def plan(cfg, stage: str, mesh_shape: tuple, batch_size: int, seq_len: int,
         optimizer_dtype: str = "float32", remat: Optional[bool] = None,
         minibatch_size: Optional[int] = None, name: str = "") -> Plan:
  """Per-device memory of `stage` for model `cfg` on a (data, fsdp, tensor) mesh."""
  from rlhf_jax import sharding
  if stage not in STAGES:
    raise UserError(f"stage: expected one of {STAGES}, got {stage!r}")
  if seq_len < 1 or seq_len > cfg.max_len:
    raise UserError(f"seq_len: must be in [1, max_len={cfg.max_len}] of the model, got {seq_len}")
  remat = cfg.remat != "none" if remat is None else remat   # (any remat policy counts as remat)
  sizes = sharding.mesh_sizes(mesh_shape)
  dp, tensor = sizes["data"] * sizes["fsdp"], sizes["tensor"]
  sharding.check_batch_size(batch_size, mesh_shape)
  head = "scalar" if stage == "rm" else "lm"
  params, grads, opt, notes = model_bytes(cfg, head, mesh_shape, optimizer_dtype)
  frozen = value = 0
  if stage == "ppo":
    minibatch = minibatch_size or max(batch_size // 8, dp)
    sharding.check_batch_size(minibatch, mesh_shape, "minibatch_size")
    v_params, v_grads, v_opt, _ = model_bytes(cfg, "scalar", mesh_shape, optimizer_dtype)
    frozen = params + v_params        # reference policy (lm) + reward model (scalar)
    value = v_params + v_grads + v_opt
    update = (train_activation_bytes(cfg, "lm", minibatch // dp, seq_len, tensor, remat)
              + train_activation_bytes(cfg, "scalar", minibatch // dp, seq_len, tensor, remat))
    act = max(update, rollout_bytes(cfg, batch_size // dp, seq_len, tensor))
  else:
    act = train_activation_bytes(cfg, head, batch_size // dp, seq_len, tensor, remat)
  dtypes = f"{_SHORT[cfg.dtype]}/{_SHORT[cfg.param_dtype]}/{_SHORT[optimizer_dtype]}"
  return Plan(name, stage, tuple(mesh_shape), batch_size, seq_len, remat, dtypes, params, grads,
              opt, frozen, value, act, notes)


# ----------------------------------------------------------------------------- the table

def human(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


def format_table(plans) -> str:
  """Aligned text table, one row per plan; sharding fallbacks as notes below their rows."""
  head = ("model", "stage", "mesh d,f,t", "chips", "batch x seq", "remat", "act/param/opt", "params",
          "grads", "opt", "frozen", "value", "act", "total/device")
  rows, notes = [], []
  for p in plans:
    rows.append((p.model, p.stage, ",".join(map(str, p.mesh)), str(math.prod(p.mesh)),
                 f"{p.batch_size} x {p.seq_len}", "yes" if p.remat else "no", p.dtypes, human(p.params),
                 human(p.grads), human(p.opt), human(p.frozen), human(p.value), human(p.act),
                 human(p.total)))
    if p.notes and (p.model, tuple(p.notes)) not in notes:
      notes.append((p.model, tuple(p.notes)))
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  out = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
  for model, found in notes:
    out.append(f"note: {model}: sharding fallbacks: " + "; ".join(found))
  return "\n".join(out)


# ----------------------------------------------------------------------------- command line

def define_flags() -> dict:
  """The command line's flags (defined only when run as a program, so importing is side-effect free)."""
  return {
      "model": flags.DEFINE_string("model", None, "Model preset (default: every preset)."),
      "stage": flags.DEFINE_enum("stage", None, STAGES,
                                 "Stage (default: the config's, else all three)."),
      "mesh": flags.DEFINE_string("mesh", None, "data,fsdp,tensor mesh shape; -1 = the rest."),
      "num_devices": flags.DEFINE_integer(
          "num_devices", None, "Devices a -1 in --mesh divides (default: local devices)."),
      "batch_size": flags.DEFINE_integer("batch_size", None,
                                         "Global batch (sequences; ppo: episodes)."),
      "minibatch_size": flags.DEFINE_integer(
          "minibatch_size", None,
          "ppo update minibatch (default: batch / the config's ppo.minibatches, else batch/8)."),
      "seq_len": flags.DEFINE_integer("seq_len", None,
                                      "Tokens per sequence (ppo: prompt + response)."),
      "optimizer_dtype": flags.DEFINE_enum("optimizer_dtype", "float32", list(_DTYPE_BYTES),
                                           "dtype of the AdamW moments."),
      "remat": flags.DEFINE_bool("remat", None, "Recompute layers in the backward pass (default: "
                                 "the model config's; the all-preset table uses DEFAULTS)."),
      "config": config_flags.DEFINE_config_file("config", None,
                                                "Stage config file (path.py[:preset]).",
                                                lock_config=False),
  }


def _config_value(config, name, default=None):
  if config is None:
    return default
  node = config
  for part in name.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def _runs_from_flags(f: dict):
  return requests({k: v.value for k, v in f.items()})


def _config_shape(config, batch: int, seq: int):
  """(batch, seq_len, minibatches) a stage config asks for, `batch`/`seq` where it says nothing.

  The PPO stage (a config with `ppo`): ppo.batch_size episodes of ppo.prompt_len +
  ppo.response_len tokens, updated in ppo.minibatches minibatches. The other stages: the top-level
  batch_size and seq_len; minibatches None.
  """
  if _config_value(config, "ppo") is None:
    return _config_value(config, "batch_size", batch), _config_value(config, "seq_len", seq), None
  p = config.ppo
  return p.batch_size, p.prompt_len + p.response_len, p.minibatches


def requests(opts: dict):
  """(name, ModelConfig, stages, mesh, batch, seq, remat, minibatch) for every table row group
  requested; minibatch None = `plan`'s default.

  opts: the flag values by flag name (None = not given); opts['config'] a stage ConfigDict or None.
  """
  from rlhf_jax import sharding
  from rlhf_jax.models import PRESET_NAMES, ModelConfig, get_model_config
  config = opts.get("config")
  if config is not None and "model" not in config:
    raise UserError("--config: the config has no 'model' field")
  if opts.get("model") is not None:
    names, cfgs = [opts.get("model")], [get_model_config(opts.get("model"))]
  elif config is not None:
    names, cfgs = [_config_value(config, "name", "config")], [ModelConfig.from_dict(config.model)]
  else:
    names = list(PRESET_NAMES)
    cfgs = [get_model_config(n, **DEFAULTS.get(n, _FALLBACK_DEFAULT)[4]) for n in names]
  stage = opts.get("stage") or _config_value(config, "stage")
  stages = STAGES if stage is None else (stage,)
  runs = []
  for name, cfg in zip(names, cfgs):
    mesh, batch, seq, remat, _ = DEFAULTS.get(name, _FALLBACK_DEFAULT)
    mesh = opts.get("mesh") or _config_value(config, "mesh.shape", mesh)
    field = "--mesh" if opts.get("mesh") else "mesh.shape"
    shape = sharding.parse_mesh_shape(mesh, field)
    devices = opts.get("num_devices") or (math.prod(shape) if -1 not in shape else None)
    if devices is None:
      import jax
      devices = jax.device_count()
    shape = sharding.resolve_mesh_shape(shape, devices, field)
    batch, seq, minibatches = _config_shape(config, batch, min(seq, cfg.max_len))
    batch, seq = opts.get("batch_size") or batch, opts.get("seq_len") or seq
    minibatch = opts.get("minibatch_size") or (int(batch) // minibatches if minibatches else None)
    remat = opts.get("remat") if opts.get("remat") is not None else (
        remat if opts.get("model") is None and config is None else None)
    runs.append((name, cfg, stages, shape, int(batch), int(seq), remat, minibatch))
  return runs


def main(argv, f: dict):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; use --model/--config and flags")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  plans = []
  for name, cfg, stages, shape, batch, seq, remat, minibatch in _runs_from_flags(f):
    for stage in stages:
      plans.append(plan(cfg, stage, shape, batch, seq, f["optimizer_dtype"].value, remat,
                        minibatch, name))
  print(format_table(plans))


if __name__ == "__main__":
  _flags = define_flags()
  run_cli(lambda argv: main(argv, _flags))
