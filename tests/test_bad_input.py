"""Bad input at the boundary (issue 9): config, command line, data files, checkpoints and models.

Every case runs the real command line (`python -m rlhf_jax.main ...` or the data CLI) and must end
with exit status 2, exactly one line on stderr starting with 'error:' that names the offending
field / flag / file, no traceback, and its workdir exactly as it was (names, sizes, mtimes).

The commands run a few at a time in one module fixture (each is a fresh Python process: ~2 s for
config errors, ~6-10 s for the ones that load a tokenizer, data or checkpoints).
"""
import concurrent.futures
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Callable, Optional

import pytest

import kill_resume as kr

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SFT = "--config=configs/sft.py:tiny"
RM = "--config=configs/rm.py:tiny"
PPO = "--config=configs/ppo_ptx.py"
COLLECT = "--config=configs/collect.py:tiny"
# Real data (issue 17): the HH-RLHF pipeline from SmolLM2 on files written by `_real_data_files`;
# every case fails before a model is loaded.
HH = ["--config=configs/hh_rlhf.py:smollm2", "--config.data.ptx={fixtures}/ptx.txt"]
TLDR = ["--config=configs/tldr.py:smollm2", "--config.data.ptx={fixtures}/ptx.txt"]
# The checkpointed run the checkpoint cases resume (see the `shared` fixture).
PRETRAIN = [SFT, "--config.stage=pretrain", "--config.data.dir={data}",
            "--config.model.num_layers=1", "--config.num_steps=4", "--config.checkpoint_every=2",
            "--config.eval_every=0", "--config.eval_batches=1"]


@dataclasses.dataclass
class Case:
  name: str
  args: list                      # {workdir}, {data}, {lm}, {scalar}, {sft_only}, {shared}
  expect: tuple                   # substrings of the one stderr line (field / flag / file)
  setup: Optional[Callable] = None      # (workdir, shared dict) -> None, before the snapshot
  module: str = "rlhf_jax.main"
  workdir_flag: bool = True       # append --workdir={workdir}


def _checkpoint_run(workdir, shared):
  shutil.copytree(shared["run"], workdir, dirs_exist_ok=True)


def _latest(workdir):
  ckpt = os.path.join(workdir, "pretrain", "checkpoints")
  return os.path.join(ckpt, str(max(int(n) for n in os.listdir(ckpt) if n.isdigit())))


def _truncate_arrays(workdir, shared):
  _checkpoint_run(workdir, shared)
  for dirpath, _, files in os.walk(os.path.join(_latest(workdir), "state")):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.sep + "d" + os.sep in path + os.sep and os.path.getsize(path) > 64:
        os.truncate(path, 32)          # array data cut short, as by a full disk


def _garbage_meta(workdir, shared):
  _checkpoint_run(workdir, shared)
  with open(os.path.join(_latest(workdir), "meta", "metadata"), "w") as f:
    f.write("{not json")


def _garbage_marker(workdir, shared):
  _checkpoint_run(workdir, shared)
  with open(os.path.join(workdir, "pretrain", "checkpoints", "rlhf_jax_checkpoints.json"),
            "w") as f:
    f.write("garbage")


def _file_in_workdir(workdir, shared):
  with open(os.path.join(workdir, "file"), "w") as f:
    f.write("not a directory\n")


