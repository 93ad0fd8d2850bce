"""The DPO step: the policy learns the comparisons directly, with no reward model and no
sampling in the loop (Rafailov et al., 2023).

A batch is padded groups of ranked completions (`gptstack.data.preference`):
    tokens      int32   `[B, K, T]`  each completion after its prompt, then `<|reward|>`, padded
    segment_ids int32   `[B, K, T]`  1 on the row's tokens, 0 on padding
    positions   int32   `[B, K, T]`  0, 1, 2, ... along the row
    ranks       int32   `[B, K]`     lower is better; equal ranks tie
    valid       int32   `[B, K]`     1 where the slot holds a completion
    reply_mask  int32   `[B, K, T]`  1 on the completion's own tokens (`preference.reply_mask`)
    ref_logp    float32 `[B, K]`     the frozen reference's log-probability of each completion

The reference's log-probabilities are computed once, before training, and travel with the data
(`experiments.dpo`), so the reference model is never on the devices during training. The policy's
log-probability of a completion is the sum over its reply tokens; the loss is
`gptstack.losses.dpo_loss` over the group's pairs (`losses.preference_pairs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptstack import losses, sharding
from gptstack.config import ConfigError
from gptstack.optim import accumulate_gradients
from gptstack.state import TrainState
from gptstack.steps.lm import keep_if_finite

# The per-token fields of a batch of padded groups `[B, K, T]` (`gptstack.data.preference`).
GROUP_KEYS = ('tokens', 'segment_ids', 'positions')


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """The DPO stage's loss settings (`loss.*`)."""

    # 'sigmoid' (DPO; conservative DPO with label_smoothing > 0) or 'ipo'.
    kind: str = 'sigmoid'
    # β: how far the implicit reward's scale lets the policy move from the reference.
    beta: float = 0.1
    # cDPO's ε: the probability that a comparison's label is flipped.
    label_smoothing: float = 0.0
    # The pairs of a K-way ranking: 'all' ordered pairs, or 'best_worst' only.
    pairs: str = 'all'
    # Weight of the language-model loss (per token) of each group's best-ranked completions,
    # added to the preference loss: DPO+NLL (Pang et al., 2024), which keeps the preferred
    # replies' likelihood from falling with the others'. Without it, DPO on the main job's
    # comparisons lost 0.06 sampled and 0.09 greedy gold in 300 steps; with 1.0 it held both
    # (docs/results.md). 0 is plain DPO.
    nll_coef: float = 1.0

    def __post_init__(self):
        def require(ok, field, expected):
            if not ok:
                raise ConfigError(f'loss.{field}={getattr(self, field)!r}: expected {expected}')

        require(self.kind in ('sigmoid', 'ipo'), 'kind', 'sigmoid or ipo')
        require(self.beta > 0, 'beta', '> 0')
        require(0 <= self.label_smoothing < 0.5, 'label_smoothing', 'in [0, 0.5)')
        require(self.kind == 'sigmoid' or self.label_smoothing == 0, 'label_smoothing',
                '0 with loss.kind=ipo')
        require(self.pairs in ('all', 'best_worst'), 'pairs', 'all or best_worst')
        require(self.nll_coef >= 0, 'nll_coef', '>= 0')


def completion_log_probs(graphdef: nnx.GraphDef, params: nnx.State,
                         batch: dict[str, jax.Array]) -> jax.Array:
    """`[B, K]` log-probability of each completion slot's reply tokens under a language model
    (0 for an empty slot)."""
    b, k, t = batch['tokens'].shape
    flat = {key: batch[key].reshape(b * k, t) for key in (*GROUP_KEYS, 'reply_mask')}
    model = nnx.merge(graphdef, params)
    logits = model(flat['tokens'], flat['positions'], flat['segment_ids'])
    # Token t is predicted at t - 1.
    token_logp = losses.token_log_probs(logits[:, :-1], flat['tokens'][:, 1:])
    mask = flat['reply_mask'][:, 1:].astype(jnp.float32)
    return jnp.sum(token_logp * mask, axis=1).reshape(b, k)


def dpo_batch_shardings(mesh: Mesh, rules: str, batch_size: int) -> dict[str, NamedSharding]:
    """Shardings of a batch of `batch_size` padded groups: groups split over the batch axes."""
    sharding.batch_sharding(mesh, rules, batch_size)  # checks divisibility, names the fix
    groups = sharding.named_sharding(mesh, ('batch', None, None), rules)
    slots = sharding.named_sharding(mesh, ('batch', None), rules)
    return {**{key: groups for key in (*GROUP_KEYS, 'reply_mask')}, 'ranks': slots,
            'valid': slots, 'ref_logp': slots}


