"""The offline task: instructions a program can grade, pretraining text, and a gold labeler.

It stands in for human data on a machine with no internet. Every prompt is one line
`Q: <instruction>\\nA:` and the ideal response is `" " + answer`. Four instruction families:

  sort     "Sort the words: pear fig apple"                 -> " apple fig pear"
  reverse  "Reverse the words: pear fig apple"              -> " apple fig pear"
  count    "How many times does fig appear in: fig kiwi fig" -> " 2"
  add      "What is 23 plus 58?"                            -> " 81"

each with two phrasings. The gold labeler `gold_score(prompt, response)` is a pure function in
[0, 1]: the correctness of the answer times a penalty for each flaw,

  gold = correctness x FLAW_PENALTY ** (filler words + hallucinated words),   FLAW_PENALTY = 1/2

where correctness (`content_score`) is the graded partial credit of the response with its filler
words removed:
  sort, reverse  1 - (word-level edit distance to the answer) / max(len(response), len(answer))
  count          1 / (1 + |n - answer|) for the first word n, divided by the number of words
  add            fraction of digits right (aligned from the right, over the longer number), divided
                 by the number of words
A response with no usable first word scores 0. Like InstructGPT's labelers, who rated
hallucination and not following the instruction as the gravest faults, the labeler cares more
about a made-up word or a habit word than about one slip in the answer: each halves the score.

Why RLHF can help here: judging is easier than doing. Human demonstrations are not perfect, and
their flaws are systematic habits more than random slips. The training demonstrations carry three
kinds of flaw (`TaskConfig`), which SFT imitates:

  filler         a habit word appended to the answer (" apple fig ok"), `filler_rate` of them;
  hallucination  a word that is not in the prompt inserted into a sort/reverse/count answer
                 (closed-domain hallucination, the paper's 41% -> 21% metric), `hallucination_rate`;
  mistakes       one plausible slip (a swap, a wrong/missing/doubled word, a digit or count off by a
                 little), `demo_error_rate`.

The gold labeler penalises all three through the same partial credit (an extra word costs as much
as a wrong one). A small reward model trained on ranked SFT samples can learn to see the first two
(is a word a filler? does a word of the answer occur in the prompt? both are one attention
lookup) long before it can sort or add itself; so PPO against it removes them, and the content of
the answers gets more right, not only their style. The evaluation reports both: `content_score`
(the gold score with filler words removed: correctness alone), the number of filler words and
`hallucinated_words` per response.

A capability probe that only the pretraining text teaches (`probe_records`, `probe_score`): the
pretraining sentences "the list fig pear kiwi has 3 words." give rise to prompts "the list fig
pear kiwi has" whose continuation must start with the right count. No demonstration has this form,
so it measures what RLHF costs in capabilities (the paper's "alignment tax") and what the ptx term
restores.

Difficulty knobs (`TaskConfig`): which families, how many distinct words, list lengths, operand
range, and the three flaw rates. Pretraining text uses the same words and numbers (sums,
alphabetical order, list lengths). Everything is generated from a seed with numpy's Generator: the
same seed gives the same files.
"""
import dataclasses
import json
import os
import re
import zlib

import numpy as np

from rlhf_jax.data import labelers
from rlhf_jax.data import schema
from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.errors import UserError

FAMILIES = ("sort", "reverse", "count", "add")

WORDS = ("apple", "pear", "fig", "plum", "kiwi", "lime", "date", "grape", "lemon", "mango",
         "melon", "peach", "berry", "olive", "cherry", "guava", "bean", "corn", "rice", "oat",
         "nut", "pea", "yam", "leek")
FILLERS = ("ok", "sure", "done")   # habit words of the demonstrators; never task words
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
  num_words: int = 8           # distinct words used, the first of WORDS
  min_items: int = 2           # list length range of sort / reverse / count
  max_items: int = 4
  max_operand: int = 10        # add: operands in 0..max_operand
  demo_error_rate: float = 0.15  # fraction of training demonstrations with one mistake
  filler_rate: float = 0.75    # ... ending with a filler word (FILLERS)
  hallucination_rate: float = 0.3  # ... of sort/reverse/count with a word not in the prompt

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
    for field in ("demo_error_rate", "filler_rate", "hallucination_rate"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"offline task: {field} must be in [0, 1] (got {value!r})")
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


FLAW_PENALTY = 0.5   # the gold score's factor per filler or hallucinated word


