"""Checkpoints of the full training state over orbax's CheckpointManager.

One checkpoint = one step directory holding up to three items:
  state  every array of the run as one pytree: params, optimizer state, step, RNG keys, EMA params,
         controller arrays... (orbax StandardSave; each process writes only its own shards).
  meta   a JSON dict: controller/scheduler state, anything JSON-able and the same on every
         process (written by process 0), plus what we add: the tree description (path -> shape,
         dtype) and which leaves were RNG keys.
  data   what differs per process, e.g. its data iterators' positions (each host reads its own
         records): one JSON file per process, `process_<i>-of-<n>.json` (grain's pattern), each
         process restoring its own (`read_data`).

Properties:
  async      `save` returns once the arrays are copied off the device; writing goes on in the
             background (`wait()` blocks until done; `restore` and `close` wait first).
  every N    `save(step, ...)` writes only when step % save_every == 0 (or force=True).
  keep K     only the newest `keep` checkpoints are kept.
  atomic     orbax writes `<step>.orbax-checkpoint-tmp-<time>/` and renames it to `<step>/` only
             when every item and process is done (on GCS: a commit_success.txt marker). A crash
             mid-save leaves only a tmp directory, which `latest_step` ignores and the next manager
             deletes.
  reshard    `restore(target=...)` takes ShapeDtypeStructs with shardings
             (`rlhf_jax.sharding.abstract_with_sharding`), so a run saved on one mesh resumes on
             another; a target that does not match the checkpoint is a one-line UserError.
  ours       the directory holds a marker file; a non-empty directory without it is refused rather
             than written into or cleaned up.
  damage     a checkpoint whose record or arrays cannot be read (truncated, overwritten files) is
             a one-line UserError naming its directory and the other steps on disk, without the
             tensorstore noise of the aborted reads (`quiet_aborted_reads`).
  latest     `latest_path()`: the newest complete checkpoint's directory, after pending saves.

Typed PRNG keys are stored as `jax.random.key_data` and rewrapped on restore. Nothing is pickled.
"""
import dataclasses
import json
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rlhf_jax.errors import UserError

MARKER = "rlhf_jax_checkpoints.json"
FORMAT = {"format": "rlhf_jax.checkpoint", "version": 1}
_TREE, _KEYS, _USER = "tree", "rng_keys", "user"


# ----------------------------------------------------------------------------- tree helpers

def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path)


