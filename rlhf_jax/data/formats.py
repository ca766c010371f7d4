"""Converters from public preference data sets (local copies of their JSONL files) to our schema.

Anthropic HH-RLHF (`{"chosen": transcript, "rejected": transcript}` per line, transcripts of
"\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns): the prompt is everything up to and including
the last "\\n\\nAssistant:", the responses are what follows it. The two transcripts must share that
prompt; pairs that do not, or whose responses are identical, are skipped and counted.

Files are read as distributed: plain or gzip-compressed JSON lines (`schema.json_lines`).

OpenAI summarize-from-feedback comparisons (`{"info": {"id", "post", "title", "subreddit", ...},
"summaries": [{"text", "policy", "note"}, x2], "choice": 0 | 1, "split", "worker"}` per line):
the prompt is "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:" and each summary,
given a leading space when it has none, is a response. Records without a Reddit post (the CNN/DM
articles of that release) are skipped and counted.

Both become K = 2 comparison records `{"prompt", "responses": [preferred, other], "ranks": [0, 1]}`.
`best_demonstrations` and `unique_prompts` derive SFT and PPO-prompt records from comparisons.
"""
import json
import os

from rlhf_jax.data import schema
from rlhf_jax.errors import UserError

HH_ASSISTANT = "\n\nAssistant:"
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _field(where, record, field, kind=str):
  """record[field], checked to exist and be of `kind`."""
  if field not in record:
    raise UserError(f"{where}: missing field '{field}'")
  value = record[field]
  if isinstance(value, bool) or not isinstance(value, kind):
    raise UserError(f"{where}: field '{field}' must be {kind.__name__} "
                    f"(got {type(value).__name__})")
  return value


def split_hh_transcript(transcript, where="transcript"):
  """(prompt, response) of one HH transcript, split after its last "\\n\\nAssistant:"."""
  cut = transcript.rfind(HH_ASSISTANT)
  if cut < 0:
    raise UserError(f"{where}: no '\\n\\nAssistant:' turn in the transcript (expected "
                    "Anthropic HH-RLHF format)")
  cut += len(HH_ASSISTANT)
  return transcript[:cut], transcript[cut:]


def convert_hh_rlhf(path):
  """Comparison records from an HH-RLHF JSONL file; returns (records, {reason: skipped count})."""
  records, skipped = [], {"different prompts": 0, "identical responses": 0}
  for where, record in schema.json_lines(path):
    chosen_prompt, chosen = split_hh_transcript(_field(where, record, "chosen"),
                                                f"{where} field 'chosen'")
    rejected_prompt, rejected = split_hh_transcript(_field(where, record, "rejected"),
                                                    f"{where} field 'rejected'")
    if chosen_prompt != rejected_prompt:
      skipped["different prompts"] += 1
    elif chosen == rejected:
      skipped["identical responses"] += 1
    else:
      records.append({"prompt": chosen_prompt, "responses": [chosen, rejected], "ranks": [0, 1]})
  _check_not_empty(path, records, skipped)
  return records, skipped


def tldr_prompt(info, where="info"):
  """The TL;DR prompt of one summarize-from-feedback `info` object."""
  fields = {name: _field(where, info, name) for name in ("subreddit", "title", "post")}
  return TLDR_PROMPT.format(**fields)