def _parse(prompt):
  parsed = parse_prompt(prompt)
  if parsed is None:
    raise UserError(f"gold labeler: not an offline-task prompt: {prompt[:60]!r}")
  return parsed


def analyze(prompt, response):
  """The gold labeler's view of one response: {'family', 'gold', 'content' (correctness: the
  partial credit with filler words removed), 'filler' (number of filler words), 'hallucinated'
  (words of a sort/reverse/count answer, fillers and numbers aside, that are not in the prompt's
  list; None for add)}; gold = content x FLAW_PENALTY ** (filler + hallucinated)."""
  family, args = _parse(prompt)
  words = response.split()
  fillers = sum(w in FILLERS for w in words)
  content = score_answer(family, args, " ".join(w for w in words if w not in FILLERS))
  hallucinated = None
  if family != "add":
    allowed = set(args["items"])
    hallucinated = sum(1 for w in words if w not in allowed and w not in FILLERS
                       and not w.isdigit())
  gold = content * FLAW_PENALTY ** (fillers + (hallucinated or 0))
  return {"family": family, "gold": gold, "content": content, "filler": fillers,
          "hallucinated": hallucinated}


def gold_score(prompt, response):
  """Gold score in [0, 1] of `response` to an offline-task `prompt`; deterministic and pure."""
  return analyze(prompt, response)["gold"]


def gold_scores(prompts, responses):
  """Gold scores of paired lists, as float32."""
  return np.asarray([gold_score(p, r) for p, r in zip(prompts, responses)], np.float32)


def content_score(prompt, response):
  """Correctness alone: the partial credit of the response with its filler words removed."""
  return analyze(prompt, response)["content"]


def hallucinated_words(prompt, response):
  """Closed-domain hallucinations: words of a sort/reverse/count answer (filler words and numbers
  aside) that do not occur in the prompt's list; None for the families without a list (add)."""
  return analyze(prompt, response)["hallucinated"]


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


def hallucinate(family, args, words, config, rng):
  """`words` with one task word that is not in the prompt's list inserted at a random place
  (appended after a count); unchanged for add or when every task word is in the list."""
  if family == "add":
    return list(words)
  outside = [w for w in WORDS[:config.num_words] if w not in args["items"]]
  if not outside:
    return list(words)
  word = outside[int(rng.integers(len(outside)))]
  i = len(words) if family == "count" else int(rng.integers(len(words) + 1))
  return list(words[:i]) + [word] + list(words[i:])


def demonstration(family, args, config, rng, flawed=True):
  """A human-like demonstration: the answer with, independently, one mistake (demo_error_rate),
  a hallucinated word (hallucination_rate) and a filler word at the end (filler_rate). With
  `flawed` False (the validation split) it is the correct answer. The rng draws are the same in
  number whatever the rates, so changing one rate does not reshuffle the rest."""
  mistake, hallucination, filler = rng.random(3)
  pick = int(rng.integers(len(FILLERS)))
  words = answer_words(family, args)
  if not flawed:
    return " " + " ".join(words)
  if mistake < config.demo_error_rate:
    words = perturb_words(family, words, config, rng)
  if hallucination < config.hallucination_rate:
    words = hallucinate(family, args, words, config, rng)
  if filler < config.filler_rate:
    words = list(words) + [FILLERS[pick]]
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


PROBE_REGEX = re.compile(r"^the list (?P<items>[a-z]+(?: [a-z]+)*) has$")


def probe_prompt(config, rng):
  """A capability-probe prompt: the start of a pretraining sentence whose next word is a count,
  "the list fig pear kiwi has" (-> " 3 words.")."""
  words = WORDS[:config.num_words]
  n = int(rng.integers(config.min_items, config.max_items + 1))
  return "the list " + " ".join(words[i] for i in rng.integers(len(words), size=n)) + " has"


def probe_score(prompt, response):
  """1.0 when the first word of the continuation is the list's length, else 0.0."""
  match = PROBE_REGEX.match(prompt)
  if match is None:
    raise UserError(f"capability probe: not a probe prompt: {prompt[:60]!r}")
  words = response.split()
  return float(bool(words) and words[0] == str(len(match.group("items").split(" "))))


def ptx_document(config, rng):
  """A short pretraining document: 2 to 6 sentences over the task's words and numbers."""
  return " ".join(_ptx_sentence(config, rng) for _ in range(int(rng.integers(2, 7))))


# ---------------------------------------------------------------- the generated data set


