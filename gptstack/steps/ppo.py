"""The jitted math of stage 4 of the recipe, reinforcement learning from sampled replies:
scoring rollouts, advantages with a KL penalty to the frozen SFT model, and the clipped updates.
Three algorithms share it (`PPOConfig.algorithm`):

    ppo   a critic estimates each token's value; advantages by GAE over per-token rewards
    grpo  no critic: each reply's score against its group's mean and standard deviation
          (Shao et al., 2024), or its mean alone (Dr. GRPO, Liu et al., 2025)
    rloo  no critic: each reply's score against the mean of the other replies to its prompt
          (Ahmadian et al., 2024)

Four roles, each its own graphdef and parameters (so a separate rollout mesh can be added
without touching the rest):

    actor      `GPT`, trained; starts as the SFT model
    critic     `ScoreModel`, trained, PPO only; starts as the reward model; the value of each
               response token's state (read where the token is predicted)
    reference  `GPT`, frozen SFT model: the anchor of the KL penalty
    reward     `ScoreModel`, frozen; the reward is its score at `<|reward|>` after the response

The trained roles live in `PPOState`, the frozen ones are `Frozen` pairs. The factories here
return the jitted pieces of one iteration: `reward` (the reward model's score of each reply),
`score` (actor and reference log-probs, values), `advantages` (the KL penalty in the reward or
not, then GAE and whitening for PPO or the group baselines of GRPO and RLOO; the KL controller
and running reward statistics) and `update` (clipped surrogate with optional entropy bonus, KL
loss term and PPO-ptx language-model term for the actor, clipped value loss for the critic).
They read rollout rows laid out as `gptstack.rollout` describes; its `PPOIteration` runs them
on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import losses, rl, sharding
from gptstack.config import ConfigError
from gptstack.model import read_at_token
from gptstack.state import TrainState
from gptstack.steps.lm import keep_if_finite, lm_loss

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The RL stage's settings: `rl.algorithm` and `rl.ppo.*` (which hold for every algorithm
    unless a comment names one); the defaults are the recommended ones for PPO."""

    # 'ppo', 'grpo' or 'rloo' (see the module docstring); set by `rl.algorithm`.
    algorithm: str = 'ppo'
    # Passes over an iteration's rollouts, and updates (minibatches) per pass.
    epochs: int = 2
    minibatches: int = 2
    # Clip ranges of the policy's probability ratio and of the value's change (PPO's ε).
    clip: float = 0.2
    value_clip: float = 0.2
    # The discount and GAE's λ.
    gamma: float = 1.0
    lam: float = 0.95
    # β: the KL penalty's coefficient (the start value when target_kl > 0).
    kl_coef: float = 0.2
    kl_estimator: str = 'k1'
    # > 0: adapt β toward this KL per response (nats), Ziegler et al.'s controller; β then
    # lives in the checkpointed state. 0: β is `kl_coef`, read from the config on every run.
    target_kl: float = 0.0
    kl_horizon: int = 10_000
    # Where the KL to the reference enters: 'reward' (-β·KL on each token's reward, as PPO and
    # RLOO have it), 'loss' (β·KL on each token as a term of the actor's loss, as GRPO has it;
    # there always the k3 estimator, since k1's gradient on the policy's own samples is zero in
    # expectation) or 'auto' (loss for grpo, reward for ppo and rloo).
    kl_in: str = 'auto'
    entropy_coef: float = 0.0
    # PPO: advantages whitened over the rollout batch.
    whiten_advantages: bool = True
    # GRPO: each centred score divided by its group's standard deviation; False is Dr. GRPO.
    scale_by_std: bool = True
    # The actor's loss of a minibatch from its tokens' losses: 'token' (the mean over all its
    # response tokens), 'sequence' (each reply's mean, then the mean over replies, as GRPO's
    # paper has it) or 'constant' (the sum over `replies x data.max_new_tokens`, Dr. GRPO's,
    # which favours neither short nor long replies).
    loss_norm: str = 'token'
    # Scores normalised by their running mean and standard deviation.
    normalize_reward: bool = False
    # Subtracted from the score of a response that hit the length limit without a stop token.
    truncated_penalty: float = 0.0
    # PPO-ptx: weight of the language-model loss on pretraining rows in the actor's objective.
    ptx_coef: float = 0.0
    temperature: float = 1.0
    # Replies sampled per prompt (consecutive rollout rows). PPO with > 1: each score is
    # centred on the mean score of its prompt's replies before the KL penalty is added
    # (`rl.center_groups`); GRPO and RLOO need at least 2, their baselines come from the group.
    group_size: int = 4

    # Dynamic sampling (Yu et al., 2025, DAPO): each iteration samples `oversample` times the
    # prompts it trains on and keeps the groups whose replies scored differently, filling up
    # with tied groups only when too few differ. A tied group's replies all get the advantage
    # 0 under a group baseline, so it costs an update and teaches nothing. Needs group_size > 1.
    oversample: int = 1

    ALGORITHMS = ('ppo', 'grpo', 'rloo')

    def __post_init__(self):
        def require(ok, field, expected):
            if not ok:
                raise ConfigError(f'rl.ppo.{field}={getattr(self, field)!r}: expected {expected}')

        if self.algorithm not in self.ALGORITHMS:
            raise ConfigError(f'rl.algorithm={self.algorithm!r}: expected one of '
                              f'{", ".join(self.ALGORITHMS)}')
        require(self.kl_estimator in ('k1', 'k3'), 'kl_estimator', 'k1 or k3')
        require(self.kl_in in ('auto', 'reward', 'loss'), 'kl_in', 'auto, reward or loss')
        require(self.loss_norm in ('token', 'sequence', 'constant'), 'loss_norm',
                'token, sequence or constant')
        if self.oversample > 1 and self.group_size < 2:
            raise ConfigError(f'rl.ppo.oversample={self.oversample} keeps the groups whose '
                              'replies scored differently, so it needs rl.ppo.group_size >= 2')
        if not self.critic and self.group_size < 2:
            raise ConfigError(f'rl.ppo.group_size={self.group_size}: rl.algorithm='
                              f'{self.algorithm} takes its baseline from the other replies to '
                              'a prompt, so it needs at least 2')
        for field in ('epochs', 'minibatches', 'group_size', 'kl_horizon', 'oversample'):
            require(getattr(self, field) >= 1, field, '>= 1')
        for field in ('kl_coef', 'target_kl', 'entropy_coef', 'ptx_coef', 'temperature'):
            require(getattr(self, field) >= 0, field, '>= 0')
        for field in ('clip', 'value_clip'):
            require(getattr(self, field) > 0, field, '> 0')
        for field in ('gamma', 'lam'):
            require(0 <= getattr(self, field) <= 1, field, 'in [0, 1]')

    @classmethod
    def from_config(cls, rl_config) -> PPOConfig:
        """The settings of a stage config's `rl` block (`rl.algorithm` and `rl.ppo`)."""
        return cls(algorithm=rl_config.algorithm, **rl_config.ppo)

    @classmethod
    def tunables(cls) -> dict:
        """The default `rl.ppo` block: every field but the algorithm."""
        fields = dataclasses.asdict(cls())
        del fields['algorithm']
        return fields

    @property
    def critic(self) -> bool:
        """Whether the algorithm trains a critic (PPO) or takes its baselines from the groups."""
        return self.algorithm == 'ppo'

    @property
    def kl_in_loss(self) -> bool:
        """Whether β·KL is a term of the actor's loss rather than a penalty in the reward."""
        return self.kl_in == 'loss' or (self.kl_in == 'auto' and self.algorithm == 'grpo')

    @property
    def adaptive(self) -> bool:
        """Whether the KL controller adapts β (then β is part of `PPOState`)."""
        return self.target_kl > 0

    def check_batch(self, batch_size: int) -> None:
        """Raises `ConfigError` unless `batch_size` rollouts split into whole groups of replies
        and whole minibatches: cheap, so a stage checks it before loading anything."""
        if batch_size % self.group_size:
            raise ConfigError(f'data.batch_size={batch_size} rollouts is not divisible by '
                              f'rl.ppo.group_size={self.group_size} replies per prompt')
        if batch_size % self.minibatches:
            raise ConfigError(f'data.batch_size={batch_size} rollouts is not divisible by '
                              f'rl.ppo.minibatches={self.minibatches}')


