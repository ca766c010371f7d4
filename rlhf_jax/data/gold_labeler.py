"""The offline task's gold labeler: partial credit, halved per flaw; and the probe's score."""
import numpy as np

from rlhf_jax.data import offline_task
from rlhf_jax.errors import UserError


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
  """Gold score in [0, 1] of `response` to the parsed instruction (see `offline_task`)."""
  words = response.split()
  target = offline_task.answer_words(family, args)
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
  parsed = offline_task.parse_prompt(prompt)
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
  fillers = sum(w in offline_task.FILLERS for w in words)
  content = score_answer(family, args, " ".join(w for w in words if w not in offline_task.FILLERS))
  hallucinated = None
  if family != "add":
    allowed = set(args["items"])
    hallucinated = sum(1 for w in words if w not in allowed and w not in offline_task.FILLERS
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


def probe_score(prompt, response):
  """1.0 when the first word of the continuation is the list's length, else 0.0."""
  match = offline_task.PROBE_REGEX.match(prompt)
  if match is None:
    raise UserError(f"capability probe: not a probe prompt: {prompt[:60]!r}")
  words = response.split()
  return float(bool(words) and words[0] == str(len(match.group("items").split(" "))))
