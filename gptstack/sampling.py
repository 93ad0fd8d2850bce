"""Generation: prefill a batch of prompts, then decode inside jitted `lax.while_loop`s with a
preallocated KV cache. It serves evaluation, chat, best-of-N and RL rollouts alike, with the same
model code, dtypes and sharding as training.

- Prompts of different lengths share a batch: they are left-padded to a length bucket, padding
  is masked out of attention, and positions count from each prompt's first real token. Every row
  then writes its next token at the same cache slot.
- Temperature, top-k and top-p are traced arguments (changing them does not recompile);
  temperature 0 is greedy. They are one setting for the batch, or one per row; so is the random
  key. One compiled program exists per (batch, prompt bucket, max new tokens) and per choice.
- Each row stops at its first stop token (kept, and scored); later slots are `pad` with mask 0.
  Decoding ends when every row has stopped or `max_new_tokens` is reached.
- Returns per-token log-probabilities under the distribution actually sampled from (after
  temperature, top-k, top-p) and under the unmodified model (what PPO's ratios and KL use).
- Randomness is `fold_in(key, decode step)`: the same key gives the same samples. With a key
  per row, a row's samples depend on its own key and prompt only, not on its batch-mates.
- An optional host callback (`on_step`) sees each step's tokens as they are drawn and may stop
  any row: what streaming, stop strings and cancellation in a server are built on.
- `sample_many` draws replies to any number of prompts (evaluation, labelling, best-of-N, the
  comparison) in waves: short budgets first, then only the unfinished replies go on, so that a
  batch does not decode for its one long reply while the rest have stopped.

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
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh

from gptstack import sharding
from gptstack.config import ConfigError, GPTConfig
from gptstack.metrics import progress_bar
from gptstack.model import GPT, Block
from gptstack.ops import KVCache

log = logging.getLogger(__name__)
# Prompts cut to the context by any sampler of this process (the console shows a few counts).
_TRUNCATED = itertools.count(1)
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
            raise ConfigError(f'temperature={self.temperature}: expected >= 0')
        if self.top_k < 0:
            raise ConfigError(f'top_k={self.top_k}: expected >= 0 (0 disables)')
        if not 0 < self.top_p <= 1:
            raise ConfigError(f'top_p={self.top_p}: expected in (0, 1]')


def filter_logits(logits_bv: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Log-probabilities of the sampling distribution: logits / temperature restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`.
    With temperature 0 all mass goes to the argmax (greedy). Each setting is a scalar or one
    value per row (`[B]`); a row's distribution does not depend on the other rows' settings."""
    temperature, top_k, top_p = (jnp.reshape(x, (-1, 1)) if jnp.ndim(x) else x
                                 for x in (temperature, top_k, top_p))
    greedy = temperature <= 0
    scaled_bv = logits_bv / jnp.where(greedy, 1.0, temperature)
    vocab = logits_bv.shape[-1]
    # Sorting the vocabulary is the costly part: only do it when a filter is on.
    needs_sort = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1))
    threshold_b1 = jax.lax.cond(
        jnp.any(needs_sort), _filter_threshold,
        lambda s, *_: jnp.full((s.shape[0], 1), -jnp.inf, s.dtype), scaled_bv, top_k, top_p)
    threshold_b1 = jnp.where(greedy, scaled_bv.max(axis=-1, keepdims=True), threshold_b1)
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
    nucleus_b1 = jnp.where(top_p < 1, jnp.take_along_axis(sorted_bv, last_kept_b1, axis=-1),
                           -jnp.inf)
    return jnp.maximum(kth_b1, nucleus_b1)


