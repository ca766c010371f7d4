"""Seconds per PPO iteration: rlhf_jax vs TRL's PPOTrainer vs tunix's PPOLearner, same shapes.

  python benchmarks/ppo_iteration.py [--rounds=3] [--warmup=2] [--iters=4] [--only=ours,trl,tunix]
                                     [--shape=default] [--peak_n=2048] [--bandwidth_mb=512]
                                     [--no_phases] [--wait_idle=60]
                                     [--trl_python=/work/peers/trl/bin/python]
                                     [--tunix_python=/work/peers/tunix/bin/python]

Shapes, every side: 4 layers, d_model 256, 4 heads, vocabulary 8192, random-initialised float32
weights; 16 prompts of 32 tokens; exactly 32 sampled response tokens (temperature 1, no EOS stop);
one PPO epoch with one minibatch of 16 (policy and value); no pretraining (ptx) term. One iteration
= rollout + scoring (reference log-probs, values, reward) + GAE + the update. Ours is GPT-2 flavoured
(`bench_iteration` below: `rlhf_jax.train.ppo_iteration`'s iteration, one jitted program per
iteration, its settings from configs/ppo_ptx.py's tiny config with the sizes above); TRL 1.10
runs GPT-2 (`trl.experimental.ppo.PPOTrainer`, eager PyTorch); tunix 0.1.7 has no GPT-2 and runs
Qwen2 (`tunix.rl.ppo.ppo_learner.PPOLearner`). See benchmarks/peers/trl_ppo.py and
tunix_ppo.py for how each peer is driven and timed.

`--shape=tiny` (1 layer x 32, 2 heads, vocabulary 64, 4 prompts of 6 tokens, 4 response tokens) is
a smoke test, not a measurement: tests/test_benchmarks.py runs `--shape=tiny --rounds=1 --warmup=1
--iters=1 --wait_idle=0 --peak_n=128` with the peers pointed at missing interpreters (two calls:
the state donated by the first iteration feeds the second; a non-finite value loss fails the
worker).

Each measurement is its own subprocess: ours with this interpreter, each peer with the python of its
own venv, interleaved round by round (ours, trl, tunix, ours, ...) so a busy moment on a shared
machine hits all of them. Before each run the driver waits (up to --wait_idle seconds) for the CPUs
to go quiet. A worker runs --warmup untimed iterations (compilation, first calls) and then --iters
timed ones and reports their median; the summary is the median over rounds with min-max, and each
speedup is the median over rounds of peer / ours measured in the same round. A peer whose
interpreter is missing or whose import fails is "not available": null in RESULT and a one-line note
on stderr, never a crash.

Roofline: model FLOPs of one iteration / (ours s/iter x this machine's float32 matmul peak, measured
in the same run by benchmarks/machine.py on --peak_n^2 matrices). With N = 12 x layers x d_model^2
(matmul weights per block), f_b = 2N + 4 x layers x d_model x T/2 per token of a backbone forward
(T = prompt + response), f_h = 2 x d_model x vocab per LM-head token, and B sequences:
  rollout  B T f_b + B R f_h;   scoring  (B T f_b + B R f_h) + 2 B T f_b   (reference, value, RM);
  update   3 (B T f_b + B R f_h) + 3 B T f_b   (policy and value, forward + backward).
This is what a plain implementation computes (every forward over all T positions, the value
function forwarded again in the update), the same count for every side. Ours runs fewer: the last
layer only where the head reads (`transformer.Block.query_from`) and the first update's value
forward taken from scoring (`ppo_iteration._Iteration.score`), 64.1 of the 76.5 GFLOP at the
default shape, so the fraction of peak on the FLOPs ours executes is 0.84 x the one printed.

Per phase (ours, round 1 unless --no_phases): the worker also times each phase as its own jitted
program (`bench_phases`: the rollout; scoring; GAE + the update + the new state) and the driver
prints each one's FLOPs above (the plain count: ours runs fewer in scoring, whose last layers
read only the response, so its fraction reads high) over its time x peak, and for the rollout
also the bytes it must
read (per sampled token every policy matmul weight and the KV cache at the mean context,
`generate.bytes_per_step`) over its time x this machine's read bandwidth (a jitted sum over
--bandwidth_mb MiB, `machine.read_bandwidth`, measured in the same run). Run alone the update
forwards the value function itself, and nothing is shared or overlapped between phases, so the
phases' times add up to more than the iteration's.

Setting up the peers (each in its own venv, so their pins never touch the project's environment):

  # TRL (PPOTrainer exists only in trl 1.0-1.12). Install torch FIRST, from the local CPU wheel,
  # and pin it while installing the rest, or pip pulls several GB of CUDA packages.
  python -m venv /work/peers/trl
  /work/peers/trl/bin/pip install torch==2.13.0
  /work/peers/trl/bin/pip install -c <(echo torch==2.13.0+cpu) trl==1.10.0 transformers \
      tokenizers accelerate

  # tunix (brings its own jax 0.10.2, flax 0.12.8, qwix)
  python -m venv /work/peers/tunix
  /work/peers/tunix/bin/pip install google-tunix==0.1.7

PyTorch threads: the TRL worker runs with OMP_WAIT_POLICY=PASSIVE (unless the environment sets it;
--trl_omp_wait_policy='' keeps PyTorch's default). With the default, libgomp's spinning threads made
2-thread PyTorch 5x slower on a shared 2-core machine (about 15 s vs 3 s per iteration, measured
back to back here), which would flatter ours; on an idle machine spinning can be a little faster.

Nothing is downloaded at run time (random init, offline tokenizers). Other venv locations: pass
--trl_python / --tunix_python, or set RLHF_JAX_TRL_PYTHON / RLHF_JAX_TUNIX_PYTHON.

The last line is `RESULT {json}` with ours_s_per_iter, trl_s_per_iter, tunix_s_per_iter,
speedup_vs_trl, speedup_vs_tunix (null where a side is not available or failed), plus
roofline_fraction, model_gflop_per_iter, matmul_peak_gflops [before, after], breakdown_s (the
per-phase breakdowns each side exposes; ours: its phases as separate programs),
phase_roofline_fraction ({phase: {compute[, bandwidth]}} of ours), read_gb_s, shape, and rounds
(the raw s/iter per side and round).
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

from machine import matmul_peak, read_bandwidth  # benchmarks/machine.py (this script's folder)
from peers.worker_io import read_result  # noqa: E402

SHAPES = {
    "default": dict(layers=4, d_model=256, heads=4, vocab=8192, num_prompts=16, prompt_len=32,
                    response_len=32),
    "tiny": dict(layers=1, d_model=32, heads=2, vocab=64, num_prompts=4, prompt_len=6,
                 response_len=4),
}
SHAPE = SHAPES["default"]
SIDES = ("ours", "trl", "tunix")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PYTHON = {
    "trl": os.path.expanduser(os.environ.get("RLHF_JAX_TRL_PYTHON", "/work/peers/trl/bin/python")),
    "tunix": os.path.expanduser(os.environ.get("RLHF_JAX_TUNIX_PYTHON",
                                               "/work/peers/tunix/bin/python")),
}
# What must import for a side to count as available.
PROBES = {
    "ours": ("from rlhf_jax.train import ppo, ppo_iteration; ppo.settings_from_config, "
             "ppo.state_shardings, ppo.place, ppo_iteration.make_iteration, ppo.jit_iteration"),
    "trl": "from trl.experimental.ppo import PPOConfig, PPOTrainer",
    "tunix": "from tunix.rl.ppo.ppo_learner import PPOLearner; import tunix.models.qwen2.model",
}
PEER_SCRIPTS = {"trl": "trl_ppo.py", "tunix": "tunix_ppo.py"}


# ----------------------------------------------------------------------------- our worker
# (jax and rlhf_jax are imported inside these functions: the driver, which times the peers in
# their own processes, never loads them.)

def tiny_config():
  """configs/ppo_ptx.py's tiny config: where the benchmark's settings and model options come from."""
  from rlhf_jax import config_files
  return config_files.get_config(os.path.join(HERE, "..", "configs", "ppo_ptx.py"), "tiny")


def model_config(shape=SHAPE):
  """The GPT-2 flavoured ModelConfig at the benchmark shape (as benchmarks/generate.py builds it),
  its few layers unrolled in the training and scoring forwards if the tiny config's model is
  (`model.unroll_layers`, configs/models.py)."""
  from rlhf_jax.models import get_model_config
  d, h = shape["d_model"], shape["heads"]
  return get_model_config("gpt2-small", num_layers=shape["layers"], d_model=d, num_heads=h,
                          num_kv_heads=h, head_dim=d // h, d_ff=4 * d,
                          vocab_size=shape["vocab"], max_len=512,
                          unroll_layers=tiny_config().model.unroll_layers)


def iteration_settings(**fields):
  """`ppo_iteration.Settings` from configs/ppo_ptx.py's tiny config (their one source, through
  `ppo.settings_from_config`) with ptx and the missing-EOS penalty off and `fields` replaced."""
  from rlhf_jax.train import ppo
  config = tiny_config()
  config.ppo.ptx_coef = 0.0
  config.ppo.missing_eos_penalty = 0.0
  return dataclasses.replace(ppo.settings_from_config(config), **fields)


def _setup(model_cfg, *, num_prompts, prompt_len, response_len, seed, epochs, minibatches):
  """What one PPO iteration runs on (ptx off, random weights, one device): the pieces
  `rlhf_jax.train.ppo.run` uses (settings_from_config, state_shardings, place); a dict."""
  import jax
  import ml_collections
  import numpy as np
  from rlhf_jax import sharding
  from rlhf_jax.models import init_params
  from rlhf_jax.train import optim, ppo
  cfg = model_cfg.replace(dropout_resid=0.0, dropout_attn=0.0)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  s = iteration_settings(batch_size=num_prompts, prompt_len=prompt_len, response_len=response_len,
                         epochs=epochs, minibatches=minibatches, eos_token_id=-1, grad_clip=1.0)
  opt = {"lr": 1e-5, "warmup_steps": 0, "final_lr_fraction": 1.0, "weight_decay": 0.0,
         "b1": 0.9, "b2": 0.95, "eps": 1e-8}
  # As in ppo.run(): the iteration clips the policy gradient, the value's AdamW its own.
  txs = {k: optim.make_optimizer(ml_collections.ConfigDict(dict(opt, grad_clip=clip)), 1000)[0]
         for k, clip in (("policy", 0.0), ("value", 1.0))}
  keys = jax.random.split(jax.random.key(seed), 4)
  policy = init_params(cfg, keys[0], "lm")
  value = init_params(cfg, keys[1], "scalar")
  shardings = ppo.state_shardings(cfg, cfg, txs, mesh, ema=False)
  frozen_sh = {"ref": shardings["params"]["policy"], "rm": shardings["params"]["value"]}
  state, frozen = ppo.place(policy, value, init_params(cfg, keys[2], "scalar"), txs, shardings,
                            frozen_sh, 0.02)
  rng = np.random.default_rng(seed)
  host = {"prompts": rng.integers(3, cfg.vocab_size, (num_prompts, prompt_len)).astype(np.int32),
          "prompt_segment_ids": np.ones((num_prompts, prompt_len), np.int32)}
  return dict(cfg=cfg, mesh=mesh, s=s, txs=txs, shardings=shardings, frozen_sh=frozen_sh,
              state=state, frozen=frozen, host=host)


def bench_iteration(model_cfg, *, num_prompts, prompt_len, response_len, seed=0, epochs=1,
                    minibatches=1):
  """A `run()` that does one full PPO iteration (ptx off) on random weights, blocks and returns the
  iteration's metrics.

  Rollout with the sampler, scoring by policy/reference/value/reward model, GAE, `epochs` x
  `minibatches` updates: the pieces `rlhf_jax.train.ppo.run` uses (settings_from_config,
  make_iteration, state_shardings, place, jit_iteration) on one device, the state donated from call
  to call.
  """
  import jax
  from rlhf_jax import sharding
  from rlhf_jax.train import ppo, ppo_iteration
  e = _setup(model_cfg, num_prompts=num_prompts, prompt_len=prompt_len,
             response_len=response_len, seed=seed, epochs=epochs, minibatches=minibatches)
  cfg, mesh = e["cfg"], e["mesh"]
  holder = {"state": e["state"]}
  step = ppo.jit_iteration(ppo_iteration.make_iteration(cfg, cfg, cfg, e["s"], e["txs"], mesh),
                           e["shardings"], e["frozen_sh"], e["host"], mesh)
  batch = jax.device_put(e["host"])
  counter = [0]

  def run():
    counter[0] += 1
    with sharding.activate(mesh):
      holder["state"], metrics, _ = step(holder["state"], e["frozen"], batch,
                                         jax.random.key(counter[0]))
    jax.block_until_ready((holder["state"], metrics))
    return metrics
  return run


def bench_phases(model_cfg, *, num_prompts, prompt_len, response_len, seed=0):
  """{'rollout', 'scoring', 'update'}: `run()`s that each run one phase of the iteration
  (`ppo_iteration._Iteration`'s methods) as its own jitted program on fixed inputs (made by the
  phases before it, once) and block. The update is GAE + the minibatch updates + the new state;
  run on its own it forwards the value function itself (in the whole iteration the first
  update takes that forward from scoring), so the phases' sum is more than one iteration."""
  import jax
  from rlhf_jax import sharding
  from rlhf_jax.train import ppo_iteration
  e = _setup(model_cfg, num_prompts=num_prompts, prompt_len=prompt_len,
             response_len=response_len, seed=seed, epochs=1, minibatches=1)
  cfg, mesh, state, frozen = e["cfg"], e["mesh"], e["state"], e["frozen"]
  it = ppo_iteration._Iteration(cfg, cfg, cfg, e["s"], e["txs"], mesh, None)
  batch = jax.device_put(e["host"])
  rng = jax.random.key(1)

  def update(state, batch, rolled, scored, rng):   # `_Iteration.__call__` after scoring
    out, tokens, seg, has_eos = rolled
    _, seq_kl, data = it.episodes(tokens, seg, out.mask, scored, has_eos, state["kl_coef"])
    updated, _ = it.optimize(state["params"], state, data, batch, rng)
    return it.next_state(state, updated, seq_kl, batch["prompts"].shape[0])[0]

  progs = {"rollout": jax.jit(it.rollout),
           "scoring": jax.jit(lambda p, f, t, g, o: it.score(p, f, t, g, o)[0]),
           "update": jax.jit(update)}
  with sharding.activate(mesh):
    rolled = progs["rollout"](state["params"]["policy"], batch, rng)
    scored = progs["scoring"](state["params"], frozen, *rolled[1:3], rolled[0])
  args = {"rollout": (state["params"]["policy"], batch, rng),
          "scoring": (state["params"], frozen, *rolled[1:3], rolled[0]),
          "update": (state, batch, rolled, scored, rng)}

  def runner(name):
    def run():
      with sharding.activate(mesh):
        jax.block_until_ready(progs[name](*args[name]))
    return run
  return {name: runner(name) for name in progs}