def convert_tldr(path, splits=None):
  """Comparison records from a summarize-from-feedback comparisons JSONL file.

  Args:
    path: local JSONL file of comparisons.
    splits: keep only records whose "split" is one of these (e.g. ("train",)); None keeps all.

  Returns:
    (records, {reason: skipped count}).
  """
  records, skipped = [], {"no reddit post": 0, "other split": 0, "identical summaries": 0}
  for where, record in schema.json_lines(path):
    if splits is not None and record.get("split") not in splits:
      skipped["other split"] += 1
      continue
    info = _field(where, record, "info", dict)
    if "post" not in info:
      skipped["no reddit post"] += 1
      continue
    prompt = tldr_prompt(info, f"{where} field 'info'")
    summaries = _field(where, record, "summaries", list)
    if len(summaries) != 2:
      raise UserError(f"{where}: field 'summaries' must hold 2 summaries (got {len(summaries)})")
    texts = []
    for i, summary in enumerate(summaries):
      if not isinstance(summary, dict):
        raise UserError(f"{where}: field 'summaries' entry {i} must be an object")
      text = _field(f"{where} field 'summaries' entry {i}", summary, "text")
      texts.append(text if text[:1].isspace() else " " + text)
    choice = _field(where, record, "choice", int)
    if choice not in (0, 1):
      raise UserError(f"{where}: field 'choice' must be 0 or 1 (got {choice})")
    if texts[0] == texts[1]:
      skipped["identical summaries"] += 1
      continue
    records.append({"prompt": prompt, "responses": [texts[choice], texts[1 - choice]],
                    "ranks": [0, 1]})
  _check_not_empty(path, records, skipped)
  return records, skipped


def convert_demonstrations(path):
  """SFT records from a demonstrations file: the TL;DR SFT split of summarize-from-feedback
  (`{"id", "subreddit", "title", "post", "summary"}` per line; the prompt as in `tldr_prompt`,
  the summary given a leading space) or our own sft JSONL (`{"prompt", "response"}`), told apart
  per record by its fields. Returns (records, {reason: skipped count})."""
  records, skipped = [], {"empty response": 0}
  for where, record in schema.json_lines(path, "demonstrations"):
    if "summary" in record:
      prompt = tldr_prompt(record, where)
      response = _field(where, record, "summary")
      response = response if response[:1].isspace() else " " + response
    elif "prompt" in record:
      prompt, response = _field(where, record, "prompt"), _field(where, record, "response")
    else:
      raise UserError(f"{where}: expected a TL;DR SFT record (fields subreddit, title, post, "
                      "summary) or an sft record (fields prompt, response)")
    if not response.strip():
      skipped["empty response"] += 1
      continue
    records.append({"prompt": prompt, "response": response})
  _check_not_empty(path, records, skipped, "demonstrations")
  return records, skipped


def _check_not_empty(path, records, skipped, what="comparisons"):
  if not records and not any(skipped.values()):
    raise UserError(f"{os.fspath(path)}: holds no records (expected JSON lines of {what}, "
                    "plain or gzip)")
  if not records:
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
    raise UserError(f"{os.fspath(path)}: no usable {what} (skipped: {reasons or 'none'})")


def best_demonstrations(comparisons):
  """SFT records from comparisons: the prompt and its single best response (ties skipped)."""
  demonstrations = []
  for record in comparisons:
    ranks = record["ranks"]
    best = min(ranks)
    if ranks.count(best) == 1:
      demonstrations.append({"prompt": record["prompt"],
                             "response": record["responses"][ranks.index(best)]})
  return demonstrations


def unique_prompts(records):
  """Prompt records of the distinct prompts of `records`, in order of first appearance."""
  seen = dict.fromkeys(record["prompt"] for record in records)
  return [{"prompt": prompt} for prompt in seen]


CONVERTERS = {"hh_rlhf": convert_hh_rlhf, "tldr": convert_tldr}


def convert_file(source_format, src, out_dir, prefix):
  """Converts a public-format file to `{prefix}_comparisons.jsonl`, `{prefix}_sft.jsonl` (best
  responses) and `{prefix}_prompts.jsonl` in `out_dir`; returns ({kind: path}, skipped counts)."""
  if source_format not in CONVERTERS:
    raise UserError(f"unknown source format {source_format!r} (expected one of "
                    f"{', '.join(CONVERTERS)})")
  comparisons, skipped = CONVERTERS[source_format](src)
  outputs = {schema.COMPARISONS: comparisons, schema.SFT: best_demonstrations(comparisons),
             schema.PROMPTS: unique_prompts(comparisons)}
  paths = {}
  for kind, records in outputs.items():
    paths[kind] = os.path.join(os.fspath(out_dir), f"{prefix}_{kind}.jsonl")
    schema.write_jsonl(paths[kind], records, kind)
  return paths, skipped
