"""The reward-model step: the InstructGPT ranking loss on groups of ranked completions.

A batch is packed rows of branched groups (see `gptstack.data.preference`), all `int32 [B, T]`:
    tokens       a group's prompt, then each completion followed by `<|reward|>`; 0 padding
    segment_ids  which group of the row a token belongs to (1, 2, ...), 0 on padding
    positions    the prompt's 0, 1, ..., continued along each completion
    branch_ids   0 on the prompt, i on the i-th completion and its reward token
    ranks        a completion's rank on its tokens (lower is better; equal ranks tie)
    group        the group's index in its data, plus one

The reward of a completion is the score model's output at its branch's last token, the reward
token. The rewards are gathered into slots `[G, K]` (`group_slots`), one row of slots per group,
so all pairs of a prompt are formed inside the step and every prompt with at least one pair
weighs the same in the loss, however the groups were packed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptstack import losses, sharding
from gptstack.data.preference import max_groups_per_row
from gptstack.model import read_at_token
from gptstack.optim import accumulate_gradients
from gptstack.state import TrainState
from gptstack.steps.lm import keep_if_finite

BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'branch_ids', 'ranks', 'group')


def rewards(graphdef: nnx.GraphDef, params: nnx.State, tokens_bt: jax.Array,
            positions_bt: jax.Array, segment_ids_bt: jax.Array, reward_id: int) -> jax.Array:
    """`[B]` rewards of rows that each contain one `<|reward|>` token (NaN for a row without)."""
    model = nnx.merge(graphdef, params)
    return read_at_token(model(tokens_bt, positions_bt, segment_ids_bt), tokens_bt, reward_id)


def group_slots(values_bt: jax.Array, batch: dict[str, jax.Array], completions: int,
                fill) -> jax.Array:
    """`[B * G, K]`: the value at each completion's last token (its reward token), in the slot
    of its group (`G = max_groups_per_row(T)` per row, `K = completions`); `fill` elsewhere."""
    b, t = batch['tokens'].shape
    g = max_groups_per_row(t)
    branch_bt, segment_bt = batch['branch_ids'], batch['segment_ids']
    next_branch_bt = jnp.pad(branch_bt[:, 1:], ((0, 0), (0, 1)))
    next_segment_bt = jnp.pad(segment_bt[:, 1:], ((0, 0), (0, 1)))
    last_bt = (branch_bt > 0) & (segment_bt > 0) & (
        (next_branch_bt != branch_bt) | (next_segment_bt != segment_bt))
    # Tokens that are not a completion's last go to slot (G, K) of their row, which is dropped.
    slot_bt = jnp.where(last_bt, segment_bt - 1, g)
    branch_slot_bt = jnp.where(last_bt, branch_bt - 1, completions)
    rows_bt = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    slots_bgk = jnp.full((b, g, completions), fill, values_bt.dtype)
    slots_bgk = slots_bgk.at[rows_bt, slot_bt, branch_slot_bt].set(values_bt, mode='drop')
    return slots_bgk.reshape(b * g, completions)


def group_rewards(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                  completions: int) -> dict[str, jax.Array]:
    """The batch's groups as slots `[B * G, K]`: `rewards` (NaN in empty slots), `ranks`,
    `valid` (1 where a slot holds a completion), and `group` `[B * G]` (the group's index in
    its data plus one; 0 for an empty row of slots)."""
    model = nnx.merge(graphdef, params)
    scores_bt = model(batch['tokens'], batch['positions'], batch['segment_ids'],
                      batch['branch_ids'])
    present_bt = jnp.ones_like(batch['tokens'])
    slots = lambda values, fill: group_slots(values, batch, completions, fill)  # noqa: E731
    return {'rewards': slots(scores_bt, jnp.nan), 'ranks': slots(batch['ranks'], 0),
            'valid': slots(present_bt, 0), 'group': slots(batch['group'], 0).max(axis=1)}


def ranking_stats(rewards_bk: jax.Array, ranks_bk: jax.Array,
                  valid_bk: jax.Array) -> dict[str, jax.Array]:
    """Sums over the ordered pairs of groups `[B, K]`: `pairs`, `correct` (better one rewarded
    higher) and `gap` (reward of the better minus the worse)."""
    pairs_bkk = losses.ranking_pairs(ranks_bk, valid_bk)
    rewards_bk = jnp.where(valid_bk > 0, rewards_bk, 0.0)
    diff_bkk = jnp.where(pairs_bkk > 0, rewards_bk[:, :, None] - rewards_bk[:, None, :], 0.0)
    return {'pairs': pairs_bkk.sum(), 'correct': jnp.sum((diff_bkk > 0) * pairs_bkk),
            'gap': diff_bkk.sum()}


def reward_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                completions: int, margin: float = 0.0):
    """`(loss_sum, aux)`: the K-way ranking loss summed over prompts, and sums `count`
    (prompts with a pair), `pairs`, `correct`, `gap`."""
    groups = group_rewards(graphdef, params, batch, completions)
    loss_sum, count = losses.ranking_loss(groups['rewards'], groups['ranks'], groups['valid'],
                                          margin)
    return loss_sum, {'count': count,
                      **ranking_stats(groups['rewards'], groups['ranks'], groups['valid'])}


def batch_shardings(mesh: Mesh, rules: str, batch_size: int) -> dict[str, NamedSharding]:
    """Shardings of a reward batch of `batch_size` packed rows, split over the batch axes."""
    rows = sharding.batch_sharding(mesh, rules, batch_size)  # checks divisibility, names the fix
    return {key: rows for key in BATCH_KEYS}


def make_reward_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                     schedule: optax.Schedule, mesh: Mesh, rules: str,
                     state_shardings: TrainState, batch_size: int, completions: int, *,
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
                lambda p, b: reward_loss(graphdef, p, b, completions, margin), state.params,
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
                          batch_size: int, completions: int):
    """Builds the jitted `eval_step(params, batch) -> (rewards [B * G, K], group [B * G])`
    (`group_rewards`; replicated, so the host can compute accuracy, calibration and reward
    distributions from them)."""
    shardings = batch_shardings(mesh, rules, batch_size)

    def eval_step(params, batch):
        with sharding.activation_sharding(mesh, rules):
            groups = group_rewards(graphdef, params, batch, completions)
            return groups['rewards'], groups['group']

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
