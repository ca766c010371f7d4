"""The whole InstructGPT method in order, each stage skipped when its result is up to date.

  data -> pretrain (offline base model) -> sft -> collect (K SFT samples per prompt, ranked by
  the simulated labeler) -> rm -> ppo (ptx_coef 0) and ppo_ptx [-> ppo_oracle: PPO-ptx against
  the gold labeler itself, `config.oracle_run`] [-> dpo: DPO on the same comparisons from the
  same SFT model, `config.dpo_run`] -> eval (results.json/.md, plots)

`python -m rlhf_jax.main --config=configs/ppo_ptx.py` runs this. Each stage writes under
`<workdir>/<stage>/` and finishes by writing its marker (the model's `rlhf_jax_stage.json`,
`collect/collect.json`, `results.json`) last. A stage is up to date when its marker exists and is
newer than the markers of the stages it reads; otherwise its old output is removed and it runs
again (a killed stage with no marker resumes from its checkpoints). So re-running the command
skips everything finished, and deleting one stage's directory re-runs it and what follows.

Each stage runs with its own sub-config (`config.pretrain`, `config.sft`, `config.collect`,
`config.rm`, `config.dpo`, `config.eval` from configs/eval.py, and the top level for PPO), each
checked by its own stage's rules before anything is written; `mesh`, the `data` fields, the seeds
and `wandb` of the top level are copied into every sub-config, and the top-level `model` into the
stages that train or sample the policy (pretrain, sft, collect, dpo), so one override reaches all
of them.
"""
import os
import shutil
import time

import jax
import ml_collections

from rlhf_jax import distributed
from rlhf_jax.errors import UserError
from rlhf_jax.train import stage_io

# stage -> the stages whose results it reads
DEPENDS = {
    "pretrain": (),
    "sft": ("pretrain",),
    "collect": ("sft",),
    "rm": ("sft", "collect"),
    "ppo": ("sft", "rm"),
    "ppo_ptx": ("sft", "rm"),
    "ppo_oracle": ("sft", "rm"),
    "dpo": ("sft", "collect"),
    "eval": ("pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "ppo_oracle", "dpo"),
}
POLICY_STAGES = ("pretrain", "sft", "collect", "dpo")


def marker(workdir, stage):
  """The file a finished stage writes last."""
  if stage == "collect":
    from rlhf_jax import collect  # pylint: disable=g-import-not-at-top
    return os.path.join(workdir, "collect", collect.DONE_FILE)
  if stage == "eval":
    return os.path.join(workdir, "results.json")
  return os.path.join(stage_io.final_model_dir(workdir, stage), stage_io.STAGE_META)


def stage_outputs(workdir, stage):
  if stage == "eval":
    return [os.path.join(workdir, n) for n in ("results.json", "results.md", "plots")]
  return [os.path.join(workdir, stage)]


def stages_of(config):
  """The stages this config runs, in order."""
  out = []
  if config.pretrain_base:
    out.append("pretrain")
  out += ["sft"]
  if config.collect_comparisons:
    out.append("collect")
  out += ["rm", "ppo"]
  if config.ppo.ptx_coef:
    out.append("ppo_ptx")
  if config.get("oracle_run", False):
    out.append("ppo_oracle")
  if config.get("dpo_run", False):
    out.append("dpo")
  return out + ["eval"]


def _copy(config):
  return ml_collections.ConfigDict(config.to_dict())


def stage_config(config, stage, workdir):
  """The config one stage runs with (see the module docstring for what is shared)."""
  if stage in ("ppo", "ppo_ptx", "ppo_oracle", "eval"):
    sub = _copy(config)
    if stage == "ppo":
      sub.ppo.ptx_coef = 0.0
    if stage == "ppo_oracle":
      sub.reward_model = "gold"
    return sub
  sub = _copy(config[stage])
  sub.mesh = _copy(config.mesh)
  for key in config.data:
    if key in sub.data:
      sub.data[key] = config.data[key]
  for key in ("seed", "data_seed"):
    if key in sub:
      sub[key] = config[key]
  if "wandb" in sub and "wandb" in config:
    sub.wandb = _copy(config.wandb)
  if stage in POLICY_STAGES:
    sub.model = _copy(config.model)
  if stage == "sft" and not config.pretrain_base and sub.init_from == "auto":
    sub.init_from = config.init_from if config.init_from != "auto" else ""
  if stage in ("rm", "dpo") and config.collect_comparisons:
    sub.data.comparisons_dir = os.path.join(workdir, "collect")
  return sub


def up_to_date(workdir, stage, ran):
  """Whether `stage` has a marker newer than every marker it depends on."""
  path = marker(workdir, stage)
  if not os.path.exists(path):
    return False
  mtime = os.path.getmtime(path)
  for dep in DEPENDS[stage]:
    if dep in ran:
      dep_marker = marker(workdir, dep)
      if not os.path.exists(dep_marker) or os.path.getmtime(dep_marker) > mtime:
        return False
  return True


def run_stage(stage, config, workdir):
  if stage in ("pretrain", "sft"):
    from rlhf_jax.train import sft  # pylint: disable=g-import-not-at-top
    stage_io.validate_config(config)
    return sft.run(config, workdir)
  if stage == "rm":
    from rlhf_jax.train import rm  # pylint: disable=g-import-not-at-top
    stage_io.validate_config(config)
    return rm.run(config, workdir)
  if stage == "dpo":
    from rlhf_jax.train import dpo  # pylint: disable=g-import-not-at-top
    stage_io.validate_config(config)
    return dpo.run(config, workdir)
  if stage == "collect":
    from rlhf_jax import collect  # pylint: disable=g-import-not-at-top
    return collect.run(config, workdir)
  if stage in ("ppo", "ppo_ptx", "ppo_oracle"):
    from rlhf_jax.train import ppo  # pylint: disable=g-import-not-at-top
    return ppo.run(config, workdir)
  from rlhf_jax import evaluate  # pylint: disable=g-import-not-at-top
  if distributed.is_primary():
    plot(workdir)
  return evaluate.run(config, workdir)


def plot(workdir):
  """PNG curves of the PPO runs (reward, KL, ptx loss, gold score) and of SFT/RM training."""
  from rlhf_jax import report  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "plots")
  ppo_runs = {n: os.path.join(workdir, n, "metrics.jsonl")
              for n in ("ppo", "ppo_ptx", "ppo_oracle")
              if os.path.exists(os.path.join(workdir, n, "metrics.jsonl"))}
  if ppo_runs:
    report.plot_curves(ppo_runs, ["reward", "kl", "ptx_loss", "gold_score", "entropy",
                                  "response_length"],
                       os.path.join(out, "ppo.png"), "PPO vs PPO-ptx by iteration")
  stages = {n: os.path.join(workdir, n, "metrics.jsonl")
            for n in ("pretrain", "sft", "rm", "dpo")
            if os.path.exists(os.path.join(workdir, n, "metrics.jsonl"))}
  if stages:
    report.plot_curves(stages, ["loss", "eval/loss", "eval/accuracy"],
                       os.path.join(out, "stages.png"), "Pretraining, SFT, RM (and DPO)")


