"""The collect stage: records valid per schema, ranks exactly what the simulated labeler gives on
its fixed per-prompt rng (and sorted by score at labeler temperature 0, all-tie prompts dropped),
a TFDS dataset the reward model's loader reads, skip when finished, one-line user errors.

A random-init tiny policy writes garbage, which the offline task's gold labeler scores 0 almost
always (every prompt would be dropped as all ties), so the runs here rank with a hash of
(prompt, response) as the gold score: distinct responses never tie.
"""
import importlib.util
import json
import os
import zlib

import jax
import numpy as np
import pytest

from rlhf_jax import collect, rollout
from rlhf_jax.convert import save_model
from rlhf_jax.data import builders, labelers, loaders, offline_task, schema
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.errors import UserError
from rlhf_jax.models import get_model_config, init_params
from rlhf_jax.train import rm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def get_config(name, preset="tiny"):
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def hash_score(prompt, response):
  """A stand-in gold score in [0, 1): equal only for equal (prompt, response)."""
  return zlib.crc32(f"{prompt}\x00{response}".encode()) / 2.0 ** 32


def is_add(prompt):
  parsed = offline_task.parse_prompt(prompt)
  return parsed is not None and parsed[0] == "add"


def tie_add_prompts(prompt, response):
  """Every response to an 'add' prompt scores 0.5 (all ties: dropped), the rest by hash."""
  return 0.5 if is_add(prompt) else hash_score(prompt, response)


@pytest.fixture(scope="module")
def data_dir(offline_data_dir):
  return offline_data_dir


def make_workdir(root, data_dir):
  """A workdir holding a random-init tiny policy as its SFT model."""
  os.makedirs(root, exist_ok=True)
  cfg = get_model_config("tiny")
  params = jax.device_get(init_params(cfg, jax.random.key(0)))
  save_model(os.path.join(root, "sft", "model"), cfg, params, fmt="rlhf_jax",
             tokenizer_dir=os.path.join(data_dir, "tokenizer"))
  return root


def collect_config(data_dir, **overrides):
  c = get_config("collect")
  c.data.dir = data_dir
  c.num_train_prompts, c.num_eval_prompts = 24, 16
  c.batch_size, c.max_new_tokens, c.min_k, c.max_k = 8, 8, 2, 4
  for key, value in overrides.items():
    c[key] = value
  return c


def prompts_of(data_dir, split, n):
  source = builders.load_source(os.path.join(data_dir, "tfds"), "prompts", split)
  return [loaders.text_of(source[i]["prompt"]) for i in range(n)]


@pytest.fixture(scope="module")
def collected(tmp_path_factory, data_dir):
  workdir = make_workdir(str(tmp_path_factory.mktemp("run")), data_dir)
  config = collect_config(data_dir)
  out = collect.run(config, workdir, score_fn=hash_score)
  return workdir, config, out


def test_response_ids_cut_at_eos():
  assert rollout.response_ids(np.asarray([5, 6, 2, 0, 0]), 3, eos_id=2) == [5, 6]
  assert rollout.response_ids(np.asarray([5, 6, 7]), 3, eos_id=2) == [5, 6, 7]   # no EOS: all
  assert rollout.response_ids(np.asarray([2, 0, 0]), 1, eos_id=2) == []


