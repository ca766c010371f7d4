"""Loading a model onto a sharded mesh never holds more than one full tensor per process.

Hugging Face safetensors and GGUF models are placed one parameter at a time, each distinct device
slice read from the memory-mapped file once (`rlhf_jax.models.lazy`); rlhf_jax models are restored
by orbax straight into their shardings. Measured on the 8 CPU devices of the test process: the
peak of Python/numpy host allocations (tracemalloc) while loading, and the bytes read from the
files' tensors. With 2 processes x 4 devices each process reads only its own half
(tests/multihost_worker.py --mode=load).
"""
import json
import os
import subprocess
import sys
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest

from fake_devices import xla_flags
from rlhf_jax import convert, sharding
from rlhf_jax.models import abstract_params, lazy

D, HEADS, KV, HD, FF, LAYERS, VOCAB = 512, 8, 4, 64, 1024, 6, 1024
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def hf_llama_tensors(seed: int = 0) -> dict:
  """HF-named tensors of a small untied Llama (HF layout: Linear weights are (out, in))."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  out = {"model.embed_tokens.weight": r(VOCAB, D), "model.norm.weight": r(D),
         "lm_head.weight": r(VOCAB, D)}
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    out.update({p + "self_attn.q_proj.weight": r(HEADS * HD, D),
                p + "self_attn.k_proj.weight": r(KV * HD, D),
                p + "self_attn.v_proj.weight": r(KV * HD, D),
                p + "self_attn.o_proj.weight": r(D, HEADS * HD),
                p + "mlp.gate_proj.weight": r(FF, D), p + "mlp.up_proj.weight": r(FF, D),
                p + "mlp.down_proj.weight": r(D, FF),
                p + "input_layernorm.weight": r(D), p + "post_attention_layernorm.weight": r(D)})
  return out


def write_hf_llama(path: str) -> str:
  """A Hugging Face Llama directory (config.json + bfloat16 model.safetensors), numpy only."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": FF,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
            "head_dim": HD, "max_position_embeddings": 64, "tie_word_embeddings": False}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in hf_llama_tensors().items()},
            os.path.join(path, "model.safetensors"))
  return path


