"""What a stage reads and writes around its loop: the config check, the workdir, 'auto' model
paths, the data and tokenizer, the models it starts from, and the atomic final model.

A pretrain/SFT/RM stage starts with `begin_stage` (None: its final model exists, skip it) and
ends with `save_final`; PPO and collect use the same pieces (`resolve_auto`, `data_paths`,
`load_init_model`, `load_scalar_model`, `load_tokenizer_for`, `load_split`).
"""
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from rlhf_jax import convert
from rlhf_jax import distributed
from rlhf_jax import sharding
from rlhf_jax.checkpoint import CheckpointManager, check_matches, quiet_aborted_reads
from rlhf_jax.convert import load_model
from rlhf_jax.data import builders, load_tokenizer, offline_dataset, prepare, real_data
from rlhf_jax.errors import UserError, check_int, check_positive
from rlhf_jax.models import ModelConfig, abstract_params
from rlhf_jax.models.transformer import resize_vocab
from rlhf_jax.train import STAGE_NAMES
from rlhf_jax.train import loop
from rlhf_jax.train import optim
from rlhf_jax.train import step

STAGE_META = "rlhf_jax_stage.json"


# ----------------------------------------------------------------------------- config

def validate_config(config):
  """Checks every top-level field a training stage reads, before anything is loaded or written:
  the stage and model here, then the optimizer's (optim.py); for pretrain/SFT/RM the batch's
  (step.py) and the loop's (loop.py), for PPO the non-finite limit and seed (loop.py), the fields
  of the other stages it must not carry, and its `ppo` section and reward (ppo.py); then the
  data's and the reward model's here."""
  if "stage" not in config or config.stage not in STAGE_NAMES:
    raise UserError(f"config.stage must be one of {', '.join(STAGE_NAMES)}, "
                    f"got {config.get('stage')!r}")
  if "model" not in config:
    raise UserError("config.model is missing (expected a model preset ConfigDict)")
  ModelConfig.from_dict(config.model)
  sharding.parse_mesh_shape(config.mesh.shape, "config.mesh.shape")
  optim.check_config(config)
  if config.stage == "ppo":
    loop.check_run_config(config)
    check_unread(config, step.FIELDS + loop.FIELDS,
                 "its batch and loop fields are under config.ppo")
    from rlhf_jax.train import ppo  # pylint: disable=g-import-not-at-top  (ppo imports this)
    ppo.validate_ppo_config(config)
  else:
    step.check_config(config)
    loop.check_config(config)
  check_positive(config, "data.prefetch", kind=int, allow_zero=True)
  if "shards" in config.data:
    check_positive(config, "data.shards", kind=int, allow_zero=True)
  for name in ("data_seed", "data.task_seed"):
    check_int(config, name)
  if config.stage in ("rm", "dpo"):
    k_max = config.k_max
    if not isinstance(k_max, int) or isinstance(k_max, bool) or (k_max != 0 and k_max < 2):
      raise UserError(f"config.k_max must be an integer >= 2 (or 0: the largest K in the data), "
                      f"got {k_max!r}")
  if config.stage == "rm":
    check_positive(config, "norm_examples", kind=int, allow_zero=True)
  if config.stage == "dpo":
    check_positive(config, "beta")
  if config.data.source not in ("offline", "dir") + real_data.SOURCES:
    raise UserError(f"config.data.source must be one of offline, dir, "
                    f"{', '.join(real_data.SOURCES)}; got {config.data.source!r}")
  if config.data.source in real_data.SOURCES:
    real_data.check_config(config)
  if config.data.source == "dir" and not config.data.dir:
    raise UserError("config.data.dir is required when config.data.source is 'dir'")
  if config.data.source == "offline":
    offline_dataset.from_config(config.data.get("task", {}))


def check_unread(config, fields, why):
  """UserError naming the first of `fields` the config has: fields of other stages that this
  stage would silently ignore (`why` says where its own are)."""
  for name in fields:
    if name in config:
      raise UserError(f"config.{name}: the {config.stage} stage does not read it ({why}); "
                      "remove it")


# ----------------------------------------------------------------------------- workdir

def final_model_dir(workdir, stage):
  return os.path.join(workdir, stage, "model")


