r"""The pipeline on OpenAI's summarize-from-feedback (TL;DR): `--config=configs/tldr.py:<preset>`.

  python -m rlhf_jax.main --config=configs/tldr.py:smollm2 \
      --config.data.input=comparisons.jsonl \
      --config.data.sft=tldr_3_filtered/train.jsonl \
      --config.data.ptx=wiki.txt

reads the files as distributed: the comparisons JSON lines (`{"info": {"post", "title",
"subreddit", ...}, "summaries": [{"text"}, {"text"}], "choice": 0 | 1, ...}`; the batch files of
the release concatenated, records without a Reddit post skipped) and, optionally, the TL;DR SFT
split (`{"subreddit", "title", "post", "summary"}`; without it SFT trains on the preferred
summaries). The prompt is "SUBREDDIT: r/...\nTITLE: ...\nPOST: ...\nTL;DR:". Everything else as
in configs/hh_rlhf.py (held-out split by prompt, ptx corpus, evaluation without a gold labeler).
"""
from rlhf_jax import config_files

hh_rlhf = config_files.sibling(__file__, "hh_rlhf")


def get_config(preset="smollm2"):
  return hh_rlhf.get_config_for("tldr", preset)
