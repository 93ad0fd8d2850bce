"""One PPO iteration on the peer benchmark's model shape, split into generation, scoring and update.

    python -m benchmarks.ppo_iteration [--policy mixed] [--iterations 3] [--out ppo_iteration.json]

The rl stage's iteration (`gptstack.rollout.PPOIteration`) with its default sizes: 64 prompts of 64
tokens, 48 new tokens each at temperature 1, 2 epochs of 2 minibatches. Actor and reference are
the GPT-2 shape of ../shared/bench (6 layers, d_model 384, vocab 8192, context 256); critic and
reward model are the same backbone with a score head. All four start from random weights: the
speed does not depend on them, and no stop token is set, so every response has 48 tokens.
Reports the median seconds of each part over the timed iterations (after one that compiles) and
its tokens/s: new tokens for generation, rollout tokens for scoring (four forward passes: actor,
reference, critic, reward) and for the update (per epoch: forward and backward of actor and
critic).
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
# One reply to each of the 64 prompts, β = 0.05: the sittings of docs/performance.md.
CONFIG = ppo.PPOConfig(kl_coef=0.05, group_size=1)
PARTS = ('generate', 'score', 'update')


def build(config: GPTConfig, rollouts: int = BATCH, new_tokens: int = NEW):
    """The trainer and its state for `rollouts` replies of `new_tokens` by `config`'s actor;
    reference and reward model are copies of the initial actor and critic (the state's own
    buffers are donated to the update)."""
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(OptimConfig(lr=1e-6, total_steps=1000, warmup_steps=0))
    actor_fn = lambda rngs: GPT(config, rngs=rngs)  # noqa: E731
    critic_fn = lambda rngs: ScoreModel(config, rngs=rngs)  # noqa: E731
    actor_graphdef, critic_graphdef = abstract_model(actor_fn)[0], abstract_model(critic_fn)[0]
    shardings = ppo.PPOState.structure(
        state_shardings(abstract_train_state(actor_fn, tx), mesh, 'fsdp', tx),
        state_shardings(abstract_train_state(critic_fn, tx), mesh, 'fsdp', tx), CONFIG,
        sharding.replicated(mesh))

    def init(key):
        actor = init_params(actor_fn, jax.random.fold_in(key, 0))
        critic = init_params(critic_fn, jax.random.fold_in(key, 1))
        return ppo.PPOState.create(
            TrainState(jnp.zeros((), jnp.int32), actor, tx.init(actor)),
            TrainState(jnp.zeros((), jnp.int32), critic, tx.init(critic)), CONFIG)

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    frozen = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    sampler = Sampler(actor_graphdef, config, mesh, 'fsdp', batch_size=rollouts,
                      max_new_tokens=new_tokens, stop_ids=[], pad_id=0)
    trainer = PPOIteration(CONFIG, actor_graphdef=actor_graphdef,
                           critic_graphdef=critic_graphdef,
                           reference=ppo.Frozen(actor_graphdef, frozen.actor.params),
                           reward=ppo.Frozen(critic_graphdef, frozen.critic.params),
                           sampler=sampler, tx_actor=tx, tx_critic=tx, mesh=mesh, rules='fsdp',
                           reward_id=config.vocab_size - 1)
    return trainer, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--policy', default='mixed',
                        help=f'comma-separated, of {sorted(POLICIES)}')
    parser.add_argument('--iterations', type=int, default=3)
    parser.add_argument('--out', default='ppo_iteration.json')
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = {'tokens': rng.integers(1, 8191, (BATCH, PROMPT)).astype(np.int32),
               'lengths': np.full(BATCH, PROMPT, np.int32)}
    result = {'shape': 'gpt2 6L d384 6H V8192 T256', 'rollouts': BATCH, 'prompt': PROMPT,
              'new_tokens': NEW, 'epochs': 2, 'minibatches': 2, 'cpu_count': os.cpu_count(),
              'policies': {}}
    for policy in parse_policies(parser, args.policy):
        trainer, state = build(GPTConfig.preset('mini', scan_layers=False, **POLICIES[policy]))
        seconds = {part: [] for part in PARTS}
        rates = {part: [] for part in PARTS}
        for i in range(args.iterations + 1):  # the first compiles
            state, metrics = trainer(state, prompts, jax.random.key(i))
            assert metrics['response_length'] == NEW, metrics['response_length']
            if i:
                for part in PARTS:
                    seconds[part].append(metrics[f'time/{part}'])
                    rates[part].append(metrics[f'tokens_per_sec/{part}'])
        result['policies'][policy] = {
            part: {'seconds': statistics.median(seconds[part]),
                   'tokens_per_sec': statistics.median(rates[part])} for part in PARTS}
        result['policies'][policy]['iteration_seconds'] = sum(
            statistics.median(seconds[part]) for part in PARTS)
    print(f'{"policy":10s} ' + ' '.join(f'{part + " s":>10s} {"tok/s":>7s}' for part in PARTS)
          + f' {"total s":>8s}')
    for policy, r in result['policies'].items():
        print(f'{policy:10s} ' + ' '.join(f'{r[part]["seconds"]:10.2f} '
                                          f'{r[part]["tokens_per_sec"]:7.0f}' for part in PARTS)
              + f' {r["iteration_seconds"]:8.2f}')
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    environment.cpu_without_accelerators()  # no TPU probe on a machine without one
    main()