def _seconds(fn):
  """(wall seconds of fn(), its result)."""
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def worker_ours(warmup, iters, seed=0, shape=SHAPE, phases=False):
  """Times `bench_iteration(...)()`: `warmup` untimed calls, then `iters` timed ones; with
  `phases` also each of `bench_phases(...)` (one untimed call, then the median of `iters`)."""
  sizes = dict(num_prompts=shape["num_prompts"], prompt_len=shape["prompt_len"],
               response_len=shape["response_len"], seed=seed)
  run = bench_iteration(model_config(shape), **sizes)

  def call():
    elapsed, metrics = _seconds(run)
    loss = float(metrics["value_loss"])   # checked outside the timed region
    if not math.isfinite(loss):           # a timing of a diverged iteration means nothing
      raise SystemExit(f"[ppo_iteration] ours: non-finite value_loss {loss}")
    return elapsed

  for i in range(warmup):
    sys.stderr.write(f"warm-up {i}: {call():.3f} s\n")
  times = []
  for i in range(iters):
    times.append(call())
    sys.stderr.write(f"iteration {i}: {times[-1]:.3f} s\n")
  breakdown = {}
  if phases:   # each phase as its own program (the iteration is one: no split inside it)
    for name, phase in bench_phases(model_config(shape), **sizes).items():
      phase()
      breakdown[name] = statistics.median(_seconds(phase)[0] for _ in range(iters))
      sys.stderr.write(f"phase {name}: {breakdown[name]:.3f} s\n")
  return {"s_per_iter": statistics.median(times), "times_s": times, "breakdown_s": breakdown,
          "model": "gpt2"}


