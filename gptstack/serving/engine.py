"""The serving engine: one thread owns a language model and every program compiled for it;
requests from any number of HTTP handlers reach it through a bounded queue.

- **Batching.** The engine waits for a first row of work, gathers whatever else arrives within
  a short window (`gather_s`), and runs up to `batch_size` rows of one kind in one call of a
  compiled program: generation by the library's KV-cache `Sampler`, scoring by one forward pass.
  Shapes are fixed (the batch, prompt buckets of powers of two), and every program is compiled
  by `warm_up` before the first request, so no request waits for a compile.
- **Rows are independent.** Each row has its own sampling setting and key (its seed, or a fresh
  one), so a reply is the same alone or beside others in a batch.
- **Streaming.** The sampler calls back to the host after every decoding step; the engine turns
  each row's tokens so far into text and sends the new part as soon as it is whole: never half of
  a UTF-8 character, and never text that may turn out to begin a stop string. The same callback
  ends a row at a stop string, at its own `max_tokens`, or when its client has gone away, so
  generation really stops.
- **Scoring** (`echo` with `logprobs`): each row runs through the model once, after an implicit
  `<|endoftext|>` (every training document starts with one), and gets the log-probability of
  each of its tokens and the most likely alternatives at each position.
- **Rewards**: an engine on a reward model scores conversations with the library's reward
  scorer (`RewardModel.scorer`), read at the reward token exactly as training reads it; it
  generates no text.

Results go back through each row's `emit` callable, which must be safe to call from the engine
thread (the HTTP side hands the events to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptstack import sharding
from gptstack.data.tokenizer import Tokenizer
from gptstack.lineage import Policy, RewardModel
from gptstack.sampling import MIN_PROMPT_BUCKET, Sampler, SamplingParams

log = logging.getLogger(__name__)
MAX_TOP_LOGPROBS = 5  # alternatives per position a scoring row may ask for (OpenAI's limit)
REPLACEMENT_CHARACTER = '\ufffd'  # what decoding shows for an incomplete UTF-8 sequence


class QueueFullError(Exception):
    """The engine has `max_queue` rows waiting: the client should retry later."""


# --- the work -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of row `index`, safe to show."""

    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """Row `index` is done: its whole text, its token ids, why it ended (`stop` or `length`),
    and for scoring rows the per-token log-probabilities."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: dict | None = None
    reward: float | None = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """Row `index` could not be served (the message says why)."""

    index: int
    message: str


Event = Delta | Finished | Failed


@dataclasses.dataclass
class Request:
    """What the rows of one HTTP request share: where their events go, and whether the
    client is still there."""

    emit: Callable[[Event], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class GenerationRow:
    """Generate after `prompt` (ids, the chat template already applied). `chat` rows return
    the assistant's reply (the text of its turn); others the decoded tokens, special tokens
    left out. Generation stops at a stop token, before the first of the `stop` strings, or
    after `max_tokens` tokens."""

    request: Request
    index: int
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False
    logprobs: int | None = None  # with a value, score the generated tokens afterwards,
    echo: bool = False  # and the prompt's too (after its leading <|endoftext|>)


@dataclasses.dataclass
class ScoringRow:
    """Score `prompt` (ids) token by token, with `top` alternatives per position; with
    `generate`, also pick one more token at its end (greedy at temperature 0, else drawn with
    `seed`)."""

    request: Request
    index: int
    prompt: list[int]
    top: int
    generate: bool = False
    temperature: float = 0.0
    seed: int | None = None


@dataclasses.dataclass
class RewardRow:
    """The reward model's score of `completion` (the assistant's turns) after `prompt` (the
    conversation before them)."""

    request: Request
    index: int
    prompt: list[dict]
    completion: list[dict]


Row = GenerationRow | ScoringRow | RewardRow


# --- text as it streams -------------------------------------------------------------------------
class _Stream:
    """A generation row's tokens so far, the text they make, and the text already sent.

    The text is a row's content tokens decoded: for a chat row, the assistant turn's tokens up
    to the first role marker or `<|end_of_turn|>` (`<|endoftext|>` and `<|pad|>` left out), as
    `gptstack.chat.reply_text` reads a reply; for a completion row, every token that is not a
    special token. While the row runs, each step decodes only its last few tokens (the text
    grows by whole characters only); the row's last step decodes it whole.
    """

    def __init__(self, row: GenerationRow, tokenizer: Tokenizer, stop_ids: set[int],
                 ends: set[int], skipped: set[int]):
        self.row, self.decode, self.stop_ids = row, tokenizer.decode, stop_ids
        self.ends, self.skipped = ends, skipped  # tokens that end the content, or are not in it
        self.tokens: list[int] = []
        self.content: list[int] = []
        self.content_ended = False
        self.text = ''  # the content decoded up to `self._read`, whole characters only
        # The tokens decoded last step begin at `_prefix` (context), the new ones at `_read`.
        self._prefix = self._read = 0
        self.sent = ''
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Takes one new token, decides whether the row ends here, and sends the text that is
        now safe to send."""
        self.tokens.append(token)
        if not self.content_ended:
            if token in self.ends:
                self.content_ended = True
            elif token not in self.skipped:
                self.content.append(token)
                self._extend_text()
        if token in self.stop_ids or _first_stop(self.text, self.row.stop) is not None:
            self.finish_reason = 'stop'
        elif len(self.tokens) >= self.row.max_tokens:
            self.finish_reason = 'length'
        if self.done:
            self._send(self._final_text())
        else:
            self._send(self.text[:len(self.text) - _held_back(self.text, self.row.stop)])

    def finish(self, logprobs: dict | None = None) -> None:
        """Ends the row: a row that ran out of the sampler's budget ends by `length`, and any
        text held back is sent."""
        if not self.done:
            self.finish_reason = 'length'
            self._send(self._final_text())
        self.row.request.emit(Finished(self.row.index, self.sent, self.tokens,
                                       self.finish_reason, logprobs))

    def _extend_text(self) -> None:
        """Decodes the new tokens after a few earlier ones (a token's text may depend on the one
        before it) and keeps the text once it ends in a whole character."""
        before = self.decode(self.content[self._prefix:self._read])
        after = self.decode(self.content[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHARACTER):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.content)

    def _final_text(self) -> str:
        """The whole content decoded, cut before the first stop string."""
        text = self.decode(self.content)
        cut = _first_stop(text, self.row.stop)
        return text if cut is None else text[:cut]

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.row.request.emit(Delta(self.row.index, text[len(self.sent):]))
            self.sent = text


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins (None: nowhere)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could begin a stop string: not sent yet."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


