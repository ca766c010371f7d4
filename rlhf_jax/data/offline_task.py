"""The offline task: instructions a program can grade, pretraining text, and a gold labeler.

It stands in for human data on a machine with no internet. Every prompt is one line
`Q: <instruction>\\nA:` and the ideal response is `" " + answer`. Four instruction families:

  sort     "Sort the words: pear fig apple"                 -> " apple fig pear"
  reverse  "Reverse the words: pear fig apple"              -> " apple fig pear"
  count    "How many times does fig appear in: fig kiwi fig" -> " 2"
  add      "What is 23 plus 58?"                            -> " 81"

each with two phrasings. The gold labeler `gold_score(prompt, response)` is a pure function with
graded partial credit in [0, 1]:
  sort, reverse  1 - (word-level edit distance to the answer) / max(len(response), len(answer))
  count          1 / (1 + |n - answer|) for the first word n, divided by the number of words
  add            fraction of digits right (aligned from the right, over the longer number), divided
                 by the number of words
A response with no usable first word scores 0.

Difficulty knobs (`TaskConfig`): which families, how many distinct words, list lengths, operand
range, and `demo_error_rate`, the fraction of training demonstrations that carry one mistake (as
human demonstrators do) so that SFT alone is imperfect while the gold labeler still knows better.
Pretraining text uses the same words and numbers (sums, alphabetical order, list lengths).
Everything is generated from a seed with numpy's Generator: the same seed gives the same files.
"""
import dataclasses
import json
import os
import re

import numpy as np

from rlhf_jax.data import labelers
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

FAMILIES = ("sort", "reverse", "count", "add")

WORDS = ("apple", "pear", "fig", "plum", "kiwi", "lime", "date", "grape", "lemon", "mango",
         "melon", "peach", "berry", "olive", "cherry", "guava", "bean", "corn", "rice", "oat",
         "nut", "pea", "yam", "leek")
ADJECTIVES = ("red", "green", "small", "big", "ripe", "sweet", "sour", "fresh")

TEMPLATES = {
    "sort": ("Sort the words: {items}", "Put in alphabetical order: {items}"),
    "reverse": ("Reverse the words: {items}", "Write backwards: {items}"),
    "count": ("How many times does {word} appear in: {items}", "Count {word} in: {items}"),
    "add": ("What is {a} plus {b}?", "Add {a} and {b}."),
}
PROMPT_FORMAT = "Q: {instruction}\nA:"

