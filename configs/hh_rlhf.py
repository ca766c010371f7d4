r"""The pipeline on Anthropic HH-RLHF: `--config=configs/hh_rlhf.py:<preset>`.

  python -m rlhf_jax.main --config=configs/hh_rlhf.py:smollm2 \
      --config.data.input=hh/helpful-base/train.jsonl.gz \
      --config.data.heldout=hh/helpful-base/test.jsonl.gz \
      --config.data.ptx=wiki.txt

reads the files as distributed (`{"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}`
per line, gzip or not) and runs SFT (on the chosen responses) -> RM (on the chosen/rejected pairs)
-> PPO and PPO-ptx -> evaluation, everything under runs/hh_rlhf_<preset>/. The data are prepared
under <workdir>/data on first use (rlhf_jax.data.real_data: held-out split by prompt, the ptx
corpus from any text or JSONL file). There is no gold labeler: the evaluation reports the reward
model's score, the KL to SFT and each policy's win rate against SFT under the trained reward
model and, with `--config.eval.judge=<reward model dir>` (ours, or a Hugging Face
*ForSequenceClassification directory), under that judge.

Presets: smollm2 (SmolLM2-135M-Instruct, offline), 1.3b, 6.7b, 175b (the paper's sizes and
hyperparameters: give the base model with --config.sft.init_from=<model>). No ptx file: add
--config.ppo.ptx_coef=0 (plain PPO only).
"""
import ml_collections

from rlhf_jax import config_files

ppo_ptx = config_files.sibling(__file__, "ppo_ptx")

# Sequence lengths of each source and preset: sft/rm seq_len, ppo prompt/response, eval.
LENGTHS = {
    "hh_rlhf": {"smollm2": dict(seq_len=512, prompt_len=256, response_len=128),
                "paper": dict(seq_len=1024, prompt_len=512, response_len=256)},
    "tldr": {"smollm2": dict(seq_len=640, prompt_len=512, response_len=64),
             "paper": dict(seq_len=640, prompt_len=512, response_len=64)},
}


def real_data_fields(data, source):
  """Adds the real-data fields (rlhf_jax.data.real_data) to one `config.data`."""
  data.source = source
  data.input = ""                # the comparisons file as distributed (.jsonl / .jsonl.gz)
  data.heldout = ""              # '' = hold out heldout_fraction of input's prompts; else a file
  data.heldout_fraction = 0.05
  data.sft = ""                  # '' = the preferred responses; else a demonstrations file
  data.ptx = ""                  # pretraining text: a .txt (blank-line documents) or JSONL "text"
  data.limit = 0                 # first N usable comparisons of input (0 = all)


def get_config_for(source, preset="smollm2"):
  """The pipeline config of configs/ppo_ptx.py:<preset> on real data of `source`."""
  if preset == "tiny":
    raise ValueError(f"unknown config preset 'tiny' for {source} (expected smollm2, 1.3b, 6.7b "
                     "or 175b; tiny is the offline task's)")
  c = ppo_ptx.get_config(preset)
  c.name = f"{source}_{preset}"
  c.pretrain_base = False        # start from a pretrained model (smollm2, or sft.init_from)
  c.collect_comparisons = False  # the RM trains on the data set's own comparisons
  c.oracle_run = False           # no gold labeler on real data
  real_data_fields(c.data, source)
  for key in c.keys():           # every stage's sub-config (pretrain, sft, collect, rm, ...)
    if isinstance(c[key], ml_collections.ConfigDict) and "data" in c[key]:
      real_data_fields(c[key].data, source)
  lengths = LENGTHS[source]["smollm2" if preset == "smollm2" else "paper"]
  c.sft.seq_len = lengths["seq_len"]
  c.rm.seq_len = lengths["seq_len"]
  if "dpo" in c:
    c.dpo.seq_len = lengths["seq_len"]
  c.ppo.prompt_len = lengths["prompt_len"]
  c.ppo.response_len = lengths["response_len"]
  c.eval.prompt_len = lengths["prompt_len"]
  c.eval.max_new_tokens = lengths["response_len"]
  c.eval.num_prompts = 256       # held-out prompts evaluated (HH test: 8.5k; 0 = all)
  c.eval.best_of = (4,)
  c.eval.pretrain_seq_len = lengths["seq_len"]
  if preset == "smollm2":
    c.sft.num_epochs = 1.0
    c.rm.grad_accum_steps = 8    # 16 prompts x 2 responses x 512 tokens through 30 layers
  return c


def get_config(preset="smollm2"):
  return get_config_for("hh_rlhf", preset)