def write_gguf_llama(path: str) -> str:
  """The same model as a llama GGUF: matrices Q8_0-quantized, norms float32."""
  import gguf
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  layer = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
           "post_attention_layernorm.weight": "ffn_norm.weight"}
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(LAYERS)
  w.add_embedding_length(D)
  w.add_feed_forward_length(FF)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV)
  w.add_context_length(64)
  w.add_vocab_size(VOCAB)
  w.add_layer_norm_rms_eps(1e-5)
  for name, value in hf_llama_tensors(seed=1).items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gname = f"blk.{i}.{layer[rest]}"
    else:
      gname = names[name]
    if value.ndim == 2:
      q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(gname, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


class ReadCounter:
  """Counts the bytes of float32 slices the lazy parameters hand out (`lazy.Part.read`)."""

  def __init__(self, monkeypatch):
    self.bytes = 0
    original = lazy.Part.read

    def read(part, index):
      out = original(part, index)
      self.bytes += out.nbytes
      return out
    monkeypatch.setattr(lazy.Part, "read", read)


def _unaligned_copy(x: np.ndarray) -> np.ndarray:
  """A copy of `x` whose data start 16 bytes past a 64-byte boundary."""
  buf = np.empty(x.nbytes + 128, np.uint8)
  off = (16 - buf.ctypes.data) % 64
  out = buf[off:off + x.nbytes].view(x.dtype).reshape(x.shape)
  out[...] = x
  return out


@pytest.fixture
def host_only_tracing(monkeypatch):
  """Makes tracemalloc count host memory only. The CPU backend adopts a 64-byte-aligned numpy
  array as the device buffer itself (zero-copy, whatever `may_alias` says), so on CPU part of the
  devices' memory would show up as numpy allocations, by the luck of malloc's alignment. Every
  `jax.device_put` of a numpy array (ours and orbax's) gets an unaligned copy instead, which the
  backend copies and drops: the copy is one more slice, counted against the loader."""
  original = jax.device_put

  def device_put(x, *args, **kwargs):
    if isinstance(x, np.ndarray) and x.nbytes:
      return original(_unaligned_copy(x), *args, **kwargs).block_until_ready()
    return original(x, *args, **kwargs)
  monkeypatch.setattr(jax, "device_put", device_put)


def _measure(fn):
  """(result, peak bytes of host allocations made while fn ran, beyond what was there before)."""
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    jax.block_until_ready(out)
    return out, tracemalloc.get_traced_memory()[1] - base
  finally:
    tracemalloc.stop()


def _sizes(cfg):
  """(bytes of the largest parameter, bytes of all), float32."""
  sizes = [int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(abstract_params(cfg))]
  return max(sizes), sum(sizes)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return write_hf_llama(str(tmp_path_factory.mktemp("hf_llama")))


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  pytest.importorskip("gguf")
  return write_gguf_llama(str(tmp_path_factory.mktemp("gguf") / "model.gguf"))


@pytest.mark.parametrize("mesh_shape", ["1,8,1", "1,4,2", "8,1,1"])
def test_safetensors_loads_slice_by_slice(hf_dir, mesh_shape, monkeypatch, host_only_tracing):
  host = convert.load_model(hf_dir).params              # numpy, read whole: the reference
  cfg = convert.load_model(hf_dir).cfg
  largest, total = _sizes(cfg)
  assert total > 4 * largest
  mesh = sharding.make_mesh(mesh_shape)
  convert.load_model(hf_dir, mesh=mesh)     # warm-up: jax's tracing caches are not the tensors
  counter = ReadCounter(monkeypatch)
  model, peak = _measure(lambda: convert.load_model(hf_dir, mesh=mesh).params)
  # Each element read once, whatever the replication (each distinct slice once per process).
  assert counter.bytes == total
  if mesh_shape == "8,1,1":
    # Replicated: the loader holds one whole parameter at a time (read once for the 8 devices);
    # the bound adds the fixture's copy of it and the previous copy, which the runtime drops
    # asynchronously after the transfer.
    assert peak < 3 * largest + largest // 4, (peak, largest, total)
  else:
    # Sharded: one slice (an eighth) at a time, with those copies: under half a parameter.
    assert peak < largest // 2, (peak, largest, total)
  want = convert._shardings(cfg, "lm", mesh)
  for got, ref, s in zip(jax.tree.leaves(model), jax.tree.leaves(host), jax.tree.leaves(want)):
    assert got.sharding == s and got.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("mesh_shape", ["1,8,1", "1,4,2"])
def test_gguf_loads_one_parameter_at_a_time(gguf_path, mesh_shape, monkeypatch,
                                            host_only_tracing):
  from rlhf_jax.models import gguf_import
  cfg, host = gguf_import.read_gguf(gguf_path, abstract_params)
  largest, total = _sizes(cfg)
  mesh = sharding.make_mesh(mesh_shape)

  def load():
    cfg2, params = gguf_import.read_gguf_lazy(gguf_path, abstract_params)
    return lazy.place(params, convert._shardings(cfg2, "lm", mesh))
  load()                                    # warm-up
  counter = ReadCounter(monkeypatch)
  placed, peak = _measure(load)
  assert counter.bytes == total
  # A GGUF tensor is dequantized whole (its blocks lie within rows, dequantized a few rows at a
  # time), and the file tensors of the parameter being placed are kept until it is placed: one
  # parameter's worth, plus the slice being copied (an eighth) and the fixture's copies.
  assert peak < largest + largest // 2, (peak, largest, total)
  for got, ref in zip(jax.tree.leaves(placed), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_native_model_restores_into_shardings(hf_dir, tmp_path, host_only_tracing):
  """An rlhf_jax model (orbax) restores straight into the target shardings, each device's slice
  read by tensorstore, at most one whole tensor's worth of reads in flight (orbax's default reads
  every shard of every array at once: the process's share of the whole model)."""
  m = convert.load_model(hf_dir)
  _, total = _sizes(m.cfg)
  convert.save_model(str(tmp_path / "native"), m.cfg, m.params, "rlhf_jax")
  mesh = sharding.make_mesh("1,8,1")
  convert.load_model(str(tmp_path / "native"), mesh=mesh)      # warm-up
  model, peak = _measure(lambda: convert.load_model(str(tmp_path / "native"), mesh=mesh).params)
  largest, _ = _sizes(m.cfg)
  assert peak < largest + largest // 2, (peak, largest, total)
  want = convert._shardings(m.cfg, "lm", mesh)
  for got, ref, s in zip(jax.tree.leaves(model), jax.tree.leaves(m.params), jax.tree.leaves(want)):
    assert got.sharding == s
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.slow
def test_two_processes_each_read_their_own_half(hf_dir, gguf_path, tmp_path):
  """2 processes x 4 CPU devices, mesh (1,8,1): every parameter is split over 'fsdp', so each
  process reads exactly half of every model's bytes, and the gathered values are the model's."""
  from test_multihost import _finish, _free_port
  cfg = convert.load_model(hf_dir).cfg
  _, total = _sizes(cfg)
  out = str(tmp_path / "load")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  procs = []
  for i in range(2):
    with open(f"{out}.{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, "--mode=load", f"--process_id={i}", "--num_processes=2",
           f"--port={port}", f"--out={out}", f"--model={hf_dir}", f"--model={gguf_path}"],
          env=env, stdout=log, stderr=subprocess.STDOUT))
  results = _finish(procs, out, timeout=240)
  host = {hf_dir: convert.load_model(hf_dir).params}
  from rlhf_jax.models import gguf_import
  host[gguf_path] = gguf_import.read_gguf(gguf_path, abstract_params)[1]
  for r in results:
    for path in (hf_dir, gguf_path):
      got = r[path]
      assert got["bytes_read"] == total // 2, (path, got["bytes_read"], total)
      ref = [float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(host[path])]
      np.testing.assert_allclose(got["checksum"], ref, rtol=1e-6)
