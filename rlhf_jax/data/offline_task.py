"""The offline task: instructions a program can grade, flawed demonstrations, pretraining text.

It stands in for human data on a machine with no internet. Every prompt is one line
`Q: <instruction>\\nA:` and the ideal response is `" " + answer`. Four instruction families:

  sort     "Sort the words: pear fig apple"                 -> " apple fig pear"
  reverse  "Reverse the words: pear fig apple"              -> " apple fig pear"
  count    "How many times does fig appear in: fig kiwi fig" -> " 2"
  add      "What is 23 plus 58?"                            -> " 81"

each with two phrasings. The gold labeler `gold_labeler.gold_score(prompt, response)` is a pure
function in [0, 1]: the correctness of the answer times a penalty for each flaw,

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

A capability probe that only the pretraining text teaches (`probe_prompt`,
`gold_labeler.probe_score`): the pretraining sentences "the list fig pear kiwi has 3 words." give
rise to prompts "the list fig pear kiwi has" whose continuation must start with the right count.
No demonstration has this form, so it measures what RLHF costs in capabilities (the paper's
"alignment tax") and what the ptx term restores.

Difficulty knobs (`TaskConfig`): which families, how many distinct words, list lengths, operand
range, and the three flaw rates. Pretraining text uses the same words and numbers (sums,
alphabetical order, list lengths). Everything is generated from a seed with numpy's Generator: the
same seed gives the same files.

The task lives in three modules, read in this order:
  offline_task     this one: the task's knobs, prompts and answers, demonstrations and their
                   flaws, pretraining documents and probe prompts
  gold_labeler     the gold labeler: `gold_score`, `analyze` (content, filler, hallucinated words),
                   `probe_score`
  offline_dataset  the data set: `OfflineSizes`, the `config.data.task` fields, the held-out split
                   of the prompt space, the seeded records of every kind and split, and the files
                   `write_offline_task` writes
"""
import dataclasses
import re

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


def ptx_document(config, rng):
  """A short pretraining document: 2 to 6 sentences over the task's words and numbers."""
  return " ".join(_ptx_sentence(config, rng) for _ in range(int(rng.integers(2, 7))))


# ---------------------------------------------------------------- capability probe


PROBE_REGEX = re.compile(r"^the list (?P<items>[a-z]+(?: [a-z]+)*) has$")


def probe_prompt(config, rng):
  """A capability-probe prompt: the start of a pretraining sentence whose next word is a count,
  "the list fig pear kiwi has" (-> " 3 words.")."""
  words = WORDS[:config.num_words]
  n = int(rng.integers(config.min_items, config.max_items + 1))
  return "the list " + " ".join(words[i] for i in rng.integers(len(words), size=n)) + " has"
