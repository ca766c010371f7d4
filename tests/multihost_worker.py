"""A minimal sharded LM train step, shared by the sharding/checkpoint/multi-host/plan tests.

Imported by the tests, and run as a script by tests/test_multihost.py, one process per fake host:

  python tests/multihost_worker.py --process_id=I --num_processes=N --port=P --steps=S --out=F

Each process owns 4 CPU devices, reads only its own rows of every global batch and writes (process 0)
the loss trajectory and a parameter checksum as JSON to F.

  python tests/multihost_worker.py --mode=data --ckpt=DIR --process_id=I --num_processes=N ...

checkpoints each process's own packed-SFT loader position and restores it (`data_positions`).

  python tests/multihost_worker.py --mode=load --model=PATH [--model=PATH ...] ...

places each model onto the (1,8,1) mesh and writes the bytes this process read (`load_models`).

  python tests/multihost_worker.py --mode=workdir --workdir=DIR [--apart=1] ...

runs `rlhf_jax.workdir.check_shared(DIR)` (with --apart each process gets DIR/<its id>: not shared).
"""
import json
import os
import sys

import numpy as np

import fake_devices

BATCH_SIZE = 8
SEQ_LEN = 32


def model_config(dropout: float = 0.0):
  from rlhf_jax.models import get_model_config
  return get_model_config("tiny", dropout_resid=dropout)


def optimizer():
  """AdamW. Adam divides each update by |g|, so float32 reduction-order noise e in a near-zero
  gradient moves a weight by about lr * e / |g|: the learning rate is small enough that different
  meshes agree to 1e-5 in the weights, not only in the loss."""
  import optax
  return optax.adamw(1e-4, weight_decay=0.01)


def make_batch(index: int, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN,
               vocab: int = 512) -> dict:
  """Global batch number `index`: two packed segments per row and trailing padding (seg 0)."""
  rng = np.random.default_rng(1000 + index)
  tokens = rng.integers(3, vocab, size=(batch_size, seq_len), dtype=np.int32)
  seg = np.zeros((batch_size, seq_len), np.int32)
  for row in range(batch_size):
    first = int(rng.integers(4, seq_len // 2))
    total = int(rng.integers(first + 2, seq_len + 1))
    seg[row, :first], seg[row, first:total] = 1, 2
  tokens[seg == 0] = 0
  return {"tokens": tokens, "segment_ids": seg}


def lm_loss(logits, tokens, segment_ids):
  """Mean next-token cross-entropy over targets inside the same (non-padding) segment."""
  import jax
  import jax.numpy as jnp
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  mask = (segment_ids[:, 1:] != 0) & (segment_ids[:, 1:] == segment_ids[:, :-1])
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_step(cfg, tx):
  """step(state, batch) -> (state, metrics); state = {params, opt_state, step, rng (typed key)}."""
  import jax
  import optax
  from rlhf_jax.models import Transformer

  model = Transformer(cfg)

  def loss_fn(params, batch, rng):
    logits, _ = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                            deterministic=not cfg.dropout_resid, rngs={"dropout": rng})
    return lm_loss(logits, batch["tokens"], batch["segment_ids"])

  def step(state, batch):
    rng, sub = jax.random.split(state["rng"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, sub)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step


def state_shardings(cfg, tx, mesh):
  """Shardings of the whole train state, from the one rule table."""
  from rlhf_jax import sharding
  from rlhf_jax.models import abstract_params
  boxed = abstract_params(cfg, boxed=True)
  rep = sharding.replicated(mesh)
  return {"params": sharding.param_shardings(boxed, mesh),
          "opt_state": sharding.opt_state_shardings(tx, boxed, mesh), "step": rep, "rng": rep}


def init_state(cfg, tx, shardings, seed: int = 0):
  """The train state, initialised under jit straight into its shardings."""
  import jax
  import jax.numpy as jnp
  from rlhf_jax import sharding
  from rlhf_jax.models import init_params

  def init(key):
    params = init_params(cfg, key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key(seed + 1)}
  return sharding.init_sharded(init, shardings, jax.random.key(seed))


def jit_step(cfg, tx, mesh, shardings):
  """The step jitted with explicit in/out shardings and the state donated."""
  import jax
  from rlhf_jax import sharding
  batch_sh = {"tokens": sharding.batch_sharding(mesh), "segment_ids": sharding.batch_sharding(mesh)}
  rep = sharding.replicated(mesh)
  return jax.jit(make_step(cfg, tx), in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, {"loss": rep, "grad_norm": rep}), donate_argnums=0)


def run(mesh, steps: int, start_state=None, start: int = 0, dropout: float = 0.0):
  """Trains `steps` steps from batch `start`; returns (state, [losses]). Multi-process aware."""
  import jax
  from rlhf_jax import sharding
  cfg, tx = model_config(dropout), optimizer()
  shardings = state_shardings(cfg, tx, mesh)
  state = init_state(cfg, tx, shardings) if start_state is None else start_state
  step_fn = jit_step(cfg, tx, mesh, shardings)
  rows = sharding.process_batch_rows(mesh, BATCH_SIZE)
  losses = []
  with sharding.activate(mesh):
    for i in range(start, start + steps):
      local = {k: v[rows] for k, v in make_batch(i).items()}
      state, metrics = step_fn(state, sharding.global_batch(local, mesh, BATCH_SIZE))
      losses.append(float(jax.device_get(metrics["loss"])))
  return state, losses


def param_checksum(params) -> list:
  """Per-leaf sums of the (gathered) parameters, a cheap cross-process comparison."""
  import jax
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(params, tiled=True)
  return [float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(gathered)]


class ByteTokenizer:
  """A tokenizer stand-in: one id per byte (+3), pad 0, bos 1, eos 2."""
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

  def encode(self, text):
    return [b + 3 for b in text.encode()]


def packed_sft_batches(rows: int, num_shards: int = 0):
  """This process's packed SFT rows (`rows` per batch) of a small demonstration set whose
  documents have many lengths, so the hosts' packers stand at different records."""
  from rlhf_jax.data import loaders, shards
  records = [{"prompt": "q" * (1 + i % 7), "response": "a" * (2 + (i * 5) % 11)}
             for i in range(64)]
  tok = ByteTokenizer()
  return shards.ShardedBatches(
      lambda shard, n: loaders.sft_loader(records, tok, batch_size=n, seq_len=32, seed=0,
                                          shard=shard), rows, num_shards)


def data_positions(ckpt_dir: str, consumed: int = 3, rows: int = 4) -> dict:
  """Reads `consumed` batches, checkpoints this process's loader position (one file per process)
  with a step, reads 2 more; then a fresh loader restored from the checkpoint must give the same
  2 batches. Returns {'state', 'restored', 'same_next', 'meta'}."""
  from rlhf_jax import sharding
  from rlhf_jax.checkpoint import CheckpointManager
  it = packed_sft_batches(rows)
  for _ in range(consumed):
    next(it)
  state = it.get_state()
  mesh = sharding.make_mesh((1, -1, 1))
  arrays = {"w": sharding.put(np.arange(8, dtype=np.float32), sharding.batch_sharding(mesh, 1))}
  with CheckpointManager(ckpt_dir, save_every=1) as ckpt:
    ckpt.save(consumed, arrays, meta={"same": "on every process"}, data=state)
  expected = [next(it) for _ in range(2)]
  fresh = packed_sft_batches(rows)
  with CheckpointManager(ckpt_dir) as ckpt:
    restored = ckpt.read_data()
    meta = ckpt.read_meta()
  fresh.set_state(restored)
  got = [next(fresh) for _ in range(2)]
  same = all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)
  return {"state": state, "restored": restored, "same_next": same, "meta": meta}


