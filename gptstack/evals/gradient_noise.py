"""How much of a policy gradient is signal: the agreement of gradients from disjoint batches.

Write the gradient of one batch of `B` rollouts as `g = s + n_B`: the true gradient `s` plus
sampling noise with `E|n_B|^2 = tr(Σ) / B`. Two independent batches agree only through `s`, so
their cosine estimates the signal's share of a batch gradient's squared norm,

    E[cos(g_1, g_2)] ≈ |s|^2 / (|s|^2 + tr(Σ)/B) = c,

and the batch at which signal and noise are equal, McCandlish et al.'s (2018) simple noise
scale, is `B_noise = tr(Σ) / |s|^2 = B (1 - c) / c`. A batch of `k B` rollouts has the
signal share `k B / (k B + B_noise)`. An optimiser that normalises its steps (Adam moves every
weight by about its learning rate) turns a gradient of small `c` into steps that are mostly
noise: KL spent without reward.

`policy_gradient` is the gradient of the RL stage's actor loss at its first update of an
iteration (probability ratio 1, the clip inactive, the loss the mean over response tokens):
REINFORCE with the given advantages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptstack.steps import ppo


def make_policy_gradient(graphdef):
    """Jitted `gradient(params, rows, advantages [B]) -> flat float32 [P]`: the gradient of
    `-mean over response tokens of advantage * log π(token)` on rollout `rows`
    (`gptstack.rollout.rollout_rows`)."""
    def loss(params, rows, advantages_b):
        logp_bn, _ = ppo.response_log_probs(graphdef, params, rows)
        mask_bn = rows['mask'].astype(jnp.float32)
        return -jnp.sum(advantages_b[:, None] * logp_bn * mask_bn) / jnp.sum(mask_bn)

    @jax.jit
    def gradient(params, rows, advantages_b):
        grads = jax.grad(loss)(params, rows, advantages_b)
        return jnp.concatenate([g.ravel().astype(jnp.float32) for g in jax.tree.leaves(grads)])

    return gradient


def noise_scale(gradients: Sequence[np.ndarray], batch: int) -> dict:
    """From the gradients of disjoint batches of `batch` rollouts each: the mean pairwise cosine
    `c` (the signal's share at that batch; 0 with a batch of no gradient) with its standard
    error over pairs, the noise scale
    `B_noise = batch (1 - c) / c` (None where `c <= 0`: no signal measured) and the signal's
    share at 1, 4, 16 and 64 times the batch."""
    if len(gradients) < 2:
        raise ValueError(f'noise_scale needs gradients of at least 2 batches, got '
                         f'{len(gradients)}')
    # A batch whose advantages are all 0 (every group tied) has no gradient: it agrees with none.
    unit = [np.asarray(g, np.float64) / max(np.linalg.norm(g), np.finfo(np.float64).tiny)
            for g in gradients]
    cosines = np.array([a @ b for a, b in itertools.combinations(unit, 2)])
    c = float(cosines.mean())
    b_noise = batch * (1 - c) / c if c > 0 else None
    return {'batch': batch, 'batches': len(gradients), 'cosine': c,
            'cosine_stderr': float(cosines.std(ddof=1) / np.sqrt(len(cosines)))
            if len(cosines) > 1 else 0.0,
            'gradient_norm': float(np.mean([np.linalg.norm(g) for g in gradients])),
            'noise_scale': b_noise,
            'signal_share': {k * batch: (k * batch / (k * batch + b_noise) if b_noise else 0.0)
                             for k in (1, 4, 16, 64)}}


def group_advantages(scores: np.ndarray, group_size: int) -> np.ndarray:
    """Each score less its group's mean (consecutive `group_size` replies to one prompt),
    divided by the batch's standard deviation, as the RL stage centres and whitens them."""
    groups = np.asarray(scores, np.float64).reshape(-1, group_size)
    centred = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
    return (centred / (centred.std() + 1e-6)).astype(np.float32)
