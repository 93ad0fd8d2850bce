"""PPO, stage 4 of the recipe: rollouts from our sampler, scored by a frozen reward model, with a
per-token KL penalty to the frozen SFT model.

Four roles, each its own graphdef and parameters (so a separate rollout mesh can be added
without touching the rest):

    actor      `GPT`, trained; starts as the SFT model
    critic     `ScoreModel`, trained; starts as the reward model; the value of each response
               token's state (read where the token is predicted)
    reference  `GPT`, frozen SFT model: the anchor of the KL penalty
    reward     `ScoreModel`, frozen; the reward is its score at `<|reward|>` after the response

One iteration (`PPO.__call__`): sample `group_size` responses to each prompt
(`gptstack.sampling`) -> `score` (jitted: actor and reference log-probs, values, reward) ->
`advantages` (jitted: the scores centred within each prompt's group, per-token rewards `-β·KL`
plus the score at the last token, GAE, whitening, the KL controller and running reward
statistics) -> `epochs` passes of `minibatches` jitted `update`s (clipped surrogate with an
optional entropy bonus and PPO-ptx language-model term for the actor, clipped value loss for the
critic). The rollout layout, one row per reply:

    tokens  [B, P + N + 1]  the prompt left-padded to P, the N response slots (padded after the
                            stop token), and `<|reward|>` right after the response
    mask    [B, N]          1 on generated tokens (up to and including the stop token)

Response token `j` sits at `P + j` and is predicted at `P + j - 1`; everything the actor, critic
and reference read is at or before that, so the reward token after the response changes nothing
for them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import losses, rl, sharding
from gptstack.config import ConfigError
from gptstack.model import read_at_token
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState
from gptstack.steps.lm import keep_if_finite, lm_loss

Array = jax.Array
# Rollout rows are trimmed to multiples of this many tokens (prompt part and response part).
ROLLOUT_BUCKET = 16


@flax.struct.dataclass
class PPOState:
    """Everything an exact resume needs besides the prompt iterator and the seed."""

    actor: TrainState
    critic: TrainState
    kl_coef: Array
    reward_stats: rl.RunningMoments

    @property
    def step(self) -> Array:
        return self.actor.step


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    epochs: int = 2
    minibatches: int = 2
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    # β: the KL penalty's coefficient (the start value when target_kl > 0).
    kl_coef: float = 0.05
    kl_estimator: str = 'k1'
    # > 0: adapt β toward this KL per response (nats), Ziegler et al.'s controller.
    target_kl: float = 0.0
    kl_horizon: int = 10_000
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    # Scores normalised by their running mean and standard deviation.
    normalize_reward: bool = False
    # Subtracted from the score of a response that hit the length limit without a stop token.
    truncated_penalty: float = 0.0
    # PPO-ptx: weight of the language-model loss on pretraining rows in the actor's objective.
    ptx_coef: float = 0.0
    temperature: float = 1.0
    # Replies sampled per prompt (consecutive rollout rows). > 1: each score is centred on the
    # mean score of its prompt's replies before the KL penalty is added (`rl.center_groups`).
    group_size: int = 1

    def __post_init__(self):
        if self.kl_estimator not in ('k1', 'k3'):
            raise ConfigError(f'rl.kl_estimator={self.kl_estimator!r}: expected k1 or k3')
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError('rl.epochs and rl.minibatches must be >= 1')
        if self.group_size < 1:
            raise ConfigError(f'rl.group_size={self.group_size}: expected >= 1')


@dataclasses.dataclass(frozen=True)
class Roles:
    """Graphdefs of the four roles (parameters travel separately)."""

    actor: nnx.GraphDef
    critic: nnx.GraphDef
    reference: nnx.GraphDef
    reward: nnx.GraphDef


def rollout_batch(prompts: Sequence[Sequence[int]], response: np.ndarray, lengths: np.ndarray,
                  prompt_len: int, pad_id: int, reward_id: int) -> dict[str, np.ndarray]:
    """Host-side rollout rows (see the module docstring) from prompts and sampled responses."""
    b, n = response.shape
    tokens = np.full((b, prompt_len + n + 1), pad_id, np.int32)
    segment_ids = np.zeros_like(tokens)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    for row, prompt in enumerate(prompts):
        prompt = list(prompt)[-prompt_len:]
        tokens[row, prompt_len - len(prompt):prompt_len] = prompt
        segment_ids[row, prompt_len - len(prompt):prompt_len + lengths[row] + 1] = 1
        tokens[row, prompt_len:prompt_len + lengths[row]] = response[row, :lengths[row]]
        tokens[row, prompt_len + lengths[row]] = reward_id
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {'tokens': tokens, 'positions': positions, 'segment_ids': segment_ids, 'mask': mask}


def _layout(batch) -> tuple[int, int]:
    """`(P, N)` of a rollout batch, from its static shapes."""
    n = batch['mask'].shape[1]
    return batch['tokens'].shape[1] - n - 1, n


def _response_log_probs(graphdef, params, batch):
    """`(log-probs [B, N] of the response tokens, their logits [B, N, V])` under an LM."""
    prompt_len, n = _layout(batch)
    model = nnx.merge(graphdef, params)
    h_btd = model.transformer(batch['tokens'], batch['positions'], batch['segment_ids'])
    logits_bnv = model.logits(h_btd[:, prompt_len - 1:prompt_len - 1 + n])
    targets_bn = batch['tokens'][:, prompt_len:prompt_len + n]
    return losses.token_log_probs(logits_bnv, targets_bn), logits_bnv


def _values(graphdef, params, batch):
    prompt_len, n = _layout(batch)
    model = nnx.merge(graphdef, params)
    scores_bt = model(batch['tokens'], batch['positions'], batch['segment_ids'])
    return scores_bt[:, prompt_len - 1:prompt_len - 1 + n]


class PPO:
    """`ppo(state, prompts, key) -> (state, metrics)`: one PPO iteration.

    Args:
        roles: the four graphdefs; `reference_params` and `reward_params` stay frozen.
        sampler: generates from the actor's parameters (its batch size is the rollout batch).
        judge: `judge(prompt_batch, responses, lengths) -> {'reward'?: [B], 'gold'?: [B]}` on
            the host; `reward` replaces the reward model's score (verifiable-reward mode) and
            `gold` is logged.

    With `ptx_coef > 0` every call also takes `ptx_batch`: `epochs * minibatches` language-model
    batches of pretraining rows stacked on the batch axis, one slice per update (PPO-ptx).
    """

    def __init__(self, config: PPOConfig, roles: Roles, *, reference_params, reward_params,
                 sampler: Sampler, tx_actor: optax.GradientTransformation,
                 tx_critic: optax.GradientTransformation, mesh: Mesh, rules: str,
                 state_shardings: PPOState, reward_id: int, pad_id: int,
                 stop_ids: Sequence[int], verifiable: bool = False,
                 judge: Callable | None = None):
        self.config, self.roles, self.mesh, self.rules = config, roles, mesh, rules
        self.reference_params, self.reward_params = reference_params, reward_params
        self.sampler, self.tx_actor, self.tx_critic = sampler, tx_actor, tx_critic
        self.state_shardings = state_shardings
        self.reward_id, self.pad_id = reward_id, pad_id
        self.stop_ids = np.asarray(list(stop_ids))
        self.verifiable, self.judge = verifiable, judge
        self.batch_size = sampler.batch_size
        if self.batch_size % config.minibatches:
            raise ConfigError(f'rollout batch {self.batch_size} is not divisible by '
                             f'rl.minibatches={config.minibatches}')
        self.minibatch_size = self.batch_size // config.minibatches
        if self.batch_size % config.group_size:
            raise ConfigError(f'rollout batch {self.batch_size} is not divisible by '
                             f'rl.group_size={config.group_size}')
        if verifiable and judge is None:
            raise ValueError('the verifiable-reward mode needs a judge')
        # Each compiles once per rollout shape (a few prompt and response buckets).
        self.score_fn = self._make_score()
        self.advantages_fn = self._make_advantages()
        self.update_fn = self._make_update()

    def _rows(self, size: int):
        return sharding.batch_sharding(self.mesh, self.rules, size)

    # --- the jitted pieces ----------------------------------------------------------------------
    def _make_score(self):
        """Jitted `score(actor, reference, critic, reward params, rollout batch)`."""
        roles, mesh, rules, reward_id = self.roles, self.mesh, self.rules, self.reward_id

        def score(actor_params, reference_params, critic_params, reward_params, batch):
            with sharding.activation_sharding(mesh, rules):
                logp, _ = _response_log_probs(roles.actor, actor_params, batch)
                ref_logp, _ = _response_log_probs(roles.reference, reference_params, batch)
                values = _values(roles.critic, critic_params, batch)
                reward_model = nnx.merge(roles.reward, reward_params)
                score = read_at_token(reward_model(batch['tokens'], batch['positions'],
                                                   batch['segment_ids']),
                                      batch['tokens'], reward_id)
            return {'logp': logp, 'ref_logp': ref_logp, 'values': values, 'rm_score': score}

        return jax.jit(score)

    def _make_advantages(self):
        """Jitted `advantages(state, scored, mask, score, truncated)`; donates the state."""
        config, batch_size = self.config, self.batch_size

        def advantages(state: PPOState, scored, mask_bn, score_b, truncated_b):
            mask_bn = mask_bn.astype(jnp.float32)
            kl_bn = losses.kl_penalty(scored['logp'], scored['ref_logp'],
                                      config.kl_estimator) * mask_bn
            stats = state.reward_stats
            if config.group_size > 1:
                score_b = rl.center_groups(score_b, config.group_size)
            if config.normalize_reward:
                stats = stats.update(score_b)
                score_b = (score_b - stats.mean) / (stats.std + 1e-6)
            score_b = score_b - config.truncated_penalty * truncated_b
            lengths_b = mask_bn.sum(axis=1).astype(jnp.int32)
            last_bn = jax.nn.one_hot(lengths_b - 1, mask_bn.shape[1]) * mask_bn
            rewards_bn = -state.kl_coef * kl_bn + score_b[:, None] * last_bn
            advantages_bn, returns_bn = rl.gae(rewards_bn, scored['values'], mask_bn,
                                               config.gamma, config.lam)
            if config.whiten_advantages:
                advantages_bn = rl.whiten(advantages_bn, mask_bn)
            kl_b = kl_bn.sum(axis=1)
            kl_coef = state.kl_coef
            if config.target_kl > 0:
                kl_coef = rl.adaptive_kl_coef(kl_coef, kl_b.mean(), config.target_kl,
                                              config.kl_horizon, batch_size)
            values_bn = scored['values']
            _, return_var = rl.masked_mean_var(returns_bn, mask_bn)
            _, error_var = rl.masked_mean_var(returns_bn - values_bn, mask_bn)
            metrics = {'kl': kl_b.mean(), 'kl_coef': state.kl_coef,
                       'score': score_b.mean(),
                       'non_score_reward': (-state.kl_coef * kl_b).mean(),
                       'total_reward': rewards_bn.sum(axis=1).mean(),
                       'explained_variance': 1.0 - error_var / jnp.maximum(return_var, 1e-8),
                       'value_mean': jnp.sum(values_bn * mask_bn) / mask_bn.sum()}
            state = state.replace(kl_coef=kl_coef, reward_stats=stats)
            return state, advantages_bn, returns_bn, metrics

        return jax.jit(advantages, donate_argnums=0)

    def _make_update(self):
        """Jitted `update(state, minibatch, ptx_batch)`; donates the state."""
        config, roles = self.config, self.roles
        mesh, rules, tx_actor, tx_critic = self.mesh, self.rules, self.tx_actor, self.tx_critic

        def update(state: PPOState, batch, ptx_batch):
            mask_bn = batch['mask'].astype(jnp.float32)
            count = jnp.maximum(mask_bn.sum(), 1.0)

            def actor_objective(params):
                logp, logits = _response_log_probs(roles.actor, params, batch)
                loss_sum, sums = losses.ppo_policy_loss(logp, batch['old_logp'],
                                                        batch['advantages'], mask_bn,
                                                        config.clip)
                entropy_sum = losses.entropy(logits, mask_bn)
                objective = (loss_sum - config.entropy_coef * entropy_sum) / count
                aux = {'policy_loss': loss_sum / count, 'entropy': entropy_sum / count,
                       'clipfrac': sums['clipped'] / count,
                       'approx_kl': sums['approx_kl'] / count}
                if config.ptx_coef > 0:
                    ptx_sum, ptx_count = lm_loss(roles.actor, params, ptx_batch)
                    aux['ptx_loss'] = ptx_sum / jnp.maximum(ptx_count, 1.0)
                    objective = objective + config.ptx_coef * aux['ptx_loss']
                return objective, aux

            def critic_objective(params):
                values = _values(roles.critic, params, batch)
                loss_sum, clipped = losses.ppo_value_loss(values, batch['old_values'],
                                                          batch['returns'], mask_bn,
                                                          config.value_clip)
                return loss_sum / count, {'value_loss': loss_sum / count,
                                          'value_clipfrac': clipped / count}

            with sharding.activation_sharding(mesh, rules):
                (_, actor_aux), actor_grads = jax.value_and_grad(
                    actor_objective, has_aux=True)(state.actor.params)
                (_, critic_aux), critic_grads = jax.value_and_grad(
                    critic_objective, has_aux=True)(state.critic.params)
                actor_updates, actor_opt = tx_actor.update(actor_grads, state.actor.opt_state,
                                                           state.actor.params)
                critic_updates, critic_opt = tx_critic.update(
                    critic_grads, state.critic.opt_state, state.critic.params)
            actor_norm, critic_norm = optax.tree.norm(actor_grads), optax.tree.norm(
                critic_grads)
            finite = (jnp.isfinite(actor_norm) & jnp.isfinite(critic_norm)
                      & jnp.isfinite(actor_aux['policy_loss'])
                      & jnp.isfinite(critic_aux['value_loss']))
            actor = keep_if_finite(finite, state.actor,
                                   optax.apply_updates(state.actor.params, actor_updates),
                                   actor_opt)
            critic = keep_if_finite(finite, state.critic,
                                    optax.apply_updates(state.critic.params, critic_updates),
                                    critic_opt)
            # One PPO iteration is one step: the counters advance once per iteration.
            actor, critic = actor.replace(step=state.actor.step), critic.replace(
                step=state.critic.step)
            metrics = {**actor_aux, **critic_aux, 'actor_grad_norm': actor_norm,
                       'critic_grad_norm': critic_norm,
                       'nonfinite': (~finite).astype(jnp.float32)}
            return state.replace(actor=actor, critic=critic), metrics

        return jax.jit(update, donate_argnums=0)

    def rollout_rows(self, prompts, responses: np.ndarray, lengths: np.ndarray) -> dict:
        """Rollout rows trimmed to buckets of `ROLLOUT_BUCKET` tokens: the prompt part to the
        longest prompt, the response part to the longest response, so padding costs little in
        scoring and updates while only a few shapes compile."""
        def bucket(n, limit):
            return min(limit, ROLLOUT_BUCKET * max(1, -(-n // ROLLOUT_BUCKET)))

        prompt_len = bucket(max(len(p) for p in prompts),
                            self.sampler.prompt_bucket(max(len(p) for p in prompts)))
        n = bucket(int(lengths.max()), self.sampler.max_new_tokens)
        return rollout_batch(prompts, responses[:, :n], lengths, prompt_len, self.pad_id,
                             self.reward_id)

    # --- one iteration on the host ------------------------------------------------------------
    def __call__(self, state: PPOState, prompt_batch: dict, key: Array,
                 ptx_batch: dict | None = None):
        """One iteration on `prompt_batch`: `batch_size / group_size` prompts, each answered
        `group_size` times."""
        config = self.config
        prompt_batch = {k: np.repeat(np.asarray(v), config.group_size, axis=0)
                        for k, v in prompt_batch.items()}
        prompts = [list(row[:length]) for row, length in
                   zip(prompt_batch['tokens'], prompt_batch['lengths'], strict=True)]
        timings = {}

        start = time.perf_counter()
        sample_key, shuffle_key = jax.random.split(key)
        out = self.sampler(state.actor.params, prompts, sample_key,
                           SamplingParams(temperature=config.temperature))
        lengths = out['lengths'].astype(np.int32)
        timings['generate'] = time.perf_counter() - start

        start = time.perf_counter()
        rows = self.rollout_rows(prompts, out['tokens'], lengths)
        device_rows = {k: jax.device_put(v, self._rows(self.batch_size)) for k, v in rows.items()}
        scored = self.score_fn(state.actor.params, self.reference_params,
                                 state.critic.params, self.reward_params, device_rows)
        last = out['tokens'][np.arange(len(lengths)), lengths - 1]
        truncated = (~np.isin(last, self.stop_ids)).astype(np.float32)
        judged = self.judge(prompt_batch, out['tokens'], lengths) if self.judge else {}
        score = (jnp.asarray(judged['reward'], jnp.float32) if self.verifiable
                 else scored['rm_score'])
        state, advantages, returns, metrics = self.advantages_fn(
            state, scored, device_rows['mask'], score, jnp.asarray(truncated))
        host = jax.device_get({**rows, 'old_logp': scored['logp'],
                               'old_values': scored['values'], 'advantages': advantages,
                               'returns': returns})
        timings['score'] = time.perf_counter() - start

        start = time.perf_counter()
        update = self.update_fn
        rng = np.random.default_rng(np.asarray(jax.random.key_data(shuffle_key)))
        updates = config.epochs * config.minibatches
        if config.ptx_coef > 0:
            if ptx_batch is None:
                raise ValueError('rl.ptx_coef > 0: every iteration needs a ptx_batch')
            ptx_rows = len(next(iter(ptx_batch.values()))) // updates
        update_metrics = []
        for _ in range(config.epochs):
            order = rng.permutation(self.batch_size)
            for m in range(config.minibatches):
                index = np.sort(order[m * self.minibatch_size:(m + 1) * self.minibatch_size])
                minibatch = {k: jax.device_put(v[index], self._rows(self.minibatch_size))
                             for k, v in host.items()}
                ptx = None
                if config.ptx_coef > 0:
                    u = len(update_metrics)
                    ptx = {k: jax.device_put(v[u * ptx_rows:(u + 1) * ptx_rows],
                                             self._rows(ptx_rows)) for k, v in ptx_batch.items()}
                state, step_metrics = update(state, minibatch, ptx)
                update_metrics.append(step_metrics)
        update_metrics = jax.device_get(update_metrics)
        timings['update'] = time.perf_counter() - start

        state = state.replace(actor=state.actor.replace(step=state.actor.step + 1),
                              critic=state.critic.replace(step=state.critic.step + 1))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for k in update_metrics[0]:
            values = [float(m[k]) for m in update_metrics]
            metrics[k] = float(np.max(values)) if k == 'nonfinite' else float(np.mean(values))
        metrics['rm_score'] = float(np.mean(jax.device_get(scored['rm_score'])))
        if 'gold' in judged:
            metrics['gold'] = float(np.mean(judged['gold']))
        metrics['response_length'] = float(lengths.mean())
        metrics['truncated'] = float(truncated.mean())
        tokens = rows['tokens'].size
        metrics.update({
            'time/generate': timings['generate'], 'time/score': timings['score'],
            'time/update': timings['update'],
            'tokens_per_sec/generate': float(lengths.sum()) / timings['generate'],
            'tokens_per_sec/score': tokens / timings['score'],
            'tokens_per_sec/update': config.epochs * tokens / timings['update']})
        return state, metrics