# --- the engine ---------------------------------------------------------------------------------
class Engine:
    """Serves one model from a thread of its own: a language model (`Policy`) generates and
    scores text, a reward model (`RewardModel`) scores conversations.

    Args:
        model: the loaded model, tokenizer and mesh.
        batch_size: rows per compiled call (rounded up to the mesh's batch shards).
        max_new_tokens: the most tokens one row may generate; prompts may use the rest of the
            context.
        max_queue: rows that may wait; `submit` raises `QueueFullError` past it.
        gather_s: how long to wait for more rows after the first one arrives.
    """

    def __init__(self, model: Policy | RewardModel, *, batch_size: int = 8,
                 max_new_tokens: int = 128, max_queue: int = 256, gather_s: float = 0.02):
        self.model, self.tokenizer = model, model.tokenizer
        tok = self.tokenizer
        self.context = model.config.max_seq_len
        self.max_queue, self.gather_s = max_queue, gather_s
        self.generates = isinstance(model, Policy)
        self.batch_size = sharding.round_to_batch_shards(model.mesh, batch_size)
        if not self.generates:
            # Rows as long as the reward model was trained on, within its context: longer ones
            # are refused, not cut, and every request runs the one program warm-up compiles.
            self._rewards = model.scorer(self.batch_size, fixed_width=True)
            self.reward_row_tokens = min(self.context, model.meta['config']['data']['seq_len'])
            self.max_new_tokens = self.max_prompt_tokens = 0
        else:
            self.stop_ids = {tok.eot_id, tok.end_of_turn_id}
            self.sampler = Sampler(model.graphdef, model.config, model.mesh, 'fsdp',
                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   stop_ids=sorted(self.stop_ids), pad_id=tok.pad_id,
                                   vocab_size=tok.vocab_size, on_step=self._on_step)
            self.max_new_tokens = max_new_tokens
            # The longest prompt generation takes: the context less the generation budget.
            self.max_prompt_tokens = self.sampler.prompt_bucket(self.context)
            self._special_ids = set(tok.special_ids.values())
            self._score = make_scorer(model, self.batch_size)
        self._base_key = jax.random.key(secrets.randbits(31))
        self._unseeded = 0
        self._waiting: collections.deque[Row] = collections.deque()
        self._lock = threading.Condition()
        self._streams: list[_Stream] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the HTTP side's interface --------------------------------------------------------
    def submit(self, rows: Sequence[Row]) -> None:
        """Queues the rows of one request (all or none)."""
        with self._lock:
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFullError(f'{len(self._waiting)} rows are waiting (at most '
                                     f'{self.max_queue}); retry shortly')
            self._waiting.extend(rows)
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name='engine', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after the batch in progress; rows still waiting fail."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        for row in self._waiting:
            row.request.emit(Failed(row.index, 'the server is shutting down'))

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def warm_up(self, progress: Callable[[str], None] = log.info) -> None:
        """Compiles every program requests can reach: generation for each prompt bucket and
        scoring for each length bucket (one batch of dummy rows each), or the reward model's
        scoring."""
        if not self.generates:
            progress(f'compiling reward scoring for rows of {self.reward_row_tokens} tokens')
            self._rewards([[{'role': 'user', 'content': ''}]],
                          [[{'role': 'assistant', 'content': ''}]])
            return
        buckets = sorted({self.sampler.prompt_bucket(n)
                          for n in range(1, self.max_prompt_tokens + 1)})
        for bucket in buckets:
            progress(f'compiling generation for prompts of up to {bucket} tokens')
            self._streams = []  # the callback stops every row at once
            self._sample([[self.tokenizer.eot_id] * bucket], [None], [SamplingParams()])
        for length in _score_buckets(self.context):
            progress(f'compiling scoring for rows of up to {length} tokens')
            self._score(np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32),
                        np.zeros(self.batch_size, np.int32))

    # --- the engine thread ----------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                if isinstance(batch[0], GenerationRow):
                    self._generate(batch)
                elif isinstance(batch[0], ScoringRow):
                    self._score_rows(batch)
                else:
                    self._reward_rows(batch)
            except Exception as error:  # the server goes on; these rows fail
                log.exception('a batch of %d rows failed', len(batch))
                for row in batch:
                    row.request.emit(Failed(row.index, f'{type(error).__name__}: {error}'))

    def _next_batch(self) -> list[Row] | None:
        """Waits for a row, gathers more for `gather_s`, and takes up to a batch of rows of the
        kind of the oldest one, skipping rows whose client has gone."""
        with self._lock:
            batch = []
            while not batch:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return None
                deadline = time.monotonic() + self.gather_s
                while len(self._waiting) < self.batch_size and time.monotonic() < deadline:
                    self._lock.wait(deadline - time.monotonic())
                kind, keep = type(self._waiting[0]), collections.deque()
                while self._waiting:
                    row = self._waiting.popleft()
                    if row.request.cancelled.is_set():
                        continue
                    fits = type(row) is kind and len(batch) < self.batch_size
                    (batch if fits else keep).append(row)
                self._waiting = keep
            return batch

    def _key(self, seed: int | None) -> jax.Array:
        """A row's key: from its seed (taken modulo 2**32), or a fresh one."""
        if seed is not None:
            return jax.random.key(seed % 2**32)
        self._unseeded += 1
        return jax.random.fold_in(self._base_key, self._unseeded)

    def _sample(self, prompts: list[list[int]], seeds: list[int | None],
                settings: list[SamplingParams]) -> None:
        """One call of the sampler, always on a full batch (dummy rows, which the callback
        stops at once, fill it): every array has one shape, so nothing compiles per request."""
        dummies = self.batch_size - len(prompts)
        keys = jnp.stack([self._key(seed) for seed in seeds] + [self._key(0)] * dummies)
        self.sampler(self.model.params, prompts + [[self.tokenizer.eot_id]] * dummies, keys,
                     settings + [SamplingParams(temperature=0.0)] * dummies)

    def _generate(self, rows: list[GenerationRow]) -> None:
        tok = self.tokenizer
        chat_ends = {tok.end_of_turn_id, *tok.role_ids.values()}
        self._streams = [
            _Stream(row, tok, self.stop_ids, chat_ends, {tok.eot_id, tok.pad_id}) if row.chat
            else _Stream(row, tok, self.stop_ids, set(), self._special_ids) for row in rows]
        self._sample([row.prompt for row in rows], [row.seed for row in rows],
                     [row.sampling for row in rows])
        scores = self._generated_logprobs(self._streams)
        for stream, logprobs in zip(self._streams, scores, strict=True):
            stream.finish(logprobs)
        self._streams = []

    def _on_step(self, step, tokens, live) -> np.ndarray:
        """The sampler's host callback: each live row takes its token; the rows that end here,
        whose client has gone, and the batch's dummy rows stop."""
        del step
        stop = np.ones(len(tokens), bool)
        for i, stream in enumerate(self._streams):
            if live[i] and not stream.done:
                stream.push(int(tokens[i]))
            stop[i] = stream.done or stream.row.request.cancelled.is_set()
        return stop

    def _generated_logprobs(self, streams: list[_Stream]) -> list[dict | None]:
        """For rows that asked for them, the log-probabilities of the generated tokens, from
        one scoring pass over prompt and reply."""
        wanted = [s for s in streams if s.row.logprobs is not None]
        results = {}
        for start in range(0, len(wanted), self.batch_size):
            chunk = wanted[start:start + self.batch_size]
            scored = self._forward([s.row.prompt[1:] + s.tokens for s in chunk],
                                   max(s.row.logprobs for s in chunk))
            for stream, (logp, top) in zip(chunk, scored, strict=True):
                begin = 0 if stream.row.echo else len(stream.row.prompt) - 1
                results[id(stream)] = self._logprobs_json(
                    (stream.row.prompt[1:] + stream.tokens)[begin:], logp[begin:], top[begin:],
                    stream.row.logprobs)
        return [results.get(id(s)) for s in streams]

    def _reward_rows(self, rows: list[RewardRow]) -> None:
        rewards = self._rewards([row.prompt for row in rows], [row.completion for row in rows])
        for row, reward in zip(rows, rewards, strict=True):
            row.request.emit(Finished(row.index, '', [], 'stop', reward=float(reward)))

    def _score_rows(self, rows: list[ScoringRow]) -> None:
        scored = self._forward([row.prompt for row in rows], max(r.top for r in rows),
                               with_next=True)
        for row, (logp, top, next_logp_v) in zip(rows, scored, strict=True):
            ids = list(row.prompt)
            if row.generate:
                if row.temperature <= 0:
                    token = int(np.argmax(next_logp_v))
                else:
                    rng = np.random.default_rng(row.seed)
                    probs = np.exp((next_logp_v - next_logp_v.max()) / row.temperature)
                    token = int(rng.choice(len(probs), p=probs / probs.sum()))
                ids.append(token)
                logp = np.append(logp, next_logp_v[token])
                order = np.argsort(-next_logp_v)[:MAX_TOP_LOGPROBS]
                top = [*top, list(zip(order.tolist(), next_logp_v[order].tolist(),
                                      strict=True))]
            text = self.tokenizer.decode(ids[len(row.prompt):]) if row.generate else ''
            row.request.emit(Finished(row.index, text, ids[len(row.prompt):],
                                      'length', self._logprobs_json(ids, logp, top, row.top)))

    def _forward(self, rows: list[list[int]], top: int, with_next: bool = False):
        """Per row: the log-probability of each token after `<|endoftext|>` `[n]`, its `top`
        alternatives at each position, and (`with_next`) the log-probabilities of the token
        after the row `[V]`."""
        length = next(b for b in _score_buckets(self.context) if b >= 1 + max(map(len, rows)))
        tokens = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
        for i, row in enumerate(rows):
            tokens[i, :1 + len(row)] = [self.tokenizer.eot_id, *row]
        lengths = np.zeros(self.batch_size, np.int32)
        lengths[:len(rows)] = [len(row) for row in rows]
        token_logp, top_logp, top_ids, next_logp = self._score(tokens, lengths)
        out = []
        for i, row in enumerate(rows):
            n = len(row)
            alternatives = [list(zip(top_ids[i, t, :top].tolist(),
                                     top_logp[i, t, :top].tolist(), strict=True))
                            for t in range(n)]
            result = (token_logp[i, :n], alternatives)
            if with_next:
                result += (next_logp[i],)
            out.append(result)
        return out

    def _logprobs_json(self, ids: list[int], logp, top, k: int) -> dict:
        """OpenAI's `logprobs` object for `ids`: tokens as text, their log-probabilities, the
        top `k` alternatives at each, and each token's offset in the joined text."""
        pieces = [self.tokenizer.decode([i]) for i in ids]
        offsets = np.cumsum([0, *map(len, pieces)])[:-1].tolist()
        alternatives = [{self.tokenizer.decode([t]): float(v) for t, v in position[:k]}
                        for position in top]
        return dict(tokens=pieces, token_logprobs=[float(v) for v in logp],
                    top_logprobs=alternatives, text_offset=offsets)