def load_models(paths) -> dict:
  """Each model placed onto the (1,8,1) mesh: {path: {'bytes_read': bytes of the file's tensors
  this process read, 'checksum': per-leaf sums of the gathered parameters}}."""
  from rlhf_jax import convert, sharding
  from rlhf_jax.models import abstract_params, gguf_import, lazy
  mesh = sharding.make_mesh((1, -1, 1))
  counted = [0]
  original = lazy.Part.read

  def read(part, index):
    out = original(part, index)
    counted[0] += out.nbytes
    return out
  lazy.Part.read = read
  out = {}
  for path in paths:
    counted[0] = 0
    if path.endswith(".gguf"):    # (no tokenizer in the test's GGUF: the parameters only)
      cfg, params = gguf_import.read_gguf_lazy(path, abstract_params)
      params = lazy.place(params, convert._shardings(cfg, "lm", mesh))
    else:
      params = convert.load_model(path, mesh=mesh).params
    out[path] = {"bytes_read": counted[0], "checksum": param_checksum(params)}
  lazy.Part.read = original
  return out


def _flag(argv, name, default=None):
  for arg in argv:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return default


def main(argv):
  """One fake host: 4 CPU devices, gloo collectives, its own rows of each batch."""
  os.environ["XLA_FLAGS"] = fake_devices.xla_flags(4)
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from rlhf_jax import distributed, sharding
  num_processes = int(_flag(argv, "num_processes"))
  process_id = int(_flag(argv, "process_id"))
  distributed.initialize_from_env(coordinator_address=f"localhost:{_flag(argv, 'port')}",
                                  num_processes=num_processes, process_id=process_id)
  import jax
  assert jax.process_count() == num_processes and jax.local_device_count() == 4
  if _flag(argv, "mode") == "workdir":    # --workdir=DIR, each process DIR/<its id> if --apart
    from rlhf_jax import workdir
    from rlhf_jax.errors import UserError
    path = _flag(argv, "workdir")
    if _flag(argv, "apart"):
      path = os.path.join(path, str(process_id))
    try:
      workdir.check_shared(path)
      result = {"error": None}
    except UserError as e:
      result = {"error": str(e)}
    result["left"] = sorted(os.listdir(path)) if os.path.isdir(path) else None
    with open(f"{_flag(argv, 'out')}.{process_id}", "w") as f:
      json.dump(result, f)
    jax.distributed.shutdown()
    return
  if _flag(argv, "mode") == "load":
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--model=")]
    with open(f"{_flag(argv, 'out')}.{process_id}", "w") as f:
      json.dump(load_models(paths), f)
    jax.distributed.shutdown()
    return
  if _flag(argv, "mode") == "data":
    with open(f"{_flag(argv, 'out')}.{process_id}", "w") as f:
      json.dump(data_positions(_flag(argv, "ckpt")), f)
    jax.distributed.shutdown()
    return
  mesh = sharding.make_mesh(_flag(argv, "mesh", "1,-1,1"))
  state, losses = run(mesh, int(_flag(argv, "steps", "3")))
  out = {"losses": losses, "checksum": param_checksum(state["params"]),
         "rows": [sharding.process_batch_rows(mesh, BATCH_SIZE).start,
                  sharding.process_batch_rows(mesh, BATCH_SIZE).stop],
         "process_count": jax.process_count(), "device_count": jax.device_count()}
  with open(f"{_flag(argv, 'out')}.{process_id}", "w") as f:
    json.dump(out, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
