"""The JSONL schema of the four kinds of RLHF data, and a strict reader and writer for it.

Every file holds one JSON object per line (blank lines are skipped). The fields of each kind are
exactly these (an unknown or missing field is an error, so a typo never passes silently):

  ptx          {"text": str}                      pretraining text, non-empty
  sft          {"prompt": str, "response": str}   a demonstration (the model sees prompt + response)
  comparisons  {"prompt": str, "responses": [str, ...], "ranks": [int, ...]}
                                                  K = 2..9 responses to one prompt; ranks[i] is the
                                                  rank of responses[i], 0 = best, equal ranks are
                                                  ties, every rank lies in 0..K-1 and at least two
                                                  ranks differ
  prompts      {"prompt": str}                    a prompt for PPO rollouts or evaluation

Comparisons sampled from a policy (the collect stage) may also carry, both or neither:
  "response_ids": [[int, ...], ...]   the token ids the policy sampled for each response (without
                                      EOS), which the reward model then trains on: the ids it will
                                      score in PPO, not a re-encoding of the decoded text
  "ended": [bool, ...]                whether each response ended with EOS (a truncated one is
                                      trained on without EOS, as PPO scores it)

Text is joined without any separator: the document is exactly `prompt + response`, so a prompt
carries its own trailing marker ("\\n\\nAssistant:", "TL;DR:", "A:") and a response its own leading
space. Responses may be empty (a policy that stopped at once); prompts may be empty.
"""
import gzip
import json
import os
import zlib

from rlhf_jax.errors import UserError

PTX = "ptx"
SFT = "sft"
COMPARISONS = "comparisons"
PROMPTS = "prompts"
KINDS = (PTX, SFT, COMPARISONS, PROMPTS)

MIN_K = 2
MAX_K = 9

FIELDS = {
    PTX: ("text",),
    SFT: ("prompt", "response"),
    COMPARISONS: ("prompt", "responses", "ranks"),
    PROMPTS: ("prompt",),
}
OPTIONAL = {COMPARISONS: ("response_ids", "ended")}


def check_kind(kind):
  """Raises a UserError unless `kind` is one of KINDS."""
  if kind not in KINDS:
    raise UserError(f"data kind must be one of {', '.join(KINDS)} (got {kind!r})")


def _type_name(value):
  return type(value).__name__


def _check_string(where, record, field):
  value = record[field]
  if not isinstance(value, str):
    raise UserError(f"{where}: field '{field}' must be a string (got {_type_name(value)})")


def _check_comparison(where, record):
  """Validates the responses and ranks of one comparison record."""
  responses, ranks = record["responses"], record["ranks"]
  if not isinstance(responses, list):
    raise UserError(f"{where}: field 'responses' must be a list of strings "
                    f"(got {_type_name(responses)})")
  if not MIN_K <= len(responses) <= MAX_K:
    raise UserError(f"{where}: field 'responses' must hold {MIN_K} to {MAX_K} responses "
                    f"(got {len(responses)})")
  for i, response in enumerate(responses):
    if not isinstance(response, str):
      raise UserError(f"{where}: field 'responses' entry {i} must be a string "
                      f"(got {_type_name(response)})")
  if not isinstance(ranks, list):
    raise UserError(f"{where}: field 'ranks' must be a list of integers (got {_type_name(ranks)})")
  if len(ranks) != len(responses):
    raise UserError(f"{where}: field 'ranks' must have one entry per response "
                    f"(got {len(ranks)}, expected {len(responses)})")
  k = len(responses)
  for i, rank in enumerate(ranks):
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < k:
      raise UserError(f"{where}: field 'ranks' entry {i} must be an integer in 0..{k - 1} "
                      f"(0 = best; got {rank!r})")
  if len(set(ranks)) < 2:
    raise UserError(f"{where}: field 'ranks' must rank at least two responses differently "
                    f"(got all ties {ranks})")
  if ("response_ids" in record) != ("ended" in record):
    raise UserError(f"{where}: fields 'response_ids' and 'ended' go together (both or neither)")
  if "response_ids" in record:
    ids, ended = record["response_ids"], record["ended"]
    if (not isinstance(ids, list) or len(ids) != k or not all(
        isinstance(r, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                    for t in r) for r in ids)):
      raise UserError(f"{where}: field 'response_ids' must be one list of token ids (integers "
                      f">= 0) per response ({k})")
    if not isinstance(ended, list) or len(ended) != k or not all(
        isinstance(e, bool) for e in ended):
      raise UserError(f"{where}: field 'ended' must be one boolean per response ({k})")


