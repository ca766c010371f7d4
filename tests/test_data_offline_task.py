"""The offline task: prompts, gold labeler, simulated labeler, and its deterministic files."""
import filecmp
import json
import os

import numpy as np
import pytest

from rlhf_jax.data import builders
from rlhf_jax.data import labelers
from rlhf_jax.data import loaders
from rlhf_jax.data import offline_task as ot
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

SMALL = ot.OfflineSizes(ptx=300, sft=400, comparisons=60, prompts=60, validation=40)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("offline")
  return out, ot.write_offline_task(out, sizes=SMALL, seed=7)


def test_correct_answers_score_one_and_prompts_parse_back():
  config, rng = ot.TaskConfig(), np.random.default_rng(0)
  for _ in range(300):
    family, args, phrasing = ot.sample_instruction(config, rng)
    prompt = ot.make_prompt(family, args, phrasing)
    assert ot.parse_prompt(prompt) == (family, args)
    assert ot.gold_score(prompt, ot.answer_text(family, args)) == 1.0


def test_gold_scores_give_graded_partial_credit():
  sort = ot.make_prompt("sort", {"items": ["pear", "fig", "kiwi", "apple"]})
  assert ot.gold_score(sort, " apple fig kiwi pear") == 1.0
  assert ot.gold_score(sort, " fig apple kiwi pear") == 0.5      # one swap = 2 substitutions
  assert ot.gold_score(sort, " apple fig kiwi") == 0.75          # one word missing
  assert ot.gold_score(sort, " apple fig kiwi pear pear") == 0.8  # one word too many
  assert ot.gold_score(sort, "") == 0.0
  add = ot.make_prompt("add", {"a": 23, "b": 58}, phrasing=1)
  assert add == "Q: Add 23 and 58.\nA:"
  assert ot.gold_score(add, " 81") == 1.0
  assert ot.gold_score(add, " 71") == 0.5
  assert ot.gold_score(add, " 181") == pytest.approx(2 / 3)
  assert ot.gold_score(add, " 81 yes") == 0.5
  assert ot.gold_score(add, " eighty-one") == 0.0
  count = ot.make_prompt("count", {"word": "fig", "items": ["fig", "kiwi", "fig"]})
  assert count == "Q: How many times does fig appear in: fig kiwi fig\nA:"
  assert [ot.gold_score(count, f" {n}") for n in (2, 1, 3, 0, 5)] == [1.0, 0.5, 0.5, 1 / 3, 0.25]
  reverse = ot.make_prompt("reverse", {"items": ["a", "b", "c"]})
  assert ot.gold_score(reverse, " c b a") == 1.0
  assert ot.gold_score(reverse, " a b c") == pytest.approx(1 / 3)
  np.testing.assert_allclose(ot.gold_scores([add, count], [" 81", " 1"]), [1.0, 0.5])
  with pytest.raises(UserError, match="not an offline-task prompt"):
    ot.gold_score("Q: Tell me a joke\nA:", " no")


def test_mistakes_really_are_mistakes():
  config, rng = ot.TaskConfig(), np.random.default_rng(1)
  for _ in range(300):
    family, args, _ = ot.sample_instruction(config, rng)
    prompt = ot.make_prompt(family, args)
    assert ot.gold_score(prompt, ot.candidate_response(family, args, config, rng, 1)) < 1.0


def test_simulated_labeler_is_bradley_terry_with_ties():
  rng = np.random.default_rng(0)
  assert labelers.simulated_ranks([0.2, 0.9, 0.2, 0.5], rng, 0.0).tolist() == [2, 0, 2, 1]
  wins = np.mean([labelers.simulated_ranks([0.6, 0.4], rng, 0.1)[0] == 0 for _ in range(4000)])
  assert abs(wins - 1 / (1 + np.exp(-2.0))) < 0.02
  for _ in range(50):
    ranks = labelers.simulated_ranks([0.3, 0.7, 0.3], rng, 0.5)
    assert ranks[0] == ranks[2] and sorted(set(ranks.tolist())) == [0, 1]
  a = labelers.simulated_ranks(np.linspace(0, 1, 9), np.random.default_rng(5), 0.2)
  b = labelers.simulated_ranks(np.linspace(0, 1, 9), np.random.default_rng(5), 0.2)
  assert a.tolist() == b.tolist()
  records = labelers.label_comparisons(
      ["Q: What is 1 plus 1?\nA:"] * 2, [[" 2", " 3"], [" 5", " 5"]], ot.gold_score, rng, 0.0)
  assert records == [{"prompt": "Q: What is 1 plus 1?\nA:", "responses": [" 2", " 3"],
                      "ranks": [0, 1]}]  # the all-tied prompt holds no preference
  with pytest.raises(UserError, match="temperature must be >= 0"):
    labelers.simulated_ranks([0, 1], rng, -1.0)