def encode_keys(tree: Any):
  """(tree with typed PRNG keys replaced by their key data, {path: key impl name})."""
  impls = {}

  def one(path, x):
    if _is_key(x):
      impls[_path_str(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x
  return jax.tree_util.tree_map_with_path(one, tree), impls


def _encode_key_target(tree: Any):
  """Like encode_keys, for a tree of ShapeDtypeStructs (a restore target); keys' impls come from
  the checkpoint record."""
  def one(x):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return x
  return jax.tree.map(one, tree)


def decode_keys(tree: Any, impls: dict):
  """Inverse of encode_keys."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.wrap_key_data(x, impl=impls[_path_str(p)])
      if _path_str(p) in impls else x, tree)


def describe_tree(tree: Any) -> dict:
  """{path: [shape, dtype]} of every leaf: what a restore target must match."""
  return {_path_str(p): [list(np.shape(x)), str(np.dtype(x.dtype))]
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_matches(saved: dict, expected: dict, where: str) -> None:
  """Raises a one-line UserError naming the first leaf where the two tree descriptions differ."""
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  if missing:
    raise UserError(f"{where}: checkpoint does not match the model: it has no {missing[0]} "
                    f"({len(missing)} leaves missing)")
  if extra:
    raise UserError(f"{where}: checkpoint does not match the model: it has {extra[0]} which the "
                    f"model lacks ({len(extra)} extra leaves)")
  for path in sorted(expected):
    if list(saved[path]) != list(expected[path]):
      (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected[path]
      raise UserError(f"{where}: checkpoint does not match the model: {path} is "
                      f"{s_dtype}{tuple(s_shape)} in the checkpoint, {e_dtype}{tuple(e_shape)} "
                      f"expected")


# ----------------------------------------------------------------------------- directory

def _claim_directory(directory: epath.Path, create: bool) -> None:
  """Refuses a directory that is not ours; creates ours (with its marker) if needed. Every
  process looks before process 0 writes anything, so all decide alike."""
  missing = _check_directory(directory, create)
  _sync("rlhf_jax_checkpoint_checked")
  if missing and jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(FORMAT))
    tmp.rename(directory / MARKER)
  _sync("rlhf_jax_checkpoint_claim")


def _check_directory(directory: epath.Path, create: bool) -> bool:
  """Whether the directory still needs its marker; a UserError for one that is not ours."""
  marker = directory / MARKER
  if directory.exists() and not directory.is_dir():
    raise UserError(f"{directory}: checkpoint directory is a file, expected a directory")
  if marker.exists():
    try:
      found = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
      found = None
    if not isinstance(found, dict) or found.get("format") != FORMAT["format"]:
      raise UserError(f"{marker}: not an rlhf_jax checkpoint marker (expected JSON {FORMAT})")
    if found.get("version", 0) > FORMAT["version"]:
      raise UserError(f"{marker}: checkpoint format version {found['version']} is newer than this "
                      f"rlhf_jax (reads up to {FORMAT['version']})")
    return False
  if directory.exists() and any(directory.iterdir()):
    raise UserError(f"{directory}: directory is not empty and is not an rlhf_jax checkpoint "
                    f"directory (no {MARKER}); pick a new or empty directory")
  if not create:
    raise UserError(f"{directory}: no rlhf_jax checkpoints here (no {MARKER})")
  return True


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _others(steps, bad) -> str:
  others = [s for s in steps if s != bad]
  return f"steps {others} are on disk" if others else "no other checkpoint is on disk"


def quiet_aborted_reads() -> None:
  """When one read of a restore fails, orbax closes its asyncio loop while tensorstore reads are
  still in flight; each then reports RuntimeError('Event loop is closed') as an unraisable
  exception, a traceback on stderr around the one-line error. Installed (once) before restores,
  this drops those reports and only those; every other unraisable goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "rlhf_jax_quiet", False):
    return

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)
  hook.rlhf_jax_quiet = True
  sys.unraisablehook = hook


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- per-process JSON

def _process_file(directory) -> epath.Path:
  return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
  """An orbax item of one JSON file per process (`process_<i>-of-<n>.json`), each process
  writing and reading its own (as grain's iterator handler does; this one takes the value to save
  instead of an iterator, so an async save records the position at the time of the save)."""

  def save(self, directory: epath.Path, args: "ProcessJsonSave"):
    _process_file(directory).write_text(json.dumps(args.value))

  def restore(self, directory: epath.Path, args: Optional["ProcessJsonRestore"] = None):
    path = _process_file(directory)
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).glob("process_*-of-*.json"))
      count = found[0].rsplit("-of-", 1)[1][:-len(".json")] if found else "?"
      raise UserError(f"{directory}: no {path.name}: the checkpoint was written by {count} "
                      f"process(es), this run has {jax.process_count()}; resume with as many")
    return json.loads(path.read_text())


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  value: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------- manager

