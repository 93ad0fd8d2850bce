"""Reinforcement learning from sampled replies: the rollout layout, one iteration of PPO,
GRPO or RLOO on the host, and the evaluation of a policy on held-out prompts.

One rollout row per reply:

    tokens  [B, P + N + 1]  the prompt left-padded to P, the N response slots (padded after the
                            stop token), and `<|reward|>` right after the response
    mask    [B, N]          1 on generated tokens (up to and including the stop token)

Response token `j` sits at `P + j` and is predicted at `P + j - 1`; everything the actor, critic
and reference read is at or before that, so the reward token after the response changes nothing
for them. `P` and `N` are trimmed to multiples of `ROLLOUT_BUCKET` (`rollout_rows`).

One iteration (`PPOIteration.__call__`): sample `group_size` responses to each prompt
(`gptstack.sampling`) -> `reward` (or the gold scorer) -> keep the groups that differ, when
oversampling -> `score` -> `advantages` -> `epochs` passes of `minibatches` `update`s, the
jitted pieces of `gptstack.steps.ppo`; the algorithm (`PPOConfig.algorithm`) decides whether a
critic takes part.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gptstack import rl, sharding
from gptstack.sampling import Sampler, SamplingParams
from gptstack.steps.ppo import (
    Frozen,
    PPOConfig,
    PPOState,
    make_advantages_fn,
    make_reward_fn,
    make_score_fn,
    make_update_fn,
    response_log_probs,
)

Array = jax.Array
# Rollout rows are trimmed to multiples of this many tokens (prompt part and response part).
ROLLOUT_BUCKET = 16


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


def rollout_rows(prompts: Sequence[Sequence[int]], responses: np.ndarray, lengths: np.ndarray,
                 sampler: Sampler, reward_id: int) -> dict[str, np.ndarray]:
    """Rollout rows of `sampler`'s output trimmed to buckets of `ROLLOUT_BUCKET` tokens: the
    prompt part to the longest prompt, the response part to the longest response, so padding
    costs little in scoring and updates while only a few shapes compile."""
    def bucket(n, limit):
        return min(limit, ROLLOUT_BUCKET * max(1, -(-n // ROLLOUT_BUCKET)))

    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest, sampler.prompt_bucket(longest))
    n = bucket(int(lengths.max()), sampler.max_new_tokens)
    return rollout_batch(prompts, responses[:, :n], lengths, prompt_len, sampler.pad_id,
                         reward_id)


@functools.cache
def _log_probs_fn(graphdef: nnx.GraphDef, mesh: Mesh, rules: str):
    """Jitted `(params, rollout rows) -> [B, N]` response-token log-probabilities of a model."""

    def log_probs(params, rows):
        with sharding.activation_sharding(mesh, rules):
            return response_log_probs(graphdef, params, rows)[0]

    return jax.jit(log_probs)


def reply_log_probs(graphdef: nnx.GraphDef, params, sampler: Sampler,
                    prompts: Sequence[Sequence[int]], replies: Sequence[np.ndarray]) -> np.ndarray:
    """`log π(reply | prompt)` of each reply under the model `(graphdef, params)`, summed over
    the reply's tokens (its stop token included): rollout rows in full batches of `sampler`'s
    size on its mesh, the last batch filled up with its final reply. The difference of two
    models' sums on one model's replies is that model's KL (k1) to the other, reply by reply."""
    size, sums = sampler.batch_size, []
    log_probs = _log_probs_fn(graphdef, sampler.mesh, sampler.rules)
    for start in range(0, len(prompts), size):
        real = min(size, len(prompts) - start)
        chunk = [*range(start, start + real), *[start + real - 1] * (size - real)]
        lengths = np.asarray([len(replies[i]) for i in chunk], np.int32)
        responses = np.full((size, max(1, lengths.max())), sampler.pad_id, np.int32)
        for row, i in enumerate(chunk):
            responses[row, :lengths[row]] = replies[i]
        rows = rollout_rows([prompts[i] for i in chunk], responses, lengths, sampler,
                            reward_id=sampler.pad_id)
        # The slot after a reply (the reward model's) is read by nothing here, but a reply that
        # fills the context puts it one past the last position.
        rows['positions'] = np.minimum(rows['positions'], sampler.config.max_seq_len - 1)
        logp = sharding.to_host(log_probs(params, rows))
        sums.append((logp * rows['mask']).sum(axis=1)[:real])
    return np.concatenate(sums)


