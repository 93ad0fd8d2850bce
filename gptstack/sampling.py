"""Generation: prefill a batch of prompts, then decode inside jitted `lax.while_loop`s with a
preallocated KV cache. It serves evaluation, chat, best-of-N and RL rollouts alike, with the same
model code, dtypes and sharding as training.

- Prompts of different lengths share a batch: they are left-padded to a length bucket, padding
  is masked out of attention, and positions count from each prompt's first real token. Every row
  then writes its next token at the same cache slot.
- Temperature, top-k and top-p are traced arguments (changing them does not recompile);
  temperature 0 is greedy. One compiled program exists per (batch, prompt bucket, max new tokens).
- Each row stops at its first stop token (kept, and scored); later slots are `pad` with mask 0.
  Decoding ends when every row has stopped or `max_new_tokens` is reached.
- Returns per-token log-probabilities under the distribution actually sampled from (after
  temperature, top-k, top-p) and under the unmodified model (what PPO's ratios and KL use).
- Randomness is `fold_in(key, decode step)`: the same key gives the same samples.

Decoding a token reads every weight and the whole KV cache written so far, for a few small
matmuls per layer, so its speed is set by per-call and per-byte costs, not arithmetic. Hence:
the layers (prefill's too) are unrolled over per-layer weights sliced (and cast to the matmul
dtype) once per call; the prompt's logits are computed at its last position only; the cache is
kept in blocks of `CACHE_BLOCK` slots with one decoding loop per block, so that a step reads
only the blocks in use and writes only the block it carries (the filled ones are joined into one
array between loops); and tokens are drawn by inverting the cumulative distribution at one
uniform number per row rather than with B×V Gumbel variates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gptstack import sharding
from gptstack.config import GPTConfig
from gptstack.model import KVCache

log = logging.getLogger(__name__)
Array = jax.Array
MIN_PROMPT_BUCKET = 16
CACHE_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token: `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 disable."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f'temperature={self.temperature}: expected >= 0')
        if self.top_k < 0:
            raise ValueError(f'top_k={self.top_k}: expected >= 0 (0 disables)')
        if not 0 < self.top_p <= 1:
            raise ValueError(f'top_p={self.top_p}: expected in (0, 1]')


def filter_logits(logits_bv: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Log-probabilities of the sampling distribution: logits / temperature restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`.
    With temperature 0 all mass goes to the argmax (greedy)."""
    greedy = temperature <= 0
    scaled_bv = logits_bv / jnp.where(greedy, 1.0, temperature)
    vocab = logits_bv.shape[-1]
    # Sorting the vocabulary is the costly part: only do it when a filter is on.
    needs_sort = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1))
    threshold_b1 = jax.lax.cond(
        needs_sort, _filter_threshold,
        lambda s, *_: jnp.where(greedy, s.max(axis=-1, keepdims=True), -jnp.inf),
        scaled_bv, top_k, top_p)
    return jax.nn.log_softmax(jnp.where(scaled_bv >= threshold_b1, scaled_bv, -jnp.inf), axis=-1)


def _filter_threshold(scaled_bv: Array, top_k: Array, top_p: Array) -> Array:
    """`[B, 1]`: the smallest logit that survives top-k and top-p."""
    batch, vocab = scaled_bv.shape
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.broadcast_to(k - 1, (batch, 1)), axis=-1)
    # Nucleus: keep a sorted token when the mass strictly before it is still below top_p.
    probs_sorted_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_sorted_bv, axis=-1) - probs_sorted_bv
    last_kept_b1 = jnp.sum(mass_before_bv < top_p, axis=-1, keepdims=True) - 1
    nucleus_b1 = jnp.take_along_axis(sorted_bv, last_kept_b1, axis=-1)
    return jnp.maximum(kth_b1, nucleus_b1)


