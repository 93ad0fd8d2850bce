"""One RL iteration on the peer benchmark's model shape, split into generation, scoring and
update, for PPO and the critic-free GRPO and RLOO.

    python -m benchmarks.ppo_iteration [--policy mixed] [--algorithm ppo,grpo,rloo]
        [--iterations 3] [--out ppo_iteration.json]

The rl stage's iteration (`gptstack.rollout.PPOIteration`) with its default sizes: 64 rollouts
of 64-token prompts, 48 new tokens each at temperature 1, 2 epochs of 2 minibatches. Actor and
reference are the GPT-2 shape of ../shared/bench (6 layers, d_model 384, vocab 8192, context
256); critic and reward model are the same backbone with a score head. All start from random
weights: the speed does not depend on them, and no stop token is set, so every response has 48
tokens. PPO answers each of 64 prompts once (β 0.05: the sittings of docs/performance.md); GRPO
and RLOO, which have no critic and need groups, answer each of 16 prompts four times.
Reports the median seconds of each part over the timed iterations (after one that compiles) and
its tokens/s: new tokens for generation, rollout tokens for scoring (forward passes of actor,
reference, reward model and, for PPO, critic) and for the update (per epoch: forward and
backward of the actor, and of the critic for PPO).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.generate import POLICIES, parse_policies
from gptstack import environment, sharding
from gptstack.config import GPTConfig, MeshConfig, OptimConfig
from gptstack.model import GPT, ScoreModel
from gptstack.optim import make_optimizer
from gptstack.rollout import PPOIteration
from gptstack.sampling import Sampler
from gptstack.state import (
    TrainState,
    abstract_model,
    abstract_train_state,
    init_params,
    state_shardings,
)
from gptstack.steps import ppo

BATCH, PROMPT, NEW = 64, 64, 48
# PPO: one reply to each of the 64 prompts, β = 0.05 (the sittings of docs/performance.md);
# GRPO and RLOO: four replies to each of 16.
CONFIGS = {'ppo': ppo.PPOConfig(kl_coef=0.05, group_size=1),
           'grpo': ppo.PPOConfig(algorithm='grpo', group_size=4),
           'rloo': ppo.PPOConfig(algorithm='rloo', group_size=4)}
PARTS = ('generate', 'score', 'update')


def build(config: GPTConfig, rollouts: int = BATCH, new_tokens: int = NEW,
          rl_config: ppo.PPOConfig = CONFIGS['ppo']):
    """The trainer and its state for `rollouts` replies of `new_tokens` by `config`'s actor;
    reference and reward model are copies of the initial actor and of a score model, the
    critic's start where the algorithm has one (the state's own buffers are donated to the
    update)."""
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(OptimConfig(lr=1e-6, total_steps=1000, warmup_steps=0))
    actor_fn = lambda rngs: GPT(config, rngs=rngs)  # noqa: E731
    critic_fn = lambda rngs: ScoreModel(config, rngs=rngs)  # noqa: E731
    actor_graphdef, critic_graphdef = abstract_model(actor_fn)[0], abstract_model(critic_fn)[0]
    with_critic = rl_config.critic
    shardings = ppo.PPOState.structure(
        state_shardings(abstract_train_state(actor_fn, tx), mesh, 'fsdp', tx),
        state_shardings(abstract_train_state(critic_fn, tx), mesh, 'fsdp', tx)
        if with_critic else None, rl_config, sharding.replicated(mesh))

    def initial(key):
        return (init_params(actor_fn, jax.random.fold_in(key, 0)),
                init_params(critic_fn, jax.random.fold_in(key, 1)))

    def init(key):
        actor, critic = initial(key)
        return ppo.PPOState.create(
            TrainState(jnp.zeros((), jnp.int32), actor, tx.init(actor)),
            TrainState(jnp.zeros((), jnp.int32), critic, tx.init(critic))
            if with_critic else None, rl_config)

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    # The frozen roles: the same initial weights in buffers of their own.
    actor, score_model = jax.jit(initial, out_shardings=sharding.replicated(mesh))(
        jax.random.key(0))
    sampler = Sampler(actor_graphdef, config, mesh, 'fsdp', batch_size=rollouts,
                      max_new_tokens=new_tokens, stop_ids=[], pad_id=0)
    trainer = PPOIteration(rl_config, actor_graphdef=actor_graphdef,
                           critic_graphdef=critic_graphdef if with_critic else None,
                           reference=ppo.Frozen(actor_graphdef, actor),
                           reward=ppo.Frozen(critic_graphdef, score_model),
                           sampler=sampler, tx_actor=tx, tx_critic=tx if with_critic else None,
                           mesh=mesh, rules='fsdp', reward_id=config.vocab_size - 1)
    return trainer, state


def measure(trainer, state, prompts: dict, iterations: int) -> dict:
    """Median seconds and tokens/s of each part over `iterations` timed iterations (after one
    that compiles), and of the whole iteration."""
    seconds = {part: [] for part in PARTS}
    rates = {part: [] for part in PARTS}
    for i in range(iterations + 1):
        state, metrics = trainer(state, prompts, jax.random.key(i))
        assert metrics['response_length'] == NEW, metrics['response_length']
        if i:
            for part in PARTS:
                seconds[part].append(metrics[f'time/{part}'])
                rates[part].append(metrics[f'tokens_per_sec/{part}'])
    result = {part: {'seconds': statistics.median(seconds[part]),
                     'tokens_per_sec': statistics.median(rates[part])} for part in PARTS}
    result['iteration_seconds'] = sum(result[part]['seconds'] for part in PARTS)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--policy', default='mixed',
                        help=f'comma-separated, of {sorted(POLICIES)}')
    parser.add_argument('--algorithm', default='ppo,grpo,rloo',
                        help=f'comma-separated, of {sorted(CONFIGS)}')
    parser.add_argument('--iterations', type=int, default=3)
    parser.add_argument('--out', default='ppo_iteration.json')
    args = parser.parse_args()
    algorithms = args.algorithm.split(',')
    if unknown := sorted(set(algorithms) - set(CONFIGS)):
        parser.error(f'--algorithm: unknown {unknown}; expected some of {sorted(CONFIGS)}')
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 8191, (BATCH, PROMPT)).astype(np.int32)
    result = {'shape': 'gpt2 6L d384 6H V8192 T256', 'rollouts': BATCH, 'prompt': PROMPT,
              'new_tokens': NEW, 'epochs': 2, 'minibatches': 2, 'cpu_count': os.cpu_count(),
              'policies': {}, 'algorithms': {}}
    for policy in parse_policies(parser, args.policy):
        config = GPTConfig.preset('mini', scan_layers=False, **POLICIES[policy])
        for algorithm in algorithms:
            rl_config = CONFIGS[algorithm]
            prompts = {'tokens': tokens[:BATCH // rl_config.group_size],
                       'lengths': np.full(BATCH // rl_config.group_size, PROMPT, np.int32)}
            measured = measure(*build(config, rl_config=rl_config), prompts, args.iterations)
            result['algorithms'].setdefault(algorithm, {})[policy] = measured
            if algorithm == 'ppo':  # the figure the summary and docs/performance.md track
                result['policies'][policy] = measured
    print(f'{"algorithm":10s} {"policy":10s} '
          + ' '.join(f'{part + " s":>10s} {"tok/s":>7s}' for part in PARTS) + f' {"total s":>8s}')
    for algorithm, by_policy in result['algorithms'].items():
        for policy, r in by_policy.items():
            print(f'{algorithm:10s} {policy:10s} '
                  + ' '.join(f'{r[part]["seconds"]:10.2f} {r[part]["tokens_per_sec"]:7.0f}'
                             for part in PARTS) + f' {r["iteration_seconds"]:8.2f}')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
