"""The PPO iteration on a toy model: the rollout layout, scores against direct computation,
the KL penalty's hold on the policy, and learning a rewarded token.

Run: `python -m pytest -q tests/test_ppo.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptstack import losses, rl
from gptstack.config import GPTConfig, OptimConfig
from gptstack.model import GPT, ScoreModel, read_at_token
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler
from gptstack.state import create_train_state, init_params
from gptstack.steps import ppo

VOCAB, TARGET, PAD, REWARD, STOP = 16, 3, 13, 14, 15
BATCH, NEW = 16, 8
CONFIG = GPTConfig.preset('toy', vocab_size=VOCAB)


def test_rollout_rows_put_the_reward_token_right_after_the_response():
    rows = ppo.rollout_batch([[5, 6, 7], [8]], np.array([[1, 2, STOP, PAD], [4, 4, 4, 4]]),
                             np.array([3, 4]), prompt_len=4, pad_id=PAD, reward_id=REWARD)
    assert rows['tokens'].tolist() == [[PAD, 5, 6, 7, 1, 2, STOP, REWARD, PAD],
                                       [PAD, PAD, PAD, 8, 4, 4, 4, 4, REWARD]]
    assert rows['segment_ids'].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1, 0],
                                            [0, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert rows['positions'][0, 1:8].tolist() == list(range(7))
    assert rows['positions'][1, 3:].tolist() == list(range(6))
    assert rows['mask'].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.fixture(scope='module')
def trainer(mesh_8):
    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=1000,
                                       weight_decay=0.0, end_lr_ratio=1.0))
    actor_graphdef, actor, actor_shardings = create_train_state(
        lambda rngs: GPT(CONFIG, rngs=rngs), tx, mesh_8, 'fsdp', jax.random.key(0))
    critic_graphdef, critic, critic_shardings = create_train_state(
        lambda rngs: ScoreModel(CONFIG, rngs=rngs), tx, mesh_8, 'fsdp', jax.random.key(1))
    reward_params = jax.jit(lambda k: init_params(
        lambda rngs: ScoreModel(CONFIG, rngs=rngs), k))(jax.random.key(2))
    sampler = Sampler(actor_graphdef, CONFIG, mesh_8, 'fsdp', batch_size=BATCH,
                      max_new_tokens=NEW, stop_ids=[STOP], pad_id=PAD)

    def judge(prompt_batch, responses, lengths):
        hits = [(row[:n] == TARGET).mean() for row, n in zip(responses, lengths, strict=True)]
        return {'reward': np.asarray(hits, np.float32), 'gold': np.asarray(hits)}

    def start(kl_coef):
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 (updates donate)
        return ppo.PPOState(actor=copy(actor), critic=copy(critic), kl_coef=jnp.float32(kl_coef),
                            reward_stats=rl.RunningMoments.create())

    shardings = ppo.PPOState(actor_shardings, critic_shardings, None, None)
    config = ppo.PPOConfig(epochs=2, minibatches=2, whiten_advantages=True)
    trainer = ppo.PPO(config, ppo.Roles(actor_graphdef, critic_graphdef, actor_graphdef,
                                        critic_graphdef),
                      reference_params=jax.tree.map(jnp.copy, actor.params),
                      reward_params=reward_params, sampler=sampler, tx_actor=tx, tx_critic=tx,
                      mesh=mesh_8, rules='fsdp', state_shardings=shardings, reward_id=REWARD,
                      pad_id=PAD, stop_ids=[STOP], verifiable=True, judge=judge)
    prompts = {'tokens': np.tile([[1, 2, 4, 5]], (BATCH, 1)), 'lengths': np.full(BATCH, 4)}
    return trainer, start, prompts, (actor_graphdef, critic_graphdef, reward_params)


def run_iterations(trainer, state, prompts, n):
    history = []
    for i in range(n):
        state, metrics = trainer(state, prompts, jax.random.key(i))
        history.append(metrics)
    return state, history


def test_scores_match_direct_forward_passes(trainer):
    trainer, start, prompts, (actor_graphdef, critic_graphdef, reward_params) = trainer
    state = start(0.1)
    out = trainer.sampler(state.actor.params, [list(p) for p in prompts['tokens']],
                          jax.random.key(0))
    rows = trainer.rollout_rows(list(prompts['tokens']), out['tokens'], out['lengths'])
    p = rows['tokens'].shape[1] - rows['mask'].shape[1] - 1
    assert p == 16 and rows['mask'].shape[1] in (8, 16)  # trimmed to the buckets
    scored = trainer.score_fn(state.actor.params, trainer.reference_params,
                                 state.critic.params, reward_params, rows)
    logits = nnx.merge(actor_graphdef, state.actor.params)(
        rows['tokens'], rows['positions'], rows['segment_ids'])
    expected = losses.token_log_probs(logits[:, p - 1:-2], rows['tokens'][:, p:-1])
    mask = rows['mask'] > 0
    np.testing.assert_allclose(np.asarray(scored['logp'])[mask], np.asarray(expected)[mask],
                               rtol=1e-4, atol=1e-5)
    # The sampler's own log-probs (KV cache) agree with the full forward pass.
    np.testing.assert_allclose(out['model_logprobs'][mask], np.asarray(expected)[mask],
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(scored['logp']), np.asarray(scored['ref_logp']))
    rm = nnx.merge(critic_graphdef, reward_params)(rows['tokens'], rows['positions'],
                                                   rows['segment_ids'])
    np.testing.assert_allclose(np.asarray(scored['rm_score']),
                               np.asarray(read_at_token(rm, rows['tokens'], REWARD)), rtol=1e-5)


def test_rewarded_token_rises_without_kl_and_a_large_kl_holds_the_policy(trainer):
    trainer, start, prompts, _ = trainer
    _, free = run_iterations(trainer, start(0.0), prompts, 12)
    _, held = run_iterations(trainer, start(10.0), prompts, 12)
    assert free[0]['nonfinite'] == 0 and free[0]['gold'] < 0.25
    assert np.mean([m['gold'] for m in free[-3:]]) > 2 * free[0]['gold'] + 0.1
    assert free[-1]['kl'] > 1.0
    assert np.mean([m['kl'] for m in held[-3:]]) < 0.2 * free[-1]['kl']
    assert np.mean([m['gold'] for m in held[-3:]]) < np.mean([m['gold'] for m in free[-3:]])
    for key in ('clipfrac', 'approx_kl', 'value_loss', 'explained_variance', 'entropy',
                'tokens_per_sec/generate', 'time/update'):
        assert np.isfinite(free[-1][key]), key