def test_records_valid_and_ranked_by_the_labeler(collected, data_dir):
  workdir, config, out = collected
  assert out == os.path.join(workdir, "collect")
  assert not os.path.exists(os.path.join(workdir, ".collect.partial"))
  with open(os.path.join(out, collect.DONE_FILE)) as f:
    stats = json.load(f)
  for code, (split, n) in enumerate((("train", 24), ("validation", 16))):
    records = schema.read_jsonl(os.path.join(out, f"comparisons_{split}.jsonl"),
                                schema.COMPARISONS)
    # Distinct responses never tie under the hash score, so no prompt is dropped.
    assert stats["splits"][split]["dropped_all_ties"] == 0 and len(records) == n
    assert [r["prompt"] for r in records] == prompts_of(data_dir, split, n)
    ks = []
    for i, record in enumerate(records):
      rng = np.random.default_rng([config.seed, code, i])
      k = int(rng.integers(config.min_k, config.max_k + 1))
      assert len(record["responses"]) == k
      scores = [hash_score(record["prompt"], r) for r in record["responses"]]
      expected = labelers.simulated_ranks(scores, rng, config.labeler_temperature)
      assert record["ranks"] == expected.tolist()
      ks.append(k)
    assert len(set(ks)) > 1                  # K really varies in min_k..max_k
    assert stats["splits"][split]["mean_k"] == pytest.approx(np.mean(ks))
  assert stats["min_k"] == 2 and stats["max_k"] == 4


def test_temperature_zero_ranks_by_score_and_drops_all_ties(tmp_path, data_dir):
  workdir = make_workdir(str(tmp_path), data_dir)
  config = collect_config(data_dir, labeler_temperature=0.0, min_k=4, max_k=4)
  out = collect.run(config, workdir, score_fn=tie_add_prompts)
  with open(os.path.join(out, collect.DONE_FILE)) as f:
    stats = json.load(f)["splits"]["train"]
  prompts = prompts_of(data_dir, "train", 24)
  records = schema.read_jsonl(os.path.join(out, "comparisons_train.jsonl"), schema.COMPARISONS)
  assert [r["prompt"] for r in records] == [p for p in prompts if not is_add(p)]
  n_add = sum(map(is_add, prompts))
  assert 0 < n_add < 24
  assert stats["dropped_all_ties"] == n_add
  assert stats["dropped_fraction"] == pytest.approx(n_add / 24)
  total = 0.0
  for record in records:
    scores = [hash_score(record["prompt"], r) for r in record["responses"]]
    dense = [len({t for t in scores if t > s}) for s in scores]   # brute force: 0 = best
    assert record["ranks"] == dense
    total += sum(scores)
  assert stats["mean_gold_score"] == pytest.approx((total + 0.5 * 4 * n_add) / (4 * 24))


def test_tfds_dataset_loads_with_the_reward_model_loader(collected, data_dir):
  workdir, _, out = collected
  rm_config = get_config("rm")
  rm_config.data.comparisons_dir = "auto"
  tfds_dir = rm.comparisons_tfds_dir(rm_config, workdir, "unused")
  assert tfds_dir == os.path.join(out, "tfds")
  records = schema.read_jsonl(os.path.join(out, "comparisons_validation.jsonl"),
                              schema.COMPARISONS)
  k_max = rm.k_max_of(rm_config, tfds_dir)
  assert k_max == max(len(r["responses"]) for r in records)
  tok = load_tokenizer(os.path.join(data_dir, "tokenizer"))
  source = builders.load_source(tfds_dir, "comparisons", "validation")
  batches = list(loaders.comparison_loader(source, tok, batch_size=8, seq_len=48, k_max=k_max,
                                           num_epochs=1, shuffle=False, drop_remainder=False))
  assert sum(int((b["index"] >= 0).sum()) for b in batches) == len(records)
  for batch in batches:
    rm.check_comparisons(batch)
    for row, index in enumerate(batch["index"]):
      if index < 0:
        continue
      ranks = records[index]["ranks"]
      assert batch["ranks"][row, :len(ranks)].tolist() == ranks
      assert batch["response_valid"][row].sum() == len(ranks)
  rm_config.data.comparisons_dir = os.path.join(workdir, "nowhere")
  with pytest.raises(UserError, match="config.data.comparisons_dir"):
    rm.comparisons_tfds_dir(rm_config, workdir, "unused")


