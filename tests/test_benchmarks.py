"""Every benchmarks/*.py runs: each is started as its own process on tiny shapes, without peers
(TRL, tunix and transformers are left out or pointed at interpreters that do not exist, which each
driver must skip with a note), and its last `RESULT {json}` line must carry the keys its docstring
documents. Numbers are not checked, only that they are numbers: this is a smoke test."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
MISSING = "/nonexistent/peer/bin/python"

# script -> (tiny flags, check of the RESULT dict and stderr)
SMOKE = {}


def _smoke(script, *flags):
  def register(check):
    SMOKE[script] = (list(flags), check)
    return check
  return register


def _number(x, positive=False):
  ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  return ok and (x > 0 if positive else True)


@_smoke("machine.py", "--n=128", "--repeats=2", "--mb=4")
def _check_machine(res, stderr):
  assert _number(res["matmul_peak_gflops"], positive=True)
  assert _number(res["read_gb_s"], positive=True) and res["mb"] == 4
  assert res["n"] == 128 and res["repeats"] == 2 and res["platform"] == "cpu"
  assert res["device_count"] >= 1


@_smoke("train_step.py", "--shapes=tiny", "--seq_len=16", "--repeats=1", "--peak_n=128")
def _check_train_step(res, stderr):
  assert _number(res["peak_gflops"], positive=True) and res["seq_len"] == 16
  assert set(res["fraction_of_peak"]) == {"tiny/sft", "tiny/rm"}
  assert all(_number(v) for v in res["fraction_of_peak"].values())
  keys = {"fraction_of_peak", "step_s", "tflops", "flops", "sequences", "compile_s", "forward_s",
          "forward_backward_s", "backward_s", "optimizer_s", "backward_over_forward"}
  for name, d in res["details"].items():
    want = keys | ({"lm_head_and_loss_s"} if name.endswith("/sft") else set())
    assert want <= set(d), (name, want - set(d))
    assert all(_number(d[k]) for k in want), d
    assert d["flops"] > 0 and d["sequences"] == (2 if name.endswith("/sft") else 4)


@_smoke("generate.py", "--shapes=tiny", "--rounds=1", "--repeats=1", "--prompt_len=8",
        "--new_tokens=8", "--peak_n=128", "--bandwidth_mb=4", "--only=ours,ours_int8,tunix",
        f"--tunix_python={MISSING}")
def _check_generate(res, stderr):
  assert len(res["matmul_peak_gflops"]) == 2
  assert all(_number(v, positive=True) for v in res["matmul_peak_gflops"])
  tiny = res["tiny"]
  assert _number(tiny["ours_tok_s"], positive=True) and _number(tiny["roofline_fraction"])
  assert _number(tiny["bandwidth_roofline_fraction"], positive=True)
  assert _number(tiny["bytes_per_step"], positive=True) and _number(res["read_gb_s"], positive=True)
  assert _number(tiny["ours_int8_tok_s"], positive=True)
  assert _number(tiny["int8_bandwidth_roofline_fraction"], positive=True)
  for side in ("ours_phases", "ours_int8_phases"):   # the prefill and a decode step
    assert sorted(tiny[side]) == ["decode_bandwidth_roofline_fraction", "decode_step_s",
                                  "prefill_roofline_fraction", "prefill_s"], tiny[side]
    assert _number(tiny[side]["prefill_s"], positive=True)
    assert _number(tiny[side]["prefill_roofline_fraction"], positive=True)
  for key in ("hf_tok_s", "tunix_tok_s", "ratio_vs_hf", "ratio_vs_tunix", "int8_ratio_vs_hf",
              "int8_ratio_vs_tunix"):
    assert key in tiny and tiny[key] is None, (key, tiny)
  assert "tunix not available" in stderr


@_smoke("ppo_iteration.py", "--shape=tiny", "--rounds=1", "--warmup=1", "--iters=1",
        "--wait_idle=0", "--peak_n=128", "--bandwidth_mb=4", f"--trl_python={MISSING}",
        f"--tunix_python={MISSING}")
def _check_ppo_iteration(res, stderr):
  assert _number(res["ours_s_per_iter"], positive=True)
  assert _number(res["roofline_fraction"]) and _number(res["model_gflop_per_iter"], positive=True)
  for key in ("trl_s_per_iter", "tunix_s_per_iter", "speedup_vs_trl", "speedup_vs_tunix"):
    assert key in res and res[key] is None, (key, res)
  assert len(res["matmul_peak_gflops"]) == 2
  phases = ("rollout", "scoring", "update")
  assert sorted(res["breakdown_s"]["ours"]) == sorted(phases)    # timed in round 1
  assert all(_number(v, positive=True) for v in res["breakdown_s"]["ours"].values())
  fractions = res["phase_roofline_fraction"]
  assert sorted(fractions) == sorted(phases) and _number(res["read_gb_s"], positive=True)
  assert all(_number(f["compute"], positive=True) for f in fractions.values())
  assert _number(fractions["rollout"]["bandwidth"], positive=True)
  assert res["shape"]["d_model"] == 32 and len(res["rounds"]["ours"]) == 1
  assert "trl not available" in stderr and "tunix not available" in stderr


def test_every_benchmark_has_a_smoke_test():
  assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SMOKE)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  # One CPU device, as a benchmark sees the machine (conftest asks for 8 fake ones).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  return env


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_on_tiny_shapes(script):
  flags, check = SMOKE[script]
  proc = subprocess.run([sys.executable, str(BENCH / script), *flags], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stdout[-2000:]
  assert proc.stdout.rstrip().splitlines()[-1] == lines[-1], "RESULT is not the last line"
  check(json.loads(lines[-1][len("RESULT "):]), proc.stderr)