def sample_tokens(key: Array, log_probs_bv: Array, chunk: int = 128) -> Array:
    """`[B]` int32: one token per row drawn from `exp(log_probs_bv)`, by inverting the
    cumulative distribution at one uniform number per row, drawn from `key` or, given a key
    per row (`[B]`), from the row's own.

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
    if jnp.ndim(key):
        u_b1 = jax.vmap(lambda k: jax.random.uniform(k, (1,)))(key)
    else:
        u_b1 = jax.random.uniform(key, (batch, 1))
    u_b1 = u_b1 * mass_bg.sum(axis=-1, keepdims=True)
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
        batch_size: rows per call, rounded up to a multiple of the mesh's batch shards
            (`sharding.round_to_batch_shards`); fewer prompts are padded with dummy rows.
        max_new_tokens: generation budget per row.
        stop_ids: tokens that end a row (kept in the output).
        pad_id: fills slots after a row stopped.
        vocab_size: ids below this are drawn (the tokenizer's size); rows of an embedding table
            padded past it never are. None: the model's whole vocabulary.
        on_step: called on the host after every decoding step, in order, as
            `on_step(step, tokens [B], live [B]) -> stop [B]` on NumPy arrays: the tokens drawn
            at `step`, which rows are still generating (their token is recorded), and the rows
            to stop now
            (their token stays recorded). A server streams, applies stop strings and per-request
            limits, and cancels with it. None (every training and evaluation use): no callback
            is compiled in.
    """

    def __init__(self, graphdef: nnx.GraphDef, config: GPTConfig, mesh: Mesh, rules: str, *,
                 batch_size: int, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                 vocab_size: int | None = None, on_step: StepCallback | None = None):
        if max_new_tokens >= config.max_seq_len:
            raise ConfigError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in '
                             f'max_seq_len={config.max_seq_len}')
        self.graphdef, self.config, self.mesh, self.rules = graphdef, config, mesh, rules
        self.batch_size = sharding.round_to_batch_shards(mesh, batch_size)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = np.asarray(sorted(set(stop_ids)), np.int32)
        self.pad_id = pad_id
        self.vocab_size = config.vocab_size if vocab_size is None else vocab_size
        if not 0 < self.vocab_size <= config.vocab_size:
            raise ConfigError(f'vocab_size={vocab_size}: the tokenizer must fit the model\'s '
                              f'{config.vocab_size} token rows')
        self._batch_sharding = sharding.batch_sharding(mesh, rules, self.batch_size)
        self._row_sharding = sharding.named_sharding(mesh, ('batch',), rules)
        self.on_step = on_step
        self._compiled: dict[tuple[int, int], Callable] = {}
        self.truncated_prompts = 0

    def prompt_bucket(self, longest: int, max_new_tokens: int | None = None) -> int:
        """Prompt lengths are rounded up to a power of two, at least `MIN_PROMPT_BUCKET` (capped
        by the context less `max_new_tokens`, by default the sampler's): a stream of prompts
        compiles a few programs, and the padding, which every decoding step reads in the cache,
        stays below the prompt's own length."""
        limit = self.config.max_seq_len - (max_new_tokens or self.max_new_tokens)
        return min(limit, max(MIN_PROMPT_BUCKET, 1 << (max(longest, 1) - 1).bit_length()))

    def fitted(self, prompt: Sequence[int], bucket: int | None = None) -> Sequence[int]:
        """`prompt`, or its last `bucket` tokens (by default, all that the context leaves beside
        `max_new_tokens` new ones) when it is longer: counted in `truncated_prompts`, and logged
        at the 1st, 4th, 16th, 64th, ... prompt of the process on the console (every one in the
        run log)."""
        bucket = bucket or self.config.max_seq_len - self.max_new_tokens
        if len(prompt) <= bucket:
            return prompt
        self.truncated_prompts += 1
        n = next(_TRUNCATED)
        is_power_of_4 = n & (n - 1) == 0 and n.bit_length() % 2 == 1
        log.log(logging.WARNING if is_power_of_4 else logging.DEBUG,
                '%d prompt%s so far longer than the %d tokens that the context (%d) leaves '
                'beside %d new ones: each keeps its last %d tokens (this one had %d)', n,
                's' if n > 1 else '', bucket, self.config.max_seq_len,
                self.config.max_seq_len - bucket, bucket, len(prompt))
        return prompt[-bucket:]

    def __call__(self, params: nnx.State, prompts: Sequence[Sequence[int]], key: Array,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 max_new_tokens: int | None = None, first_step: int = 0
                 ) -> dict[str, np.ndarray]:
        """Generates a continuation of each prompt.

        `key` is one key for the batch, or a key per prompt (`[len(prompts)]`); `sampling` is
        one setting for the batch, or one per prompt. Per row, a reply depends only on its own
        prompt, key and setting. `max_new_tokens` (at most the sampler's) lowers this call's
        budget. `first_step` continues a reply: the prompts end with the `first_step` tokens
        drawn so far with these keys, and the draws go on from there (token `s` of the reply
        always comes from `fold_in(key, s)`).

        Returns (NumPy, one row per prompt):
            tokens `[B, N]` int32, logprobs `[B, N]` (sampling distribution), model_logprobs
            `[B, N]` (unmodified model), mask `[B, N]` (1 on generated tokens up to and including
            the stop token), lengths `[B]` (number of generated tokens).
        """
        if not 0 < len(prompts) <= self.batch_size:
            raise ValueError(f'got {len(prompts)} prompts for a sampler of batch size '
                             f'{self.batch_size}')
        n_new = max_new_tokens or self.max_new_tokens
        if not 0 < n_new <= self.max_new_tokens:
            raise ValueError(f'max_new_tokens={max_new_tokens}: expected 1 to the sampler\'s '
                             f'{self.max_new_tokens}')
        bucket = self.prompt_bucket(max(len(p) for p in prompts), n_new)
        tokens = np.full((self.batch_size, bucket), self.pad_id, np.int32)
        lengths = np.ones(self.batch_size, np.int32)
        for row, prompt in enumerate(prompts):
            if not len(prompt):
                raise ValueError(f'prompt {row} is empty; start it with <|endoftext|> at least')
            prompt = self.fitted(prompt, bucket)
            tokens[row, bucket - len(prompt):] = prompt
            lengths[row] = len(prompt)
        if (bucket, n_new) not in self._compiled:
            self._compiled[bucket, n_new] = self._build(bucket, n_new)
        out = self._compiled[bucket, n_new](
            params, jax.device_put(tokens, self._batch_sharding),
            jax.device_put(lengths, self._row_sharding), self._keys(key, len(prompts)),
            jnp.int32(first_step), *self._settings(sampling, len(prompts)))
        return {k: v[:len(prompts)] for k, v in sharding.to_host(out).items()}

    def _keys(self, key: Array, n: int) -> Array:
        """One key as given, or per-row keys padded to the batch (dummy rows reuse the last)."""
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            raise ValueError('expected a typed key (jax.random.key), not raw key data')
        if not jnp.ndim(key):
            return key
        if key.shape != (n,):
            raise ValueError(f'got {key.shape[0]} keys for {n} prompts: give one key, or one '
                             'per prompt')
        # Through the host, like the prompts: every process holds the same keys, and a
        # multi-process mesh takes host values, not an array on one process's device.
        data = np.asarray(jax.random.key_data(key))
        data = np.concatenate([data, np.repeat(data[-1:], self.batch_size - n, axis=0)])
        return jax.random.wrap_key_data(jax.device_put(data, self._row_sharding),
                                        impl=jax.random.key_impl(key))

    def _settings(self, sampling: SamplingParams | Sequence[SamplingParams], n: int):
        """Temperature, top-k and top-p as scalars, or per row (dummy rows greedy)."""
        if isinstance(sampling, SamplingParams):
            return (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
                    jnp.float32(sampling.top_p))
        if len(sampling) != n:
            raise ValueError(f'got {len(sampling)} sampling settings for {n} prompts')
        rows = [*sampling, *[SamplingParams(temperature=0.0)] * (self.batch_size - n)]
        columns = ((np.float32, [r.temperature for r in rows]),
                   (np.int32, [r.top_k for r in rows]), (np.float32, [r.top_p for r in rows]))
        return tuple(jax.device_put(np.asarray(values, dtype), self._row_sharding)
                     for dtype, values in columns)

    def _build(self, prompt_len: int, n_new: int):
        """The jitted generation of `n_new` tokens for prompts of `prompt_len` tokens (a
        bucket)."""
        graphdef, mesh, rules = self.graphdef, self.mesh, self.rules
        stop_ids, pad_id = jnp.asarray(self.stop_ids), self.pad_id
        vocab_size, on_step = self.vocab_size, self.on_step

        def generate(params, tokens_bp, lengths_b, key, first_step, temperature, top_k, top_p):
            with sharding.activation_sharding(mesh, rules):
                sampling = _Sampling(key, first_step, temperature, top_k, top_p, stop_ids,
                                     pad_id, vocab_size, on_step)
                return _generate(nnx.merge(graphdef, params), tokens_bp, lengths_b, sampling,
                                 prompt_len, n_new)

        # Outputs are small and replicated, so every process can read them (multi-host too).
        return jax.jit(generate, out_shardings=sharding.replicated(mesh))


