"""Loss functions over model outputs (logits, scores) and masks.

Losses are pure functions of arrays; they never call a module. They return a sum and a count
rather than a mean, so the step can divide once after summing over micro-batches and devices: the
result is then exactly the token-weighted mean over the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_loss(logits_btv: Array, targets_bt: Array, mask_bt: Array) -> tuple[Array, Array]:
    """Masked cross entropy of `targets` under `logits`.

    Args:
        logits_btv: `[B, T, V]` unnormalised scores (computed in float32).
        targets_bt: `[B, T]` int token ids to predict at each position.
        mask_bt: `[B, T]` 1 where the position counts, 0 where it does not (padding, prompt
            tokens, document boundaries).

    Returns:
        `(loss_sum, count)`: the summed negative log-likelihood over counted positions and the
        number of counted positions, both float32 scalars.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    mask_bt = mask_bt.astype(jnp.float32)
    return jnp.sum((log_z_bt - target_logit_bt) * mask_bt), jnp.sum(mask_bt)


def pairwise_loss(better_b: Array, worse_b: Array, margin: float = 0.0) -> Array:
    """Bradley-Terry loss of each comparison: `-log sigmoid(r_better - r_worse - margin)`.

    Args:
        better_b, worse_b: `[B]` rewards of the preferred and the rejected completion.
        margin: how far the preferred reward must exceed the other before the loss flattens.

    Returns:
        `[B]` losses (nats).
    """
    return -jax.nn.log_sigmoid(better_b.astype(jnp.float32) - worse_b.astype(jnp.float32) - margin)


def ranking_pairs(ranks_bk: Array, valid_bk: Array) -> Array:
    """`[B, K, K]` float mask, 1 where completion `i` is ranked strictly better (lower rank) than
    completion `j` and both exist; ties and missing completions give no pair."""
    valid_bkk = valid_bk[:, :, None].astype(bool) & valid_bk[:, None, :].astype(bool)
    return ((ranks_bk[:, :, None] < ranks_bk[:, None, :]) & valid_bkk).astype(jnp.float32)


def ranking_loss(rewards_bk: Array, ranks_bk: Array, valid_bk: Array,
                 margin: float = 0.0) -> tuple[Array, Array]:
    """The InstructGPT K-way loss: every ordered pair of one prompt's completions, in one batch
    element, each prompt weighted equally.

    For prompt `b`, the loss is the mean of `pairwise_loss(r_i, r_j)` over the pairs where `i`
    is ranked better than `j`; with `K = 2` and one pair it is the pairwise loss.

    Args:
        rewards_bk: `[B, K]` rewards of each prompt's `K` completion slots.
        ranks_bk: `[B, K]` int ranks, lower is better; equal ranks are ties (no pair).
        valid_bk: `[B, K]` 1 where the slot holds a completion (groups smaller than `K` and
            padding groups have 0s); rewards of the other slots are ignored, even NaN.

    Returns:
        `(loss_sum, count)`: the sum over prompts of each prompt's mean pair loss, and the number
        of prompts with at least one pair.
    """
    pairs_bkk = ranking_pairs(ranks_bk, valid_bk)
    # Zero the empty slots first: a NaN there would poison the gradient even behind a `where`.
    rewards_bk = jnp.where(valid_bk > 0, rewards_bk.astype(jnp.float32), 0.0)
    loss_bkk = pairwise_loss(rewards_bk[:, :, None], rewards_bk[:, None, :], margin)
    n_pairs_b = pairs_bkk.sum(axis=(1, 2))
    per_prompt_b = (loss_bkk * pairs_bkk).sum(axis=(1, 2)) / jnp.maximum(n_pairs_b, 1.0)
    has_pairs_b = (n_pairs_b > 0).astype(jnp.float32)
    return jnp.sum(per_prompt_b * has_pairs_b), jnp.sum(has_pairs_b)