def check_workdir(workdir):
  """The absolute workdir; a UserError when it exists but is not a directory."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir: {workdir} is a file, expected a directory")
  for parent in _parents(workdir):
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise UserError(f"--workdir: {parent} is a file, so {workdir} cannot be created")
  return workdir


def _parents(path):
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    yield path


def finished(workdir, stage):
  """The stage's final model when it exists (after saying the stage is skipped), else None."""
  final = final_model_dir(workdir, stage)
  if os.path.exists(final):
    print(f"{stage}: final model exists at {final}; skipping the stage", flush=True)
    return final
  return None


def resolve_auto(path, workdir, stage, field, hint=""):
  """`path`, or for 'auto' the final model of `stage`, which must exist (else a UserError
  naming `config.<field>`; `hint` ends its advice)."""
  if path != "auto":
    return path
  found = final_model_dir(workdir, stage)
  if not os.path.exists(found):
    raise UserError(f"config.{field}: 'auto' means the {stage} stage's model {found}, which does "
                    f"not exist; run that stage first or set config.{field}{hint}")
  return found


def check_checkpoints(config, directory):
  """Fails early (before models and data are loaded) when the run would resume from checkpoints
  in `directory` it cannot use: not ours, an unreadable record, or another config. The arrays
  themselves are read (and checked) when the loop restores them."""
  if not os.path.exists(directory) or (os.path.isdir(directory) and not os.listdir(directory)):
    return
  with CheckpointManager(directory, save_every=config.checkpoint_every,
                         keep=config.keep_checkpoints) as ckpt:
    latest = ckpt.latest_step()
    if latest is not None:
      loop.check_resume_config(ckpt.read_meta(latest).get("config"), config,
                               f"the checkpoint {ckpt.directory}/{latest}")


# Config presets (configs/models.py PAPER) too large to train from random initialisation by
# accident: they need a base model, or init_from='random' to do it on purpose.
NEEDS_BASE_MODEL = ("1.3b", "6.7b", "175b")


def resolve_init(config, workdir, stage, previous):
  """The model a pretrain/SFT/RM stage starts from ('' = random init): `config.init_from`, with
  'auto' the `previous` stage's model (random init when there is no previous stage) and
  'random' random init on purpose. A `NEEDS_BASE_MODEL` preset refuses to start from random
  init unless init_from is 'random' (one line, before anything is loaded or written)."""
  init_from = config.init_from
  if init_from == "random":
    return ""
  if init_from == "auto":
    init_from = (resolve_auto("auto", workdir, previous, "init_from",
                              " to a model (e.g. smollm2-135m)") if previous else "")
  if not init_from and config.get("name") in NEEDS_BASE_MODEL:
    raise UserError(f"config.init_from: the {config.name} preset would start {stage} from random "
                    "initialisation; set it to a base model (a model directory, GGUF or "
                    "Hugging Face checkpoint) or to 'random' to train from scratch on purpose")
  return init_from


@dataclasses.dataclass
class StageSetup:
  """What every stage resolves before it builds anything (see `begin_stage`)."""
  workdir: str
  stage_dir: str
  cfg: ModelConfig
  mesh: Any
  tfds_dir: str
  data_tokenizer_dir: str
  init_from: str       # the model to start from ('' = random init)


def begin_stage(config, workdir, stage, previous):
  """Resolves paths, the model config, the mesh, the data and `config.init_from` of a stage.

  Returns None (after saying so) when the stage's final model already exists. `previous` is the
  stage whose model `init_from='auto'` means ('' for none).
  """
  workdir = check_workdir(workdir)
  if finished(workdir, stage):
    return None
  cfg = ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  step.check_mesh_batch(config, mesh)
  init_from = resolve_init(config, workdir, stage, previous)   # before data are written
  check_checkpoints(config, os.path.join(workdir, stage, "checkpoints"))
  tfds_dir, data_tok_dir = data_paths(config, workdir)
  return StageSetup(workdir, os.path.join(workdir, stage), cfg, mesh, tfds_dir, data_tok_dir,
                    init_from)


# ----------------------------------------------------------------------------- data

