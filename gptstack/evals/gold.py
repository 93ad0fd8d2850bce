"""Gold scores: how well a policy's replies solve the embedded tasks, by their exact scorer.

SFT's evaluation, the reward stage's labeler and best-of-N, PPO's held-out evaluation and the
pipeline's comparison all score replies here; a prompt's score is the mean over its replies.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from gptstack import stats
from gptstack.chat import reply_text, sample_replies, sample_reply_tokens
from gptstack.data import tasks
from gptstack.data.tokenizer import Tokenizer
from gptstack.rollout import reply_log_probs
from gptstack.sampling import Sampler, SamplingParams


def conversations(held_out: Sequence[tasks.Task]) -> list[list[dict]]:
    """The tasks as conversations awaiting the assistant's answer."""
    return [t.messages(with_answer=False) for t in held_out]


def score(held_out: Sequence[tasks.Task], replies: Sequence[Sequence[str]]) -> np.ndarray:
    """`[P, n]` gold scores of `n` replies to each of `P` tasks."""
    return np.asarray([[tasks.score(t, r) for r in rs]
                       for t, rs in zip(held_out, replies, strict=True)])


def sample_and_score(sampler: Sampler, params, tokenizer: Tokenizer,
                     held_out: Sequence[tasks.Task], key: jax.Array, sampling: SamplingParams,
                     n: int = 1, progress: str | None = None):
    """`(scores [P, n], replies)`: `n` replies of the policy to each task and their scores."""
    replies = sample_replies(sampler, params, tokenizer, conversations(held_out), key, sampling,
                             n, progress=progress)
    return score(held_out, replies), replies


def modes_summary(sampler: Sampler, params, tokenizer: Tokenizer,
                  held_out: Sequence[tasks.Task], key: jax.Array,
                  modes: dict[str, SamplingParams], reference=None) -> dict[str, float]:
    """For each `{name: sampling}` decoding, the gold score of the policy's replies to the tasks
    (`summary`) and its mean by task level (`by_level`), all drawn with `key`.

    With `reference` (parameters of the sampler's model), also the policy's KL to that model on
    its replies of the mode named 'sampled': `val/kl` and `val/kl_stderr`, the mean over prompts
    of `log π(reply) - log π_ref(reply)` (k1, an unbiased estimate where that mode samples at
    temperature 1)."""
    metrics = {}
    levels = [t.level for t in held_out]
    for name, sampling in modes.items():
        prompts, tokens = sample_reply_tokens(sampler, params, tokenizer,
                                              conversations(held_out), key, sampling)
        per_prompt = score(held_out, [[reply_text(tokenizer, t)] for t in tokens])[:, 0]
        metrics.update(summary(per_prompt, name))
        metrics.update(by_level(per_prompt, levels, name))
        if reference is not None and name == 'sampled':
            kl = (reply_log_probs(sampler.graphdef, params, sampler, prompts, tokens)
                  - reply_log_probs(sampler.graphdef, reference, sampler, prompts, tokens))
            mean, stderr = stats.mean_and_stderr(kl)
            metrics.update({'val/kl': mean, 'val/kl_stderr': stderr})
    return metrics


def summary(per_prompt: np.ndarray, name: str) -> dict[str, float]:
    """`{gold/<name>, gold/<name>_stderr}` of per-prompt scores."""
    mean, stderr = stats.mean_and_stderr(per_prompt)
    return {f'gold/{name}': mean, f'gold/{name}_stderr': stderr}


def by_group(per_prompt: np.ndarray, labels: Sequence) -> dict:
    """`{label: mean score of its prompts}`, labels sorted; a prompt labelled None is in no
    group."""
    labels = np.asarray(labels, dtype=object)
    return {label: float(per_prompt[labels == label].mean())
            for label in sorted({x for x in labels if x is not None})}


def by_family(per_prompt: np.ndarray, families: Sequence[str | None],
              name: str) -> dict[str, float]:
    """`{gold/<name>/<family>: mean}` for each task family among the prompts (None: not a
    task)."""
    groups = by_group(per_prompt, families)
    return {f'gold/{name}/{family}': mean for family, mean in groups.items()}


def by_level(per_prompt: np.ndarray, levels: Sequence[int | None],
             name: str) -> dict[str, float]:
    """`{gold/<name>/level<k>: mean}` for each task level among the prompts (None: not a
    task)."""
    groups = by_group(per_prompt, levels)
    return {f'gold/{name}/level{level}': mean for level, mean in groups.items()}