def _score_buckets(context: int) -> list[int]:
    """Row lengths the scoring pass is compiled for: powers of two up to the context."""
    buckets, length = [], MIN_PROMPT_BUCKET
    while length < context:
        buckets.append(length)
        length *= 2
    return [*buckets, context]


def make_scorer(policy: Policy, batch_size: int):
    """`score(tokens [B, T], lengths [B]) -> (token_logp [B, T-1], top_logp [B, T-1, k],
    top_ids [B, T-1, k], next_logp [B, V])` as NumPy: the log-probability of each next token,
    the `k` most likely tokens at each position, and the distribution of the token after each
    row's last (`tokens[b, lengths[b]]`). A token's log-probability and the alternatives' are
    read from one array, so the most likely alternative equals a greedy token's own value to
    the bit (what clients compare to tell whether a continuation is the greedy one)."""
    rows = sharding.batch_sharding(policy.mesh, 'fsdp', batch_size)
    row_values = sharding.named_sharding(policy.mesh, ('batch',), 'fsdp')
    graphdef, mesh = policy.graphdef, policy.mesh

    def score(params, tokens_bt, lengths_b):
        with sharding.activation_sharding(mesh, 'fsdp'):
            logits_btv = nnx.merge(graphdef, params)(tokens_bt)
        logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
        token_logp_bt = jnp.take_along_axis(logp_btv[:, :-1], tokens_bt[:, 1:, None],
                                            axis=-1)[..., 0]
        top_logp, top_ids = jax.lax.top_k(logp_btv[:, :-1], MAX_TOP_LOGPROBS)
        next_logp_bv = jnp.take_along_axis(logp_btv, lengths_b[:, None, None], axis=1)[:, 0]
        return token_logp_bt, top_logp, top_ids, next_logp_bv

    jitted = jax.jit(score, out_shardings=sharding.replicated(mesh))
    return lambda tokens, lengths: sharding.to_host(jitted(
        policy.params, jax.device_put(tokens, rows), jax.device_put(lengths, row_values)))