@dataclasses.dataclass(frozen=True)
class OfflineSizes:
  """How many records of each kind to generate, and how the comparisons are made."""
  ptx: int = 4000
  sft: int = 8000              # demonstrations (at 2000, 1000 SFT steps overfit them: 8 epochs)
  comparisons: int = 1000
  prompts: int = 10000         # RL prompts: the collect stage ranks SFT samples of each
  validation: int = 400        # records in each validation split
  held_out_fraction: float = 0.1  # share of the prompt space (by a hash) kept for validation
  probe: int = 200             # capability-probe prompts (probe_validation.jsonl)
  min_k: int = 4               # responses per comparison, drawn in min_k..max_k
  max_k: int = 6
  max_edits: int = 3           # candidate responses carry 0..max_edits mistakes
  labeler_temperature: float = 0.1

  def validate(self):
    """Raises a UserError naming the first bad size."""
    for field in ("ptx", "sft", "comparisons", "prompts", "validation", "probe"):
      if getattr(self, field) < 1:
        raise UserError(f"offline task: {field} size must be >= 1 (got {getattr(self, field)})")
    if not 0 < self.held_out_fraction < 1:
      raise UserError(f"offline task: held_out_fraction must be in (0, 1) "
                      f"(got {self.held_out_fraction})")
    if not schema.MIN_K <= self.min_k <= self.max_k <= schema.MAX_K:
      raise UserError(f"offline task: need {schema.MIN_K} <= min_k <= max_k <= {schema.MAX_K} "
                      f"(got {self.min_k}, {self.max_k})")
    return self


def config_fields():
  """{field: default} of every knob of the task and its sizes: `config.data.task.*`."""
  return {**dataclasses.asdict(TaskConfig()), **dataclasses.asdict(OfflineSizes())}


def from_config(task):
  """(TaskConfig, OfflineSizes) from `config.data.task` (a mapping of `config_fields()`), checked
  field by field: a UserError names `config.data.task.<field>` and what was expected."""
  defaults = config_fields()
  task = dict(task)
  for field in task:
    if field not in defaults:
      raise UserError(f"config.data.task.{field}: unknown field (expected some of "
                      f"{', '.join(defaults)})")
  values = {**defaults, **task}
  for field, default in defaults.items():
    value = values[field]
    if field == "families":
      if isinstance(value, str):
        value = (value,)
      if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config.data.task.families must be a list of family names, got "
                        f"{value!r}")
      # --config.data.task.families=sort,count arrives as ('sort,count',)
      values[field] = tuple(f.strip() for v in value for f in v.split(",") if f.strip())
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"config.data.task.{field} must be a number, got {value!r}")
      values[field] = float(value)
    elif isinstance(value, bool) or not isinstance(value, int):
      raise UserError(f"config.data.task.{field} must be an integer, got {value!r}")
  config = TaskConfig(**{k: values[k] for k in dataclasses.asdict(TaskConfig())})
  sizes = OfflineSizes(**{k: values[k] for k in dataclasses.asdict(OfflineSizes())})
  try:
    config.validate()
    sizes.validate()
  except UserError as e:
    raise UserError(f"config.data.task: {e}".replace("offline task: ", "")) from None
  return config, sizes


_STREAMS = {"sft": 2, "comparisons": 3, "prompts": 4, "ptx": 5, "labeler": 6,
            "probe": 7}


def _rng(seed, stream, split):
  return np.random.default_rng([seed, _STREAMS[stream], 0 if split == "train" else 1])


def held_out(prompt, seed, fraction):
  """Whether `prompt` belongs to the validation side of the prompt space: a hash of (seed, prompt)
  below `fraction`. Splitting the space (not the draws) keeps every family's share the same in
  both splits, however few distinct prompts a family has (add: 2 x 11 x 11)."""
  return zlib.crc32(f"{seed}\x00{prompt}".encode()) < fraction * 2 ** 32