@flax.struct.dataclass
class PPOState:
    """Everything an exact resume needs besides the prompt iterator and the seed.

    `critic` is None for the critic-free algorithms (nothing of it is built or stored).
    `kl_coef` (β) is a leaf only when the controller adapts it (`PPOConfig.adaptive`); else it
    is None and β comes from the config, so a resumed run takes a changed `rl.ppo.kl_coef`."""

    actor: TrainState
    critic: TrainState | None
    kl_coef: Array | None
    reward_stats: rl.RunningMoments

    @property
    def step(self) -> Array:
        return self.actor.step

    @classmethod
    def create(cls, actor: TrainState, critic: TrainState | None,
               config: PPOConfig) -> PPOState:
        """A fresh state: β at `config.kl_coef` if adaptive, empty reward statistics."""
        kl_coef = jnp.float32(config.kl_coef) if config.adaptive else None
        return cls(actor, critic, kl_coef, rl.RunningMoments.create())

    @classmethod
    def structure(cls, actor: Any, critic: Any, config: PPOConfig, scalar: Any) -> PPOState:
        """The state's tree with `scalar` at each scalar leaf (β if adaptive, the reward
        statistics): its abstract shapes or its shardings, given the actor's and critic's
        (None without a critic)."""
        return cls(actor, critic, scalar if config.adaptive else None,
                   rl.RunningMoments(scalar, scalar, scalar))


