"""A simulated human labeler: ranks K responses from gold scores with Bradley-Terry noise.

The ranking is Plackett-Luce with utilities `score / temperature`, sampled by sorting
`score / temperature + Gumbel noise`. For any two responses this gives exactly the Bradley-Terry
preference `P(i preferred to j) = sigmoid((score_i - score_j) / temperature)`. Responses with
equal gold scores share one noise draw and so tie (the labeler cannot tell them apart);
temperature 0 ranks by gold score without noise. Ranks are dense, 0 = best.
"""
import numpy as np

from rlhf_jax.data import schema
from rlhf_jax.errors import UserError


def simulated_ranks(scores, rng, temperature):
  """Dense ranks (int32, 0 = best) of responses with gold `scores`, with Bradley-Terry noise."""
  if temperature < 0:
    raise UserError(f"labeler temperature must be >= 0 (got {temperature})")
  scores = np.asarray(scores, np.float64)
  values, group = np.unique(scores, return_inverse=True)
  utility = values if temperature == 0 else values / temperature + rng.gumbel(size=len(values))
  order = np.argsort(-utility, kind="stable")
  group_rank = np.empty(len(values), np.int32)
  group_rank[order] = np.arange(len(values), dtype=np.int32)
  return group_rank[group.reshape(-1)]


def label_comparisons(prompts, responses, score_fn, rng, temperature):
  """Comparison records for K responses per prompt, ranked by the simulated labeler.

  Args:
    prompts: list of prompt strings.
    responses: list (one per prompt) of lists of 2..9 response strings.
    score_fn: gold labeler, (prompt, response) -> float.
    rng: numpy Generator.
    temperature: Bradley-Terry temperature, in units of gold score.

  Returns:
    Records of the `comparisons` schema. A prompt whose responses all tie is left out (it holds
    no preference).
  """
  records = []
  for prompt, candidates in zip(prompts, responses):
    if not schema.MIN_K <= len(candidates) <= schema.MAX_K:
      raise UserError(f"labeler: need {schema.MIN_K} to {schema.MAX_K} responses per prompt "
                      f"(got {len(candidates)})")
    scores = [score_fn(prompt, r) for r in candidates]
    ranks = simulated_ranks(scores, rng, temperature)
    if len(set(ranks.tolist())) < 2:
      continue
    records.append({"prompt": prompt, "responses": list(candidates),
                    "ranks": [int(r) for r in ranks]})
  return records
