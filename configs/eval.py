r"""Evaluation config: `config.eval` of the pipeline (configs/ppo_ptx.py), `get_config(<preset>)`.

The evaluation stage (rlhf_jax.evaluate, the pipeline's last stage) runs with the pipeline's
config: these fields under `config.eval`, next to the top-level `data` and `mesh` and, for the
reward model's sequence length, `rm`. It samples every policy on held-out prompts and reports the
win rate against SFT by the gold labeler, the reward-model score, the KL to SFT, best-of-N
baselines, the pretraining loss and a capability probe (the alignment tax).
"""
import ml_collections


def get_config(preset="tiny"):
  c = ml_collections.ConfigDict()
  c.num_prompts = 0            # held-out prompts (`prompts` data.eval_split); 0 = all (400 offline)
  c.samples_per_prompt = 4     # responses per prompt and policy
  c.temperature = 1.0          # sampling temperature (1 = the policies' own distribution)
  c.max_new_tokens = 256
  c.prompt_len = 256           # prompts left-padded (or cut on the left) to this many tokens
  c.batch_size = 32            # prompts per sampler call (x samples_per_prompt rows)
  c.seed = 0
  c.rm_path = "auto"           # the reward model; 'auto' = <workdir>/rm/model
  # An external judge reward model ('' = none): ours or a Hugging Face *ForSequenceClassification
  # directory, with its own tokenizer; win rates against SFT under it (rlhf_jax/eval_judge.py).
  c.judge = ""
  c.pretrain_batches = 8       # packed batches of held-out pretraining text (0 = no pretrain_loss)
  c.pretrain_batch_size = 16
  c.pretrain_seq_len = 1024
  c.num_examples = 3           # prompts whose completions results.md shows
  # Best-of-N baselines: max(best_of) SFT candidates per prompt, reranked by the RM and by gold.
  c.best_of = (4, 16)          # () = off
  c.probe_prompts = 0          # capability-probe prompts (offline task); 0 = all
  c.probe_new_tokens = 4       # greedy tokens decoded per probe prompt
  # Sequence length of the held-out comparisons (RM accuracy tables); 0 = config.rm.seq_len when
  # the config has an `rm` section (the pipeline's), else prompt_len + max_new_tokens.
  c.rm_seq_len = 0
  if preset == "tiny":
    c.max_new_tokens = 24
    c.prompt_len = 24
    c.batch_size = 40
    c.pretrain_seq_len = 128
  elif preset == "smollm2":
    c.max_new_tokens = 32
    c.prompt_len = 48
    c.batch_size = 32
    c.pretrain_seq_len = 256
  return c