def run(config, workdir):
  """Runs every stage of `stages_of(config)` that is not up to date; returns the results."""
  workdir = os.path.abspath(workdir)
  # Every stage's config is checked before anything is written (each by its own stage's rules).
  stages = stages_of(config)
  configs = {s: stage_config(config, s, workdir) for s in stages}
  stage_io.validate_config(config)      # the top level: the PPO stage's
  for s in ("pretrain", "sft", "rm", "dpo"):
    if s in configs:
      stage_io.validate_config(configs[s])
  from rlhf_jax import collect, evaluate  # pylint: disable=g-import-not-at-top
  if "collect" in configs:
    collect.validate(configs["collect"])
  evaluate.validate(config)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".rlhf_jax_write_test.{jax.process_index()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir: cannot write to {workdir} ({e.strerror})") from None
  t0 = time.time()
  result = None
  for stage in stages:
    # Every process decides from the same files: each stage ends with its writers done (a
    # barrier), and all look before process 0 removes anything.
    distributed.barrier("rlhf_jax_pipeline_stage")
    if up_to_date(workdir, stage, stages):
      print(f"pipeline: {stage} is up to date ({marker(workdir, stage)})", flush=True)
      continue
    if os.path.exists(marker(workdir, stage)):
      print(f"pipeline: {stage} is older than what it depends on; running it again", flush=True)
      distributed.barrier("rlhf_jax_pipeline_stale")
      if distributed.is_primary():
        for path in stage_outputs(workdir, stage):
          if os.path.isdir(path):
            shutil.rmtree(path)
          elif os.path.exists(path):
            os.remove(path)
      distributed.barrier("rlhf_jax_pipeline_removed")
    print(f"pipeline: running {stage} ({time.time() - t0:.0f} s so far)", flush=True)
    result = run_stage(stage, configs[stage], workdir)
  if not isinstance(result, dict):   # evaluation was up to date: show its table again
    with open(marker(workdir, "eval").replace(".json", ".md"), encoding="utf-8") as f:
      print(f.read(), flush=True)
  print(f"pipeline: done in {time.time() - t0:.0f} s; results in "
        f"{os.path.join(workdir, 'results.md')}", flush=True)
  return result
