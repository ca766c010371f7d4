"""Benchmark worker: time Google's tunix sampler on a random-initialised Qwen2.

Runs in tunix's own venv (see shared PEERS.md, section "tunix"), e.g.

  /work/peers/tunix/bin/python benchmarks/peers/tunix_generate.py \
      --layers=4 --d_model=256 --heads=4 --kv_heads=4 --d_ff=1024 \
      --vocab=8192 --batch=8 --prompt_len=64 --new_tokens=64 --repeats=3 --seed=0

Builds `tunix.models.qwen2.model.Qwen2` from its own `ModelConfig` with random
init (nothing is downloaded), wraps it in `tunix.generate.sampler.Sampler` with
a KV cache of exactly prompt_len + new_tokens, and times sampling (temperature
1, top-k/top-p off) of exactly `new_tokens` tokens for `batch` prompts of
exactly `prompt_len` tokens. One untimed warm-up call (compilation), then
`repeats` timed calls; each call returns host numpy tokens, so it is blocking.

Stdout carries exactly one line, the last: `RESULT {json}`. Everything else
(tunix/absl logging, warnings, progress) goes to stderr.

Notes on what tunix's model does (vs. a GPT-2 baseline):
  * Qwen2 block: RMSNorm, RoPE, q/k/v biases, SwiGLU MLP (three d_model x d_ff
    matrices, i.e. 1.5x a GPT-2 MLP), no qk-norm (that is Qwen3). float32.
  * Embeddings tied by default here (--tied_embedding=1, like GPT-2); the
    lm-head matmul costs the same either way.
  * tunix zero-initialises the MLP kernels and draws the embedding from
    N(0, 1); here the MLP kernels are re-drawn at random and the embedding is
    scaled to N(0, 0.02) (timing-neutral; keeps sampling non-degenerate).
  * The tokenizer is a trivial offline word-level one ('w0'..'w{V-1}'); pad and
    EOS ids are set to ids >= vocab, which the model can never sample, so
    generation never stops early and no generated token is treated as padding.
  * tunix's decode loop runs new_tokens forward steps after prefill (the last
    one's token falls off the end of the buffer), i.e. one more forward pass
    than strictly needed; that is part of what is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import worker_io  # benchmarks/peers/worker_io.py (this script's folder; standard library only)


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


class WordTokenizer:
  """Offline word-level tokenizer: token i <-> 'w{i}'.

  Satisfies tunix's TokenizerAdapter "NONE" interface
  (encode, decode, bos_id, eos_id, pad_id).
  """

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str, **kwargs) -> list[int]:
    del kwargs
    return [int(w[1:]) for w in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return ' '.join(f'w{int(i)}' for i in ids)

  def bos_id(self):
    # Falsy -> tunix prepends no BOS; None never equals a token, so
    # dedup_bos_ids cannot shorten a prompt either.
    return None

  def eos_id(self) -> int:
    return self.vocab_size + 1  # never sampled: logits only cover [0, vocab)

  def pad_id(self) -> int:
    return self.vocab_size  # never sampled, never in a prompt


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--kv_heads', type=int, default=None,
                 help='defaults to --heads')
  p.add_argument('--d_ff', type=int, default=1024)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=64)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--tied_embedding', type=int, default=1, choices=(0, 1))
  args = p.parse_args(argv)
  kv_heads = args.kv_heads or args.heads
  if args.d_model % args.heads:
    p.error('d_model must be divisible by heads')
  if args.heads % kv_heads:
    p.error('heads must be divisible by kv_heads')

  # Route anything written to fd 1 (library prints, C-level output) to
  # stderr; only the final RESULT line goes to the real stdout.
  real_stdout = worker_io.claim_stdout()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from tunix.generate import sampler as sampler_lib
  from tunix.models.qwen2 import model as qwen2_lib

  tunix_version = worker_io.package_version('google-tunix')
  _log(f'tunix {tunix_version}, jax {jax.__version__}, '
       f'devices {jax.devices()}')

  head_dim = args.d_model // args.heads
  config = qwen2_lib.ModelConfig(
      num_layers=args.layers,
      vocab_size=args.vocab,
      embed_dim=args.d_model,
      hidden_dim=args.d_ff,
      num_heads=args.heads,
      head_dim=head_dim,
      num_kv_heads=kv_heads,
      rope_theta=10_000,
      norm_eps=1e-6,
      use_tied_embedding=bool(args.tied_embedding),
      dtype=jnp.float32,
      param_dtype=jnp.float32,
  )
  model = qwen2_lib.Qwen2(config, rngs=nnx.Rngs(params=args.seed))

  # tunix initialises MLP kernels to zero; draw them at random instead. Its
  # embedding is N(0, 1); rescale to GPT-2's N(0, 0.02) so that (tied) logits
  # are not so peaked that temperature-1 sampling degenerates to greedy.
  # Neither change affects the amount of work timed.
  key = jax.random.PRNGKey(args.seed + 12345)
  for layer in model.layers:
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      lin = getattr(layer.mlp, name)
      key, sub = jax.random.split(key)
      shape = lin.kernel.get_value().shape
      lin.kernel.set_value(
          jax.random.normal(sub, shape, jnp.float32) / np.sqrt(shape[0])
      )
  emb = model.embedder.input_embedding
  emb.set_value(emb.get_value() * 0.02)
  n_params = sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )
  _log(f'qwen2 random init: {n_params / 1e6:.2f} M params, '
       f'tied_embedding={bool(args.tied_embedding)}')

  tokenizer = WordTokenizer(args.vocab)
  cache_size = args.prompt_len + args.new_tokens
  sampler = sampler_lib.Sampler(
      transformer=model,
      tokenizer=tokenizer,
      cache_config=sampler_lib.CacheConfig(
          cache_size=cache_size,
          num_layers=args.layers,
          num_kv_heads=kv_heads,
          head_dim=head_dim,
      ),
  )

  rng = np.random.default_rng(args.seed)
  prompt_ids = rng.integers(0, args.vocab, size=(args.batch, args.prompt_len))
  prompts = [tokenizer.decode(row) for row in prompt_ids]
  eos = tokenizer.eos_id()

  def generate(seed):
    return sampler(
        prompts,
        max_generation_steps=args.new_tokens,
        max_prompt_length=args.prompt_len,
        echo=False,
        eos_tokens=[eos],
        temperature=args.temperature,
        top_p=1.0,   # 1.0 + top_k None -> plain categorical over full vocab
        top_k=None,
        seed=seed,
    )

  def check(out):
    padded = np.asarray(out.padded_prompt_tokens)
    if padded.shape != (args.batch, args.prompt_len) or not np.array_equal(
        padded, prompt_ids):
      raise RuntimeError(
          f'prompt tokenised to {padded.shape}, expected '
          f'{(args.batch, args.prompt_len)} equal to the prompt ids')
    lens = [len(t) for t in out.tokens]
    if len(lens) != args.batch or any(n != args.new_tokens for n in lens):
      raise RuntimeError(f'generated lengths {lens}, expected '
                         f'{args.batch} x {args.new_tokens}')
    toks = np.stack([np.asarray(t) for t in out.tokens])
    if toks.min() < 0 or toks.max() >= args.vocab:
      raise RuntimeError('generated token out of vocabulary range')
    return int(toks.size)

  _log('warm-up (compile) ...')
  t0 = time.perf_counter()
  out = generate(args.seed)
  generated = check(out)
  _log(f'warm-up {time.perf_counter() - t0:.2f} s, '
       f'{generated} tokens; sample row 0: {out.text[0][:80]} ...')

  times = []
  for i in range(args.repeats):
    t0 = time.perf_counter()
    out = generate(args.seed + 1 + i)
    jax.block_until_ready(out.tokens)  # already host numpy; kept for clarity
    dt = time.perf_counter() - t0
    generated = check(out)
    times.append(dt)
    _log(f'repeat {i}: {dt:.3f} s, '
         f'{args.batch * args.new_tokens / dt:.1f} tok/s')

  tok_s = statistics.median(args.batch * args.new_tokens / t for t in times)
  result = {
      'tok_s': tok_s,
      'times_s': times,
      'generated_tokens': generated,
      'model': 'qwen2',
      'tunix_version': tunix_version,
  }
  worker_io.emit_result(real_stdout, result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