def sample_tokens(key: Array, log_probs_bv: Array, chunk: int = 128) -> Array:
    """`[B]` int32: one token per row drawn from `exp(log_probs_bv)`, by inverting the
    cumulative distribution at one uniform number per row.

    Exact like the Gumbel-max trick, but it draws B random numbers instead of B×V, which
    makes it several times cheaper at every decoding step. The inversion runs in two levels,
    first over chunks of `chunk` tokens and then within the chosen chunk, so it needs no
    running sum over the whole vocabulary. A token (or chunk) of probability 0 is never drawn:
    one is chosen only where the cumulative sum steps over the uniform number.
    """
    batch, vocab = log_probs_bv.shape
    n_chunks = -(-vocab // chunk)
    probs_bv = jnp.pad(jnp.exp(log_probs_bv), ((0, 0), (0, n_chunks * chunk - vocab)))
    probs_bgc = probs_bv.reshape(batch, n_chunks, chunk)
    mass_bg = probs_bgc.sum(axis=-1)
    u_b1 = jax.random.uniform(key, (batch, 1)) * mass_bg.sum(axis=-1, keepdims=True)
    group_b, rest_b1 = _invert_cdf(mass_bg, u_b1)
    probs_bc = jnp.take_along_axis(probs_bgc, group_b[:, None, None], axis=1)[:, 0]
    within_b, _ = _invert_cdf(probs_bc, rest_b1)
    return (group_b * chunk + within_b).astype(jnp.int32)


def _invert_cdf(mass_bn: Array, u_b1: Array) -> tuple[Array, Array]:
    """The index `i` per row with `cdf[i-1] <= u < cdf[i]` (cdf: the running sum of the
    non-negative `mass_bn`), and `u - cdf[i-1]`. When rounding puts `u` at or past the total,
    the last index of non-zero mass is returned."""
    cdf_bn = jnp.cumsum(mass_bn, axis=-1)
    index_b = jnp.sum(cdf_bn <= u_b1, axis=-1)
    last_b = jnp.max(jnp.where(mass_bn > 0, jnp.arange(mass_bn.shape[-1]), 0), axis=-1)
    index_b = jnp.minimum(index_b, last_b)
    before_b1 = jnp.take_along_axis(cdf_bn - mass_bn, index_b[:, None], axis=-1)
    return index_b, jnp.maximum(u_b1 - before_b1, 0.0)


class Sampler:
    """Batched generation for one model: `sampler(params, prompts, key) -> dict`.

    Args:
        graphdef: the `GPT` graphdef (from `nnx.split`).
        config: its `GPTConfig`.
        mesh, rules: where the params live and how activations are sharded.
        batch_size: rows per call (a shorter list of prompts is padded with dummy rows).
        max_new_tokens: generation budget per row.
        stop_ids: tokens that end a row (kept in the output).
        pad_id: fills slots after a row stopped.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: GPTConfig, mesh: Mesh, rules: str, *,
                 batch_size: int, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int):
        if max_new_tokens >= config.max_seq_len:
            raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in '
                             f'max_seq_len={config.max_seq_len}')
        self.graphdef, self.config, self.mesh, self.rules = graphdef, config, mesh, rules
        self.batch_size = sharding.round_to_batch_shards(mesh, batch_size)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = np.asarray(sorted(set(stop_ids)), np.int32)
        self.pad_id = pad_id
        self._batch_sharding = sharding.batch_sharding(mesh, rules, self.batch_size)
        self._row_sharding = sharding.named_sharding(mesh, ('batch',), rules)
        self._compiled: dict[int, Callable] = {}
        self.truncated_prompts = 0

    def prompt_bucket(self, longest: int) -> int:
        """Prompt lengths are rounded up to a power of two, at least `MIN_PROMPT_BUCKET` (capped
        by the context): a stream of prompts compiles a few programs, and the padding, which
        every decoding step reads in the cache, stays below the prompt's own length."""
        limit = self.config.max_seq_len - self.max_new_tokens
        return min(limit, max(MIN_PROMPT_BUCKET, 1 << (max(longest, 1) - 1).bit_length()))

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: Array,
                 sampling: SamplingParams = SamplingParams()) -> dict[str, np.ndarray]:
        """Generates a continuation of each prompt.

        Returns (NumPy, one row per prompt):
            tokens `[B, N]` int32, logprobs `[B, N]` (sampling distribution), model_logprobs
            `[B, N]` (unmodified model), mask `[B, N]` (1 on generated tokens up to and including
            the stop token), lengths `[B]` (number of generated tokens).
        """
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f'got {len(prompts)} prompts for a sampler of batch size '
                             f'{self.batch_size}')
        bucket = self.prompt_bucket(max(len(p) for p in prompts))
        tokens = np.full((self.batch_size, bucket), self.pad_id, np.int32)
        lengths = np.ones(self.batch_size, np.int32)
        for row, prompt in enumerate(prompts):
            if not len(prompt):
                raise ValueError(f'prompt {row} is empty; start it with <|endoftext|> at least')
            if len(prompt) > bucket:
                self.truncated_prompts += 1
                log.warning('prompt %d has %d tokens; keeping the last %d (context %d, %d new)',
                            row, len(prompt), bucket, self.config.max_seq_len,
                            self.max_new_tokens)
                prompt = prompt[-bucket:]
            tokens[row, bucket - len(prompt):] = prompt
            lengths[row] = len(prompt)
        if bucket not in self._compiled:
            self._compiled[bucket] = self._build(bucket)
        out = self._compiled[bucket](
            params, jax.device_put(tokens, self._batch_sharding),
            jax.device_put(lengths, self._row_sharding), key,
            jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p))
        return {k: np.asarray(v)[:len(prompts)] for k, v in jax.device_get(out).items()}

    def _build(self, prompt_len: int):
        graphdef, mesh, rules = self.graphdef, self.mesh, self.rules
        n_new, stop_ids, pad_id = self.max_new_tokens, jnp.asarray(self.stop_ids), self.pad_id
        block = CACHE_BLOCK
        slots = block * math.ceil((prompt_len + n_new) / block)

        def generate(params, tokens_bp, lengths_b, key, temperature, top_k, top_p):
            with sharding.activation_sharding(mesh, rules):
                model = nnx.merge(graphdef, params)
                layers = model.transformer.unstacked_blocks()
                batch = tokens_bp.shape[0]
                pad_b = prompt_len - lengths_b
                slots_c = jnp.arange(slots)
                # Cache slots holding real tokens: the prompt after its padding, then everything
                # generated (written at slot prompt_len + step - 1 by decode step `step`).
                valid_bc = slots_c[None, :] >= pad_b[:, None]
                positions_bp = jnp.maximum(slots_c[None, :prompt_len] - pad_b[:, None], 0)
                segment_ids_bp = valid_bc[:, :prompt_len].astype(jnp.int32)
                logits_bv, (k_lbkph, v_lbkph) = model.prefill(tokens_bp, positions_bp,
                                                              segment_ids_bp, layers)
                # The cache, per layer: keys and values in blocks of `block` slots. Blocks before
                # the one being written are only read; the prompt fills the first ones.
                first_block = prompt_len // block
                blocks_bkch = ('batch', 'kv_heads', 'seq', 'head_dim')

                def blocks_of(kv_bkph):
                    room = (first_block + 1) * block - prompt_len
                    kv_bkch = jnp.pad(kv_bkph, ((0, 0), (0, 0), (0, room), (0, 0)))
                    return [sharding.constrain(b, blocks_bkch)
                            for b in jnp.split(kv_bkch, first_block + 1, axis=2)]

                prompt_cache = [(blocks_of(k_lbkph[i]), blocks_of(v_lbkph[i]))
                                for i in range(len(layers))]

                def merged(blocks):
                    """Read-only blocks as one (a copy once per loop, not per step): a step then
                    runs two attention matmuls per layer on them rather than two per block."""
                    return ([sharding.constrain(jnp.concatenate(blocks, axis=2), blocks_bkch)]
                            if blocks else [])

                full = [(merged(keys[:-1]), merged(values[:-1])) for keys, values in prompt_cache]
                current = [(keys[-1], values[-1]) for keys, values in prompt_cache]

                def pick(logits_bv, step):
                    log_probs_bv = filter_logits(logits_bv, temperature, top_k, top_p)
                    token_b = sample_tokens(jax.random.fold_in(key, step), log_probs_bv)
                    sampled_lp = jnp.take_along_axis(log_probs_bv, token_b[:, None], -1)[:, 0]
                    model_lp = jnp.take_along_axis(jax.nn.log_softmax(logits_bv, axis=-1),
                                                   token_b[:, None], -1)[:, 0]
                    return token_b, sampled_lp, model_lp

                out = dict(tokens=jnp.full((batch, n_new), pad_id, jnp.int32),
                           logprobs=jnp.zeros((batch, n_new), jnp.float32),
                           model_logprobs=jnp.zeros((batch, n_new), jnp.float32),
                           mask=jnp.zeros((batch, n_new), jnp.int32))

                def record(out, step, token_b, sampled_lp, model_lp, live_b):
                    values = dict(tokens=jnp.where(live_b, token_b, pad_id),
                                  logprobs=jnp.where(live_b, sampled_lp, 0.0),
                                  model_logprobs=jnp.where(live_b, model_lp, 0.0),
                                  mask=live_b.astype(jnp.int32))
                    return {k: out[k].at[:, step].set(values[k]) for k in out}

                token_b, sampled_lp, model_lp = pick(logits_bv, 0)
                out = record(out, 0, token_b, sampled_lp, model_lp, jnp.ones((batch,), bool))
                done_b = jnp.isin(token_b, stop_ids)

                def joined(full, current):
                    """Per layer, the read-only blocks followed by the block being written."""
                    return [([*keys, k_bkch], [*values, v_bkch])
                            for (keys, values), (k_bkch, v_bkch)
                            in zip(full, current, strict=True)]

                def decode_loop(carry, full, block_index, end_step):
                    """Decode steps up to `end_step` whose token goes into cache block
                    `block_index` (carried and written); earlier blocks (`full`) are only
                    read, and later ones not at all."""
                    visible = (block_index + 1) * block

                    def cond(carry):
                        step, _, done_b, _, _ = carry
                        return (step < end_step) & ~jnp.all(done_b)

                    def body(carry):
                        step, token_b, done_b, current, out = carry
                        slot = prompt_len + step - 1  # where the previous token is written
                        mask_bc = valid_bc[:, :visible] & (slots_c[None, :visible] <= slot)
                        position_b1 = (lengths_b + step - 1)[:, None]
                        caches = [KVCache(keys, values, slot - block_index * block)
                                  for keys, values in joined(full, current)]
                        logits_b1v, caches = model.decode(token_b[:, None], position_b1, layers,
                                                          caches, mask_bc[:, None])
                        current = [(c.keys[-1], c.values[-1]) for c in caches]
                        next_b, sampled_lp, model_lp = pick(logits_b1v[:, 0], step)
                        out = record(out, step, next_b, sampled_lp, model_lp, ~done_b)
                        done_b = done_b | jnp.isin(next_b, stop_ids)
                        return step + 1, next_b, done_b, current, out

                    return jax.lax.while_loop(cond, body, carry)

                # One loop per cache block, so that a step reads only the blocks in use: decoding
                # is bound by reading the cache, which fills up as generation proceeds.
                step, block_index = jnp.int32(1), first_block
                while block_index * block - prompt_len + 1 < n_new:
                    end_step = min(n_new, (block_index + 1) * block - prompt_len + 1)
                    step, token_b, done_b, current, out = decode_loop(
                        (step, token_b, done_b, current, out), full, block_index, end_step)
                    full = [(merged(keys), merged(values))
                            for keys, values in joined(full, current)]
                    empty = sharding.constrain(jnp.zeros_like(current[0][0]), blocks_bkch)
                    current = [(empty, empty)] * len(layers)
                    block_index += 1
                out['lengths'] = out['mask'].sum(axis=1)
                return out

        # Outputs are small and replicated, so every process can read them (multi-host too).
        return jax.jit(generate, out_shardings=sharding.replicated(mesh))
