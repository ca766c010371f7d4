"""Real data (issue 17): HH-RLHF and TL;DR files as distributed -> the pipeline's four kinds.

The fixtures (tests/fixtures, written by make_fixtures.py) have the public files' exact field
layout; HH-RLHF is gzip-compressed as distributed.
"""
import gzip
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from rlhf_jax import config_files
from rlhf_jax import eval_metrics
from rlhf_jax import eval_results
from rlhf_jax.data import builders
from rlhf_jax.data import formats
from rlhf_jax.data import prepare
from rlhf_jax.data import real_data
from rlhf_jax.data import schema
from rlhf_jax.errors import UserError
from rlhf_jax.train import stage_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
HH_TRAIN = os.path.join(FIXTURES, "hh_rlhf", "train.jsonl.gz")
HH_TEST = os.path.join(FIXTURES, "hh_rlhf", "test.jsonl.gz")
TLDR = os.path.join(FIXTURES, "tldr", "comparisons.jsonl")
TLDR_SFT = os.path.join(FIXTURES, "tldr", "sft_train.jsonl")
PTX = os.path.join(FIXTURES, "ptx.txt")


def data_config(source="hh_rlhf", **fields):
  values = dict(source=source, input=HH_TRAIN if source == "hh_rlhf" else TLDR, heldout="",
                heldout_fraction=0.05, sft="", ptx=PTX, limit=0)
  values.update(fields)
  return ml_collections.ConfigDict(values)


def test_fixtures_are_what_make_fixtures_writes(tmp_path):
  """The committed fixtures are the generator's output (gzip with mtime 0: same bytes)."""
  copy = tmp_path / "fixtures"
  shutil.copytree(FIXTURES, copy)
  os.remove(copy / "hh_rlhf" / "train.jsonl.gz")
  module = config_files.load(str(copy / "make_fixtures.py"))
  module.main()
  for rel in ("hh_rlhf/train.jsonl.gz", "hh_rlhf/test.jsonl.gz", "tldr/comparisons.jsonl",
              "tldr/sft_train.jsonl", "ptx.txt"):
    with open(os.path.join(FIXTURES, rel), "rb") as a, open(copy / rel, "rb") as b:
      assert a.read() == b.read(), rel


def test_gzip_is_told_by_its_magic_bytes_not_its_name(tmp_path):
  lines = [{"text": "a"}, {"text": "b"}]
  raw = "".join(json.dumps(r) + "\n" for r in lines).encode()
  (tmp_path / "gz_named_plain.jsonl").write_bytes(gzip.compress(raw))
  (tmp_path / "plain_named.gz").write_bytes(raw)
  for name in ("gz_named_plain.jsonl", "plain_named.gz"):
    assert [r for _, r in schema.json_lines(tmp_path / name)] == lines


@pytest.mark.parametrize("damage,expected", [
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b[:12] + bytes(40) + b[52:], "corrupt"),
])
def test_damaged_gzip_is_one_line_naming_the_file(tmp_path, damage, expected):
  path = tmp_path / "bad.jsonl.gz"
  with open(HH_TRAIN, "rb") as f:
    path.write_bytes(damage(f.read()))
  with pytest.raises(UserError, match=f"bad.jsonl.gz: damaged gzip file .*{expected}") as e:
    formats.convert_hh_rlhf(path)
  assert "\n" not in str(e.value)


def test_hh_fixture_converts_with_the_prompt_up_to_the_last_assistant_turn():
  records, skipped = formats.convert_hh_rlhf(HH_TRAIN)
  assert len(records) == 16 and skipped == {"different prompts": 0, "identical responses": 1}
  first = records[0]          # a two-turn dialogue: the prompt holds the first answer
  assert first["prompt"].endswith("this week.\n\nAssistant:")
  assert first["prompt"].count("\n\nAssistant:") == 2
  assert first["responses"] == [" Start small: here is a simple way to bake bread, step by step.",
                                " I don't know."]
  assert first["ranks"] == [0, 1]


def test_tldr_fixture_converts_comparisons_and_the_sft_split():
  records, skipped = formats.convert_tldr(TLDR)
  assert len(records) == 14 and skipped["no reddit post"] == 1
  assert records[0]["prompt"].startswith("SUBREDDIT: r/personalfinance\nTITLE: I (24F) want")
  assert records[0]["prompt"].endswith("\nTL;DR:")
  # choice 1 prefers the second summary (the fixture puts the better one there)
  assert all(r["responses"][0].startswith(" I keep failing") for r in records)
  demos, _ = formats.convert_demonstrations(TLDR_SFT)
  assert len(demos) == 12 and demos[0]["prompt"] == records[0]["prompt"]
  assert demos[0]["response"] == " I want to bake bread but never find the time."


def _prompts(records):
  return {r["prompt"] if "prompt" in r else r["text"] for r in records}