class Frozen(NamedTuple):
    """A frozen role: the reference or the reward model."""

    graphdef: nnx.GraphDef
    params: nnx.State


def layout(batch) -> tuple[int, int]:
    """`(P, N)` of a rollout batch, from its static shapes."""
    n = batch['mask'].shape[1]
    return batch['tokens'].shape[1] - n - 1, n


def response_log_probs(graphdef, params, batch) -> tuple[Array, Array]:
    """`(log-probs [B, N] of the response tokens, their logits [B, N, V])` under an LM."""
    prompt_len, n = layout(batch)
    model = nnx.merge(graphdef, params)
    h_btd = model.transformer(batch['tokens'], batch['positions'], batch['segment_ids'])
    logits_bnv = model.logits(h_btd[:, prompt_len - 1:prompt_len - 1 + n])
    targets_bn = batch['tokens'][:, prompt_len:prompt_len + n]
    return losses.token_log_probs(logits_bnv, targets_bn), logits_bnv


def values(graphdef, params, batch) -> Array:
    """The critic's value `[B, N]` of each response token's state."""
    prompt_len, n = layout(batch)
    model = nnx.merge(graphdef, params)
    scores_bt = model(batch['tokens'], batch['positions'], batch['segment_ids'])
    return scores_bt[:, prompt_len - 1:prompt_len - 1 + n]


def make_score_fn(actor_graphdef: nnx.GraphDef, reference_graphdef: nnx.GraphDef,
                  critic_graphdef: nnx.GraphDef | None, mesh: Mesh, rules: str):
    """Jitted `score(actor, reference, critic params, rollout batch)` ->
    `{'logp', 'ref_logp', 'values': [B, N]}`; without a critic (its graphdef and parameters
    None) there are no `values`."""

    def score(actor_params, reference_params, critic_params, batch):
        with sharding.activation_sharding(mesh, rules):
            logp, _ = response_log_probs(actor_graphdef, actor_params, batch)
            ref_logp, _ = response_log_probs(reference_graphdef, reference_params, batch)
            scored = {'logp': logp, 'ref_logp': ref_logp}
            if critic_graphdef is not None:
                scored['values'] = values(critic_graphdef, critic_params, batch)
        return scored

    return jax.jit(score)


def make_reward_fn(reward_graphdef: nnx.GraphDef, mesh: Mesh, rules: str, reward_id: int):
    """Jitted `reward(reward params, rollout batch)` -> `[B]`: the reward model's score of each
    reply, read at `<|reward|>` after it."""

    def reward(params, batch):
        with sharding.activation_sharding(mesh, rules):
            model = nnx.merge(reward_graphdef, params)
            return read_at_token(model(batch['tokens'], batch['positions'],
                                       batch['segment_ids']), batch['tokens'], reward_id)

    return jax.jit(reward)


