"""Benchmark worker: seconds per PPO iteration of TRL's PPOTrainer (trl 1.10).

Runs in TRL's own venv (see benchmarks/ppo_iteration.py for the set-up), e.g.

  /work/peers/trl/bin/python benchmarks/peers/trl_ppo.py \
      --layers=4 --d_model=256 --heads=4 --vocab=8192 --num_prompts=16 \
      --prompt_len=32 --response_len=32 --warmup=2 --iters=4 --seed=0

What one iteration is (`trl.experimental.ppo.PPOTrainer.train`, one pass of
its outer loop): sampling `response_len` tokens for `num_prompts` prompts with
transformers `generate` (policy log-probs from the returned scores), a
reference forward, value and reward forwards, KL-penalised token rewards, GAE,
advantage whitening, then `num_ppo_epochs=1` x `num_mini_batches=1` x one
micro-batch of `num_prompts`: one joint policy + value forward/backward and one
AdamW step, then its metrics, logging and `gc.collect()`. Float32 on CPU,
temperature 1, `stop_token=None`, no pretraining (ptx) term: TRL's PPO has
none.

Models are random-initialised GPT-2 (`GPT2LMHeadModel` policy and its deep
copy as the reference; `GPT2ForSequenceClassification(num_labels=1)` value
and reward models), n_positions 512, dropout disabled by the trainer.

Tokenizer: a word-level `tokenizers` model ('w0'..'w{V-1}') wrapped in
`PreTrainedTokenizerFast`, with pad = V and EOS = V + 1, ids the V-way LM head
can never sample. So every response is exactly `response_len` tokens (no stop,
no padding), the same as in the tunix worker; the prompts never contain pad
either, so all masks are all-ones. (The tokenizer only supplies those ids: the
dataset holds token ids.)

Timing: a trainer callback stamps the clock at `on_train_begin` and at every
`on_step_end` (once per iteration); the first `warmup` iterations are dropped
and the report is the median of the remaining `iters`. Breakdown: the trainer
module's `batch_generation` ("generate"), the no-grad `forward` / `get_reward`
calls ("score": reference, value, reward), and the span from the grad-enabled
`forward` to the end of `optimizer.step()` ("update"); "other" is the rest
(GAE, whitening, metrics, gc). PyTorch runs eagerly, so these are wall times.

Stdout carries exactly one line, the last: `RESULT {json}` with s_per_iter,
times_s (the timed iterations) and breakdown_s (median seconds per phase).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import worker_io  # benchmarks/peers/worker_io.py (this script's folder; standard library only)


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def make_tokenizer(vocab_size):
  """Word-level tokenizer w0..w{V-1}; pad = V, EOS = V + 1 (outside the model's vocabulary)."""
  import tokenizers
  import transformers
  vocab = {f'w{i}': i for i in range(vocab_size)}
  vocab['<pad>'] = vocab_size
  vocab['<eos>'] = vocab_size + 1
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<pad>', eos_token='<eos>')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--num_prompts', type=int, default=16)
  p.add_argument('--prompt_len', type=int, default=32)
  p.add_argument('--response_len', type=int, default=32)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--iters', type=int, default=4)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)

  # Only the RESULT line goes to the real stdout; everything else to stderr.
  real_stdout = worker_io.claim_stdout()
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('WANDB_DISABLED', 'true')

  import datasets
  import numpy as np
  import torch
  import transformers
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as ppo_module

  version = worker_io.package_version('trl')
  _log(f'trl {version}, transformers {transformers.__version__}, torch '
       f'{torch.__version__}, threads {torch.get_num_threads()}')
  torch.manual_seed(args.seed)

  tokenizer = make_tokenizer(args.vocab)
  config = transformers.GPT2Config(
      n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
      vocab_size=args.vocab, n_positions=512, bos_token_id=args.vocab + 1,
      eos_token_id=args.vocab + 1, pad_token_id=args.vocab, num_labels=1)
  policy = transformers.GPT2LMHeadModel(config)
  reference = copy.deepcopy(policy)
  value = transformers.GPT2ForSequenceClassification(config)
  reward = transformers.GPT2ForSequenceClassification(config)

  rng = np.random.default_rng(args.seed)
  prompt_ids = rng.integers(0, args.vocab, size=(args.num_prompts, args.prompt_len))
  train_ds = datasets.Dataset.from_dict({'input_ids': prompt_ids.tolist()})
  n_total = args.warmup + args.iters

  # ---- timers
  stamps = []
  phases = []          # one dict per iteration
  state = {'update_start': None}

  def phase(name, dt):
    if not phases:
      phases.append({})
    phases[-1][name] = phases[-1].get(name, 0.0) + dt

  class Stamp(transformers.TrainerCallback):

    def on_train_begin(self, *a, **kw):
      stamps.append(time.perf_counter())
      phases.append({})

    def on_step_end(self, *a, **kw):
      stamps.append(time.perf_counter())
      phases.append({})

  orig_generation = ppo_module.batch_generation
  orig_forward = ppo_module.forward
  orig_reward = ppo_module.get_reward

  def batch_generation(model, queries, *a, **kw):
    t = time.perf_counter()
    query_responses, logits = orig_generation(model, queries, *a, **kw)
    phase('generate', time.perf_counter() - t)
    responses = query_responses[:, queries.shape[1]:]
    if responses.shape[1] != args.response_len or bool((responses >= args.vocab).any()):
      raise RuntimeError(f'responses {tuple(responses.shape)} are not exactly '
                         f'{args.response_len} in-vocabulary tokens')
    return query_responses, logits

  def forward(model, *a, **kw):
    if torch.is_grad_enabled():
      state['update_start'] = time.perf_counter()
      return orig_forward(model, *a, **kw)
    t = time.perf_counter()
    out = orig_forward(model, *a, **kw)
    phase('score', time.perf_counter() - t)
    return out

  def get_reward(*a, **kw):
    t = time.perf_counter()
    out = orig_reward(*a, **kw)
    phase('score', time.perf_counter() - t)
    return out

  ppo_module.batch_generation = batch_generation
  ppo_module.forward = forward
  ppo_module.get_reward = get_reward

  with tempfile.TemporaryDirectory() as out_dir:
    ppo_args = PPOConfig(
        output_dir=out_dir, report_to=[], save_strategy='no',
        logging_strategy='no', disable_tqdm=True, use_cpu=True,
        bf16=False, fp16=False, seed=args.seed, dataloader_num_workers=0,
        per_device_train_batch_size=args.num_prompts,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        local_rollout_forward_batch_size=args.num_prompts,
        total_episodes=args.num_prompts * n_total,
        response_length=args.response_len, temperature=1.0,
        stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        num_sample_generations=0, learning_rate=1e-5)
    trainer = PPOTrainer(
        args=ppo_args, processing_class=tokenizer, model=policy,
        ref_model=reference, reward_model=reward, value_model=value,
        train_dataset=train_ds, eval_dataset=None, callbacks=[Stamp()])
    optimizer = trainer.optimizer
    orig_step = optimizer.step

    def step(*a, **kw):
      out = orig_step(*a, **kw)
      if state['update_start'] is not None:
        phase('update', time.perf_counter() - state['update_start'])
        state['update_start'] = None
      return out

    optimizer.step = step
    _log(f'{n_total} iterations ({args.warmup} warm-up) ...')
    trainer.train()

  if len(stamps) != n_total + 1:
    raise RuntimeError(f'ran {len(stamps) - 1} iterations, expected {n_total}')
  times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
  phases = phases[:n_total]
  for i, t in enumerate(times):
    _log(f'iteration {i}: {t:.3f} s ' +
         ' '.join(f'{k}={v:.3f}' for k, v in phases[i].items()))
  timed = times[args.warmup:]
  names = sorted({k for ph in phases for k in ph})
  breakdown = {k: statistics.median(ph.get(k, 0.0) for ph in phases[args.warmup:])
               for k in names}
  s_per_iter = statistics.median(timed)
  breakdown['other'] = max(0.0, s_per_iter - sum(breakdown.values()))
  result = {
      's_per_iter': s_per_iter,
      'times_s': timed,
      'breakdown_s': breakdown,
      'model': 'gpt2',
      'trl_version': version,
  }
  worker_io.emit_result(real_stdout, result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