# --- many prompts --------------------------------------------------------------------------
FIRST_WAVE = 16


def sample_many(sampler: Sampler, params: nnx.State, prompts: Sequence[Sequence[int]],
                keys: Array, sampling: SamplingParams, progress: str | None = None
                ) -> list[np.ndarray]:
    """The generated tokens of every prompt (up to and including its stop token), prompt `i`
    drawn with `keys[i]`: a reply depends on its prompt and key only, not on its batch-mates
    or the batch size.

    A batch decodes until its longest reply stops, and at temperatures above 0 one row in a
    batch of dozens often runs to `max_new_tokens` while the median reply is a few tokens. So
    the replies are drawn in waves: every prompt gets `max(FIRST_WAVE, max_new_tokens // 4)`
    tokens, then only the unfinished replies go on, in full batches again, each wave with
    twice the budget of the last (at most what is left). A reply that goes on is prefilled
    anew from its prompt and the tokens it has (one forward pass, which costs a few decoding
    steps) and draws its next tokens from the same keys (`first_step`), so it is the reply
    that one call would have drawn, up to the rounding of prefill against decoding. A prompt
    longer than the context leaves beside `max_new_tokens` keeps its last tokens, as in one
    call. With `progress`, a bar of that name counts finished replies."""
    if keys.shape != (len(prompts),):
        raise ValueError(f'got keys of shape {keys.shape} for {len(prompts)} prompts')
    prompts = [list(sampler.fitted(p)) for p in prompts]
    replies: list[list[int]] = [[] for _ in prompts]
    pending, drawn = list(range(len(prompts))), 0
    budget = min(sampler.max_new_tokens, max(FIRST_WAVE, sampler.max_new_tokens // 4))
    bar = progress_bar(total=len(prompts), desc=progress, unit='reply') if progress else None
    while pending:
        # Batches of similar lengths share a prompt bucket (the order does not change a reply).
        pending.sort(key=lambda r: len(prompts[r]) + len(replies[r]))
        going_on = []
        for start in range(0, len(pending), sampler.batch_size):
            rows = pending[start:start + sampler.batch_size]
            out = sampler(params, [prompts[r] + replies[r] for r in rows], keys[np.asarray(rows)],
                          sampling, max_new_tokens=budget, first_step=drawn)
            finished = len(going_on) + len(rows)
            for r, tokens, length in zip(rows, out['tokens'], out['lengths'], strict=True):
                replies[r] += tokens[:length].tolist()
                stopped = length < budget or tokens[length - 1] in sampler.stop_ids
                if not stopped and drawn + budget < sampler.max_new_tokens:
                    going_on.append(r)
            if bar is not None:
                bar.update(finished - len(going_on))
        pending, drawn = going_on, drawn + budget
        budget = min(2 * budget, sampler.max_new_tokens - drawn)
    if bar is not None:
        bar.close()
    return [np.asarray(reply, np.int32) for reply in replies]


# --- decoding -----------------------------------------------------------------------------------
_BLOCK_AXES = ('batch', 'kv_heads', 'seq', 'head_dim')
_LayerBlocks = list[tuple[list[Array], list[Array]]]  # per layer, key blocks and value blocks
StepCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class _Sampling(NamedTuple):
    """How a token is drawn (traced: changing these does not recompile) and where a row ends."""

    key: Array  # one key, or one per row
    first_step: Array  # the reply's tokens before this call's first (a continuation's)
    temperature: Array
    top_k: Array
    top_p: Array
    stop_ids: Array
    pad_id: int
    vocab_size: int  # ids at or past it (a padded embedding table) are never drawn
    on_step: StepCallback | None  # the host's view of each step (see `Sampler`)


class _Layout(NamedTuple):
    """Where the batch's tokens sit in the cache: every row's prompt ends at slot
    `prompt_len - 1`, after `prompt_len - lengths_b` slots of padding."""

    prompt_len: int
    lengths_b: Array
    slots_c: Array
    valid_bc: Array  # slots holding real tokens: the prompt after its padding, then all new ones


class DecodeCarry(NamedTuple):
    """The state a decoding loop carries from step to step."""

    step: Array  # the step about to run: it feeds `token_b` and draws token `step`
    token_b: Array
    done_b: Array  # rows that have drawn a stop token
    current: list[tuple[Array, Array]]  # per layer, the key and value cache block being written
    previous_keys: list[Array | None]  # per layer, the last key before smearing (`KVCache`)
    out: dict[str, Array]  # the outputs `[B, N]` so far


def _generate(model: GPT, tokens_bp: Array, lengths_b: Array, sampling: _Sampling,
              prompt_len: int, n_new: int) -> dict[str, Array]:
    """`n_new` tokens after the left-padded prompts `tokens_bp` `[B, prompt_len]`: prefill, the
    first token, then one decoding loop per cache block, so that a step reads only the blocks in
    use (decoding is bound by reading the cache, which fills up as generation proceeds)."""
    layers = model.transformer.unstacked_blocks()
    batch = tokens_bp.shape[0]
    block = CACHE_BLOCK
    slots = block * math.ceil((prompt_len + n_new) / block)
    pad_b = prompt_len - lengths_b
    slots_c = jnp.arange(slots)
    layout = _Layout(prompt_len, lengths_b, slots_c, slots_c[None, :] >= pad_b[:, None])
    logits_bv, full, current, previous_keys = _prefill_cache(model, layers, tokens_bp, pad_b,
                                                             layout)
    out = dict(tokens=jnp.full((batch, n_new), sampling.pad_id, jnp.int32),
               logprobs=jnp.zeros((batch, n_new), jnp.float32),
               model_logprobs=jnp.zeros((batch, n_new), jnp.float32),
               mask=jnp.zeros((batch, n_new), jnp.int32))
    token_b, sampled_lp, model_lp = _pick(logits_bv, 0, sampling)
    live_b = jnp.ones((batch,), bool)
    out = _record(out, 0, token_b, sampled_lp, model_lp, live_b, sampling)
    done_b = jnp.isin(token_b, sampling.stop_ids) | _host_stops(sampling, 0, token_b, live_b)
    carry = DecodeCarry(jnp.int32(1), token_b, done_b, current, previous_keys, out)
    block_index = prompt_len // block
    while block_index * block - prompt_len + 1 < n_new:
        end_step = min(n_new, (block_index + 1) * block - prompt_len + 1)
        carry = _decode_block(model, layers, carry, full, block_index, end_step, layout,
                              sampling)
        full = [(_merged(keys), _merged(values)) for keys, values in _joined(full, carry.current)]
        empty = sharding.constrain(jnp.zeros_like(carry.current[0][0]), _BLOCK_AXES)
        carry = carry._replace(current=[(empty, empty)] * len(layers))
        block_index += 1
    return {**carry.out, 'lengths': carry.out['mask'].sum(axis=1)}


def _prefill_cache(model: GPT, layers: Sequence[Block], tokens_bp: Array, pad_b: Array,
                   layout: _Layout) -> tuple[Array, _LayerBlocks, list[tuple[Array, Array]],
                                             list[Array | None]]:
    """Runs the prompts: the logits after them `[B, V]` and, per layer, the cache they start,
    as the read-only blocks joined into one, the block that decoding writes next, and the last
    prompt token's key before smearing (None without smeared keys)."""
    prompt_len = layout.prompt_len
    positions_bp = jnp.maximum(layout.slots_c[None, :prompt_len] - pad_b[:, None], 0)
    segment_ids_bp = layout.valid_bc[:, :prompt_len].astype(jnp.int32)
    logits_bv, (k_lbkph, v_lbkph, previous_lbk1h) = model.prefill(
        tokens_bp, positions_bp, segment_ids_bp, layers)
    prompt_cache = [(_cache_blocks(k_lbkph[i]), _cache_blocks(v_lbkph[i]))
                    for i in range(len(layers))]
    full = [(_merged(keys[:-1]), _merged(values[:-1])) for keys, values in prompt_cache]
    current = [(keys[-1], values[-1]) for keys, values in prompt_cache]
    previous = [None if previous_lbk1h is None else previous_lbk1h[i] for i in range(len(layers))]
    return logits_bv, full, current, previous


def _cache_blocks(kv_bkph: Array) -> list[Array]:
    """A prompt's keys or values `[B, K, P, H]` as cache blocks of `CACHE_BLOCK` slots: the
    prompt fills the first ones, and the last has room for new tokens."""
    n_blocks = kv_bkph.shape[2] // CACHE_BLOCK + 1
    room = n_blocks * CACHE_BLOCK - kv_bkph.shape[2]
    kv_bkch = jnp.pad(kv_bkph, ((0, 0), (0, 0), (0, room), (0, 0)))
    return [sharding.constrain(b, _BLOCK_AXES) for b in jnp.split(kv_bkch, n_blocks, axis=2)]


def _merged(blocks: Sequence[Array]) -> list[Array]:
    """Read-only blocks as one (a copy once per loop, not per step): a step then runs two
    attention matmuls per layer on them rather than two per block."""
    return [sharding.constrain(jnp.concatenate(blocks, axis=2), _BLOCK_AXES)] if blocks else []


def _joined(full: _LayerBlocks, current: list[tuple[Array, Array]]) -> _LayerBlocks:
    """Per layer, the read-only blocks followed by the block being written."""
    return [([*keys, k_bkch], [*values, v_bkch])
            for (keys, values), (k_bkch, v_bkch) in zip(full, current, strict=True)]


def _pick(logits_bv: Array, step: Array | int, sampling: _Sampling):
    """Token `step` `[B]`, drawn with key `fold_in(key, first_step + step)`, and its
    log-probabilities under the sampling distribution and under the model."""
    step = sampling.first_step + step
    drawable_bv = logits_bv
    if sampling.vocab_size < logits_bv.shape[-1]:
        drawable_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < sampling.vocab_size,
                                logits_bv, -jnp.inf)
    log_probs_bv = filter_logits(drawable_bv, sampling.temperature, sampling.top_k,
                                 sampling.top_p)
    if jnp.ndim(sampling.key):  # a key per row
        key = jax.vmap(jax.random.fold_in, in_axes=(0, None))(sampling.key, step)
    else:
        key = jax.random.fold_in(sampling.key, step)
    token_b = sample_tokens(key, log_probs_bv)
    sampled_lp = jnp.take_along_axis(log_probs_bv, token_b[:, None], -1)[:, 0]
    model_lp = jnp.take_along_axis(jax.nn.log_softmax(logits_bv, axis=-1),
                                   token_b[:, None], -1)[:, 0]
    return token_b, sampled_lp, model_lp


def _host_stops(sampling: _Sampling, step: Array | int, token_b: Array,
                live_b: Array) -> Array | bool:
    """The rows that the host callback stops after this step (none without a callback). The
    call is ordered: the host sees the steps one after another."""
    if sampling.on_step is None:
        return False

    def on_host(*arrays):  # as NumPy: indexing a jax.Array on the host dispatches an op
        return np.asarray(sampling.on_step(*map(np.asarray, arrays)), bool)

    return io_callback(on_host, jax.ShapeDtypeStruct(live_b.shape, jnp.bool_),
                       jnp.int32(step), token_b, live_b, ordered=True)


def _record(out: dict[str, Array], step: Array | int, token_b: Array, sampled_lp: Array,
            model_lp: Array, live_b: Array, sampling: _Sampling) -> dict[str, Array]:
    """`out` with token `step` written in the rows still generating (`live_b`), padding in the
    others."""
    values = dict(tokens=jnp.where(live_b, token_b, sampling.pad_id),
                  logprobs=jnp.where(live_b, sampled_lp, 0.0),
                  model_logprobs=jnp.where(live_b, model_lp, 0.0),
                  mask=live_b.astype(jnp.int32))
    return {k: out[k].at[:, step].set(values[k]) for k in out}


def _decode_block(model: GPT, layers: Sequence[Block], carry: DecodeCarry, full: _LayerBlocks,
                  block_index: int, end_step: int, layout: _Layout,
                  sampling: _Sampling) -> DecodeCarry:
    """Decode steps up to `end_step` (or until every row has stopped) whose token goes into
    cache block `block_index`, carried and written; earlier blocks (`full`) are only read, and
    later ones not at all."""
    visible = (block_index + 1) * CACHE_BLOCK

    def cond(carry: DecodeCarry):
        return (carry.step < end_step) & ~jnp.all(carry.done_b)

    def body(carry: DecodeCarry) -> DecodeCarry:
        step = carry.step
        slot = layout.prompt_len + step - 1  # where the previous token is written
        mask_bc = layout.valid_bc[:, :visible] & (layout.slots_c[None, :visible] <= slot)
        position_b1 = (layout.lengths_b + step - 1)[:, None]
        caches = [KVCache(keys, values, slot - block_index * CACHE_BLOCK, previous)
                  for (keys, values), previous in zip(_joined(full, carry.current),
                                                      carry.previous_keys, strict=True)]
        logits_b1v, caches = model.decode(carry.token_b[:, None], position_b1, layers, caches,
                                          mask_bc[:, None])
        current = [(c.keys[-1], c.values[-1]) for c in caches]
        previous_keys = [c.previous_key for c in caches]
        next_b, sampled_lp, model_lp = _pick(logits_b1v[:, 0], step, sampling)
        out = _record(carry.out, step, next_b, sampled_lp, model_lp, ~carry.done_b, sampling)
        done_b = (carry.done_b | jnp.isin(next_b, sampling.stop_ids)
                  | _host_stops(sampling, step, next_b, ~carry.done_b))
        return DecodeCarry(step + 1, next_b, done_b, current, previous_keys, out)

    return jax.lax.while_loop(cond, body, carry)
