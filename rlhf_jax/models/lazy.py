"""Parameters read on demand: a model file's tensors placed onto a mesh one slice at a time.

A `LazyTensor` is one of our parameters (e.g. the layer-stacked `layers/attn/q/kernel`) that is not
in memory yet: it knows its shape and reads any slice of itself, in float32, from the file's tensors
(memory-mapped safetensors views, or GGUF tensors dequantized when first needed). Then

  materialize(tree)         -> numpy arrays (one tensor at a time), as `convert.load_model` without
                               a mesh returns them;
  place(tree, shardings)    -> global jax arrays: for every tensor, each distinct slice that this
                               process's devices hold is read, copied to those devices and dropped
                               before the next (`jax.make_array_from_single_device_arrays`), so a
                               process never holds a whole model on the host, nor (for a sharded
                               tensor) a whole tensor: reading from a memory map touches only the
                               pages of the slice. Other processes' slices are never read.

GGUF tensors are quantized in blocks, so a slice needs its whole tensor dequantized: a `Deferred`
keeps its dequantized value only while the parameter that uses it is being placed (`release`), i.e.
at most one of our parameters' worth of file tensors at a time.
"""
from typing import Any, Callable, Sequence

import numpy as np


class Deferred:
  """A file tensor (in the Hugging Face layout) computed on first use, kept until `release()`."""

  def __init__(self, shape: Sequence[int], load: Callable[[], np.ndarray]):
    self.shape = tuple(int(s) for s in shape)
    self._load = load
    self._value = None

  def value(self) -> np.ndarray:
    if self._value is None:
      self._value = self._load()
    return self._value

  def release(self) -> None:
    self._value = None

  def shape_only(self) -> np.ndarray:
    """A zero-byte stand-in of this shape (all strides 0), for computing transformed shapes."""
    return np.broadcast_to(np.zeros((), np.float32), self.shape)


class Part:
  """`transform(source)`: a file tensor seen through a layout change (transpose/reshape/column
  slice, all views), read one slice at a time as a float32 copy."""

  def __init__(self, source: Any, transform: Callable[[np.ndarray], np.ndarray] = None):
    self.source = source
    self.transform = transform or (lambda w: w)
    if isinstance(source, Deferred):
      self.shape = tuple(self.transform(source.shape_only()).shape)
    else:
      self._view = self.transform(source)
      self.shape = tuple(self._view.shape)

  def read(self, index) -> np.ndarray:
    if isinstance(self.source, Deferred):
      return np.array(self.transform(self.source.value())[index], dtype=np.float32)
    return np.array(self._view[index], dtype=np.float32)

  def release(self) -> None:
    if isinstance(self.source, Deferred):
      self.source.release()


class LazyTensor:
  """One parameter: a single `Part`, or a stack of per-layer parts (leading axis = layers)."""

  def __init__(self, parts: Sequence[Part], stacked: bool):
    self.parts, self.stacked = list(parts), stacked
    inner = self.parts[0].shape
    self.shape = ((len(self.parts),) + inner) if stacked else inner
    self.dtype = np.dtype(np.float32)
    self.nbytes = int(np.prod(self.shape)) * 4

  def read(self, index) -> np.ndarray:
    """The float32 values at `index` (a tuple of slices/ints, as jax's sharding indices are)."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
    if not self.stacked:
      return self.parts[0].read(index)
    first, rest = index[0], index[1:]
    layers = range(len(self.parts))[first]
    if isinstance(layers, int):
      return self.parts[layers].read(rest)
    out = None
    for k, i in enumerate(layers):
      value = self.parts[i].read(rest)
      if out is None:
        out = np.empty((len(layers),) + value.shape, np.float32)
      out[k] = value
    return out if out is not None else np.empty((0,) + self.shape[1:], np.float32)

  def release(self) -> None:
    for part in self.parts:
      part.release()


def is_lazy(x) -> bool:
  return isinstance(x, LazyTensor)


def materialize(tree):
  """The tree with every LazyTensor read whole (float32 numpy), one tensor at a time."""
  import jax

  def one(x):
    if not is_lazy(x):
      return x
    try:
      return x.read(())
    finally:
      x.release()
  return jax.tree.map(one, tree, is_leaf=is_lazy)


def _key(index) -> tuple:
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def place_one(x: LazyTensor, sharding):
  """One LazyTensor -> a global jax array with `sharding`: each distinct slice this process's
  devices need is read once, copied to its devices, and dropped before the next is read."""
  import jax
  try:
    indices = sharding.addressable_devices_indices_map(x.shape)
    groups = {}
    for device, index in indices.items():
      groups.setdefault(_key(index), (index, []))[1].append(device)
    arrays = {}
    for index, devices in groups.values():
      host = x.read(index)
      for device in devices:
        arrays[device] = jax.device_put(host, device).block_until_ready()
      del host
    return jax.make_array_from_single_device_arrays(x.shape, sharding,
                                                    [arrays[d] for d in indices])
  finally:
    x.release()


def place(tree, shardings):
  """The tree with every LazyTensor placed by `place_one` (other leaves: `sharding.put`)."""
  import jax
  from rlhf_jax import sharding as sharding_lib
  return jax.tree.map(lambda x, s: place_one(x, s) if is_lazy(x) else sharding_lib.put(x, s),
                      tree, shardings, is_leaf=is_lazy)