class CheckpointManager:
  """Async, keep-last-K, atomic checkpoints of a training state pytree plus JSON metadata."""

  def __init__(self, directory: str, save_every: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True, create: bool = True):
    if save_every < 1:
      raise UserError(f"checkpoint save_every: must be at least 1, got {save_every}")
    if keep is not None and keep < 1:
      raise UserError(f"checkpoint keep: must be at least 1 (or None for all), got {keep}")
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    _claim_directory(self.directory, create)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=create,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: Optional[dict] = None, force: bool = False,
           data: Any = None) -> bool:
    """Starts saving `state` (any pytree of arrays), `meta` (JSON-able, the same on every
    process) and `data` (JSON-able, this process's own, e.g. its data position; None: no data
    item) if `step` is due.

    Returns whether a save was started. The arrays may be donated to the next step right away.
    """
    if not (force or self.should_save(step)):
      return False
    arrays, impls = encode_keys(state)
    record = {_USER: meta or {}, _TREE: describe_tree(arrays), _KEYS: impls}
    for what, value in (("meta", record), ("data", data)):
      try:
        json.dumps(value)
      except TypeError as e:
        raise UserError(f"checkpoint {what}: must be JSON-serialisable ({e})") from None
    items = {"state": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(record)}
    if data is not None:
      items["data"] = ProcessJsonSave(data)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would write: step is a multiple of save_every."""
    return int(step) % self.save_every == 0

  def latest_step(self) -> Optional[int]:
    """Newest complete checkpoint (tmp directories of interrupted saves do not count)."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def _step(self, step: Optional[int]) -> int:
    self.wait()
    found = self.latest_step() if step is None else int(step)
    if found is None:
      raise UserError(f"{self.directory}: no complete checkpoint to restore")
    if found not in self.all_steps():
      raise UserError(f"{self.directory}: no checkpoint for step {found}; have {self.all_steps()}")
    return found

  def _read_record(self, step: int) -> dict:
    where = self.directory / str(step)
    try:
      record = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise UserError(f"{where}: not an rlhf_jax checkpoint (cannot read its meta item: "
                      f"{type(e).__name__})") from None
    record = record["meta"]
    if not isinstance(record, dict) or not {_TREE, _KEYS, _USER} <= set(record):
      raise UserError(f"{where}/meta: not an rlhf_jax checkpoint record")
    return record

  def read_data(self, step: Optional[int] = None, default: Any = None) -> Any:
    """This process's `data` saved with `step` (default: the latest); `default` when the
    checkpoint has no data item (older checkpoints kept the data position in `meta`)."""
    step = self._step(step)
    where = self.directory / str(step)
    if not (where / "data").exists():
      return default
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(data=ProcessJsonRestore()))["data"]
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise UserError(f"{where}/data: cannot read this process's record ({_first_line(e)})"
                      ) from None

  def read_meta(self, step: Optional[int] = None) -> dict:
    """The JSON metadata given to `save` (data position, controller state...), without arrays."""
    return self._read_record(self._step(step))[_USER]

  def restore(self, target: Any, step: Optional[int] = None):
    """(state, meta) of `step` (default: the latest), laid out as `target` says.

    target: the state pytree as ShapeDtypeStructs with shardings (or real arrays, whose shapes,
    dtypes and shardings are used). Typed PRNG keys in it come back as typed keys.
    """
    step = self._step(step)
    record = self._read_record(step)
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), target)
    encoded = _encode_key_target(target)
    check_matches(record[_TREE], describe_tree(encoded), str(self.directory / str(step)))
    quiet_aborted_reads()   # before: a failing read aborts the others at once
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(encoded)))
    except Exception as e:  # pylint: disable=broad-except
      # The tree matched the record above, so a failure here is damage on disk (a truncated or
      # overwritten array file, a missing metadata file): orbax/tensorstore raise many types.
      raise UserError(f"{self.directory / str(step)}: cannot read the checkpoint's arrays "
                      f"({_first_line(e)}); if it is damaged, delete it to resume from an earlier "
                      f"checkpoint ({_others(self.all_steps(), step)})") from None
    return decode_keys(restored["state"], record[_KEYS]), record[_USER]

  def latest_path(self) -> Optional[str]:
    """Directory of the newest complete checkpoint after pending saves finish (None if none)."""
    self.wait()
    step = self.latest_step()
    return None if step is None else str(self.directory / str(step))

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