# ----------------------------------------------------------------------------- roofline

def flops_per_phase(shape=SHAPE):
  """Model FLOPs of each phase of one iteration (formula in the module docstring)."""
  layers, d, v = shape["layers"], shape["d_model"], shape["vocab"]
  b, r = shape["num_prompts"], shape["response_len"]
  t = shape["prompt_len"] + r
  f_b = 2 * 12 * layers * d * d + 4 * layers * d * t / 2
  f_h = 2 * d * v
  lm = b * t * f_b + b * r * f_h
  scalar = b * t * f_b
  return {"rollout": lm, "scoring": lm + 2 * scalar, "update": 3 * (lm + scalar)}


def flops_per_iteration(shape=SHAPE):
  """Model FLOPs of one iteration (formula in the module docstring)."""
  return sum(flops_per_phase(shape).values())


def rollout_bytes(shape=SHAPE):
  """Bytes the rollout must read at least: per sampled token one decode step reading every
  matmul weight of the policy (float32) and its KV cache at the mean context
  (`generate.bytes_per_step`)."""
  from generate import bytes_per_step  # benchmarks/generate.py
  step = bytes_per_step(dict(shape, batch=shape["num_prompts"]), shape["prompt_len"],
                        shape["response_len"])
  return shape["response_len"] * step


