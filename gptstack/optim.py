"""The optimizer: AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask
derived from each parameter's rank, and gradient accumulation inside one jitted step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptstack.config import OptimConfig
from gptstack.sharding import constrain


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * end_lr_ratio`.

    Warmup starts at `lr / warmup_steps`, not 0, so the very first step already updates.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=config.lr / max(config.warmup_steps, 1), peak_value=config.lr,
        warmup_steps=config.warmup_steps, decay_steps=config.total_steps,
        end_value=config.lr * config.end_lr_ratio)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for matrices (rank >= 2 not counting the stacked `layers` axis): nanoGPT's rule, so
    biases and norm scales are not decayed whether or not the layers are stacked."""
    def one(variable: nnx.Variable) -> nnx.Variable:
        names = variable.get_metadata().get('out_sharding') or (None,) * variable.ndim
        return variable.replace(sum(name != 'layers' for name in names) >= 2)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its learning-rate schedule (returned for logging)."""
    schedule = make_schedule(config)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw), schedule
    return adamw, schedule


LossFn = Callable[[nnx.State, dict], tuple[jax.Array, Any]]


def accumulate_gradients(loss_fn: LossFn, params: nnx.State, batch: dict[str, jax.Array],
                         accum_steps: int):
    """Sums `loss_fn`'s value, auxiliary sums and gradient over `accum_steps` micro-batches.

    `loss_fn(params, batch) -> (loss_sum, aux)`, where `aux` is the count the loss is divided by,
    or any pytree of sums (counts, numbers of correct predictions). Micro-batch `m` takes rows
    `m, m+k, m+2k, ...` so that every device keeps its own rows and no data moves between
    devices.

    Returns:
        `(loss_sum, aux_sum, grads_sum)`; divide by the count for the mean.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss_sum, aux), grads = grad_fn(params, batch)
        return loss_sum, aux, grads

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))

    def micro_step(carry, micro_batch):
        (micro_loss, micro_aux), micro_grads = grad_fn(params, micro_batch)
        return jax.tree.map(jnp.add, carry, (micro_loss, micro_aux, micro_grads)), None

    micro_batches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    loss_shape, aux_shape = jax.eval_shape(loss_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (loss_shape, aux_shape, params))
    (loss_sum, aux, grads), _ = jax.lax.scan(micro_step, zeros, micro_batches)
    return loss_sum, aux, grads