def _draw_prompts(config, rng, count, seed, fraction, validation):
  """`count` instructions from one side of the held-out split (repeats allowed)."""
  drawn = []
  for _ in range(100 * count + 1000):
    family, args, phrasing = sample_instruction(config, rng)
    prompt = make_prompt(family, args, phrasing)
    if held_out(prompt, seed, fraction) == validation:
      drawn.append((prompt, family, args))
      if len(drawn) == count:
        return drawn
  raise UserError(f"offline task: the task config is too small to draw {count} "
                  f"{'validation' if validation else 'training'} prompts (raise num_words, "
                  "max_items or max_operand)")


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

  Validation prompts never occur in any training split (`held_out` splits the prompt space, so
  both splits have the same mix of families). Validation demonstrations are correct;
  training ones carry the flaws of `demonstration`.
  """
  config.validate()
  sizes.validate()
  draw = lambda kind, split, count: _draw_prompts(
      config, _rng(seed, kind, split), count, seed, sizes.held_out_fraction, split != "train")
  kinds = ("sft", "comparisons", "prompts")
  validation = {kind: draw(kind, "validation", sizes.validation) for kind in kinds}
  train = {kind: draw(kind, "train", getattr(sizes, kind)) for kind in kinds}
  records = {schema.PTX: {}, schema.SFT: {}, schema.COMPARISONS: {}, schema.PROMPTS: {}}
  for split, drawn, ptx_count in (("train", train, sizes.ptx),
                                  ("validation", validation, sizes.validation)):
    rng = _rng(seed, "sft", split)
    records[schema.SFT][split] = [
        {"prompt": p, "response": demonstration(f, a, config, rng, flawed=split == "train")}
        for p, f, a in drawn["sft"]]
    records[schema.COMPARISONS][split] = _comparison_records(
        config, sizes, drawn["comparisons"], _rng(seed, "labeler", split))
    records[schema.PROMPTS][split] = [{"prompt": p} for p, _, _ in drawn["prompts"]]
    rng = _rng(seed, "ptx", split)
    records[schema.PTX][split] = [{"text": ptx_document(config, rng)} for _ in range(ptx_count)]
  return records


def probe_records(config=TaskConfig(), sizes=OfflineSizes(), seed=0):
  """The capability probe: [{'prompt': 'the list ... has'}] (`sizes.probe` of them)."""
  rng = _rng(seed, "probe", "validation")
  return [{"prompt": probe_prompt(config, rng)} for _ in range(sizes.probe)]


PROBE_FILE = "probe_validation.jsonl"


def read_probe(data_dir):
  """The probe prompts written next to the task's files, or None when there are none."""
  path = os.path.join(os.fspath(data_dir), PROBE_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["prompt"] for line in f if line.strip()]


def tokenizer_corpus(records):
  """The training texts of every kind, in a fixed order (what the offline tokenizer learns)."""
  texts = [r["text"] for r in records[schema.PTX]["train"]]
  texts += [r["prompt"] + r["response"] for r in records[schema.SFT]["train"]]
  for r in records[schema.COMPARISONS]["train"]:
    texts += [r["prompt"] + response for response in r["responses"]]
  texts += [r["prompt"] for r in records[schema.PROMPTS]["train"]]
  return texts


def check_prepared(out_dir, config, sizes, seed):
  """UserError when the task in `out_dir` was generated with other knobs, sizes or seed than
  asked for (a run must not silently train on another task than its config says)."""
  path = os.path.join(os.fspath(out_dir), "offline_task.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    found = json.load(f)
  wanted = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
            "seed": seed}
  for part in ("config", "sizes"):
    for field, value in wanted[part].items():
      old = found.get(part, {}).get(field)
      if (list(value) if isinstance(value, tuple) else value) != old:
        raise UserError(f"config.data.task.{field}: the offline task in {out_dir} was generated "
                        f"with {old!r}, not {value!r}; use another --workdir (or data.dir)")
  if found.get("seed") != seed:
    raise UserError(f"config.data.task_seed: the offline task in {out_dir} was generated with "
                    f"seed {found.get('seed')!r}, not {seed!r}; use another --workdir")


def write_offline_task(out_dir, config=TaskConfig(), sizes=OfflineSizes(), seed=0,
                       vocab_size=512):
  """Writes the offline task's JSONL files and its tokenizer under `out_dir`.

  Layout: `{kind}_{split}.jsonl` for the four kinds and splits train/validation,
  `probe_validation.jsonl` (the capability probe's prompts), `tokenizer/`
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
  paths["probe"] = os.path.join(out_dir, PROBE_FILE)
  with open(paths["probe"], "w", encoding="utf-8") as f:
    for record in probe_records(config, sizes, seed):
      f.write(json.dumps(record) + "\n")
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
  tokenizer_lib.train_byte_bpe(tokenizer_corpus(records), paths["tokenizer"], vocab_size)
  description = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
                 "seed": seed, "vocab_size": vocab_size}
  with open(os.path.join(out_dir, "offline_task.json"), "w", encoding="utf-8") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return paths
