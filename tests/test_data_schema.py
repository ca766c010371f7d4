"""JSONL schema: valid records pass, each kind of bad record fails with a one-line message."""
import json

import pytest

from rlhf_jax.data import schema
from rlhf_jax.errors import UserError


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def _error(path, kind):
  with pytest.raises(UserError) as info:
    schema.read_jsonl(path, kind)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_read_valid_records_of_every_kind(tmp_path):
  records = {
      "ptx": [{"text": "héllo wörld"}],
      "sft": [{"prompt": "Q: hi\nA:", "response": " yo"}, {"prompt": "", "response": ""}],
      "comparisons": [{"prompt": "p", "responses": [" a", " b", " c"], "ranks": [1, 0, 1]}],
      "prompts": [{"prompt": "Q: hi\nA:"}],
  }
  for kind, recs in records.items():
    path = tmp_path / f"{kind}.jsonl"
    schema.write_jsonl(path, recs, kind)
    assert schema.read_jsonl(path, kind) == recs


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
  path = _write_lines(tmp_path / "x.jsonl", ['{"prompt": "a"}', "", '{"prompt": 3}'])
  assert _error(path, "prompts") == f"{path} line 3: field 'prompt' must be a string (got int)"


def test_ranks_must_have_one_entry_per_response(tmp_path):
  good = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 2, 3]}
  bad = dict(good, ranks=[0, 1, 2])
  path = _write_lines(tmp_path / "comparisons.jsonl", [json.dumps(good)] * 16 + [json.dumps(bad)])
  assert _error(path, "comparisons") == (
      f"{path} line 17: field 'ranks' must have one entry per response (got 3, expected 4)")


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "must hold 2 to 9 responses (got 1)"),
    ({"prompt": "p", "responses": ["a"] * 10, "ranks": list(range(10))},
     "must hold 2 to 9 responses (got 10)"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 2]},
     "field 'ranks' entry 1 must be an integer in 0..1"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, True]},
     "field 'ranks' entry 1 must be an integer"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "at least two responses"),
    ({"prompt": "p", "responses": ["a", 7], "ranks": [0, 1]},
     "field 'responses' entry 1 must be a string"),
    ({"prompt": "p", "responses": "ab", "ranks": [0, 1]}, "field 'responses' must be a list"),
    ({"prompt": "p", "responses": ["a", "b"]}, "missing field 'ranks'"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "rank": 1},
     "unknown field 'rank'"),
])
def test_bad_comparisons_are_named(tmp_path, record, expected):
  path = _write_lines(tmp_path / "c.jsonl", [json.dumps(record)])
  message = _error(path, "comparisons")
  assert message.startswith(f"{path} line 1: ")
  assert expected in message


def test_bad_files(tmp_path):
  assert _error(tmp_path / "none.jsonl", "sft") == (
      f"{tmp_path / 'none.jsonl'}: no such file (expected a JSONL file of sft records)")
  path = _write_lines(tmp_path / "x.jsonl", ['{"text": "a"', ])
  assert _error(path, "ptx").startswith(f"{path} line 1: not valid JSON")
  path = _write_lines(tmp_path / "y.jsonl", ['["text"]'])
  assert _error(path, "ptx") == f"{path} line 1: expected a JSON object, got list"
  path = _write_lines(tmp_path / "z.jsonl", ['{"text": ""}'])
  assert _error(path, "ptx") == f"{path} line 1: field 'text' must not be empty"
  path = _write_lines(tmp_path / "e.jsonl", ["", ""])
  assert "holds no records" in _error(path, "ptx")
  path = _write_lines(tmp_path / "m.jsonl", ['{"prompt": "a"}'])
  assert _error(path, "sft") == (
      f"{path} line 1: missing field 'response' (a sft record has fields prompt, response)")
  with pytest.raises(UserError, match="data kind must be one of"):
    schema.read_jsonl(path, "rm")


def test_write_validates_before_writing(tmp_path):
  path = tmp_path / "out.jsonl"
  with pytest.raises(UserError, match="record 1: missing field 'response'"):
    schema.write_jsonl(path, [{"prompt": "a", "response": "b"}, {"prompt": "a"}], "sft")
  assert not path.exists()