def make_dpo_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, mesh: Mesh, rules: str, state_shardings: TrainState,
                  batch_size: int, loss: DPOLoss, *, accum_steps: int = 1):
    """Builds the jitted `dpo_step(state, batch) -> (state, metrics)`; donates the state.

    Metrics (replicated float32): `loss` (the preference loss, mean over groups), `nll` (the
    best completions' negative log-likelihood per token, mean over groups), `accuracy` (pairs
    whose implicit reward `β h` is positive, a tie counting half), `margin` (its mean),
    `chosen_logp` and `rejected_logp` (the policy's mean log-probability of the preferred and
    the other completion of a pair),
    `groups`, `pairs`, `grad_norm`, `lr`, `nonfinite`.
    """
    if batch_size % accum_steps:
        raise ValueError(f'batch size {batch_size} is not divisible by accum_steps={accum_steps}')
    shardings = dpo_batch_shardings(mesh, rules, batch_size)

    def objective(params, batch):
        logp_bk = completion_log_probs(graphdef, params, batch)
        pairs_bkk = losses.preference_pairs(batch['ranks'], batch['valid'], loss.pairs)
        loss_sum, count, sums = losses.dpo_loss(logp_bk, batch['ref_logp'], pairs_bkk,
                                                loss.beta, loss.kind, loss.label_smoothing)
        # DPO+NLL: each group's mean negative log-likelihood per token of its best-ranked
        # completions (in a group with a pair), summed over groups like the loss.
        best_rank_b = jnp.min(jnp.where(batch['valid'] > 0, batch['ranks'],
                                        jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        best_bk = ((batch['ranks'] == best_rank_b) & (batch['valid'] > 0)
                   & (pairs_bkk.sum(axis=(1, 2))[:, None] > 0)).astype(jnp.float32)
        tokens_b = jnp.sum(batch['reply_mask'][:, :, 1:].sum(axis=2) * best_bk, axis=1)
        nll_sum = jnp.sum(-jnp.sum(logp_bk * best_bk, axis=1) / jnp.maximum(tokens_b, 1.0))
        return loss_sum + loss.nll_coef * nll_sum, {'count': count, 'dpo_loss': loss_sum,
                                                    'nll': nll_sum, **sums}

    def dpo_step(state: TrainState, batch: dict[str, jax.Array]):
        with sharding.activation_sharding(mesh, rules):
            _, aux, grads = accumulate_gradients(objective, state.params, batch,
                                                 accum_steps)
            count = jnp.maximum(aux['count'], 1.0)
            grads = jax.tree.map(lambda g: g / count, grads)

            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        mean_loss, grad_norm = aux['dpo_loss'] / count, optax.tree.norm(grads)
        finite = jnp.isfinite(mean_loss) & jnp.isfinite(grad_norm)
        pairs = jnp.maximum(aux['pairs'], 1.0)
        metrics = {'loss': mean_loss, 'nll': aux['nll'] / count,
                   'accuracy': aux['correct'] / pairs,
                   'margin': aux['margin'] / pairs, 'chosen_logp': aux['chosen'] / pairs,
                   'rejected_logp': aux['rejected'] / pairs, 'groups': aux['count'],
                   'pairs': aux['pairs'], 'grad_norm': grad_norm, 'lr': schedule(state.step),
                   'nonfinite': (~finite).astype(jnp.float32)}
        return keep_if_finite(finite, state, params, opt_state), metrics

    return jax.jit(dpo_step, in_shardings=(state_shardings, shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_log_probs_fn(graphdef: nnx.GraphDef, mesh: Mesh, rules: str, param_shardings,
                      batch_size: int):
    """Builds the jitted `log_probs(params, batch) -> [B, K]` (replicated): each completion's
    log-probability, for the reference's cache and the held-out evaluation. The batch needs no
    `ref_logp`."""
    shardings = {k: v for k, v in dpo_batch_shardings(mesh, rules, batch_size).items()
                 if k != 'ref_logp'}

    def log_probs(params, batch):
        with sharding.activation_sharding(mesh, rules):
            return completion_log_probs(graphdef, params, batch)

    return jax.jit(log_probs, in_shardings=(param_shardings, shardings),
                   out_shardings=sharding.replicated(mesh))