# ----------------------------------------------------------------------------- orchestration

def _note(msg):
  sys.stderr.write(f"[ppo_iteration] {msg}\n")
  sys.stderr.flush()


def _command(side, python, warmup, iters, shape_name="default", phases=False):
  if side == "ours":
    return [python, os.path.abspath(__file__), "--worker=ours", f"--warmup={warmup}",
            f"--iters={iters}", f"--shape={shape_name}"] + (["--phases"] if phases else [])
  s = SHAPES[shape_name]
  return [python, os.path.join(HERE, "peers", PEER_SCRIPTS[side]), f"--layers={s['layers']}",
          f"--d_model={s['d_model']}", f"--heads={s['heads']}", f"--vocab={s['vocab']}",
          f"--num_prompts={s['num_prompts']}", f"--prompt_len={s['prompt_len']}",
          f"--response_len={s['response_len']}", f"--warmup={warmup}", f"--iters={iters}"]


def _env(side="ours", omp_wait_policy=""):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
             TF_CPP_MIN_LOG_LEVEL="2")
  if side == "trl" and omp_wait_policy and "OMP_WAIT_POLICY" not in os.environ:
    env["OMP_WAIT_POLICY"] = omp_wait_policy
  return env


def probe(side, python):
  """None when `side` can run with `python`, else a one-line reason."""
  if not os.path.exists(python):
    return f"interpreter {python} not found"
  try:
    r = subprocess.run([python, "-c", PROBES[side]], capture_output=True, text=True, env=_env(),
                       cwd=HERE, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{python} could not run: {e}"
  if r.returncode != 0:
    lines = r.stderr.strip().splitlines()
    return f"`{PROBES[side]}` failed with {python}: {lines[-1] if lines else 'no output'}"
  return None


def _run(side, python, warmup, iters, timeout, omp_wait_policy="", shape_name="default",
         phases=False):
  cmd = _command(side, python, warmup, iters, shape_name, phases)
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(side, omp_wait_policy),
                       timeout=timeout)
  except subprocess.TimeoutExpired:
    _note(f"{side}: worker ran past {timeout} s")
    return None
  result = read_result(r.stdout)
  if r.returncode != 0 or result is None:
    _note(f"{side}: worker failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
  return result if r.returncode == 0 else None


def _cpu_busy(interval=1.0):
  """Fraction of all CPU time spent busy over `interval` seconds (/proc/stat), None off Linux."""
  def snap():
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v), idle
  try:
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
  except OSError:
    return None
  return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(max_wait, threshold=0.25):
  """Waits until the CPUs are at most `threshold` busy (or `max_wait` s passed); returns busy."""
  deadline = time.time() + max_wait
  busy = _cpu_busy()
  while busy is not None and busy > threshold and time.time() < deadline:
    busy = _cpu_busy(2.0)
  return busy