def _prepared_from_train(workdir, shared):
  """<workdir>/data prepared from the HH fixture's train file (a run that then changes files)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from rlhf_jax.data import real_data  # pylint: disable=g-import-not-at-top
  fixtures = shared["fixtures"]
  real_data.prepared_tfds_dir(ml_collections.ConfigDict(dict(
      source="hh_rlhf", input=os.path.join(fixtures, "hh_rlhf", "train.jsonl.gz"), heldout="",
      heldout_fraction=0.05, sft="", ptx=os.path.join(fixtures, "ptx.txt"), limit=0)),
      os.path.join(workdir, "data"))


def _real_data_files(root):
  """Bad HH-RLHF / TL;DR files with the real layout: damaged gzip, malformed records, empty."""
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  good = {"chosen": "\n\nHuman: hi?\n\nAssistant: Hello, how can I help?",
          "rejected": "\n\nHuman: hi?\n\nAssistant: no."}
  hh = lambda *records: "".join(json.dumps(r) + "\n" for r in records).encode()
  with open(os.path.join(FIXTURES, "hh_rlhf", "train.jsonl.gz"), "rb") as f:
    data = f.read()
  files = {
      "corrupt.jsonl.gz": data[:12] + bytes(40) + data[52:],
      "truncated.jsonl.gz": data[:len(data) // 2],
      "no_chosen.jsonl.gz": gzip.compress(hh(good, {"rejected": good["rejected"]})),
      "same.jsonl": hh({"chosen": good["chosen"], "rejected": good["chosen"]}),
      "no_turn.jsonl": hh({"chosen": "\n\nHuman: hi?", "rejected": "\n\nHuman: hi?"}),
      "empty.jsonl.gz": gzip.compress(b""),
  }
  info = {"id": "t3_1", "subreddit": "tifu", "title": "TIFU", "post": "I fell."}
  summaries = [{"text": "fell", "policy": "ref", "note": None},
               {"text": "I fell down", "policy": "sup2", "note": None}]
  files["choice_2.jsonl"] = hh({"info": info, "summaries": summaries, "choice": 2,
                                "split": "train", "worker": "w", "batch": "b"})
  files["no_summaries.jsonl"] = hh({"info": info, "choice": 0, "split": "train", "worker": "w",
                                    "batch": "b"})
  os.makedirs(os.path.join(root, "real"))
  for name, content in files.items():
    with open(os.path.join(root, "real", name), "wb") as f:
      f.write(content)
  return os.path.join(root, "real")


def _damaged_model(workdir, shared):
  shutil.copytree(shared["lm"], os.path.join(workdir, "lm"))
  for dirpath, _, files in os.walk(os.path.join(workdir, "lm", "params")):
    for name in files:
      if os.sep + "d" + os.sep in os.path.join(dirpath, name):
        os.truncate(os.path.join(dirpath, name), 10)


CASES = [
    # ---- config
    Case("unknown-preset", ["--config=configs/sft.py:huge"], ("--config", "'huge'")),
    Case("missing-config-file", ["--config=configs/nope.py"], ("--config", "configs/nope.py")),
    Case("negative-lr", [SFT, "--config.optimizer.lr=-1"], ("config.optimizer.lr",)),
    Case("zero-batch", [RM, "--config.batch_size=0"], ("config.batch_size",)),
    Case("task-knob-out-of-range", [SFT, "--config.data.task.filler_rate=2"],
         ("config.data.task", "filler_rate")),
    Case("task-family-unknown", [SFT, "--config.data.task.families=sort,divide"],
         ("config.data.task", "'divide'")),
    Case("accum-not-dividing", [SFT, "--config.grad_accum_steps=3"],
         ("config.grad_accum_steps",)),
    Case("mesh-not-dividing-devices", [SFT, "--config.mesh.shape=1,3,1"], ("mesh.shape",)),
    Case("batch-not-multiple-of-mesh", [SFT, "--config.batch_size=12"], ("config.batch_size",)),
    Case("seq-len-over-max-len", [SFT, "--config.seq_len=4096"], ("config.seq_len",)),
    Case("unknown-stage", [SFT, "--config.stage=kto"], ("config.stage",)),
    Case("unknown-data-source", [SFT, "--config.data.source=web"], ("config.data.source",)),
    Case("max-nonfinite-zero", [SFT, "--config.max_nonfinite_steps=0"],
         ("config.max_nonfinite_steps",)),
    Case("b2-one", [SFT, "--config.optimizer.b2=1.0"], ("config.optimizer.b2",)),
    Case("k-max-one", [RM, "--config.k_max=1"], ("config.k_max",)),
    Case("heads-not-dividing", [SFT, "--config.model.num_heads=3"], ("num_heads",)),
    Case("seed-not-int", [SFT, "--config.seed=1.5"], ("--config.seed",)),
    Case("negative-prefetch", [SFT, "--config.data.prefetch=-1"], ("config.data.prefetch",)),
    # each stage by its own rules: PPO has no SFT batch/loop fields; collect its own checks
    Case("ppo-has-no-sft-batch-size", [PPO, "--config.batch_size=8"], ("--config.batch_size",)),
    Case("ppo-zero-minibatches", [PPO, "--config.ppo.minibatches=0"],
         ("config.ppo.minibatches",)),
    Case("ppo-sub-config-bad", [PPO, "--config.rm.k_max=1"], ("config.k_max",)),
    Case("dpo-beta-zero", [PPO, "--config.dpo.beta=0"], ("config.beta", "> 0")),
    Case("dpo-stage-negative-beta", ["--config=configs/dpo.py", "--config.beta=-0.1"],
         ("config.beta", "-0.1")),
    Case("collect-k-below-2", [COLLECT, "--config.min_k=1"], ("config.min_k",)),
    # ---- command line
    Case("unknown-flag", [SFT, "--foo=1"], ("foo",)),
    Case("extra-argument", [SFT, "extra"], ("extra",)),
    Case("no-config", [], ("--config",)),
    Case("unknown-config-field", [SFT, "--config.model.nope=1"], ("--config.model.nope",)),
    Case("workdir-is-a-file", [SFT, "--workdir={workdir}/file"], ("--workdir", "file"),
         setup=_file_in_workdir, workdir_flag=False),
    # ---- data
    Case("data-dir-missing", [SFT, "--config.data.source=dir",
                              "--config.data.dir={workdir}/nowhere", "--config.init_from={lm}"],
         ("config.data.dir", "nowhere")),
    Case("missing-split", [SFT, "--config.data.dir={data}", "--config.init_from={lm}",
                           "--config.data.train_split=nope"], ("config.data.train_split", "nope")),
    Case("wrong-data-kind", [RM, "--config.data.source=dir", "--config.data.dir={sft_only}",
                             "--config.init_from={lm}"],
         ("config.data.train_split", "comparisons")),
    Case("tokenizer-bigger-than-vocab", [SFT, "--config.stage=pretrain", "--config.data.dir={data}",
                                         "--config.model.vocab_size=256"],
         ("config.data.tokenizer", "vocab_size 256")),
    Case("tokenizer-missing", [SFT, "--config.data.dir={data}", "--config.init_from={lm}",
                               "--config.data.tokenizer={workdir}/no_tokenizer"],
         ("config.data.tokenizer", "no_tokenizer")),
    Case("malformed-jsonl-record", ["--source=jsonl", "--kind=sft",
                                    "--input=train={shared}/malformed.jsonl",
                                    "--out_dir={workdir}/out"],
         ("malformed.jsonl line 2", "response"), module="rlhf_jax.data.prepare",
         workdir_flag=False),
    Case("comparison-with-one-response", ["--source=jsonl", "--kind=comparisons",
                                          "--input=train={shared}/one_response.jsonl",
                                          "--out_dir={workdir}/out"],
         ("one_response.jsonl line 1", "responses"), module="rlhf_jax.data.prepare",
         workdir_flag=False),
    # ---- checkpoints and models
    Case("truncated-checkpoint", PRETRAIN, ("pretrain/checkpoints/4", "damaged"),
         setup=_truncate_arrays),
    Case("corrupt-checkpoint-meta", PRETRAIN, ("pretrain/checkpoints/4", "meta"),
         setup=_garbage_meta),
    Case("corrupt-checkpoint-marker", PRETRAIN, ("rlhf_jax_checkpoints.json",),
         setup=_garbage_marker),
    Case("checkpoint-of-another-shape", PRETRAIN + ["--config.model.d_ff=128"],
         ("config.model.d_ff", "pretrain/checkpoints/4"), setup=_checkpoint_run),
    Case("init-from-another-shape", [SFT, "--config.data.dir={data}", "--config.init_from={lm}",
                                     "--config.model.num_layers=1"],
         ("config.init_from", "num_layers")),
    Case("init-from-damaged-model", [SFT, "--config.data.dir={data}",
                                     "--config.init_from={workdir}/lm"],
         ("config.init_from", "lm/params"), setup=_damaged_model),
    Case("init-from-missing", [SFT, "--config.data.dir={data}",
                               "--config.init_from={workdir}/no_model"],
         ("config.init_from", "no_model")),
    Case("init-from-reward-model", [SFT, "--config.data.dir={data}",
                                    "--config.init_from={scalar}"],
         ("config.init_from", "'scalar' head")),
    Case("rm-without-sft-model", [RM, "--config.data.dir={data}"],
         ("config.init_from", "sft")),
    # ---- issue 17: flag typos (one line with the field it may have meant)
    Case("flag-typo-top-level", [SFT, "--config.lrr=1"],
         ("--config.lrr: no such field; did you mean --config.optimizer.lr?",)),
    Case("flag-typo-nested", [SFT, "--config.optimizer.lrr=1"],
         ("--config.optimizer.lrr: no such field; did you mean --config.optimizer.lr?",)),
    Case("flag-typo-section", [PPO, "--config.optimzer.lr=1"],
         ("--config.optimzer.lr: no such field; did you mean --config.optimizer.lr?",)),
    Case("flag-wrong-type", [SFT, "--config.optimizer.lr=fast"],
         ("--config.optimizer.lr: expected a number, got 'fast'",)),
    # ---- issue 17: real data files as distributed (HH-RLHF, TL;DR)
    Case("hh-corrupt-gzip", HH + ["--config.data.input={real}/corrupt.jsonl.gz"],
         ("corrupt.jsonl.gz: damaged gzip file", "corrupt")),
    Case("hh-truncated-gzip", HH + ["--config.data.input={real}/truncated.jsonl.gz"],
         ("truncated.jsonl.gz: damaged gzip file", "truncated")),
    Case("hh-missing-chosen", HH + ["--config.data.input={real}/no_chosen.jsonl.gz"],
         ("no_chosen.jsonl.gz line 2", "missing field 'chosen'")),
    Case("hh-chosen-equals-rejected", HH + ["--config.data.input={real}/same.jsonl"],
         ("same.jsonl: no usable comparisons", "1 identical responses")),
    Case("hh-no-assistant-turn", HH + ["--config.data.input={real}/no_turn.jsonl"],
         ("no_turn.jsonl line 1 field 'chosen'", "no '\\n\\nAssistant:' turn")),
    Case("hh-empty-input", HH + ["--config.data.input={real}/empty.jsonl.gz"],
         ("empty.jsonl.gz: holds no records",)),
    Case("tldr-choice-out-of-range", TLDR + ["--config.data.input={real}/choice_2.jsonl"],
         ("choice_2.jsonl line 1", "field 'choice' must be 0 or 1 (got 2)")),
    Case("tldr-missing-summaries", TLDR + ["--config.data.input={real}/no_summaries.jsonl"],
         ("no_summaries.jsonl line 1", "missing field 'summaries'")),
    Case("ptx-file-missing", ["--config=configs/hh_rlhf.py:smollm2",
                              "--config.data.input={fixtures}/hh_rlhf/train.jsonl.gz",
                              "--config.data.ptx={workdir}/no_such_ptx.txt"],
         ("config.data.ptx", "no_such_ptx.txt is not a file")),
    Case("hh-input-missing", HH, ("config.data.input", "required")),
    Case("ppo-ptx-without-ptx", ["--config=configs/hh_rlhf.py:smollm2",
                                 "--config.data.input={fixtures}/hh_rlhf/train.jsonl.gz"],
         ("config.data.ptx", "config.ppo.ptx_coef=0")),
    Case("heldout-fraction-out-of-range", HH + [
        "--config.data.input={fixtures}/hh_rlhf/train.jsonl.gz",
        "--config.data.heldout_fraction=1.5"], ("config.data.heldout_fraction", "(0, 1)")),
    Case("data-prepared-from-other-files", HH + [
        "--config.data.input={fixtures}/hh_rlhf/test.jsonl.gz"],
         ("config.data.input: the data in", "prepared from the file of sha256"),
         setup=_prepared_from_train),
    Case("judge-missing", HH + ["--config.data.input={fixtures}/hh_rlhf/train.jsonl.gz",
                                "--config.eval.judge={workdir}/no_judge"],
         ("config.eval.judge", "no_judge")),
    Case("prepare-cli-truncated-gzip", ["--source=hh_rlhf", "--input={real}/truncated.jsonl.gz",
                                        "--out_dir={workdir}/out"],
         ("truncated.jsonl.gz: damaged gzip file",), module="rlhf_jax.data.prepare",
         workdir_flag=False),
]


def _config(name, **overrides):
  spec = importlib.util.spec_from_file_location(f"{name}_config_bad_input",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def shared(tmp_path_factory, offline_data_dir):
  """Prepared offline data (conftest.py), an sft-only data folder, random LM and reward models,
  bad JSONL files, and a pretraining run stopped with checkpoints at steps 2 and 4 (model
  removed)."""
  from rlhf_jax.data import builders  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import sft  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("bad_input")
  data = offline_data_dir
  tok = os.path.join(data, "tokenizer")
  sft_only = root / "sft_only"
  builders.build_dataset("sft", {s: os.path.join(data, f"sft_{s}.jsonl")
                                 for s in ("train", "validation")}, str(sft_only / "tfds"))
  shutil.copytree(tok, sft_only / "tokenizer")
  (root / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
  (root / "one_response.jsonl").write_text(
      '{"prompt": "p", "responses": [" a"], "ranks": [0]}\n')
  run = str(root / "run")
  sft.run(_config("sft", **{"stage": "pretrain", "data.dir": data, "model.num_layers": 1,
                            "num_steps": 4, "checkpoint_every": 2, "eval_every": 0,
                            "eval_batches": 1}), run)
  shutil.rmtree(os.path.join(run, "pretrain", "model"))
  return {"data": data, "sft_only": str(sft_only), "shared": str(root), "run": run,
          "real": _real_data_files(str(root)), "fixtures": FIXTURES,
          "lm": kr.save_random_model(str(root / "lm"), tok),
          "scalar": kr.save_random_model(str(root / "rm"), tok, head="scalar")}


def _run(case, workdir, shared):
  os.makedirs(workdir)
  if case.setup is not None:
    case.setup(workdir, shared)
  before = kr.snapshot(workdir)
  fill = lambda a: a.format(workdir=workdir, **{k: v for k, v in shared.items() if k != "run"})
  args = [fill(a) for a in case.args]
  if case.workdir_flag:
    args.append(f"--workdir={workdir}")
  result = subprocess.run([sys.executable, "-m", case.module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  return result, before, kr.snapshot(workdir)


@pytest.fixture(scope="module")
def results(request, shared, tmp_path_factory):
  """Runs the selected cases, three processes at a time."""
  selected = {item.callspec.params["case"].name for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")
              and "case" in item.callspec.params}
  root = tmp_path_factory.mktemp("cases")
  todo = [c for c in CASES if c.name in selected]
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {c.name: pool.submit(_run, c, str(root / c.name), shared) for c in todo}
    return {name: f.result() for name, f in futures.items()}


def test_at_least_twenty_distinct_cases():
  assert len({c.name for c in CASES}) == len(CASES) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, results):
  result, before, after = results[case.name]
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for part in case.expect:
    assert part in lines[0], (part, lines[0])
  assert after == before        # nothing in the workdir created, changed or half-written