@pytest.mark.parametrize("source,fields", [
    ("hh_rlhf", {}),
    ("hh_rlhf", {"heldout": HH_TEST}),
    ("hh_rlhf", {"heldout_fraction": 0.5}),
    ("tldr", {"sft": TLDR_SFT}),
    ("tldr", {"limit": 5}),
])
def test_heldout_split_is_by_prompt_deterministic_and_never_empty(source, fields):
  data = data_config(source, **fields)
  records, _ = real_data.make_records(data)
  again, _ = real_data.make_records(data)
  assert records == again
  held = set()
  for kind, splits in records.items():
    assert splits["train"] and splits["validation"], kind
    if kind != "ptx":
      held |= _prompts(splits["validation"])
  for kind, splits in records.items():
    train = _prompts(splits["train"])
    if kind == "ptx":
      assert not train & _prompts(splits["validation"])
    else:
      assert not train & held, kind          # no held-out prompt in any train split
  if fields.get("heldout"):
    test_prompts = {r["prompt"] for r in formats.convert_hh_rlhf(HH_TEST)[0]}
    assert _prompts(records["comparisons"]["validation"]) == test_prompts
  if fields.get("limit"):
    assert sum(len(s) for s in records["comparisons"].values()) == 5


def test_heldout_keys_follow_the_hash_and_keep_both_sides():
  keys = [f"prompt {i}" for i in range(400)]
  held = real_data.held_out_keys(keys, 0.1)
  hashed = real_data._hash  # pylint: disable=protected-access
  assert held == {k for k in keys if hashed(k) < 0.1 * 2 ** 32}
  assert 20 < len(held) < 60
  assert len(real_data.held_out_keys(["a", "b"], 1e-9)) == 1
  assert len(real_data.held_out_keys(["a", "b"], 1 - 1e-9)) == 1


def test_ptx_from_text_and_jsonl(tmp_path):
  docs = real_data.read_ptx(PTX)
  assert len(docs) == 20 and docs[0].startswith("The history of bake bread")
  jsonl = tmp_path / "ptx.jsonl.gz"
  jsonl.write_bytes(gzip.compress(b'{"text": "one", "meta": 1}\n{"text": "two"}\n'))
  assert real_data.read_ptx(str(jsonl)) == ["one", "two"]
  (tmp_path / "one.txt").write_text("just one document\nover two lines\n")
  with pytest.raises(UserError, match="holds 1 document"):
    real_data.read_ptx(str(tmp_path / "one.txt"))


def test_prepared_data_load_and_are_refused_when_the_files_change(tmp_path):
  data = data_config(heldout=HH_TEST)
  out = str(tmp_path / "data")
  tfds_dir = real_data.prepared_tfds_dir(data, out)
  for kind in ("comparisons", "sft", "prompts", "ptx"):
    assert len(builders.load_source(tfds_dir, kind, "validation")) >= 1
  assert len(builders.load_source(tfds_dir, "comparisons", "validation")) == 4
  assert not os.path.exists(out + ".partial")
  assert real_data.prepared_tfds_dir(data, out) == tfds_dir          # reused
  with pytest.raises(UserError, match="config.data.heldout_fraction: the data in"):
    real_data.prepared_tfds_dir(data_config(heldout=HH_TEST, heldout_fraction=0.2), out)
  with pytest.raises(UserError, match="config.data.ptx: the data in .* without a file"):
    real_data.prepared_tfds_dir(data_config(heldout=HH_TEST, ptx=""), out)


def test_prepare_cli_function_matches_the_config_path(tmp_path):
  counts, skipped = prepare.prepare_real("tldr", tmp_path / "cli", TLDR, sft=TLDR_SFT, ptx=PTX)
  records, _ = real_data.make_records(data_config("tldr", sft=TLDR_SFT))
  assert counts == {k: {s: len(r) for s, r in v.items()} for k, v in records.items()}
  assert skipped["no reddit post"] == 1
  assert prepare.prepare_real("tldr", tmp_path / "cli", TLDR, sft=TLDR_SFT, ptx=PTX)[0] is None


def _pipeline_config(name, preset, **data):
  config = config_files.get_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.mark.parametrize("name", ["hh_rlhf", "tldr"])
@pytest.mark.parametrize("preset", ["smollm2", "1.3b", "6.7b", "175b"])
def test_real_data_configs_validate_and_reach_every_stage(name, preset, tmp_path):
  from rlhf_jax import evaluate, pipeline  # pylint: disable=g-import-not-at-top
  config = _pipeline_config(name, preset, input=HH_TRAIN if name == "hh_rlhf" else TLDR, ptx=PTX)
  assert config.data.source == name and not config.collect_comparisons and not config.oracle_run
  stage_io.validate_config(config)
  evaluate.validate(config)
  stages = pipeline.stages_of(config)
  assert stages[0] == "sft" and "collect" not in stages and "ppo_ptx" in stages
  for stage in ("sft", "rm"):
    sub = pipeline.stage_config(config, stage, str(tmp_path))
    assert sub.data.source == name and sub.data.input == config.data.input
    assert sub.data.ptx == PTX
    stage_io.validate_config(sub)