def _ratio(rounds, side):
  """Median over rounds of side / ours measured in the same round (ours' speedup over side)."""
  pairs = [(o, p) for o, p in zip(rounds.get("ours", []), rounds.get(side, [])) if o and p]
  return statistics.median(p / o for o, p in pairs) if pairs else None


def _fmt(values):
  values = [v for v in values if v]
  if not values:
    return "n/a"
  return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _median_breakdown(results):
  per_phase = {}
  for res in results:
    for k, v in (res or {}).get("breakdown_s", {}).items():
      per_phase.setdefault(k, []).append(v)
  return {k: statistics.median(v) for k, v in per_phase.items()}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per worker run")
  parser.add_argument("--iters", type=int, default=4, help="timed iterations per worker run")
  parser.add_argument("--only", default=",".join(SIDES), help="comma list of ours,trl,tunix")
  parser.add_argument("--shape", default="default", choices=sorted(SHAPES),
                      help="'tiny': a smoke test, not a measurement")
  parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak matmul")
  parser.add_argument("--trl_python", default=DEFAULT_PYTHON["trl"])
  parser.add_argument("--tunix_python", default=DEFAULT_PYTHON["tunix"])
  parser.add_argument("--wait_idle", type=float, default=60.0,
                      help="seconds to wait for a quiet machine before each run (0: don't)")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker run")
  parser.add_argument("--trl_omp_wait_policy", default="PASSIVE",
                      help="OMP_WAIT_POLICY for the TRL worker unless set in the environment "
                           "('' leaves PyTorch's default: spinning)")
  parser.add_argument("--bandwidth_mb", type=int, default=512,
                      help="MiB summed to measure the read bandwidth (the rollout's roofline)")
  parser.add_argument("--no_phases", action="store_true",
                      help="skip timing our phases as separate programs (round 1)")
  parser.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
  parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  wanted = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = sorted(set(wanted) - set(SIDES))
  if unknown and not args.worker:
    parser.error(f"--only: unknown side(s) {unknown}; expected a comma list of {list(SIDES)}")
  return args, wanted


