"""The reward-model step: the InstructGPT ranking loss on groups of ranked completions.

A batch is a dict (see `gptstack.data.preference`):
    tokens       int32 `[B, K, T]`  each completion after its prompt, then `<|reward|>`, padded
    segment_ids  int32 `[B, K, T]`  1 on the row's tokens, 0 on padding
    positions    int32 `[B, K, T]`  0, 1, 2, ... along the row
    ranks        int32 `[B, K]`     lower is better; equal ranks tie
    valid        int32 `[B, K]`     1 where the slot holds a completion

The `K` completions of one prompt stay in one batch element, so all of its pairs are formed
inside the step; every prompt with at least one pair weighs the same in the loss. The reward of
a completion is the score model's output at its `<|reward|>` token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptstack import losses, sharding
from gptstack.model import read_at_token
from gptstack.optim import accumulate_gradients
from gptstack.state import TrainState
from gptstack.steps.lm import keep_if_finite

GROUP_KEYS = ('tokens', 'segment_ids', 'positions')


def rewards(graphdef: nnx.GraphDef, params: nnx.State, tokens_bt: jax.Array,
            positions_bt: jax.Array, segment_ids_bt: jax.Array, reward_id: int) -> jax.Array:
    """`[B]` rewards of rows that each contain one `<|reward|>` token (NaN for a row without)."""
    model = nnx.merge(graphdef, params)
    return read_at_token(model(tokens_bt, positions_bt, segment_ids_bt), tokens_bt, reward_id)


def group_rewards(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                  reward_id: int) -> jax.Array:
    """`[B, K]` rewards of every completion slot of a reward batch."""
    b, k, t = batch['tokens'].shape
    flat = {key: batch[key].reshape(b * k, t) for key in GROUP_KEYS}
    return rewards(graphdef, params, flat['tokens'], flat['positions'], flat['segment_ids'],
                   reward_id).reshape(b, k)


def ranking_stats(rewards_bk: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the batch's ordered pairs: `pairs`, `correct` (better one rewarded higher) and
    `gap` (reward of the better minus the worse)."""
    pairs_bkk = losses.ranking_pairs(batch['ranks'], batch['valid'])
    rewards_bk = jnp.where(batch['valid'] > 0, rewards_bk, 0.0)
    diff_bkk = jnp.where(pairs_bkk > 0, rewards_bk[:, :, None] - rewards_bk[:, None, :], 0.0)
    return {'pairs': pairs_bkk.sum(), 'correct': jnp.sum((diff_bkk > 0) * pairs_bkk),
            'gap': diff_bkk.sum()}


def reward_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                reward_id: int, margin: float = 0.0):
    """`(loss_sum, aux)`: the K-way ranking loss summed over prompts, and sums `count`
    (prompts with a pair), `pairs`, `correct`, `gap`."""
    rewards_bk = group_rewards(graphdef, params, batch, reward_id)
    loss_sum, count = losses.ranking_loss(rewards_bk, batch['ranks'], batch['valid'], margin)
    return loss_sum, {'count': count, **ranking_stats(rewards_bk, batch)}


def batch_shardings(mesh: Mesh, rules: str, batch_size: int) -> dict[str, NamedSharding]:
    """Shardings of a reward batch of `batch_size` groups: groups split over the batch axes."""
    sharding.batch_sharding(mesh, rules, batch_size)  # checks divisibility, names the fix
    groups = sharding.named_sharding(mesh, ('batch', None, None), rules)
    slots = sharding.named_sharding(mesh, ('batch', None), rules)
    return {**{key: groups for key in GROUP_KEYS}, 'ranks': slots, 'valid': slots}


def make_reward_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                     schedule: optax.Schedule, mesh: Mesh, rules: str,
                     state_shardings: TrainState, batch_size: int, reward_id: int, *,
                     accum_steps: int = 1, margin: float = 0.0):
    """Builds the jitted `reward_step(state, batch) -> (state, metrics)`.

    Metrics (replicated float32): `loss` (mean over prompts), `accuracy` (fraction of pairs whose
    better completion gets the higher reward), `reward_gap` (mean reward difference over pairs),
    `prompts`, `pairs`, `grad_norm`, `lr`, `nonfinite`. The state is donated.
    """
    if batch_size % accum_steps:
        raise ValueError(f'batch size {batch_size} is not divisible by accum_steps={accum_steps}')
    shardings = batch_shardings(mesh, rules, batch_size)

    def reward_step(state: TrainState, batch: dict[str, jax.Array]):
        with sharding.activation_sharding(mesh, rules):
            loss_sum, aux, grads = accumulate_gradients(
                lambda p, b: reward_loss(graphdef, p, b, reward_id, margin), state.params,
                batch, accum_steps)
            count = jnp.maximum(aux['count'], 1.0)
            grads = jax.tree.map(lambda g: g / count, grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        pairs = jnp.maximum(aux['pairs'], 1.0)
        metrics = {'loss': loss, 'accuracy': aux['correct'] / pairs,
                   'reward_gap': aux['gap'] / pairs, 'prompts': aux['count'],
                   'pairs': aux['pairs'], 'grad_norm': grad_norm, 'lr': schedule(state.step),
                   'nonfinite': (~finite).astype(jnp.float32)}
        return keep_if_finite(finite, state, params, opt_state), metrics

    return jax.jit(reward_step, in_shardings=(state_shardings, shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_reward_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, rules: str, param_shardings,
                          batch_size: int, reward_id: int):
    """Builds the jitted `eval_step(params, batch) -> rewards [B, K]` (replicated, so the host
    can compute accuracy, calibration and reward distributions from them)."""
    shardings = batch_shardings(mesh, rules, batch_size)

    def eval_step(params, batch):
        with sharding.activation_sharding(mesh, rules):
            return group_rewards(graphdef, params, batch, reward_id)

    return jax.jit(eval_step, in_shardings=(param_shardings, shardings),
                   out_shardings=sharding.replicated(mesh))


def make_score_fn(graphdef: nnx.GraphDef, mesh: Mesh, rules: str, param_shardings,
                  batch_size: int, reward_id: int):
    """Builds `score(params, tokens, positions, segment_ids) -> rewards [B]` for `[B, T]` host
    rows (best-of-N), jitted with the rows split over the batch shards. In a multi-process run
    every process passes the same rows."""
    rows = sharding.batch_sharding(mesh, rules, batch_size)

    def score(params, tokens_bt, positions_bt, segment_ids_bt):
        with sharding.activation_sharding(mesh, rules):
            return rewards(graphdef, params, tokens_bt, positions_bt, segment_ids_bt, reward_id)

    jitted = jax.jit(score, in_shardings=(param_shardings, rows, rows, rows),
                     out_shardings=sharding.replicated(mesh))
    return lambda params, *host_rows: jitted(params, *(jax.device_put(x, rows)
                                                       for x in host_rows))