def data_paths(config, workdir):
  """(tfds data_dir, default tokenizer dir) of the run's data; the offline task is prepared
  under `<workdir>/data` when missing."""
  if config.data.source == "dir" and not os.path.isdir(config.data.dir):
    raise UserError(f"config.data.dir: {config.data.dir} is not a directory")
  if config.data.source == "offline":
    out = config.data.dir or os.path.join(workdir, "data")
    tfds_dir = os.path.join(out, "tfds")
    task, sizes = offline_dataset.from_config(config.data.get("task", {}))
    missing = not os.path.isdir(tfds_dir)
    distributed.barrier("rlhf_jax_data_check")    # every process looked before any writes
    if missing:
      print(f"preparing the offline task in {out}", flush=True)
      if distributed.is_primary():     # one writer; the others wait for it at the barrier
        prepare.prepare_offline(out, task, sizes, seed=config.data.task_seed)
      distributed.barrier("rlhf_jax_data_prepared")
    else:
      offline_dataset.check_prepared(out, task, sizes, config.data.task_seed)
    return tfds_dir, os.path.join(out, "tokenizer")
  if config.data.source in real_data.SOURCES:    # HH-RLHF / TL;DR files, prepared on first use
    out = config.data.dir or os.path.join(workdir, "data")
    return real_data.prepared_tfds_dir(config.data, out), os.path.join(out, "tokenizer")
  tfds_dir = os.path.join(config.data.dir, "tfds")
  if not os.path.isdir(tfds_dir):
    tfds_dir = config.data.dir
  return tfds_dir, os.path.join(config.data.dir, "tokenizer")


def load_tokenizer_for(config, model_tokenizer_dir, data_tokenizer_dir, cfg):
  """(tokenizer, its dir): config.data.tokenizer, else the model's, else the data's."""
  path = config.data.tokenizer or model_tokenizer_dir or data_tokenizer_dir
  if not path or not os.path.isdir(path):
    raise UserError(f"config.data.tokenizer: no tokenizer at {path!r} (set it to a tokenizer "
                    "directory)")
  tok = load_tokenizer(path)
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(f"config.data.tokenizer: {path} has {tok.vocab_size} tokens, more than the "
                    f"model's vocab_size {cfg.vocab_size}")
  return tok, path


def local_batch_size(mesh, global_size):
  """The rows of a global batch of `global_size` that this process loads."""
  rows = sharding.process_batch_rows(mesh, global_size)
  return rows.stop - rows.start


def load_split(tfds_dir, kind, split, field):
  """The TFDS source of one split; a missing split names its config field."""
  if kind in builders.BUILDERS:
    info = os.path.join(tfds_dir, builders.BUILDERS[kind].name, builders.VERSION,
                        "dataset_info.json")
    if not os.path.isfile(info):   # checked here: tfds would log a warning line first
      raise UserError(f"config.data.{field}: {tfds_dir} holds no prepared {kind} dataset (no "
                      f"{os.path.relpath(info, tfds_dir)}; make it with rlhf_jax.data.prepare)")
  try:
    return builders.load_source(tfds_dir, kind, split)
  except UserError as e:
    raise UserError(f"config.data.{field}: {e}") from None


# ----------------------------------------------------------------------------- models