def test_files_are_bit_for_bit_deterministic(task_dir, tmp_path):
  out, paths = task_dir
  ot.write_offline_task(tmp_path, sizes=SMALL, seed=7)
  names = sorted(os.listdir(out))
  assert names == sorted(os.listdir(tmp_path))
  match, mismatch, errors = filecmp.cmpfiles(out, tmp_path, [n for n in names if n != "tokenizer"],
                                             shallow=False)
  assert not mismatch and not errors
  tok_files = sorted(os.listdir(paths["tokenizer"]))
  _, mismatch, errors = filecmp.cmpfiles(paths["tokenizer"], tmp_path / "tokenizer", tok_files,
                                         shallow=False)
  assert not mismatch and not errors
  ot.write_offline_task(tmp_path, sizes=SMALL, seed=8)
  assert not filecmp.cmp(out / "sft_train.jsonl", tmp_path / "sft_train.jsonl", shallow=False)


def test_files_follow_the_schema_and_hold_out_validation_prompts(task_dir):
  _, paths = task_dir
  records = {kind: {split: schema.read_jsonl(p, kind) for split, p in paths[kind].items()}
             for kind in schema.KINDS}
  assert len(records["sft"]["train"]) == 400 and len(records["ptx"]["validation"]) == 40
  train_prompts = {r["prompt"] for kind in ("sft", "comparisons", "prompts")
                   for r in records[kind]["train"]}
  for kind in ("sft", "comparisons", "prompts"):
    assert not train_prompts & {r["prompt"] for r in records[kind]["validation"]}
  demo_scores = [ot.gold_score(r["prompt"], r["response"]) for r in records["sft"]["train"]]
  assert 0.07 < np.mean(np.array(demo_scores) < 1.0) < 0.25  # demo_error_rate = 0.15
  assert all(ot.gold_score(r["prompt"], r["response"]) == 1.0
             for r in records["sft"]["validation"])
  for record in records["comparisons"]["train"]:
    assert SMALL.min_k <= len(record["responses"]) <= SMALL.max_k
  families = {ot.parse_prompt(r["prompt"])[0] for r in records["prompts"]["train"]}
  assert families == set(ot.FAMILIES)
  description = json.loads(open(paths["tokenizer"] + "/../offline_task.json").read())
  assert description["seed"] == 7 and description["sizes"]["sft"] == 400


def test_tokenizer_fits_the_tiny_model_and_round_trips(task_dir, tmp_path):
  _, paths = task_dir
  tok = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  tokenizer_lib.check_vocab_size(tok, 512)
  for record in schema.read_jsonl(paths["sft"]["validation"], "sft"):
    text = record["prompt"] + record["response"]
    assert tok.decode(tok.encode(text)) == text
  builders.build_datasets({kind: paths[kind] for kind in schema.KINDS}, tmp_path / "tfds")
  source = builders.load_source(tmp_path / "tfds", "comparisons", "validation")
  batch = next(iter(loaders.comparison_loader(source, tok, batch_size=4, seq_len=32,
                                              k_max=SMALL.max_k)))
  assert batch["tokens"].max() < 512 and batch["response_valid"].sum() >= 4 * SMALL.min_k


def test_bad_knobs_are_named():
  with pytest.raises(UserError, match="unknown family 'divide'"):
    ot.TaskConfig(families=("sort", "divide")).validate()
  with pytest.raises(UserError, match="num_words must be in 2..24"):
    ot.TaskConfig(num_words=99).validate()
  with pytest.raises(UserError, match="min_k <= max_k"):
    ot.OfflineSizes(min_k=5, max_k=3).validate()
  with pytest.raises(UserError, match="too small to draw"):
    ot.make_records(ot.TaskConfig(families=("add",), max_operand=1),
                    ot.OfflineSizes(ptx=1, sft=50, comparisons=1, prompts=1, validation=30))
