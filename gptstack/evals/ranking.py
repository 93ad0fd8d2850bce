"""How well a reward model ranks held-out comparisons: the pairs it orders as the labeler did,
its ranking loss, its agreement with the gold scorer, and the calibration of its win
probabilities `sigmoid(r_i - r_j)`.

Inputs are a held-out set's rewards, ranks and validity `[groups, K]` (rank 0 is the best; equal
ranks tie and make no pair; invalid slots are padding).
"""

from __future__ import annotations

import math

import numpy as np

from gptstack import stats

CALIBRATION_BINS = 10


def pair_table(rewards_bk: np.ndarray, ranks_bk: np.ndarray, valid_bk: np.ndarray,
               gold: list | None = None) -> dict[str, np.ndarray]:
    """One entry per ordered pair `(i better than j)` of the held-out groups: the rewards of the
    better and the worse completion, its group, and (with `gold`) the gold score difference."""
    out = {'better': [], 'worse': [], 'group': [], 'gold_diff': []}
    for b in range(len(rewards_bk)):
        for i in range(rewards_bk.shape[1]):
            for j in range(rewards_bk.shape[1]):
                if valid_bk[b, i] and valid_bk[b, j] and ranks_bk[b, i] < ranks_bk[b, j]:
                    out['better'].append(rewards_bk[b, i])
                    out['worse'].append(rewards_bk[b, j])
                    out['group'].append(b)
                    out['gold_diff'].append(gold[b][i] - gold[b][j] if gold else math.nan)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def ranking_metrics(rewards_bk, ranks_bk, valid_bk, gold=None, margin=0.0) -> dict:
    """Held-out loss (mean over prompts), pairwise accuracy with its standard error, mean
    rewards, and agreement with the gold scorer on pairs whose gold scores differ."""
    pairs = pair_table(rewards_bk, ranks_bk, valid_bk, gold)
    diff = pairs['better'] - pairs['worse']
    loss = np.logaddexp(0.0, -(diff - margin))
    groups = np.unique(pairs['group'])
    per_group = [loss[pairs['group'] == g].mean() for g in groups]
    correct = (diff > 0).astype(np.float64)
    metrics = {'val_loss': float(np.mean(per_group)), 'val_accuracy': float(correct.mean()),
               'val_accuracy_stderr': stats.mean_and_stderr(correct)[1],
               'val_pairs': len(correct), 'val_reward_better': float(pairs['better'].mean()),
               'val_reward_worse': float(pairs['worse'].mean()),
               'val_reward_std': float(np.nanstd(np.where(valid_bk > 0, rewards_bk, np.nan)))}
    if gold is not None:
        # Every pair with different gold scores, whatever the (noisy) labeler said.
        agree = []
        for b, g in enumerate(gold):
            for i in range(len(g)):
                for j in range(len(g)):
                    if g[i] > g[j]:
                        agree.append(float(rewards_bk[b, i] > rewards_bk[b, j]))
        metrics['gold_agreement'], metrics['gold_agreement_stderr'] = stats.mean_and_stderr(agree)
    return metrics


def calibration(rewards_bk, ranks_bk, valid_bk, bins: int = CALIBRATION_BINS):
    """`(predicted, observed, count)` per bin of the predicted probability that the first
    completion of a pair wins, `sigmoid(r_i - r_j)`, over both orders of every pair."""
    pairs = pair_table(rewards_bk, ranks_bk, valid_bk)
    diff = pairs['better'] - pairs['worse']
    predicted = 1 / (1 + np.exp(-np.concatenate([diff, -diff])))
    observed = np.concatenate([np.ones_like(diff), np.zeros_like(diff)])
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    rows = [(predicted[which == k].mean(), observed[which == k].mean(), int((which == k).sum()))
            for k in range(bins) if (which == k).any()]
    return [np.asarray(col) for col in zip(*rows, strict=True)]