def make_advantages_fn(config: PPOConfig, batch_size: int):
    """Jitted `advantages(state, scored, mask, score, truncated)` ->
    `(state, advantages [B, N], returns [B, N] or None without a critic, metrics)`; donates the
    state.

    Each reply's score (the reward model's or the gold scorer's) is first centred on its group
    (PPO), normalised by running statistics (`normalize_reward`) and lowered for truncation;
    with the KL in the reward each token then pays `β·KL`. PPO puts the score on the reply's
    last token and runs GAE over the critic's values; GRPO and RLOO give every token of a reply
    its sequence's advantage against the group baseline. β is `state.kl_coef` when adaptive
    (then moved by the controller), else `config.kl_coef`; the metric `kl_coef` is the β this
    iteration used."""

    def advantages(state: PPOState, scored, mask_bn, score_b, truncated_b):
        kl_coef = state.kl_coef if config.adaptive else config.kl_coef
        mask_bn = mask_bn.astype(jnp.float32)
        kl_bn = losses.kl_penalty(scored['logp'], scored['ref_logp'],
                                  config.kl_estimator) * mask_bn
        kl_b = kl_bn.sum(axis=1)
        metrics = {'kl': kl_b.mean(), 'kl_coef': jnp.float32(kl_coef),
                   'tied_groups': rl.tied_groups(score_b, config.group_size)}
        stats = state.reward_stats
        if config.critic and config.group_size > 1:
            score_b = rl.center_groups(score_b, config.group_size)
        if config.normalize_reward:
            stats = stats.update(score_b)
            score_b = (score_b - stats.mean) / (stats.std + 1e-6)
        score_b = score_b - config.truncated_penalty * truncated_b
        penalty_bn = jnp.zeros_like(kl_bn) if config.kl_in_loss else kl_coef * kl_bn
        metrics['score'] = score_b.mean()
        metrics['non_score_reward'] = (jnp.float32(0.0) if config.kl_in_loss
                                       else (-kl_coef * kl_b).mean())
        if config.critic:
            lengths_b = mask_bn.sum(axis=1).astype(jnp.int32)
            last_bn = jax.nn.one_hot(lengths_b - 1, mask_bn.shape[1]) * mask_bn
            rewards_bn = -penalty_bn + score_b[:, None] * last_bn
            advantages_bn, returns_bn = rl.gae(rewards_bn, scored['values'], mask_bn,
                                               config.gamma, config.lam)
            if config.whiten_advantages:
                advantages_bn = rl.whiten(advantages_bn, mask_bn)
            values_bn = scored['values']
            _, return_var = rl.masked_mean_var(returns_bn, mask_bn)
            _, error_var = rl.masked_mean_var(returns_bn - values_bn, mask_bn)
            metrics.update({
                'total_reward': rewards_bn.sum(axis=1).mean(),
                'explained_variance': 1.0 - error_var / jnp.maximum(return_var, 1e-8),
                'value_mean': jnp.sum(values_bn * mask_bn) / mask_bn.sum()})
        else:
            total_b = score_b - penalty_bn.sum(axis=1)
            if config.algorithm == 'grpo':
                advantage_b = rl.group_advantages(total_b, config.group_size,
                                                  config.scale_by_std)
            else:
                advantage_b = rl.leave_one_out(total_b, config.group_size)
            advantages_bn, returns_bn = advantage_b[:, None] * mask_bn, None
            metrics['total_reward'] = total_b.mean()
        if config.adaptive:
            kl_coef = rl.adaptive_kl_coef(kl_coef, kl_b.mean(), config.target_kl,
                                          config.kl_horizon, batch_size)
            state = state.replace(kl_coef=kl_coef)
        return state.replace(reward_stats=stats), advantages_bn, returns_bn, metrics

    return jax.jit(advantages, donate_argnums=0)