def test_ppo_ptx_without_ptx_text_is_a_one_line_error():
  config = _pipeline_config("hh_rlhf", "smollm2", input=HH_TRAIN, ptx="")
  with pytest.raises(UserError, match=r"config.data.ptx: PPO-ptx .* config.ppo.ptx_coef=0"):
    stage_io.validate_config(config)
  config.ppo.ptx_coef = 0.0
  stage_io.validate_config(config)


def test_reference_free_win_rates_against_brute_force():
  rng = np.random.default_rng(0)
  rm, base = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
  judge, base_judge = rng.integers(0, 3, (5, 3)).astype(float), rng.integers(0, 3, (5, 4))
  row, extra = eval_metrics.reference_free(rm, base, judge, base_judge)

  def brute(a, b):
    per_prompt = [np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in a[p] for y in b[p]])
                  for p in range(len(a))]
    return np.mean(per_prompt), np.std(per_prompt, ddof=1) / np.sqrt(len(a))

  for name, (a, b) in (("rm", (rm, base)), ("judge", (judge, base_judge))):
    rate, se = brute(a, b)
    assert row[f"{name}_win_rate_vs_sft"] == pytest.approx(rate, abs=1e-12)
    assert extra[f"{name}_win_rate_stderr"] == pytest.approx(se, abs=1e-12)
  assert row["judge_score"] == pytest.approx(judge.mean())
  # no baseline scores (the offline task: the gold labeler's win rate instead): nothing added
  assert eval_metrics.reference_free(rm) == ({}, {})


def test_no_gold_table_shows_rm_and_judge_win_rates():
  row = dict.fromkeys(eval_metrics.METRICS)
  row.update(rm_win_rate_vs_sft=0.75, rm_score=1.5, kl_to_sft=2.0, judge_score=0.25,
             judge_win_rate_vs_sft=0.6)
  extra = {"rm_win_rate_interval95": [0.6, 0.9]}
  text = eval_results.no_gold_table([("ppo", row, extra)])
  assert "| ppo | 0.750 [0.600, 0.900] | 0.600 | 1.500 | 0.250 | 2.000 | n/a |" in text
  results = {"meta": {"gold_labeler": False}}
  assert "| ppo | 0.750 | 0.600 |" in eval_results.table(results, [("ppo", row, extra)])


def test_judge_scores_the_rows_the_reward_model_stage_trains_on(tmp_path, offline_data_dir):
  """An external judge reads each (prompt, response) text with its own tokenizer as the row
  `[bos] prompt response [eos]` of the RM stage (a long prompt cut on the left), at the last
  token: its scores equal the RM loss's own forward on the comparison loader's rows."""
  import kill_resume as kr  # pylint: disable=g-import-not-at-top
  from rlhf_jax import eval_judge, sharding  # pylint: disable=g-import-not-at-top
  from rlhf_jax.convert import load_model  # pylint: disable=g-import-not-at-top
  from rlhf_jax.data import load_tokenizer, loaders  # pylint: disable=g-import-not-at-top
  from rlhf_jax.train import rm  # pylint: disable=g-import-not-at-top
  tok_dir = os.path.join(offline_data_dir, "tokenizer")
  path = kr.save_random_model(str(tmp_path / "judge"), tok_dir, head="scalar", num_layers=1)
  judge = eval_judge.Judge(path, sharding.make_mesh({"shape": (1, -1, 1)}), 32, 8)
  pairs = [("Sort the words: fig plum apple", " apple fig plum"), ("What is 2 plus 3?", " 5"),
           ("Reverse the words: " + "kiwi pear " * 12, " pear kiwi"), ("", " fig"),
           ("How many times does fig appear in: fig fig?", "")]
  got = judge.scores(pairs)
  # (both responses the same: the RM stage cuts a long prompt by the longest response of a record)
  records = [{"prompt": p, "responses": [r, r], "ranks": [0, 1]} for p, r in pairs]
  batch = next(iter(loaders.comparison_loader(records, load_tokenizer(tok_dir), batch_size=5,
                                              seq_len=32, k_max=2, shuffle=False,
                                              num_epochs=1)))
  model = load_model(path)
  want = np.asarray(rm.response_rewards(model.cfg, model.params, batch))[:, 0]
  assert got.shape == (5,) and len(set(np.round(got, 6))) == 5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  lm = kr.save_random_model(str(tmp_path / "lm"), tok_dir, num_layers=1)
  with pytest.raises(UserError, match="config.eval.judge: .* 'lm' head; expected a reward model"):
    eval_judge.Judge(lm, sharding.make_mesh({"shape": (1, -1, 1)}), 32, 8)