# --- direct preference optimisation ---------------------------------------------------------
def preference_pairs(ranks_bk: Array, valid_bk: Array, pairs: str = 'all') -> Array:
    """`[B, K, K]` float mask of the pairs a group of ranked completions gives: `all` ordered
    pairs (`ranking_pairs`), or `best_worst`: the best-ranked against the worst-ranked
    completions only (one pair per group unless ranks tie at either end)."""
    pairs_bkk = ranking_pairs(ranks_bk, valid_bk)
    if pairs == 'all':
        return pairs_bkk
    if pairs != 'best_worst':
        raise ValueError(f'preference pairs {pairs!r}: expected all or best_worst')
    big = jnp.iinfo(jnp.int32).max
    best_b = jnp.min(jnp.where(valid_bk > 0, ranks_bk, big), axis=1)
    worst_b = jnp.max(jnp.where(valid_bk > 0, ranks_bk, -big), axis=1)
    is_best, is_worst = (ranks_bk == best_b[:, None]), (ranks_bk == worst_b[:, None])
    return pairs_bkk * (is_best[:, :, None] & is_worst[:, None, :]).astype(jnp.float32)


def dpo_loss(logp_bk: Array, ref_logp_bk: Array, pairs_bkk: Array, beta: float,
             kind: str = 'sigmoid', label_smoothing: float = 0.0
             ) -> tuple[Array, Array, dict[str, Array]]:
    """The DPO family's loss over each group's preference pairs, each group weighted equally.

    For a pair where completion `i` is preferred to `j`, with `h = (log π_i - log π_ref,i) -
    (log π_j - log π_ref,j)` (sequence log-probabilities):

        sigmoid  `-log σ(β h)`, DPO (Rafailov et al., 2023); with `label_smoothing` ε,
                 `-(1 - ε) log σ(β h) - ε log σ(-β h)`: the conservative DPO of labels flipped
                 with probability ε
        ipo      `(h - 1 / (2β))²`, IPO (Azar et al., 2023): a target margin, not a sigmoid
                 that keeps pushing

    Returns:
        `(loss_sum, count, sums)`: the sum over groups of each group's mean pair loss, the
        number of groups with a pair, and sums over pairs of `pairs`, `correct` (implicit reward
        `β h > 0`, a tie counting half), `margin` (`β h`), `chosen` and `rejected` (the
        policy's log-probabilities of the preferred and the other completion).
    """
    logp_bk = logp_bk.astype(jnp.float32)
    rewards_bk = logp_bk - ref_logp_bk.astype(jnp.float32)
    h_bkk = rewards_bk[:, :, None] - rewards_bk[:, None, :]
    if kind == 'sigmoid':
        loss_bkk = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_bkk)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h_bkk))
    elif kind == 'ipo':
        loss_bkk = jnp.square(h_bkk - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f'DPO loss {kind!r}: expected sigmoid or ipo')
    n_pairs_b = pairs_bkk.sum(axis=(1, 2))
    per_group_b = (loss_bkk * pairs_bkk).sum(axis=(1, 2)) / jnp.maximum(n_pairs_b, 1.0)
    has_pairs_b = (n_pairs_b > 0).astype(jnp.float32)
    sums = {'pairs': pairs_bkk.sum(),
            'correct': jnp.sum(((h_bkk > 0) + 0.5 * (h_bkk == 0)) * pairs_bkk),
            'margin': jnp.sum(beta * h_bkk * pairs_bkk),
            'chosen': jnp.sum(logp_bk[:, :, None] * pairs_bkk),
            'rejected': jnp.sum(logp_bk[:, None, :] * pairs_bkk)}
    return jnp.sum(per_group_b * has_pairs_b), jnp.sum(has_pairs_b), sums