def test_skip_when_finished(collected, capsys):
  workdir, config, out = collected
  marker = os.path.join(out, collect.DONE_FILE)
  before = os.stat(marker).st_mtime_ns
  assert collect.run(config, workdir, score_fn=hash_score) == out
  assert "skipping" in capsys.readouterr().out
  assert os.stat(marker).st_mtime_ns == before


@pytest.mark.parametrize("field,value,message", [
    ("data.source", "dir", "collection needs a labeler"),
    ("min_k", 1, "config.min_k"),
    ("max_k", 10, "config.min_k .* config.max_k"),
    ("prompt_len", 250, "config.prompt_len"),
    ("temperature", 0.0, "config.temperature"),
])
def test_bad_config_is_one_line_user_error(tmp_path, data_dir, field, value, message):
  config = collect_config(data_dir)
  node, *rest = field.split(".")
  if rest:
    config[node][rest[0]] = value
  else:
    config[node] = value
  with pytest.raises(UserError, match=message) as e:
    collect.run(config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert not os.path.exists(os.path.join(tmp_path, "collect"))


def test_reward_model_trains_on_the_ids_ppo_scores(collected, data_dir):
  """The comparison rows hold the token ids the policy sampled (not a re-encoding of their text)
  and no EOS after a truncated response, so the reward the RM is trained on at `last_index` is
  the reward PPO reads for the same sample (rollout.last_token_scores on a left-padded rollout)."""
  workdir, _, out = collected
  tok = load_tokenizer(os.path.join(data_dir, "tokenizer"))
  records = schema.read_jsonl(os.path.join(out, "comparisons_validation.jsonl"),
                              schema.COMPARISONS)
  source = builders.load_source(os.path.join(out, "tfds"), "comparisons", "validation")
  k_max, seq_len, prompt_len, n_new = 4, 48, 24, 8
  batch = next(iter(loaders.comparison_loader(source, tok, batch_size=len(records),
                                              seq_len=seq_len, k_max=k_max, num_epochs=1,
                                              shuffle=False, drop_remainder=False)))
  cfg = get_model_config("tiny").replace(dropout_resid=0.0, dropout_attn=0.0)
  params = init_params(cfg, jax.random.key(1), "scalar")
  trained_on = np.asarray(rm.response_rewards(cfg, params, batch))
  reencoded = truncated = 0
  for row, record in enumerate(records):
    prompt_ids = [int(t) for t in tok.encode(record["prompt"])]
    ppo_rows = {"tokens": [], "segment_ids": [], "lengths": []}
    for j, (ids, ended) in enumerate(zip(record["response_ids"], record["ended"])):
      expected = [tok.bos_id] + prompt_ids + ids + ([tok.eos_id] if ended else [])
      n = int(batch["last_index"][row, j]) + 1
      assert batch["tokens"][row, j, :n].tolist() == expected
      reencoded += [int(t) for t in tok.encode(record["responses"][j])] != ids
      truncated += not ended
      prompt = loaders.encoding.prompt_row(prompt_ids, tok.bos_id, tok.pad_id, prompt_len)
      response = ids + ([tok.eos_id] if ended else [])
      padded = np.full(n_new, tok.pad_id, np.int32)
      padded[:len(response)] = response
      ppo_rows["tokens"].append(np.concatenate([prompt["tokens"], padded]))
      ppo_rows["segment_ids"].append(np.concatenate(
          [prompt["segment_ids"], (np.arange(n_new) < len(response)).astype(np.int32)]))
      ppo_rows["lengths"].append(len(response))
    scored = rollout.last_token_scores(cfg, params, np.stack(ppo_rows["tokens"]),
                                       np.stack(ppo_rows["segment_ids"]), prompt_len,
                                       np.asarray(ppo_rows["lengths"]))
    k = len(record["responses"])
    np.testing.assert_allclose(np.asarray(scored), trained_on[row, :k], atol=1e-5)
  # A random policy samples ids the tokenizer would never produce and rarely reaches EOS: both
  # cases are really exercised.
  assert reencoded > 0 and truncated > 0