_FIELD_PATTERNS = {"items": r"(?P<items>[a-z]+(?: [a-z]+)*)", "word": r"(?P<word>[a-z]+)",
                   "a": r"(?P<a>\d+)", "b": r"(?P<b>\d+)"}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Knobs of the offline task; the defaults suit the `tiny` model on a CPU in minutes."""
  families: tuple = FAMILIES
  num_words: int = 16          # distinct words used, the first of WORDS
  min_items: int = 2           # list length range of sort / reverse / count
  max_items: int = 6
  max_operand: int = 99        # add: operands in 0..max_operand
  demo_error_rate: float = 0.15  # fraction of training demonstrations with one mistake

  def validate(self):
    """Raises a UserError naming the first bad knob."""
    for family in self.families:
      if family not in FAMILIES:
        raise UserError(f"offline task: unknown family {family!r} (expected some of "
                        f"{', '.join(FAMILIES)})")
    if not self.families:
      raise UserError("offline task: families must not be empty")
    if not 2 <= self.num_words <= len(WORDS):
      raise UserError(f"offline task: num_words must be in 2..{len(WORDS)} (got {self.num_words})")
    if not 1 <= self.min_items <= self.max_items:
      raise UserError(f"offline task: need 1 <= min_items <= max_items (got {self.min_items}, "
                      f"{self.max_items})")
    if self.max_operand < 1:
      raise UserError(f"offline task: max_operand must be >= 1 (got {self.max_operand})")
    if not 0.0 <= self.demo_error_rate <= 1.0:
      raise UserError(f"offline task: demo_error_rate must be in [0, 1] "
                      f"(got {self.demo_error_rate})")
    return self


def _template_regex(template):
  pattern = re.escape(PROMPT_FORMAT.format(instruction=template))
  for field, field_pattern in _FIELD_PATTERNS.items():
    pattern = pattern.replace(re.escape("{" + field + "}"), field_pattern)
  return re.compile("^" + pattern + "$")


_PARSERS = tuple((family, _template_regex(t)) for family, ts in TEMPLATES.items() for t in ts)


# ---------------------------------------------------------------- prompts and answers


def make_prompt(family, args, phrasing=0):
  """The prompt text of one instruction; `args` as returned by `parse_prompt`."""
  fields = {key: " ".join(value) if key == "items" else str(value) for key, value in args.items()}
  return PROMPT_FORMAT.format(instruction=TEMPLATES[family][phrasing].format(**fields))


def parse_prompt(prompt):
  """(family, args) of an offline-task prompt, or None if it is not one.

  args: sort/reverse {'items': [str]}, count {'word': str, 'items': [str]}, add {'a', 'b': int}.
  """
  for family, regex in _PARSERS:
    match = regex.match(prompt)
    if match:
      groups = match.groupdict()
      if family == "add":
        return family, {"a": int(groups["a"]), "b": int(groups["b"])}
      args = {"items": groups["items"].split(" ")}
      if family == "count":
        args = {"word": groups["word"], **args}
      return family, args
  return None


def answer_words(family, args):
  """The correct answer as a list of words."""
  if family == "sort":
    return sorted(args["items"])
  if family == "reverse":
    return list(reversed(args["items"]))
  if family == "count":
    return [str(args["items"].count(args["word"]))]
  return [str(args["a"] + args["b"])]


def answer_text(family, args):
  """The ideal response: a space, then the answer."""
  return " " + " ".join(answer_words(family, args))


def sample_instruction(config, rng):
  """Draws (family, args, phrasing) from the task distribution."""
  family = config.families[rng.integers(len(config.families))]
  phrasing = int(rng.integers(len(TEMPLATES[family])))
  words = WORDS[:config.num_words]
  if family == "add":
    a, b = rng.integers(0, config.max_operand + 1, size=2)
    return family, {"a": int(a), "b": int(b)}, phrasing
  n = int(rng.integers(config.min_items, config.max_items + 1))
  if family == "count":
    pool = [words[i] for i in rng.choice(len(words), size=min(3, len(words)), replace=False)]
    items = [pool[i] for i in rng.integers(len(pool), size=n)]
    word = items[int(rng.integers(n))] if rng.random() < 0.8 else pool[0]
    return family, {"word": word, "items": items}, phrasing
  items = [words[i] for i in rng.integers(len(words), size=n)]
  return family, {"items": items}, phrasing


# ---------------------------------------------------------------- gold labeler


def _edit_distance(a, b):
  """Levenshtein distance between two sequences."""
  previous = list(range(len(b) + 1))
  for i, x in enumerate(a, start=1):
    current = [i]
    for j, y in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
    previous = current
  return previous[-1]


def _digit_credit(target, guess):
  """Fraction of digits right, aligned from the right, over the longer of the two numbers."""
  hits = sum(t == g for t, g in zip(reversed(target), reversed(guess)))
  return hits / max(len(target), len(guess))


def score_answer(family, args, response):
  """Gold score in [0, 1] of `response` to the parsed instruction (see the module docstring)."""
  words = response.split()
  target = answer_words(family, args)
  if not words:
    return 0.0
  if family in ("sort", "reverse"):
    return 1.0 - _edit_distance(words, target) / max(len(words), len(target))
  if not words[0].isdigit():
    return 0.0
  if family == "count":
    credit = 1.0 / (1.0 + abs(int(words[0]) - int(target[0])))
  else:
    credit = _digit_credit(target[0], words[0])
  return credit / len(words)


def gold_score(prompt, response):
  """Gold score in [0, 1] of `response` to an offline-task `prompt`; deterministic and pure."""
  parsed = parse_prompt(prompt)
  if parsed is None:
    raise UserError(f"gold labeler: not an offline-task prompt: {prompt[:60]!r}")
  return score_answer(*parsed, response)


def gold_scores(prompts, responses):
  """Gold scores of paired lists, as float32."""
  return np.asarray([gold_score(p, r) for p, r in zip(prompts, responses)], np.float32)


# ---------------------------------------------------------------- mistakes


def _one_edit(family, words, vocab, rng):
  """`words` with one random mistake of the kind `perturb_words` describes (may be a no-op)."""
  words = list(words)
  if family in ("sort", "reverse"):
    op = int(rng.integers(4))
    i = int(rng.integers(len(words))) if words else 0
    if op == 0 and len(words) >= 2:
      i = int(rng.integers(len(words) - 1))
      words[i], words[i + 1] = words[i + 1], words[i]
    elif op == 1 and words:
      others = [w for w in vocab if w != words[i]]
      words[i] = others[int(rng.integers(len(others)))]
    elif op == 2 and len(words) >= 2:
      del words[i]
    else:
      words.insert(i, words[i] if words else vocab[0])
    return words
  if family == "count":
    delta = int(rng.choice([-2, -1, 1, 2]))
    count = int(words[0]) + delta
    return [str(count if count >= 0 else count - 2 * delta)]
  digits = list(words[0])
  i = int(rng.integers(len(digits)))
  digits[i] = str((int(digits[i]) + int(rng.integers(1, 10))) % 10)
  return [str(int("".join(digits)))]


def perturb_words(family, words, config, rng, num_edits=1):
  """`words` with `num_edits` plausible mistakes (a swap, a wrong, missing or doubled word; a
  digit or a count off by a little). Each edit changes the words it is given."""
  vocab = WORDS[:config.num_words]
  for _ in range(num_edits):
    edited = _one_edit(family, words, vocab, rng)
    while edited == words:  # e.g. a swap of two equal words; an insertion always changes them
      edited = _one_edit(family, words, vocab, rng)
    words = edited
  return list(words)


def candidate_response(family, args, config, rng, num_edits):
  """A response with `num_edits` mistakes (0 = the correct answer)."""
  words = perturb_words(family, answer_words(family, args), config, rng, num_edits)
  return " " + " ".join(words)


# ---------------------------------------------------------------- pretraining text


def _ptx_sentence(config, rng):
  words = WORDS[:config.num_words]
  kind = int(rng.integers(4))
  if kind == 0:
    a, b = rng.integers(0, config.max_operand + 1, size=2)
    return f"{a} plus {b} is {a + b}."
  if kind == 1:
    w1, w2 = sorted(words[i] for i in rng.choice(len(words), size=2, replace=False))
    return f"{w1} comes before {w2}."
  if kind == 2:
    n = int(rng.integers(config.min_items, config.max_items + 1))
    items = " ".join(words[i] for i in rng.integers(len(words), size=n))
    return f"the list {items} has {n} words."
  w1, w2 = (words[i] for i in rng.integers(len(words), size=2))
  return f"the {w1} and the {w2} are {ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]}."


def ptx_document(config, rng):
  """A short pretraining document: 2 to 6 sentences over the task's words and numbers."""
  return " ".join(_ptx_sentence(config, rng) for _ in range(int(rng.integers(2, 7))))


