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