def validate_record(record, kind, where):
  """Checks one decoded record against the schema of `kind`; returns it unchanged.

  Args:
    record: the decoded JSON value.
    kind: one of KINDS.
    where: how to name the record in an error, e.g. "data/x.jsonl line 3".
  """
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object, got {_type_name(record)}")
  expected = FIELDS[kind]
  for field in expected:
    if field not in record:
      raise UserError(f"{where}: missing field '{field}' (a {kind} record has fields "
                      f"{', '.join(expected)})")
  for field in record:
    if field not in expected + OPTIONAL.get(kind, ()):
      raise UserError(f"{where}: unknown field '{field}' (a {kind} record has fields "
                      f"{', '.join(expected + OPTIONAL.get(kind, ()))})")
  for field in expected:
    if field not in ("responses", "ranks"):
      _check_string(where, record, field)
  if kind == PTX and not record["text"]:
    raise UserError(f"{where}: field 'text' must not be empty")
  if kind == COMPARISONS:
    _check_comparison(where, record)
  return record


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path):
  """Whether the file at `path` starts with the gzip magic bytes (whatever its name)."""
  with open(path, "rb") as f:
    return f.read(2) == GZIP_MAGIC


def text_lines(path, expected="JSONL records", what="file"):
  """Yields (line number, line) of a local text file, gzip-compressed or not (told by its first
  two bytes, not its name); a file that is missing, not UTF-8 or damaged gzip (corrupt,
  truncated) is a one-line UserError naming it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file (expected a {what} of {expected})")
  gz = is_gzip(path)
  line_number = 0
  try:
    with (gzip.open(path, "rt", encoding="utf-8") if gz else
          open(path, encoding="utf-8")) as f:
      for line_number, line in enumerate(f, start=1):
        yield line_number, line
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    reason = "truncated" if isinstance(e, EOFError) else f"corrupt: {e}"
    raise UserError(f"{path}: damaged gzip file after line {line_number} ({reason}); expected "
                    f"a complete .gz of {expected}") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
  except UnicodeDecodeError as e:
    raise UserError(f"{path} line {line_number + 1}: not UTF-8 text ({e.reason}); expected "
                    f"{expected}" + (" (gzip-compressed or plain)" if gz else "")) from None


def json_lines(path, expected="JSONL records"):
  """Yields (where, object) for each non-blank line of a local JSONL file (plain or gzip);
  `where` = 'path line N'."""
  path = os.fspath(path)
  for line_number, line in text_lines(path, expected, "JSONL file"):
    if not line.strip():
      continue
    where = f"{path} line {line_number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    yield where, record


def read_jsonl(path, kind):
  """Reads and validates a whole JSONL file of `kind`; returns the list of records.

  Raises a UserError naming the file and line of the first bad record, before anything is
  built from the file.
  """
  check_kind(kind)
  records = [validate_record(record, kind, where)
             for where, record in json_lines(path, f"{kind} records")]
  if not records:
    raise UserError(f"{os.fspath(path)}: holds no records (expected one JSON object per line)")
  return records


def write_jsonl(path, records, kind):
  """Validates `records` and writes them as JSONL, atomically (a temp file, then a rename)."""
  check_kind(kind)
  path = os.fspath(path)
  for i, record in enumerate(records):
    validate_record(record, kind, f"{path} record {i}")
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = path + ".tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(tmp_path, path)