# ---------------------------------------------------------------- the generated data set


@dataclasses.dataclass(frozen=True)
class OfflineSizes:
  """How many records of each kind to generate, and how the comparisons are made."""
  ptx: int = 4000
  sft: int = 2000
  comparisons: int = 1000
  prompts: int = 1000
  validation: int = 200        # records in each validation split
  min_k: int = 4               # responses per comparison, drawn in min_k..max_k
  max_k: int = 6
  max_edits: int = 3           # candidate responses carry 0..max_edits mistakes
  labeler_temperature: float = 0.1

  def validate(self):
    """Raises a UserError naming the first bad size."""
    for field in ("ptx", "sft", "comparisons", "prompts", "validation"):
      if getattr(self, field) < 1:
        raise UserError(f"offline task: {field} size must be >= 1 (got {getattr(self, field)})")
    if not schema.MIN_K <= self.min_k <= self.max_k <= schema.MAX_K:
      raise UserError(f"offline task: need {schema.MIN_K} <= min_k <= max_k <= {schema.MAX_K} "
                      f"(got {self.min_k}, {self.max_k})")
    return self


_STREAMS = {"held_out": 1, "sft": 2, "comparisons": 3, "prompts": 4, "ptx": 5, "labeler": 6}


def _rng(seed, stream, split):
  return np.random.default_rng([seed, _STREAMS[stream], 0 if split == "train" else 1])


def _draw_prompts(config, rng, count, exclude):
  """`count` instructions whose prompts are not in `exclude` (repeats allowed among them)."""
  drawn = []
  for _ in range(100 * count + 1000):
    family, args, phrasing = sample_instruction(config, rng)
    prompt = make_prompt(family, args, phrasing)
    if prompt not in exclude:
      drawn.append((prompt, family, args))
      if len(drawn) == count:
        return drawn
  raise UserError(f"offline task: the task config is too small to draw {count} prompts outside "
                  "the validation set (raise num_words, max_items or max_operand)")


