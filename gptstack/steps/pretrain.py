"""The pretraining step: next-token prediction on packed rows.

A batch is a dict of `[B, T]` arrays:
    inputs       int32  token ids fed to the model
    targets      int32  the token to predict at each position (inputs shifted by one)
    segment_ids  int32  document index within the row (attention stays inside a document)
    positions    int32  position within the document (restarts at every document)
    loss_mask    int32/float  1 where the target counts (0 on padding and document boundaries)

The loss is the token-weighted mean over the whole global batch, computed from sums so that
gradient accumulation and sharding do not change it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import losses, sharding
from gptstack.optim import accumulate_gradients
from gptstack.state import TrainState

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def lm_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]):
    """`(loss_sum, count)` of the language model `nnx.merge(graphdef, params)` on `batch`."""
    model = nnx.merge(graphdef, params)
    logits_btv = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    return losses.next_token_loss(logits_btv, batch['targets'], batch['loss_mask'])


def make_pretrain_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: Mesh, rules: str,
                       state_shardings: TrainState, batch_size: int, accum_steps: int = 1):
    """Builds the jitted `pretrain_step(state, batch) -> (state, metrics)`.

    The state is donated (updated in place); the batch must be `batch_size` rows, split over the
    mesh's batch axes. Metrics are replicated float32 scalars: `loss` (mean nats per target
    token), `tokens` (targets counted), `grad_norm` (before clipping) and `lr`.
    """
    if batch_size % accum_steps:
        raise ValueError(f'batch size {batch_size} is not divisible by accum_steps={accum_steps}')
    batch_sharding = sharding.batch_sharding(mesh, rules, batch_size // accum_steps)

    def pretrain_step(state: TrainState, batch: dict[str, jax.Array]):
        with sharding.activation_sharding(mesh, rules):
            loss_sum, count, grads = accumulate_gradients(
                lambda p, b: lm_loss(graphdef, p, b), state.params, batch, accum_steps)
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {'loss': loss_sum / jnp.maximum(count, 1.0), 'tokens': count,
                   'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(pretrain_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
