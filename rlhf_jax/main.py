r"""Entry point: runs the stage named by an ml-collections config.

  python -m rlhf_jax.main --config=configs/sft.py:tiny --config.stage=pretrain   # offline base model
  python -m rlhf_jax.main --config=configs/sft.py:tiny                          # SFT
  python -m rlhf_jax.main --config=configs/collect.py:tiny                      # ranked samples
  python -m rlhf_jax.main --config=configs/rm.py:tiny                           # reward model
  python -m rlhf_jax.main --config=configs/dpo.py:tiny                          # DPO baseline
  python -m rlhf_jax.main --config=configs/ppo_ptx.py                           # the pipeline
  python -m rlhf_jax.main --config=configs/sft.py:smollm2 --workdir=runs/smol   # from SmolLM2

--workdir defaults to runs/<config.name>; every stage writes `<workdir>/<stage>/` (metrics.jsonl,
checkpoints/, model/), and a stage whose `model/` exists is skipped. The offline data are prepared
under `<workdir>/data` on first use. --workdir is a local path (a URL such as gs://... is refused:
mount the bucket, see rlhf_jax.workdir). Multi-host runs take --coordinator_address,
--num_processes, --process_id (see rlhf_jax.distributed) and a --workdir every process sees.
Bad configs end with one line on stderr and exit status 2.
"""
import os

from absl import flags
from ml_collections import config_flags

from rlhf_jax import distributed  # noqa: F401  (defines the multi-host flags)
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.errors import UserError, run_cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (path.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")


def _stage_module(stage):
  # pylint: disable=g-import-not-at-top
  if stage == "collect":
    from rlhf_jax import collect
    return collect
  from rlhf_jax.train import dpo, ppo, rm, sft
  return {"pretrain": sft, "sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo}[stage]


def _run_stage(stage):
  return lambda config, workdir: _stage_module(stage).run(config, workdir)


# stage name -> run(config, workdir) -> path of the stage's result (its final model; collect: the
# comparisons directory).
STAGES = {name: _run_stage(name) for name in ("pretrain", "sft", "collect", "rm", "ppo", "dpo")}


def validate(config):
  """Checks the fields the config's stage reads, by that stage's own rules (a one-line
  UserError for the first bad one)."""
  if config.get("stage") not in STAGES:
    raise UserError(f"config.stage must be one of {', '.join(STAGES)}, got {config.get('stage')!r}")
  if config.stage == "collect":
    _stage_module("collect").validate(config)
  else:
    from rlhf_jax.train import stage_io  # pylint: disable=g-import-not-at-top
    stage_io.validate_config(config)


def workdir_for(config):
  return _WORKDIR.value or os.path.join("runs", str(config.get("name", "run")))


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise UserError("--config is required (e.g. --config=configs/sft.py:tiny)")
  try:
    config.get("stage")   # config_flags hands back a stand-in that raises its load error here
  except OSError as e:
    cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    raise UserError(f"--config: cannot load the config file ({cause})") from None
  validate(config)
  workdir = workdir_lib.resolve(workdir_for(config))   # a URL: one line, nothing created
  distributed.initialize_from_flags()
  workdir_lib.check_shared(workdir)                    # several processes: one directory for all
  if config.get("pipeline"):
    from rlhf_jax import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.run(config, workdir)
  else:
    STAGES[config.stage](config, workdir)


if __name__ == "__main__":
  run_cli(main)