def check_same_shapes(loaded, expected, where):
  """UserError naming the first parameter whose shape differs (e.g. RM init from a model of
  another shape)."""
  describe = lambda tree: {jax.tree_util.keystr(p): [list(np.shape(x)), "float"]
                           for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  check_matches(describe(loaded), describe(expected), where)


def shape_fields_differ(a: ModelConfig, b: ModelConfig):
  """Names of the fields that decide parameter shapes and differ between two model configs."""
  fields = ("flavour", "vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
            "head_dim", "d_ff", "tie_embeddings")
  out = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
  if a.flavour == "gpt2" and b.flavour == "gpt2" and a.max_len != b.max_len:
    out.append(f"max_len {a.max_len} vs {b.max_len}")
  return out


def load_init_model(path, cfg, where, mesh=None):
  """Parameters (LM head; global arrays sharded on `mesh`, each process restoring only its own
  slices; host arrays without a mesh) and tokenizer dir of the model at `path`, checked against
  the run's model config `cfg` (shape fields must agree; dropout/dtype/remat come from cfg)."""
  quiet_aborted_reads()    # a damaged model: one line, no tensorstore noise
  model = _load(path, where, mesh)
  if model.head != "lm":
    raise UserError(f"{where}: {path} holds a model with a {model.head!r} head; expected a "
                    "language model (the previous stage's model)")
  differ = shape_fields_differ(model.cfg, cfg)
  if differ:
    raise UserError(f"{where}: {path} holds a model of another shape than config.model "
                    f"({'; '.join(differ)})")
  params = fit_vocab_rows(model.params, model.cfg, cfg, mesh)
  check_same_shapes(params, abstract_params(cfg, "lm"), f"{where}: {path}")
  return params, model.tokenizer_dir


def fit_vocab_rows(params, loaded_cfg: ModelConfig, cfg: ModelConfig, mesh=None):
  """An LM's parameters with the embedding rows (and LM-head columns) padded with zeros (or cut)
  from loaded_cfg.padded_vocab to cfg.padded_vocab (`config.model.vocab_multiple`; e.g. HF or
  GGUF weights of 50257 rows into a model of 50304); only those leaves change, placed on `mesh`
  with the model's shardings."""
  if loaded_cfg.padded_vocab == cfg.padded_vocab:
    return params
  rows = cfg.padded_vocab
  head = {k: params[k] for k in ("embed", "lm_head") if k in params}
  if mesh is None:
    head = resize_vocab(head, cfg, rows)
  else:
    shardings = sharding.param_shardings(abstract_params(cfg, "lm", boxed=True), mesh)
    head = jax.jit(lambda h: resize_vocab(h, cfg, rows),
                   out_shardings={k: shardings[k] for k in head})(head)
  return {**params, **head}


def _load(path, where, mesh):
  """`convert.load_model(path, mesh=mesh)`, its errors prefixed with `where`."""
  try:
    return load_model(path, mesh=mesh)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None


def load_scalar_model(path, policy_cfg, field, mesh=None):
  """(config with dropout off, params on `mesh` or on the host) of the scalar-head model at
  `path` (a reward model or value function), checked to score the policy's tokens; errors name
  `config.<field>`."""
  quiet_aborted_reads()
  model = load_model(path, mesh=mesh)
  if model.head != "scalar":
    raise UserError(f"config.{field}: {path} holds a model with a {model.head!r} head; expected a "
                    "reward model (scalar head)")
  if model.cfg.vocab_size != policy_cfg.vocab_size:
    raise UserError(f"config.{field}: {path} has vocab_size {model.cfg.vocab_size} but the policy "
                    f"has {policy_cfg.vocab_size}; they must share the tokenizer")
  check_same_shapes(model.params, abstract_params(model.cfg, "scalar"), f"config.{field}: {path}")
  return model.cfg.replace(dropout_resid=0.0, dropout_attn=0.0), model.params


def save_final(stage_dir, cfg, params, head, tokenizer_dir, meta):
  """Writes `<stage_dir>/model` atomically: the model (rlhf_jax format, readable by
  `rlhf_jax.convert.load_model` and `rlhf_jax.generate`), its tokenizer and `rlhf_jax_stage.json`
  (what the stage did: steps, final metrics, e.g. the reward normalisation bias).

  Every process calls it: the parameters (global arrays) are written by all of them through orbax,
  each its own shards, into `<stage_dir>/.model.partial`; process 0 then writes the JSON and the
  tokenizer and renames the directory into place; the others wait for that (the model is the
  next stage's input).
  """
  final = os.path.join(stage_dir, "model")
  partial = os.path.join(stage_dir, ".model.partial")
  if distributed.is_primary():
    if os.path.exists(partial):
      shutil.rmtree(partial)
    os.makedirs(partial)
  distributed.barrier("rlhf_jax_final_model_start")
  convert.write_native_params(partial, params)
  if distributed.is_primary():
    convert.write_native_meta(partial, cfg, head)
    convert.copy_tokenizer(tokenizer_dir, partial)
    with open(os.path.join(partial, STAGE_META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    os.rename(partial, final)
  distributed.barrier("rlhf_jax_final_model_done")
  return final
