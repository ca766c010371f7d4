"""Converters from Anthropic HH-RLHF and OpenAI summarize-from-feedback (TL;DR) files."""
import json

import pytest

from rlhf_jax.data import builders
from rlhf_jax.data import formats
from rlhf_jax.data import loaders
from rlhf_jax.data import prepare
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

HH_PROMPT = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Tom?"
             "\n\nHuman: Something shorter?\n\nAssistant:")


def write_hh_fixture(path):
  """A small file in the exact HH-RLHF format (multi-turn, plus one anomaly of each kind)."""
  lines = [
      {"chosen": HH_PROMPT + " How about Max?", "rejected": HH_PROMPT + " I don't know."},
      {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
       "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
      {"chosen": "\n\nHuman: Tell me a fact.\n\nAssistant: Água ferve a 100 °C.",
       "rejected": "\n\nHuman: Tell me a fact.\n\nAssistant:"},
      {"chosen": "\n\nHuman: A\n\nAssistant: same", "rejected": "\n\nHuman: A\n\nAssistant: same"},
      {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
  ]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
  return path


def _tldr_line(subreddit, title, post, texts, choice, split="train"):
  return {"info": {"id": "t3_abc", "post": post, "title": title, "subreddit": subreddit},
          "summaries": [{"text": t, "policy": "sup2", "note": None} for t in texts],
          "choice": choice, "split": split, "worker": "w1", "batch": "batch3"}


def write_tldr_fixture(path):
  """A small file in the exact summarize-from-feedback comparisons format."""
  lines = [
      _tldr_line("relationships", "My [24F] boyfriend forgets dates",
                 "We have been together 2 years.\nHe forgot my birthday.",
                 [" Boyfriend forgot birthday, how to talk to him?", " I am sad."], 0),
      _tldr_line("AskReddit", "Best pizza?", "Looking for pizza ideas.",
                 ["Pineapple is fine", " Just get pepperoni."], 1, split="valid1"),
      {"info": {"id": "cnn1", "article": "Some news.", "title": "News"},
       "summaries": [{"text": " a", "policy": "p", "note": None},
                     {"text": " b", "policy": "p", "note": None}],
       "choice": 0, "split": "train", "worker": "w2"},
  ]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
  return path


def test_hh_prompt_is_everything_up_to_the_last_assistant_turn(tmp_path):
  records, skipped = formats.convert_hh_rlhf(write_hh_fixture(tmp_path / "hh.jsonl"))
  assert skipped == {"different prompts": 1, "identical responses": 1}
  assert len(records) == 3
  assert records[0] == {"prompt": HH_PROMPT, "responses": [" How about Max?", " I don't know."],
                        "ranks": [0, 1]}
  assert records[2]["responses"] == [" Água ferve a 100 °C.", ""]
  for record in records:
    schema.validate_record(record, "comparisons", "converted")


def test_tldr_prompt_format_and_choice(tmp_path):
  path = write_tldr_fixture(tmp_path / "tldr.jsonl")
  records, skipped = formats.convert_tldr(path)
  assert skipped == {"no reddit post": 1, "other split": 0, "identical summaries": 0}
  assert records[0]["prompt"] == (
      "SUBREDDIT: r/relationships\nTITLE: My [24F] boyfriend forgets dates\n"
      "POST: We have been together 2 years.\nHe forgot my birthday.\nTL;DR:")
  assert records[0]["responses"] == [" Boyfriend forgot birthday, how to talk to him?",
                                     " I am sad."]
  assert records[1]["responses"] == [" Just get pepperoni.", " Pineapple is fine"]
  assert all(r["ranks"] == [0, 1] for r in records)
  only_train, skipped = formats.convert_tldr(path, splits=("train",))
  assert len(only_train) == 1 and skipped["other split"] == 1


def test_convert_file_writes_all_three_kinds(tmp_path):
  paths, _ = formats.convert_file("hh_rlhf", write_hh_fixture(tmp_path / "hh.jsonl"),
                                  tmp_path / "out", "hh")
  assert len(schema.read_jsonl(paths["comparisons"], "comparisons")) == 3
  sft = schema.read_jsonl(paths["sft"], "sft")
  assert sft[1] == {"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": " Hello! How can I help?"}
  assert len(schema.read_jsonl(paths["prompts"], "prompts")) == 3


def test_bad_public_files_are_named(tmp_path):
  path = tmp_path / "hh.jsonl"
  path.write_text(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "x"}) + "\n")
  with pytest.raises(UserError, match=r"line 1 field 'chosen': no '\\n\\nAssistant:' turn"):
    formats.convert_hh_rlhf(path)
  path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a"}) + "\n")
  with pytest.raises(UserError, match="line 1: missing field 'rejected'"):
    formats.convert_hh_rlhf(path)
  line = _tldr_line("a", "b", "c", [" x", " y"], 2)
  path.write_text(json.dumps(line) + "\n")
  with pytest.raises(UserError, match="line 1: field 'choice' must be 0 or 1"):
    formats.convert_tldr(path)
  with pytest.raises(UserError, match="no such file"):
    formats.convert_tldr(tmp_path / "missing.jsonl")
  with pytest.raises(UserError, match="unknown source format"):
    formats.convert_file("shp", path, tmp_path, "x")


def test_prepare_public_builds_three_kinds(tmp_path):
  paths, skipped = prepare.prepare_public("tldr", write_tldr_fixture(tmp_path / "in.jsonl"),
                                          tmp_path / "out")
  assert skipped["no reddit post"] == 1
  assert len(builders.load_source(paths["tfds"], "comparisons", "train")) == 2
  assert len(builders.load_source(paths["tfds"], "sft", "train")) == 2
  assert len(builders.load_source(paths["tfds"], "prompts", "train")) == 2


@pytest.mark.parametrize("fixture, convert", [(write_hh_fixture, formats.convert_hh_rlhf),
                                              (write_tldr_fixture, formats.convert_tldr)])
def test_public_formats_round_trip(tmp_path, fixture, convert):
  records, _ = convert(fixture(tmp_path / "public.jsonl"))
  path = tmp_path / "comparisons.jsonl"
  schema.write_jsonl(path, records, "comparisons")
  builders.build_dataset("comparisons", {"train": path}, tmp_path / "tfds")
  source = builders.load_source(tmp_path / "tfds", "comparisons", "train")
  tokenizer = tokenizer_lib.train_byte_bpe([r["prompt"] for r in records], tmp_path / "tok", 300)
  loader = loaders.comparison_loader(source, tokenizer, batch_size=1, seq_len=256, k_max=2,
                                     num_epochs=1)
  decoded = {}
  for batch in loader:
    responses = []
    for tokens, mask, n in zip(batch["tokens"][0], batch["response_mask"][0] > 0,
                               batch["lengths"][0]):
      assert tokens[0] == tokenizer.bos_id and tokens[n - 1] == tokenizer.eos_id
      prompt = tokenizer.decode(tokens[1:n][~mask[1:n]])
      responses.append(tokenizer.decode(tokens[:n - 1][mask[:n - 1]]))
    decoded[int(batch["index"][0])] = {"prompt": prompt, "responses": responses,
                                       "ranks": batch["ranks"][0].tolist()}
  assert decoded == dict(enumerate(records))
