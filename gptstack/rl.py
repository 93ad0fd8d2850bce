"""Reinforcement-learning pieces that are not losses: GAE, whitening, the baselines of the
critic-free algorithms (GRPO's group statistics, RLOO's leave-one-out mean), the adaptive KL
controller and running reward statistics. All are pure functions of arrays, so their state lives
in the checkpointed train state and a resumed run continues exactly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def gae(rewards_bt: Array, values_bt: Array, mask_bt: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation over each row's response tokens, by a reverse scan.

    `δ_t = r_t + γ V_{t+1} - V_t` and `A_t = δ_t + γλ A_{t+1}`, where anything past a row's last
    counted token (`mask_bt` 0) is 0: the episode ends there.

    Returns:
        `(advantages, returns)`, both `[B, T]` and 0 where the mask is 0; `returns = A + V`.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    rewards_tb, values_tb, mask_tb = (x.T.astype(jnp.float32) * mask_bt.T
                                      for x in (rewards_bt, values_bt, mask_bt))
    next_values_tb = jnp.concatenate([values_tb[1:], jnp.zeros_like(values_tb[:1])]) * \
        jnp.concatenate([mask_tb[1:], jnp.zeros_like(mask_tb[:1])])

    def step(next_advantage_b, inputs):
        reward_b, value_b, next_value_b, mask_b = inputs
        delta_b = reward_b + gamma * next_value_b - value_b
        advantage_b = (delta_b + gamma * lam * next_advantage_b) * mask_b
        return advantage_b, advantage_b

    _, advantages_tb = jax.lax.scan(step, jnp.zeros_like(rewards_tb[0]),
                                    (rewards_tb, values_tb, next_values_tb, mask_tb),
                                    reverse=True)
    advantages_bt = advantages_tb.T
    return advantages_bt, (advantages_bt + values_bt) * mask_bt


def masked_mean_var(x: Array, mask: Array) -> tuple[Array, Array]:
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    mean = jnp.sum(x * mask) / count
    return mean, jnp.sum(jnp.square(x - mean) * mask) / count


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """`x` scaled to unit variance over the counted entries (and centred unless
    `shift_mean=False`); uncounted entries become 0."""
    mean, var = masked_mean_var(x, mask)
    scaled = (x - mean) * jax.lax.rsqrt(var + eps)
    return (scaled if shift_mean else scaled + mean) * mask


def center_groups(scores_b: Array, group_size: int) -> Array:
    """Each score minus the mean of its group of `group_size` consecutive rows (the replies to
    one prompt). A Bradley-Terry reward model is trained on differences between replies to the
    same prompt, so only those differences mean anything; the group mean removes the rest."""
    groups = scores_b.reshape(-1, group_size)
    return (groups - groups.mean(axis=1, keepdims=True)).reshape(scores_b.shape)


def group_advantages(scores_b: Array, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> Array:
    """GRPO's advantage of each reply (Shao et al., 2024): its score minus its group's mean,
    divided by the group's standard deviation (the unbiased, `n - 1` one) unless `scale_by_std`
    is False (Dr. GRPO, Liu et al., 2025: dividing by it weights the groups whose replies barely
    differ most). A group of equal scores gives every reply 0."""
    groups = scores_b.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (jnp.std(groups, axis=1, keepdims=True, ddof=1) + eps)
    return centred.reshape(scores_b.shape)


def leave_one_out(scores_b: Array, group_size: int) -> Array:
    """RLOO's advantage of each reply (Ahmadian et al., 2024): its score minus the mean score
    of the other `group_size - 1` replies to its prompt, an unbiased baseline since it does
    not depend on the reply itself; equal to `G / (G - 1)` times the centred score."""
    groups = scores_b.reshape(-1, group_size)
    others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(scores_b.shape)


def tied_groups(scores_b: Array, group_size: int) -> Array:
    """The fraction of groups whose replies all scored the same: they carry no signal to a
    group baseline (every advantage 0)."""
    groups = scores_b.reshape(-1, group_size)
    return jnp.mean(jnp.all(groups == groups[:, :1], axis=1).astype(jnp.float32))


@flax.struct.dataclass
class RunningMoments:
    """Mean and variance of every value seen so far (Chan et al.'s parallel update)."""

    mean: Array
    var: Array
    count: Array

    @classmethod
    def create(cls) -> RunningMoments:
        return cls(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32),
                   jnp.zeros((), jnp.float32))

    def update(self, x: Array) -> RunningMoments:
        n = jnp.asarray(x.size, jnp.float32)
        batch_mean, batch_var = jnp.mean(x), jnp.var(x)
        total = self.count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + jnp.square(delta) * self.count * n / total
        return RunningMoments(mean, m2 / total, total)

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)


def adaptive_kl_coef(coef: Array, kl: Array, target: float, horizon: float,
                     batch_size: int) -> Array:
    """The next KL coefficient of Ziegler et al. (2019): moved toward the value that keeps the
    observed KL at `target`, by at most ±20% of the error per `horizon` samples."""
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * batch_size / horizon)