def make_update_fn(config: PPOConfig, actor_graphdef: nnx.GraphDef,
                   critic_graphdef: nnx.GraphDef | None, tx_actor: optax.GradientTransformation,
                   tx_critic: optax.GradientTransformation | None, mesh: Mesh, rules: str,
                   max_new_tokens: int):
    """Jitted `update(state, minibatch, ptx_batch)` -> `(state, metrics)`: one optimizer step
    of the actor (and the critic, if any) on a minibatch of scored rollout rows (with
    `old_logp`, `advantages`; `old_values` and `returns` for the critic; `ref_logp` with the KL
    in the loss); donates the state. `ptx_batch` (PPO-ptx) is None unless `ptx_coef > 0`.
    `max_new_tokens` is the response budget, the length the `constant` loss norm divides by.
    The steps counters do not move: one iteration is one step."""

    def update(state: PPOState, batch, ptx_batch):
        mask_bn = batch['mask'].astype(jnp.float32)
        count = jnp.maximum(mask_bn.sum(), 1.0)
        weights_bn, denominator = losses.token_normalisation(mask_bn, config.loss_norm,
                                                             max_new_tokens)
        kl_coef = state.kl_coef if config.adaptive else config.kl_coef

        def actor_objective(params):
            logp, logits = response_log_probs(actor_graphdef, params, batch)
            loss_sum, sums = losses.ppo_policy_loss(logp, batch['old_logp'],
                                                    batch['advantages'], weights_bn,
                                                    config.clip)
            entropy_sum = losses.entropy(logits, weights_bn)
            objective = (loss_sum - config.entropy_coef * entropy_sum) / denominator
            aux = {'policy_loss': loss_sum / denominator, 'entropy': entropy_sum / denominator,
                   'clipfrac': sums['clipped'] / denominator,
                   'approx_kl': sums['approx_kl'] / denominator}
            if config.kl_in_loss:
                kl_bn = losses.kl_penalty(logp, batch['ref_logp'], 'k3')
                aux['kl_loss'] = jnp.sum(kl_bn * weights_bn) / denominator
                objective = objective + kl_coef * aux['kl_loss']
            if config.ptx_coef > 0:
                ptx_sum, ptx_count = lm_loss(actor_graphdef, params, ptx_batch)
                aux['ptx_loss'] = ptx_sum / jnp.maximum(ptx_count, 1.0)
                objective = objective + config.ptx_coef * aux['ptx_loss']
            return objective, aux

        def critic_objective(params):
            values_bn = values(critic_graphdef, params, batch)
            loss_sum, clipped = losses.ppo_value_loss(values_bn, batch['old_values'],
                                                      batch['returns'], mask_bn,
                                                      config.value_clip)
            return loss_sum / count, {'value_loss': loss_sum / count,
                                      'value_clipfrac': clipped / count}

        with sharding.activation_sharding(mesh, rules):
            (_, actor_aux), actor_grads = jax.value_and_grad(
                actor_objective, has_aux=True)(state.actor.params)
            actor_updates, actor_opt = tx_actor.update(actor_grads, state.actor.opt_state,
                                                       state.actor.params)
            if config.critic:
                (_, critic_aux), critic_grads = jax.value_and_grad(
                    critic_objective, has_aux=True)(state.critic.params)
                critic_updates, critic_opt = tx_critic.update(
                    critic_grads, state.critic.opt_state, state.critic.params)
        actor_norm = optax.tree.norm(actor_grads)
        finite = jnp.isfinite(actor_norm) & jnp.isfinite(actor_aux['policy_loss'])
        metrics = {**actor_aux, 'actor_grad_norm': actor_norm}
        if config.critic:
            critic_norm = optax.tree.norm(critic_grads)
            finite = (finite & jnp.isfinite(critic_norm)
                      & jnp.isfinite(critic_aux['value_loss']))
            metrics.update({**critic_aux, 'critic_grad_norm': critic_norm})
        # One iteration is one step: the counters advance once per iteration, not here.
        actor = keep_if_finite(finite, state.actor,
                               optax.apply_updates(state.actor.params, actor_updates), actor_opt)
        state = state.replace(actor=actor.replace(step=state.actor.step))
        if config.critic:
            critic = keep_if_finite(finite, state.critic,
                                    optax.apply_updates(state.critic.params, critic_updates),
                                    critic_opt)
            state = state.replace(critic=critic.replace(step=state.critic.step))
        metrics['nonfinite'] = (~finite).astype(jnp.float32)
        return state, metrics

    return jax.jit(update, donate_argnums=0)