def informative_groups(scores: np.ndarray, group_size: int, rows: int) -> np.ndarray:
    """The indices of `rows` replies to train on, whole groups of `group_size` consecutive
    ones: the groups whose replies scored differently first, then tied groups if too few
    differ, in the order they were sampled."""
    groups = scores.reshape(-1, group_size)
    tied = np.all(groups == groups[:, :1], axis=1)
    order = np.concatenate([np.flatnonzero(~tied), np.flatnonzero(tied)])
    chosen = np.sort(order[:rows // group_size])
    return (chosen[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)


class PolicySample(NamedTuple):
    """The policy's replies to a list of prompts, one entry per prompt."""

    replies: list[np.ndarray]  # each reply's tokens, up to and including its stop token
    rm_score: np.ndarray | None  # [n] the reward model's score of each reply
    kl: np.ndarray | None  # [n] log π/π_ref summed over each reply (k1)


class PPOIteration:
    """`iteration(state, prompt_batch, key) -> (state, metrics)`: one iteration of the
    configured algorithm.

    Args:
        actor_graphdef, critic_graphdef: the trained roles, whose parameters are in `PPOState`;
            without a critic (GRPO, RLOO) `critic_graphdef` and `tx_critic` are None.
        reference, reward: the frozen roles.
        sampler: generates from the actor's parameters (its batch size is the rollout batch);
            its stop and pad tokens are the rollouts'.
        judge: `judge(prompt_batch, responses, lengths) -> {'reward'?: [B], 'gold'?: [B]}` on
            the host; `reward` replaces the reward model's score (verifiable-reward mode) and
            `gold` is logged.

    With `ptx_coef > 0` every call also takes `ptx_batch`: `epochs * minibatches` language-model
    batches of pretraining rows stacked on the batch axis, one slice per update (PPO-ptx).
    """

    def __init__(self, config: PPOConfig, *, actor_graphdef: nnx.GraphDef,
                 critic_graphdef: nnx.GraphDef | None, reference: Frozen, reward: Frozen,
                 sampler: Sampler, tx_actor: optax.GradientTransformation,
                 tx_critic: optax.GradientTransformation | None, mesh: Mesh, rules: str,
                 reward_id: int, verifiable: bool = False, judge: Callable | None = None):
        config.check_batch(sampler.batch_size)
        if verifiable and judge is None:
            raise ValueError('the verifiable-reward mode needs a judge')
        if (critic_graphdef is not None) != config.critic:
            raise ValueError(f'rl.algorithm={config.algorithm} '
                             f'{"needs" if config.critic else "takes no"} critic')
        self.config, self.batch_size = config, sampler.batch_size
        self.minibatch_size = self.batch_size // config.minibatches
        self._reference, self._reward, self._sampler = reference, reward, sampler
        self._mesh, self._rules, self._reward_id = mesh, rules, reward_id
        self._verifiable, self._judge = verifiable, judge
        # Each compiles once per rollout shape (a few prompt and response buckets).
        self._score = make_score_fn(actor_graphdef, reference.graphdef, critic_graphdef, mesh,
                                    rules)
        self._reward_fn = make_reward_fn(reward.graphdef, mesh, rules, reward_id)
        self._advantages = make_advantages_fn(config, self.batch_size)
        self._update = make_update_fn(config, actor_graphdef, critic_graphdef, tx_actor,
                                      tx_critic, mesh, rules, sampler.max_new_tokens)

    def _rows(self, size: int):
        return sharding.batch_sharding(self._mesh, self._rules, size)

    def _sample(self, params, prompts: list[list[int]], key: Array) -> dict[str, np.ndarray]:
        """Replies to `prompts`, a multiple of the sampler's batch: each batch `c` of several
        drawn with `fold_in(key, c)`."""
        sampling = SamplingParams(temperature=self.config.temperature)
        if len(prompts) == self.batch_size:
            return self._sampler(params, prompts, key, sampling)
        outs = [self._sampler(params, prompts[start:start + self.batch_size],
                              jax.random.fold_in(key, c), sampling)
                for c, start in enumerate(range(0, len(prompts), self.batch_size))]
        return {k: np.concatenate([out[k] for out in outs]) for k in outs[0]}

    def _rm_scores(self, prompts: list[list[int]], responses: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray:
        """The reward model's score of each reply, a batch of the sampler's size at a time."""
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            rows = rollout_rows(prompts[start:end], responses[start:end], lengths[start:end],
                                self._sampler, self._reward_id)
            scores.append(sharding.to_host(self._reward_fn(self._reward.params, rows)))
        return np.concatenate(scores)

    def __call__(self, state: PPOState, prompt_batch: dict, key: Array,
                 ptx_batch: dict | None = None) -> tuple[PPOState, dict[str, float]]:
        """One iteration on `prompt_batch`: `oversample * batch_size / group_size` prompts,
        each answered `group_size` times; `batch_size` of the replies are trained on. Donates
        `state`."""
        config = self.config
        prompt_batch = {k: np.repeat(np.asarray(v), config.group_size, axis=0)
                        for k, v in prompt_batch.items()}
        prompts = [list(row[:length]) for row, length in
                   zip(prompt_batch['tokens'], prompt_batch['lengths'], strict=True)]

        if len(prompts) != config.oversample * self.batch_size:
            raise ValueError(f'{len(prompts) // config.group_size} prompts for an iteration of '
                             f'{config.oversample * self.batch_size // config.group_size}')
        timings = {}

        start = time.perf_counter()
        sample_key, shuffle_key = jax.random.split(key)
        out = self._sample(state.actor.params, prompts, sample_key)
        responses, lengths = out['tokens'], out['lengths'].astype(np.int32)
        timings['generate'] = time.perf_counter() - start

        # The reward of every sampled reply (the gold scorer's on the host, or the reward
        # model's), then the replies to train on: all of them, or with oversampling the groups
        # that differ.
        start = time.perf_counter()
        judged = self._judge(prompt_batch, responses, lengths) if self._judge else {}
        rm_score = None
        if self._verifiable:
            reward = judged['reward']
        else:
            reward = rm_score = self._rm_scores(prompts, responses, lengths)
        keep = (informative_groups(reward, config.group_size, self.batch_size)
                if config.oversample > 1 else np.arange(self.batch_size))
        prompts, responses, lengths = [prompts[i] for i in keep], responses[keep], lengths[keep]
        if rm_score is None:  # logged in the verifiable mode, for the replies trained on
            rm_score = self._rm_scores(prompts, responses, lengths)
        rows = rollout_rows(prompts, responses, lengths, self._sampler, self._reward_id)
        device_rows = {k: jax.device_put(v, self._rows(self.batch_size)) for k, v in rows.items()}
        scored = self._score(state.actor.params, self._reference.params, critic_params(state),
                             device_rows)
        last = responses[np.arange(len(lengths)), lengths - 1]
        truncated = (~np.isin(last, self._sampler.stop_ids)).astype(np.float32)
        state, advantages, returns, metrics = self._advantages(
            state, scored, device_rows['mask'], jnp.asarray(reward[keep], jnp.float32),
            jnp.asarray(truncated))
        learned = {'old_logp': scored['logp'], 'advantages': advantages}
        if config.critic:
            learned.update(old_values=scored['values'], returns=returns)
        if config.kl_in_loss:
            learned['ref_logp'] = scored['ref_logp']
        host = {**rows, **sharding.to_host(learned)}
        timings['score'] = time.perf_counter() - start

        start = time.perf_counter()
        rng = np.random.default_rng(np.asarray(jax.random.key_data(shuffle_key)))
        updates = config.epochs * config.minibatches
        if config.ptx_coef > 0:
            if ptx_batch is None:
                raise ValueError('rl.ppo.ptx_coef > 0: every iteration needs a ptx_batch')
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
                state, step_metrics = self._update(state, minibatch, ptx)
                update_metrics.append(step_metrics)
        update_metrics = sharding.to_host(update_metrics)
        timings['update'] = time.perf_counter() - start

        state = state.replace(actor=state.actor.replace(step=state.actor.step + 1))
        if config.critic:
            state = state.replace(critic=state.critic.replace(step=state.critic.step + 1))
        metrics = {k: float(v) for k, v in sharding.to_host(metrics).items()}
        for k in update_metrics[0]:
            values = [float(m[k]) for m in update_metrics]
            metrics[k] = float(np.max(values)) if k == 'nonfinite' else float(np.mean(values))
        metrics['rm_score'] = float(np.mean(rm_score))
        for name in ('gold', 'formatted'):  # of every sampled reply: the policy's own
            if name in judged:
                metrics[name] = float(np.mean(judged[name]))
        if config.oversample > 1:
            metrics['sampled_tied_groups'] = float(rl.tied_groups(reward, config.group_size))
        metrics['response_length'] = float(lengths.mean())
        metrics['truncated'] = float(truncated.mean())
        tokens = rows['tokens'].size
        metrics.update({
            'time/generate': timings['generate'], 'time/score': timings['score'],
            'time/update': timings['update'],
            'tokens_per_sec/generate': float(out['lengths'].sum()) / timings['generate'],
            'tokens_per_sec/score': tokens / timings['score'],
            'tokens_per_sec/update': config.epochs * tokens / timings['update']})
        return state, metrics

    def evaluate(self, state: PPOState, prompts: Sequence[Sequence[int]], key: Array,
                 sampling: SamplingParams, *, score: bool = True) -> PolicySample:
        """The policy's reply to each of `prompts` and, with `score`, its reward-model score
        and KL to the reference. Any number of prompts: they go in batches of the rollout size
        (the last one filled up with its final prompt), the batch from row `r` sampled with
        `fold_in(key, r)`, so the same key gives the same draws at every evaluation."""
        size = self.batch_size
        replies, scores, kls = [], [], []
        for start in range(0, len(prompts), size):
            chunk = list(prompts[start:start + size])
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            out = self._sampler(state.actor.params, padded, jax.random.fold_in(key, start),
                                sampling)
            lengths = out['lengths'].astype(np.int32)
            replies += [row[:length] for row, length in zip(out['tokens'][:len(chunk)],
                                                            lengths[:len(chunk)], strict=True)]
            if score:
                rows = rollout_rows(padded, out['tokens'], lengths, self._sampler,
                                    self._reward_id)
                scored = sharding.to_host(self._score(
                    state.actor.params, self._reference.params, critic_params(state), rows))
                kl = ((scored['logp'] - scored['ref_logp']) * rows['mask']).sum(axis=1)
                kls.append(kl[:len(chunk)])
                scores.append(sharding.to_host(self._reward_fn(self._reward.params,
                                                               rows))[:len(chunk)])
        if not score:
            return PolicySample(replies, None, None)
        return PolicySample(replies, np.concatenate(scores), np.concatenate(kls))


def critic_params(state: PPOState):
    """The critic's parameters, or None for the critic-free algorithms."""
    return None if state.critic is None else state.critic.params
