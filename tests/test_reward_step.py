"""The reward model: where the reward is read, the jitted ranking step on every mesh, learning.

Run: `python -m pytest -q tests/test_reward_step.py`.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from gptstack import model as gpt_model
from gptstack.config import GPTConfig, OptimConfig
from gptstack.optim import make_optimizer
from gptstack.state import create_train_state
from gptstack.steps import reward as reward_step

REWARD, PAD = 1000, 1001
B, K, T = 8, 3, 16


@pytest.mark.parametrize('preset', ['toy', 'toy-llama'])
def test_padding_and_text_after_the_reward_token_never_change_the_reward(preset):
    with nnx.use_eager_sharding(False):
        model = gpt_model.ScoreModel(GPTConfig.preset(preset), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    score = jax.jit(lambda *rows: reward_step.rewards(graphdef, params, *rows, REWARD))
    text = np.random.default_rng(0).integers(0, 900, size=9)
    n = len(text) + 1

    def row(before, after, width):
        """`before` pads, the text and the reward token, then `after` (pads or other text)."""
        tokens = np.full(width, PAD)
        tokens[before:before + n] = [*text, REWARD]
        tokens[before + n:before + n + len(after)] = after
        positions = np.clip(np.arange(width) - before, 0, None)
        segments = ((np.arange(width) >= before) & (np.arange(width) < before + n)).astype(int)
        return tokens, positions, segments

    variants = [row(0, [], 12), row(0, [], 40), row(0, [5, 6, 7, REWARD, 9], 24),
                row(7, [], 24), row(3, [11] * 8, 32)]
    rewards = []
    for tokens, positions, segments in variants:
        r = score(*(np.asarray(x, np.int32)[None] for x in (tokens, positions, segments)))
        rewards.append(float(r[0]))
    np.testing.assert_allclose(rewards, rewards[0], rtol=1e-5, atol=1e-6)
    # The reward moves when the text before the reward token does, and a row without the token
    # has no reward at all.
    tokens, positions, segments = row(0, [], 12)
    tokens[2] = (tokens[2] + 1) % 900
    moved = score(*(np.asarray(x, np.int32)[None] for x in (tokens, positions, segments)))
    assert float(moved[0]) != rewards[0]
    tokens[tokens == REWARD] = PAD
    missing = score(*(np.asarray(x, np.int32)[None] for x in (tokens, positions, segments)))
    assert np.isnan(float(missing[0]))


def ranked_batch(seed):
    """Groups of K completions of random length; the true rank is how many 7s they hold
    (a rule the model can learn), with some ties and some empty slots."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, K, T), PAD, np.int32)
    lengths = rng.integers(5, T, size=(B, K))
    sevens = rng.integers(0, 3, size=(B, K))
    for b in range(B):
        for k in range(K):
            body = rng.integers(8, 900, size=lengths[b, k] - 1)
            body[rng.choice(len(body), sevens[b, k], replace=False)] = 7
            tokens[b, k, :lengths[b, k]] = [*body, REWARD]
    valid = np.ones((B, K), np.int32)
    valid[0, 2] = 0
    tokens[0, 2] = PAD  # an empty slot, as the data pipeline leaves it
    rows = {'tokens': tokens, 'lengths': np.where(valid, lengths, 0),
            'ranks': (3 - sevens).astype(np.int32), 'valid': valid}
    from gptstack.data.preference import to_model_batch
    return to_model_batch(rows)


def train(mesh, rules, tx, schedule, batches, accum_steps=1):
    config = GPTConfig.preset('toy')
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.ScoreModel(config, rngs=rngs), tx, mesh, rules, jax.random.key(0))
    step = reward_step.make_reward_step(graphdef, tx, schedule, mesh, rules, shardings, B,
                                        REWARD, accum_steps=accum_steps, margin=0.1)
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return graphdef, state, shardings, history


def test_same_step_on_every_mesh_and_with_accumulation(mesh_1, mesh_2x4):
    tx, schedule = optax.sgd(1.0), lambda step: 1.0  # the update is minus the gradient
    batch = ranked_batch(0)
    results = [train(mesh, rules, tx, schedule, [batch], accum)
               for mesh, rules, accum in ((mesh_1, 'fsdp', 1), (mesh_2x4, 'fsdp_tp', 1),
                                          (mesh_1, 'fsdp', 2))]
    reference = results[0][3][0]
    assert reference['pairs'] > 0 and 0 < reference['prompts'] <= B
    assert reference['nonfinite'] == 0 and np.isfinite(reference['grad_norm'])
    for _, state, _, (metrics,) in results[1:]:
        for key in ('loss', 'accuracy', 'reward_gap', 'prompts', 'pairs', 'grad_norm'):
            np.testing.assert_allclose(metrics[key], reference[key], rtol=2e-5, err_msg=key)
        for leaf, ref in zip(jax.tree.leaves(jax.device_get(nnx.to_pure_dict(state.params))),
                             jax.tree.leaves(jax.device_get(nnx.to_pure_dict(results[0][1].params))),
                             strict=True):
            np.testing.assert_allclose(leaf, ref, rtol=1e-4, atol=1e-6)


def test_the_reward_model_learns_a_ranking_rule(mesh_8):
    tx, schedule = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=5, total_steps=60,
                                              weight_decay=0.0))
    graphdef, state, shardings, history = train(mesh_8, 'fsdp', tx, schedule,
                                                [ranked_batch(s % 12) for s in range(60)])
    assert history[-1]['loss'] < 0.5 * history[0]['loss']
    evaluate = reward_step.make_reward_eval_step(graphdef, mesh_8, 'fsdp', shardings.params, B,
                                                 REWARD)
    held_out = ranked_batch(99)
    rewards = np.asarray(evaluate(state.params, held_out))
    assert np.isnan(rewards[0, 2]) and np.isfinite(np.delete(rewards.ravel(), 2)).all()
    better = held_out['ranks'][:, :, None] < held_out['ranks'][:, None, :]
    both = held_out['valid'][:, :, None] * held_out['valid'][:, None, :] > 0
    correct = (rewards[:, :, None] > rewards[:, None, :])[better & both]
    assert correct.mean() > 0.8
