"""PPO-ptx killed with SIGKILL mid-run and re-run with the same command ends bit-identical to an
uninterrupted run: params, both optimizer states, the adaptive KL coefficient, the policy EMA, the
prompt and pretraining iterators and the per-iteration RNG all resume."""
import os

import pytest

import kill_resume as kr


def _ppo_cmd(data, lm, rm):
  return ["-m", "rlhf_jax.main", "--config=configs/ppo_ptx.py", "--workdir={workdir}",
          "--config.pipeline=False", f"--config.data.dir={data}", f"--config.init_from={lm}",
          f"--config.reward_model={rm}", f"--config.value_from={rm}",
          "--config.model.num_layers=1", "--config.ppo.num_iterations=12",
          "--config.ppo.checkpoint_every=2", "--config.ppo.batch_size=16",
          "--config.ppo.minibatches=2", "--config.ppo.response_len=8",
          "--config.ppo.adaptive_kl=True", "--config.ppo.kl_target=0.5",
          "--config.ppo.ema_decay=0.9", "--config.ppo.ptx_seq_len=32"]


@pytest.mark.slow
def test_ppo_ptx_killed_at_a_random_point_resumes_bit_identically(tmp_path, offline_data_dir):
  data = offline_data_dir
  tok = os.path.join(data, "tokenizer")
  lm = kr.save_random_model(str(tmp_path / "lm"), tok, num_layers=1)
  rm = kr.save_random_model(str(tmp_path / "rm"), tok, head="scalar", seed=1, num_layers=1)
  cmd = _ppo_cmd(data, lm, rm)
  ref = str(tmp_path / "reference")
  kr.run_to_completion(cmd, ref)
  work = str(tmp_path / "killed")
  report = kr.run_and_kill(cmd, work, "ppo_ptx", seed=5, max_delay=2.0)
  assert report.killed and not report.model_existed and report.complete_steps, report
  out = kr.run_to_completion(cmd, work)
  assert f"resumed from {kr.checkpoint_dir(work, 'ppo_ptx')}/{report.complete_steps[-1]}" in out
  kr.assert_same_params(kr.model_dir(ref, "ppo_ptx"), kr.model_dir(work, "ppo_ptx"))