# --- reinforcement learning -----------------------------------------------------------------
def kl_penalty(logp_bt: Array, ref_logp_bt: Array, estimator: str = 'k1') -> Array:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens the policy sampled.

    `k1`: `log p - log q` (unbiased, can be negative per token); `k3`: `r - 1 - log r` with
    `r = q / p` (unbiased, never negative, lower variance); Schulman's "Approximating KL".
    """
    log_ratio = logp_bt.astype(jnp.float32) - ref_logp_bt.astype(jnp.float32)
    if estimator == 'k1':
        return log_ratio
    if estimator == 'k3':
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f'KL estimator {estimator!r}: expected k1 or k3')


def token_normalisation(mask_bt: Array, how: str, max_len: int) -> tuple[Array, Array]:
    """`(weights [B, T], denominator)` that turn per-token losses into one number,
    `sum(loss * weights) / denominator`:

        token     `mask`, over the counted tokens: every token weighs the same
        sequence  `mask / length` of each row, over the rows: every reply weighs the same
        constant  `mask`, over `rows * max_len`: Dr. GRPO's, a constant whatever the lengths

    `token` and `sequence` weigh a token of a short reply more than one of a long reply
    (`sequence`) or couple the weights to the other replies' lengths (`token`); `constant`
    does neither.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    rows = jnp.float32(mask_bt.shape[0])
    if how == 'token':
        return mask_bt, jnp.maximum(mask_bt.sum(), 1.0)
    if how == 'sequence':
        return mask_bt / jnp.maximum(mask_bt.sum(axis=1, keepdims=True), 1.0), rows
    if how == 'constant':
        return mask_bt, rows * max_len
    raise ValueError(f'loss normalisation {how!r}: expected token, sequence or constant')


def ppo_policy_loss(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                    clip: float) -> tuple[Array, dict[str, Array]]:
    """The clipped surrogate `-min(ρA, clip(ρ, 1-ε, 1+ε)A)` with `ρ = exp(logp - old_logp)`.

    Returns:
        `(loss_sum, sums)`: the loss summed over counted tokens, and sums of `count`,
        `clipped` (tokens where the clipped term was chosen) and `approx_kl` (`k3` of old to new).
    """
    mask_bt = mask_bt.astype(jnp.float32)
    log_ratio = logp_bt - old_logp_bt
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages_bt
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages_bt
    loss_bt = -jnp.minimum(unclipped, clipped)
    return jnp.sum(loss_bt * mask_bt), {
        'count': jnp.sum(mask_bt),
        'clipped': jnp.sum((clipped < unclipped) * mask_bt),
        'approx_kl': jnp.sum((jnp.expm1(log_ratio) - log_ratio) * mask_bt)}


def ppo_value_loss(values_bt: Array, old_values_bt: Array, returns_bt: Array, mask_bt: Array,
                   clip: float) -> tuple[Array, Array]:
    """The clipped value loss `½ max((V - R)², (V_clip - R)²)`, `V_clip` kept within `clip` of
    the rollout's values. Returns `(loss_sum, clipped token count)` over counted tokens."""
    mask_bt = mask_bt.astype(jnp.float32)
    clipped_values = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
    plain = jnp.square(values_bt - returns_bt)
    limited = jnp.square(clipped_values - returns_bt)
    return (0.5 * jnp.sum(jnp.maximum(plain, limited) * mask_bt),
            jnp.sum((limited > plain) * mask_bt))


def entropy(logits_btv: Array, mask_bt: Array) -> Array:
    """Summed entropy (nats) of the next-token distributions at counted positions."""
    log_p = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    entropy_bt = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return jnp.sum(entropy_bt * mask_bt.astype(jnp.float32))


def token_log_probs(logits_btv: Array, tokens_bt: Array) -> Array:
    """`[B, T]` log-probability of `tokens_bt[:, t]` under `logits_btv[:, t]`."""
    logits_btv = logits_btv.astype(jnp.float32)
    picked = jnp.take_along_axis(logits_btv, tokens_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits_btv, axis=-1)