def available_sides(wanted, python):
  """The sides of `wanted` whose interpreter can run them (a note on stderr for the others)."""
  sides = []
  for side in SIDES:
    if side not in wanted:
      continue
    reason = probe(side, python[side])
    if reason:
      _note(f"{side} not available: {reason}")
    else:
      sides.append(side)
  return sides


def run_rounds(args, sides, python):
  """{side: [worker result or None per round]}, the sides interleaved round by round."""
  results = {s: [] for s in sides}
  for r in range(args.rounds):
    for side in sides:
      busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
      res = _run(side, python[side], args.warmup, args.iters, args.timeout,
                 args.trl_omp_wait_policy, args.shape, phases=(r == 0 and not args.no_phases))
      results[side].append(res)                # None when the run failed (rounds stay aligned)
      busy_txt = "" if busy is None else f" (CPU {100 * busy:.0f}% busy before)"
      val = "failed" if res is None else f"{res['s_per_iter']:.3f} s/iter"
      _note(f"round {r + 1}/{args.rounds} {side}: {val}{busy_txt}")
  return results


def phase_rooflines(breakdown, shape, peak, bandwidth):
  """{phase: {'compute': FLOPs / (s x peak)[, 'bandwidth': bytes / (s x bandwidth)]}} of our
  phases timed as separate programs (the rollout also against the read bandwidth)."""
  flops = flops_per_phase(shape)
  out = {}
  for name, secs in breakdown.items():
    out[name] = {"compute": flops[name] / (secs * peak)}
    if name == "rollout":
      out[name]["bandwidth"] = rollout_bytes(shape) / (secs * bandwidth)
  return out


