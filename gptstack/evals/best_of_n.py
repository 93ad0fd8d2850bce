"""Best-of-N: draw N replies from the policy and keep the one the reward model scores highest.

`best_of_n` is the sampler's answer with a reward model in the loop. `expected_best_of_n`
measures it without bias from one pool of M >= N samples per prompt: the sample with the
i-th lowest reward (0-based) is the reward model's pick of a random N-subset of the pool with
probability C(i, N-1) / C(M, N), so the expected gold score of best-of-N is an exact weighted
mean over the pool, for every N <= M at once.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from gptstack import sharding, stats
from gptstack.chat import sample_replies
from gptstack.data.preference import completion_row
from gptstack.data.tokenizer import Tokenizer
from gptstack.evals.overoptimization import best_of_n_kl

ScoreFn = Callable[[Sequence[list[dict]], Sequence[list[dict]]], np.ndarray]


def reward_scorer(score_fn, params, tokenizer: Tokenizer, batch_size: int, seq_len: int, *,
                  fixed_width: bool = False) -> ScoreFn:
    """`scorer(prompts, completions) -> rewards [n]` over a jitted `score_fn(params, tokens,
    positions, segment_ids)` (see `gptstack.steps.reward.make_score_fn`), in padded batches of
    `batch_size` rows; a row longer than `seq_len` keeps its last `seq_len` tokens. The rows of
    one call are as long as its longest, rounded up to a multiple of 32 (a program for each
    such width), or with `fixed_width` always `seq_len` (one program, as a server wants)."""
    def scorer(prompts, completions) -> np.ndarray:
        rows = [completion_row(tokenizer, p, c)[-seq_len:]
                for p, c in zip(prompts, completions, strict=True)]
        width = seq_len if fixed_width else min(
            seq_len, -(-max(map(len, rows), default=1) // 32) * 32)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
            segments = np.zeros((batch_size, width), np.int32)
            for i, row in enumerate(chunk):
                tokens[i, :len(row)], segments[i, :len(row)] = row, 1
            positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
            out.append(sharding.to_host(score_fn(params, tokens, positions,
                                                 segments))[:len(chunk)])
        return np.concatenate(out)

    return scorer


def sample_and_score(sampler, policy_params, tokenizer: Tokenizer, scorer: ScoreFn,
                     conversations: Sequence[list[dict]], n: int, key: jax.Array, sampling,
                     progress: str | None = None) -> tuple[list[list[str]], np.ndarray]:
    """`n` sampled replies to each conversation and their rewards `[len(conversations), n]`."""
    replies = sample_replies(sampler, policy_params, tokenizer, conversations, key, sampling, n,
                             progress=progress)
    rewards = scorer([c for c in conversations for _ in range(n)],
                     [[{'role': 'assistant', 'content': r}] for rs in replies for r in rs])
    return replies, rewards.reshape(len(conversations), n)


def best_of_n(sampler, policy_params, tokenizer: Tokenizer, scorer: ScoreFn,
              conversations: Sequence[list[dict]], n: int, key: jax.Array,
              sampling) -> tuple[list[str], np.ndarray]:
    """The highest-reward reply of `n` samples for each conversation, and all the rewards
    `[len(conversations), n]`."""
    replies, rewards = sample_and_score(sampler, policy_params, tokenizer, scorer, conversations,
                                        n, key, sampling)
    return [rs[int(np.argmax(r))] for rs, r in zip(replies, rewards, strict=True)], rewards


def expected_best_of_n(rewards_pm: np.ndarray, gold_pm: np.ndarray, n: int) -> np.ndarray:
    """`[P]`: each prompt's expected gold score of the reward model's pick among `n` samples
    drawn without replacement from its pool of `M` (`rewards_pm`, `gold_pm` are `[P, M]`)."""
    m = rewards_pm.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f'best-of-{n} needs 1 <= n <= {m} samples per prompt')
    order = np.argsort(rewards_pm, axis=1, kind='stable')
    gold_sorted = np.take_along_axis(gold_pm, order, axis=1)
    weights = np.array([math.comb(i, n - 1) for i in range(m)], np.float64) / math.comb(m, n)
    return gold_sorted @ weights


def curve(rewards_pm: np.ndarray, gold_pm: np.ndarray) -> dict[int, dict]:
    """Best-of-N for N = 1, 2, 4, ... up to the pool of `M` samples per prompt: the gold score
    of the reward model's pick (`rm`, mean and standard error over prompts), its gain over
    N = 1 paired by prompt (far less noisy than the two means), the pick of the gold scorer
    itself (`oracle`, ties broken by the reward model: the ceiling of any reward model), the
    reward model's score of its pick (`proxy`) and best-of-N's KL from the policy (`kl`);
    from N = 2 on, the paired gain over the N before (`step_gain`, `step_gain_stderr`)."""
    out, n = {}, 1
    single = previous = expected_best_of_n(rewards_pm, gold_pm, 1)
    while n <= rewards_pm.shape[1]:
        by_rm = expected_best_of_n(rewards_pm, gold_pm, n)
        by_gold = expected_best_of_n(gold_pm + 1e-9 * rewards_pm, gold_pm, n)
        mean, stderr = stats.mean_and_stderr(by_rm)
        gain, gain_stderr = stats.paired(by_rm, single)
        out[n] = {'rm': mean, 'rm_stderr': stderr, 'gain': gain, 'gain_stderr': gain_stderr,
                  'oracle': float(by_gold.mean()),
                  # The reward model's own score of its pick (the proxy) and the distance the
                  # pick moved from the policy, for the over-optimisation fits.
                  'proxy': float(expected_best_of_n(rewards_pm, rewards_pm, n).mean()),
                  'kl': float(best_of_n_kl(n))}
        if n > 1:
            out[n]['step_gain'], out[n]['step_gain_stderr'] = stats.paired(by_rm, previous)
        previous, n = by_rm, n * 2
    return out


# The reward stage's best-of-N curve, in its workdir (keys are N as strings).
CURVE_FILE = 'best_of_n.json'


def read_curve(path) -> dict[int, dict]:
    """A curve written by the reward stage (`CURVE_FILE`), keyed by N."""
    return {int(n): point for n, point in json.loads(pathlib.Path(path).read_text()).items()}
