"""The language-model step of pretraining and supervised finetuning: masked next-token
prediction on packed rows. The two stages differ only in their data: pretraining counts every
target inside a document, SFT only the assistant's tokens (the `loss_mask` says which).

A batch is a dict of `[B, T]` arrays:
    inputs       int32  token ids fed to the model
    targets      int32  the token to predict at each position (inputs shifted by one)
    segment_ids  int32  document or conversation index within the row (attention stays inside)
    positions    int32  position within the document (restarts at every document)
    loss_mask    int32/float  1 where the target counts (0 on padding, boundaries, and for SFT
                 on everything but assistant tokens)

The loss is the token-weighted mean over the whole global batch, computed from sums so that
gradient accumulation and sharding do not change it. A step whose loss or gradient is not finite
leaves the parameters and optimizer state untouched and reports `nonfinite = 1`; the host loop
decides whether that stops the run.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import losses, sharding
from gptstack.evals import copying
from gptstack.optim import accumulate_gradients
from gptstack.state import TrainState

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def lm_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]):
    """`(loss_sum, count)` of the language model `nnx.merge(graphdef, params)` on `batch`."""
    model = nnx.merge(graphdef, params)
    logits_btv = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    return losses.next_token_loss(logits_btv, batch['targets'], batch['loss_mask'])


def keep_if_finite(finite: jax.Array, state: TrainState, params, opt_state) -> TrainState:
    """The updated state, or the old parameters and optimizer state when the update is not
    finite; the step counter advances either way (the batch was consumed)."""
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def make_lm_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: Mesh, rules: str,
                       state_shardings: TrainState, batch_size: int, accum_steps: int = 1):
    """Builds the jitted `lm_step(state, batch) -> (state, metrics)`.

    The state is donated (updated in place); the batch must be `batch_size` rows, split over the
    mesh's batch axes. Metrics are replicated float32 scalars: `loss` (mean nats per target
    token), `tokens` (targets counted), `grad_norm` (before clipping), `lr` and `nonfinite`.
    """
    if batch_size % accum_steps:
        raise ValueError(f'batch size {batch_size} is not divisible by accum_steps={accum_steps}')
    batch_sharding = sharding.batch_sharding(mesh, rules, batch_size // accum_steps)

    def lm_step(state: TrainState, batch: dict[str, jax.Array]):
        with sharding.activation_sharding(mesh, rules):
            loss_sum, count, grads = accumulate_gradients(
                lambda p, b: lm_loss(graphdef, p, b), state.params, batch, accum_steps)
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / jnp.maximum(count, 1.0), optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {'loss': loss, 'tokens': count, 'grad_norm': grad_norm,
                   'lr': schedule(state.step), 'nonfinite': (~finite).astype(jnp.float32)}
        return keep_if_finite(finite, state, params, opt_state), metrics

    return jax.jit(lm_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_lm_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, rules: str, param_shardings,
                   batch_size: int, token_bytes):
    """Builds the jitted `eval_step(params, batch) -> {loss_sum, count, bytes}` (replicated).

    `bytes` sums the UTF-8 bytes of the counted targets (`token_bytes[target]`), so that
    `loss_sum / (ln 2 * bytes)` is bits per byte, comparable across tokenizers.
    """
    batch_sharding = sharding.batch_sharding(mesh, rules, batch_size)
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch):
        with sharding.activation_sharding(mesh, rules):
            loss_sum, count = lm_loss(graphdef, params, batch)
        n_bytes = jnp.sum(token_bytes[batch['targets']] * batch['loss_mask'])
        return {'loss_sum': loss_sum, 'count': count, 'bytes': n_bytes}

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=sharding.replicated(mesh))


def lm_evaluator(eval_step, eval_sets: dict[str, list], copy_sets: tuple[list, list] = ()):
    """`evaluate(state) -> {val/<name>/loss, val/<name>/bpb, val_loss, val_bpb}` over fixed
    batches of each named set; the totals weigh every counted token equally. With `copy_sets`
    (`gptstack.evals.copying.copy_batches`), also the in-context copying metrics
    `val/copy/first`, `val/copy/second` and `val/copy_gain`."""
    def sums_of(params, batches) -> np.ndarray:
        sums = np.zeros(3)
        for batch in batches:
            out = jax.device_get(eval_step(params, batch))
            sums += [out['loss_sum'], out['count'], out['bytes']]
        return sums

    def evaluate(state) -> dict:
        metrics, totals = {}, np.zeros(3)
        for name, batches in eval_sets.items():
            sums = sums_of(state.params, batches)
            metrics[f'val/{name}/loss'] = sums[0] / sums[1]
            metrics[f'val/{name}/bpb'] = sums[0] / (math.log(2) * sums[2])
            totals += sums
        if eval_sets:
            metrics['val_loss'] = totals[0] / totals[1]
            metrics['val_bpb'] = totals[0] / (math.log(2) * totals[2])
        if copy_sets:
            metrics.update(copying.metrics(*(sums_of(state.params, b)[:2] for b in copy_sets)))
        return metrics

    return evaluate