def summarize(results, sides, shape, peak, peak_after, bandwidth):
  """The RESULT dict (see the module docstring) from the rounds' results."""
  per_round = {s: [res and res["s_per_iter"] for res in results[s]] for s in sides}
  med = {s: (statistics.median([v for v in per_round[s] if v])
             if any(per_round[s]) else None) for s in SIDES if s in per_round}
  ours = med.get("ours")
  breakdown = {s: _median_breakdown(results[s]) for s in sides}
  flops = flops_per_iteration(shape)
  best_peak = max(peak, peak_after)
  return {
      "ours_s_per_iter": ours,
      "trl_s_per_iter": med.get("trl"),
      "tunix_s_per_iter": med.get("tunix"),
      "speedup_vs_trl": _ratio(per_round, "trl"),
      "speedup_vs_tunix": _ratio(per_round, "tunix"),
      "roofline_fraction": flops / (ours * best_peak) if ours else None,
      "model_gflop_per_iter": flops / 1e9,
      "matmul_peak_gflops": [round(peak / 1e9, 1), round(peak_after / 1e9, 1)],
      "breakdown_s": breakdown,
      "phase_roofline_fraction": (phase_rooflines(breakdown["ours"], shape, best_peak, bandwidth)
                                  if "ours" in breakdown else {}),
      "read_gb_s": bandwidth / 1e9,
      "shape": shape,
      "rounds": per_round,
  }


def print_table(summary, sides, args, peak, peak_after):
  """The human-readable table (before the RESULT line)."""
  per_round = summary["rounds"]
  f = lambda x: "n/a" if x is None else f"{x:.2f}"
  print(f"\nmatmul peak (float32, {args.peak_n}^2): {peak / 1e9:.0f} GFLOP/s before, "
        f"{peak_after / 1e9:.0f} after; {summary['model_gflop_per_iter']:.1f} model GFLOP per "
        f"iteration; {args.rounds} rounds x {args.iters} timed iterations (after {args.warmup} "
        "warm-up)\n")
  print("| side | s/iteration, median (min-max over rounds) | breakdown (median s) | "
        "ours' speedup |")
  print("|---|---|---|---|")
  names = {"ours": "rlhf_jax (GPT-2)", "trl": "TRL 1.10 PPOTrainer (GPT-2)",
           "tunix": "tunix 0.1.7 PPOLearner (Qwen2)"}
  for side in SIDES:
    if side not in sides:
      print(f"| {names[side]} | not run | | |")
      continue
    bd = summary["breakdown_s"][side]
    bd_txt = ", ".join(f"{k} {v:.3f}" for k, v in bd.items()) or "one jitted program"
    if side == "ours" and bd:
      bd_txt = f"one jitted program; phases as separate programs: {bd_txt}"
    speed = "" if side == "ours" else f(summary[f"speedup_vs_{side}"])
    print(f"| {names[side]} | {_fmt(per_round[side])} | {bd_txt} | {speed} |")
  if summary["ours_s_per_iter"]:
    print(f"\nroofline fraction (ours): {summary['roofline_fraction']:.3f}")
  for name, frac in summary["phase_roofline_fraction"].items():
    bw = (f", {frac['bandwidth']:.3f} of the read bandwidth ({summary['read_gb_s']:.1f} GB/s)"
          if "bandwidth" in frac else "")
    print(f"  {name} (its own program): {frac['compute']:.3f} of the matmul peak{bw}")


def main():
  args, wanted = parse_args()
  shape = SHAPES[args.shape]
  if args.worker:
    res = worker_ours(args.warmup, args.iters, shape=shape, phases=args.phases)
    print("RESULT " + json.dumps(res))
    return
  python = {"ours": sys.executable, "trl": args.trl_python, "tunix": args.tunix_python}
  sides = available_sides(wanted, python)
  peak = matmul_peak(n=args.peak_n)
  bandwidth = read_bandwidth(mb=args.bandwidth_mb)
  results = run_rounds(args, sides, python)
  peak_after = matmul_peak(n=args.peak_n)
  summary = summarize(results, sides, shape, peak, peak_after, bandwidth)
  print_table(summary, sides, args, peak, peak_after)
  print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
  main()
