"""The offline task: prompts, gold labeler, simulated labeler, and its deterministic files."""
import filecmp
import json
import os

import numpy as np
import pytest

from rlhf_jax.data import builders
from rlhf_jax.data import gold_labeler as gold
from rlhf_jax.data import labelers
from rlhf_jax.data import loaders
from rlhf_jax.data import offline_dataset as dataset
from rlhf_jax.data import offline_task as ot
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

SMALL = dataset.OfflineSizes(ptx=300, sft=400, comparisons=60, prompts=60, validation=40)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("offline")
  return out, dataset.write_offline_task(out, sizes=SMALL, seed=7)


def test_correct_answers_score_one_and_prompts_parse_back():
  config, rng = ot.TaskConfig(), np.random.default_rng(0)
  for _ in range(300):
    family, args, phrasing = ot.sample_instruction(config, rng)
    prompt = ot.make_prompt(family, args, phrasing)
    assert ot.parse_prompt(prompt) == (family, args)
    assert gold.gold_score(prompt, ot.answer_text(family, args)) == 1.0


def test_gold_scores_give_graded_partial_credit():
  sort = ot.make_prompt("sort", {"items": ["pear", "fig", "kiwi", "apple"]})
  assert gold.gold_score(sort, " apple fig kiwi pear") == 1.0
  assert gold.gold_score(sort, " fig apple kiwi pear") == 0.5      # one swap = 2 substitutions
  assert gold.gold_score(sort, " apple fig kiwi") == 0.75          # one word missing
  assert gold.gold_score(sort, " apple fig kiwi pear pear") == 0.8  # one word too many
  assert gold.gold_score(sort, "") == 0.0
  add = ot.make_prompt("add", {"a": 23, "b": 58}, phrasing=1)
  assert add == "Q: Add 23 and 58.\nA:"
  assert gold.gold_score(add, " 81") == 1.0
  assert gold.gold_score(add, " 71") == 0.5
  assert gold.gold_score(add, " 181") == pytest.approx(2 / 3)
  assert gold.gold_score(add, " 81 yes") == 0.5
  assert gold.gold_score(add, " eighty-one") == 0.0
  count = ot.make_prompt("count", {"word": "fig", "items": ["fig", "kiwi", "fig"]})
  assert count == "Q: How many times does fig appear in: fig kiwi fig\nA:"
  assert [gold.gold_score(count, f" {n}") for n in (2, 1, 3, 0, 5)] == [1.0, 0.5, 0.5, 1 / 3, 0.25]
  reverse = ot.make_prompt("reverse", {"items": ["a", "b", "c"]})
  assert gold.gold_score(reverse, " c b a") == 1.0
  assert gold.gold_score(reverse, " a b c") == pytest.approx(1 / 3)
  np.testing.assert_allclose(gold.gold_scores([add, count], [" 81", " 1"]), [1.0, 0.5])
  with pytest.raises(UserError, match="not an offline-task prompt"):
    gold.gold_score("Q: Tell me a joke\nA:", " no")


def test_mistakes_really_are_mistakes():
  config, rng = ot.TaskConfig(), np.random.default_rng(1)
  for _ in range(300):
    family, args, _ = ot.sample_instruction(config, rng)
    prompt = ot.make_prompt(family, args)
    assert gold.gold_score(prompt, ot.candidate_response(family, args, config, rng, 1)) < 1.0


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
      ["Q: What is 1 plus 1?\nA:"] * 2, [[" 2", " 3"], [" 5", " 5"]], gold.gold_score, rng, 0.0)
  assert records == [{"prompt": "Q: What is 1 plus 1?\nA:", "responses": [" 2", " 3"],
                      "ranks": [0, 1]}]  # the all-tied prompt holds no preference
  with pytest.raises(UserError, match="temperature must be >= 0"):
    labelers.simulated_ranks([0, 1], rng, -1.0)