def _comparison_records(config, sizes, instructions, rng):
  records = []
  while len(records) < len(instructions):
    prompt, family, args = instructions[len(records)]
    k = int(rng.integers(sizes.min_k, sizes.max_k + 1))
    candidates = [candidate_response(family, args, config, rng,
                                     int(rng.integers(sizes.max_edits + 1))) for _ in range(k)]
    records.extend(labelers.label_comparisons([prompt], [candidates], gold_score, rng,
                                              sizes.labeler_temperature))
  return records


def make_records(config=TaskConfig(), sizes=OfflineSizes(), seed=0):
  """All records of the offline task: {kind: {split: records}}, splits 'train' and 'validation'.

  Validation prompts never occur in any training split. Validation demonstrations are correct;
  training ones carry a mistake with probability `config.demo_error_rate`.
  """
  config.validate()
  sizes.validate()
  held_out = {}
  for kind in ("sft", "comparisons", "prompts"):
    held_out[kind] = _draw_prompts(config, _rng(seed, kind, "validation"), sizes.validation, ())
  exclude = {prompt for drawn in held_out.values() for prompt, _, _ in drawn}
  train = {kind: _draw_prompts(config, _rng(seed, kind, "train"), getattr(sizes, kind), exclude)
           for kind in ("sft", "comparisons", "prompts")}
  records = {schema.PTX: {}, schema.SFT: {}, schema.COMPARISONS: {}, schema.PROMPTS: {}}
  for split, drawn, ptx_count in (("train", train, sizes.ptx),
                                  ("validation", held_out, sizes.validation)):
    rng = _rng(seed, "sft", split)
    error_rate = config.demo_error_rate if split == "train" else 0.0
    records[schema.SFT][split] = [
        {"prompt": p, "response": candidate_response(f, a, config, rng,
                                                     int(rng.random() < error_rate))}
        for p, f, a in drawn["sft"]]
    records[schema.COMPARISONS][split] = _comparison_records(
        config, sizes, drawn["comparisons"], _rng(seed, "labeler", split))
    records[schema.PROMPTS][split] = [{"prompt": p} for p, _, _ in drawn["prompts"]]
    rng = _rng(seed, "ptx", split)
    records[schema.PTX][split] = [{"text": ptx_document(config, rng)} for _ in range(ptx_count)]
  return records


def tokenizer_corpus(records):
  """The training texts of every kind, in a fixed order (what the offline tokenizer learns)."""
  texts = [r["text"] for r in records[schema.PTX]["train"]]
  texts += [r["prompt"] + r["response"] for r in records[schema.SFT]["train"]]
  for r in records[schema.COMPARISONS]["train"]:
    texts += [r["prompt"] + response for response in r["responses"]]
  texts += [r["prompt"] for r in records[schema.PROMPTS]["train"]]
  return texts


def write_offline_task(out_dir, config=TaskConfig(), sizes=OfflineSizes(), seed=0,
                       vocab_size=512):
  """Writes the offline task's JSONL files and its tokenizer under `out_dir`.

  Layout: `{kind}_{split}.jsonl` for the four kinds and splits train/validation, `tokenizer/`
  (a Hugging Face tokenizer directory, byte-level BPE with <pad>=0, <bos>=1, <eos>=2) and
  `offline_task.json` (the config, sizes and seed). The same arguments give bit-for-bit the same
  files.

  Returns:
    {'tokenizer': path, kind: {split: path}} for the four kinds.
  """
  out_dir = os.fspath(out_dir)
  records = make_records(config, sizes, seed)
  paths = {}
  for kind, splits in records.items():
    paths[kind] = {}
    for split, split_records in splits.items():
      path = os.path.join(out_dir, f"{kind}_{split}.jsonl")
      schema.write_jsonl(path, split_records, kind)
      paths[kind][split] = path
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
  tokenizer_lib.train_byte_bpe(tokenizer_corpus(records), paths["tokenizer"], vocab_size)
  description = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
                 "seed": seed, "vocab_size": vocab_size}
  with open(os.path.join(out_dir, "offline_task.json"), "w", encoding="utf-8") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return paths