def test_files_are_bit_for_bit_deterministic(task_dir, tmp_path):
  out, paths = task_dir
  dataset.write_offline_task(tmp_path, sizes=SMALL, seed=7)
  names = sorted(os.listdir(out))
  assert names == sorted(os.listdir(tmp_path))
  match, mismatch, errors = filecmp.cmpfiles(out, tmp_path, [n for n in names if n != "tokenizer"],
                                             shallow=False)
  assert not mismatch and not errors
  tok_files = sorted(os.listdir(paths["tokenizer"]))
  _, mismatch, errors = filecmp.cmpfiles(paths["tokenizer"], tmp_path / "tokenizer", tok_files,
                                         shallow=False)
  assert not mismatch and not errors
  dataset.write_offline_task(tmp_path, sizes=SMALL, seed=8)
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
  demos = [gold.analyze(r["prompt"], r["response"]) for r in records["sft"]["train"]]
  config = ot.TaskConfig()
  filler = np.mean([d["filler"] for d in demos])
  assert abs(filler - config.filler_rate) < 0.06                    # 400 draws: 3 sigma ~ 0.065
  listed = [d["hallucinated"] > 0 for d in demos if d["hallucinated"] is not None]
  assert config.hallucination_rate - 0.08 < np.mean(listed) < config.hallucination_rate + 0.15
  clean = [d["content"] < 1.0 for d in demos if not d["hallucinated"]]
  assert 0.05 < np.mean(clean) < 0.25                               # demo_error_rate = 0.15
  assert all(gold.gold_score(r["prompt"], r["response"]) == 1.0
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
  assert tok.vocab_size <= 512
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
    dataset.OfflineSizes(min_k=5, max_k=3).validate()
  with pytest.raises(UserError, match="too small to draw"):
    dataset.make_records(ot.TaskConfig(families=("add",), max_operand=1),  # 8 prompts, none
                         dataset.OfflineSizes(ptx=1, sft=50, comparisons=1, prompts=1,  # held out
                                              validation=30, held_out_fraction=1e-6))
  with pytest.raises(UserError, match="held_out_fraction must be in"):
    dataset.OfflineSizes(held_out_fraction=1.0).validate()


def test_flaws_and_their_analysis():
  sort = ot.make_prompt("sort", {"items": ["pear", "fig", "kiwi"]})
  assert gold.analyze(sort, " fig kiwi pear") == {"family": "sort", "gold": 1.0, "content": 1.0,
                                                "filler": 0, "hallucinated": 0}
  flawed = gold.analyze(sort, " fig kiwi apple pear ok")
  assert flawed["content"] == 0.75                          # one word too many of 4
  assert flawed["gold"] == 0.75 * gold.FLAW_PENALTY ** 2      # a filler and a made-up word
  assert gold.analyze(sort, " fig kiwi pear ok done")["gold"] == gold.FLAW_PENALTY ** 2
  assert flawed["filler"] == 1 and flawed["hallucinated"] == 1
  count = ot.make_prompt("count", {"word": "fig", "items": ["fig", "kiwi", "fig"]})
  assert gold.analyze(count, " 2 lime")["hallucinated"] == 1
  assert gold.analyze(count, " 2 sure")["content"] == 1.0
  add = ot.make_prompt("add", {"a": 3, "b": 4})
  assert gold.analyze(add, " 7 done")["hallucinated"] is None
  assert gold.analyze(add, " 7 done")["gold"] == gold.FLAW_PENALTY
  assert gold.analyze(add, " 7 done")["content"] == 1.0
  config, rng = ot.TaskConfig(), np.random.default_rng(3)
  for _ in range(200):
    family, args, _ = ot.sample_instruction(config, rng)
    if family == "add":
      continue
    words = ot.hallucinate(family, args, ot.answer_words(family, args), config, rng)
    assert gold.hallucinated_words(ot.make_prompt(family, args), " " + " ".join(words)) == 1
  none = ot.TaskConfig(demo_error_rate=0.0, filler_rate=0.0, hallucination_rate=0.0)
  for _ in range(100):
    family, args, _ = ot.sample_instruction(none, rng)
    assert ot.demonstration(family, args, none, rng) == ot.answer_text(family, args)


def test_capability_probe_is_what_pretraining_teaches():
  probes = dataset.probe_records(sizes=dataset.OfflineSizes(probe=50), seed=1)
  assert len(probes) == 50
  for record in probes:
    items = record["prompt"][len("the list "):-len(" has")].split()
    right = f" {len(items)} words."
    assert gold.probe_score(record["prompt"], right) == 1.0
    assert gold.probe_score(record["prompt"], f" {len(items) + 1} words.") == 0.0
    assert gold.probe_score(record["prompt"], "") == 0.0
  rng = np.random.default_rng(0)
  sentences = " ".join(ot.ptx_document(ot.TaskConfig(), rng) for _ in range(200))
  assert "has 3 words." in sentences      # the pretraining text teaches the probe's answer
  with pytest.raises(UserError, match="not a probe prompt"):
    gold.probe_score("Q: Sort the words: fig\nA:", " fig")


def test_task_knobs_come_from_the_config_and_are_checked(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ppo_ptx_config", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ppo_ptx.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  task, sizes = dataset.from_config(config.data.task)
  assert task == ot.TaskConfig() and sizes == dataset.OfflineSizes()
  config.data.task.families = ("sort", "add")
  assert dataset.from_config(config.data.task)[0].families == ("sort", "add")
  assert dataset.from_config({"families": "sort,count"})[0].families == ("sort", "count")
  assert dataset.from_config({"families": ("sort,count",)})[0].families == ("sort", "count")
  for field, value, needle in (("filler_rate", 1.5, "filler_rate must be in"),
                               ("num_words", "8", "num_words must be an integer"),
                               ("families", "sort,divide", "unknown family 'divide'"),
                               ("max_k", 12, "max_k")):
    bad = dict(config.data.task.to_dict(), **{field: value})
    with pytest.raises(UserError, match=needle):
      dataset.from_config(bad)
  with pytest.raises(UserError, match="config.data.task.colour: unknown field"):
    dataset.from_config({"colour": 1})
  small = dataset.OfflineSizes(ptx=20, sft=20, comparisons=10, prompts=10, validation=5, probe=5)
  dataset.write_offline_task(tmp_path, ot.TaskConfig(), small, seed=3)
  assert dataset.read_probe(tmp_path) == [r["prompt"] for r in dataset.probe_records(
      ot.TaskConfig(), small, 3)]
  dataset.check_prepared(tmp_path, ot.TaskConfig(), small, 3)
  with pytest.raises(UserError, match="config.data.task.filler_rate: .* generated with 0.75"):
    dataset.check_prepared(tmp_path, ot.TaskConfig(filler_rate=0.5), small, 3)
  with pytest.raises(UserError, match="config.data.task_seed"):
    dataset.check_prepared(tmp_path, ot.TaskConfig(), small, 4)


def test_both_splits_have_the_same_mix_of_families():
  """The held-out split is a split of the prompt space, so a family with few distinct prompts
  (add: 2 x 11 x 11) is not drained from the training split by the validation draws."""
  sizes = dataset.OfflineSizes(ptx=1, sft=1, comparisons=1, prompts=4000, validation=400)
  records = dataset.make_records(ot.TaskConfig(), sizes, seed=0)["prompts"]
  share = {split: np.mean([ot.parse_prompt(r["prompt"])[0] == "add" for r in records[split]])
           for split in ("train", "validation")}
  assert abs(share["train"] - 0.25) < 0.03 and abs(share["validation"] - 0.25) < 0.07, share
  validation = {r["prompt"] for r in records["validation"]}
  assert all(dataset.held_out(p, 0, sizes.held_out_fraction) for p in validation)
  assert not validation & {r["prompt"] for r in records["train"]}
