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
from gptstack.data.preference import make_branched_eval_batches
from gptstack.optim import make_optimizer
from gptstack.state import create_train_state
from gptstack.steps import reward as reward_step

REWARD, PAD = 1000, 1001
B, K, T = 8, 3, 48


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


def ranked_groups(seed, n_groups=12):
    """Branched groups (`gptstack.data.preference.BRANCHED_FIELDS`) of a random prompt and K
    completions of random length, each ending in the reward token; the true rank is how many
    7s a completion holds (a rule the model can learn), with some ties; the first group has only
    two completions (an empty slot)."""
    rng = np.random.default_rng(seed)
    examples = []
    for group in range(1, n_groups + 1):
        prompt = rng.integers(8, 900, size=rng.integers(2, 6))
        fields = {'tokens': [prompt], 'branch_ids': [[0] * len(prompt)],
                  'positions': [np.arange(len(prompt))], 'ranks': [[0] * len(prompt)]}
        for branch in range(1, (2 if group == 1 else K) + 1):
            body = rng.integers(8, 900, size=rng.integers(2, 8))
            sevens = rng.integers(0, 3)
            body[rng.choice(len(body), min(sevens, len(body)), replace=False)] = 7
            completion = [*body, REWARD]
            start = len(prompt)
            fields['tokens'].append(completion)
            fields['branch_ids'].append([branch] * len(completion))
            fields['positions'].append(np.arange(start, start + len(completion)))
            fields['ranks'].append([3 - min(sevens, len(body))] * len(completion))
        example = {k: np.concatenate(v).astype(np.int32) for k, v in fields.items()}
        example['group'] = np.full(len(example['tokens']), group, np.int32)
        examples.append(example)
    return examples


def ranked_batch(seed):
    """The groups of `ranked_groups` packed in order into one batch of B rows of T tokens."""
    examples = ranked_groups(seed)
    (batch,) = make_branched_eval_batches(examples, T, B, max_batches=1)
    assert set(np.unique(batch['group'])) == {0, *range(1, len(examples) + 1)}  # all fit
    return batch


def test_rewards_of_packed_branches_equal_each_completion_scored_alone():
    """`group_rewards` over packed branched rows gives each completion the reward `rewards`
    gives its prompt and completion as a row of their own, in its group's slot."""
    config = GPTConfig.preset('toy', smeared_keys=True)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(gpt_model.ScoreModel(config, rngs=nnx.Rngs(0)))
    examples = ranked_groups(3)
    batch = ranked_batch(3)
    groups = jax.device_get(jax.jit(
        lambda p, b: reward_step.group_rewards(graphdef, p, b, K))(params, batch))
    alone = jax.jit(lambda *rows: reward_step.rewards(graphdef, params, *rows, REWARD))
    for slot, group in enumerate(groups['group']):
        if group == 0:
            assert not groups['valid'][slot].any()
            continue
        example = examples[group - 1]
        prompt = example['tokens'][example['branch_ids'] == 0]
        for branch in range(1, K + 1):
            completion = example['tokens'][example['branch_ids'] == branch]
            if not len(completion):
                assert groups['valid'][slot, branch - 1] == 0
                assert np.isnan(groups['rewards'][slot, branch - 1])
                continue
            row = np.concatenate([prompt, completion])[None].astype(np.int32)
            expected = alone(row, np.arange(row.shape[1])[None], np.ones_like(row))
            np.testing.assert_allclose(groups['rewards'][slot, branch - 1], expected[0],
                                       rtol=1e-5, atol=1e-5)
            rank = example['ranks'][example['branch_ids'] == branch][0]
            assert groups['ranks'][slot, branch - 1] == rank
            assert groups['valid'][slot, branch - 1] == 1
    assert sorted(g for g in groups['group'] if g) == list(range(1, len(examples) + 1))


def train(mesh, rules, tx, schedule, batches, accum_steps=1):
    config = GPTConfig.preset('toy')
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.ScoreModel(config, rngs=rngs), tx, mesh, rules, jax.random.key(0))
    step = reward_step.make_reward_step(graphdef, tx, schedule, mesh, rules, shardings, B, K,
                                        accum_steps=accum_steps, margin=0.1)
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
    assert reference['pairs'] > 0 and 0 < reference['prompts'] <= len(ranked_groups(0))
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
                                                 K)
    examples = ranked_groups(99)
    rewards, group = (np.asarray(x) for x in evaluate(state.params, ranked_batch(99)))
    rewards, valid = rewards[group > 0], ~np.isnan(rewards[group > 0])
    ranks = np.zeros_like(rewards, np.int32)
    for slot, g in enumerate(group[group > 0]):
        example = examples[g - 1]
        for branch in range(1, K + 1):
            ranks[slot, branch - 1] = example['ranks'][example['branch_ids'] == branch][:1].sum()
    assert valid.sum() == 3 * len(examples) - 1  # the first group has two completions
    better = ranks[:, :, None] < ranks[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    correct = (rewards[:, :, None] > rewards[:, None, :])[better & both]
    assert correct.mean() > 0.8


def test_held_out_evaluation_gives_each_group_its_rewards_ranks_and_slots(mesh_1):
    """`experiments.reward.make_evaluate` maps the packed held-out rows back to one row per
    group, in the data's order: every completion's reward as scored alone, its rank, and an
    empty slot (NaN, not valid) where a group has fewer than K completions."""
    import types

    import ml_collections

    from experiments.reward import make_evaluate
    config = ml_collections.ConfigDict({'data': {'completions': K}, 'loss': {'margin': 0.0}})
    graphdef, state, shardings = create_train_state(
        lambda rngs: gpt_model.ScoreModel(GPTConfig.preset('toy', smeared_keys=True), rngs=rngs),
        optax.sgd(1.0), mesh_1, 'fsdp', jax.random.key(0))
    eval_step = reward_step.make_reward_eval_step(graphdef, mesh_1, 'fsdp', shardings.params,
                                                  B, K)
    examples = ranked_groups(5, n_groups=30)
    batches = make_branched_eval_batches(examples, T, B, max_batches=10)
    assert len(batches) > 1
    evaluate, held_out_rewards, ranks, valid = make_evaluate(
        config, eval_step, batches, reward_step.batch_shardings(mesh_1, 'fsdp', B), examples,
        None)
    rewards = held_out_rewards(state.params)
    alone = jax.jit(lambda *rows: reward_step.rewards(graphdef, state.params, *rows, REWARD))
    assert rewards.shape == ranks.shape == valid.shape == (len(examples), K)
    for i, example in enumerate(examples):
        prompt = example['tokens'][example['branch_ids'] == 0]
        for branch in range(1, K + 1):
            on = example['branch_ids'] == branch
            if not on.any():
                assert valid[i, branch - 1] == 0 and np.isnan(rewards[i, branch - 1])
                continue
            row = np.concatenate([prompt, example['tokens'][on]])[None].astype(np.int32)
            expected = alone(row, np.arange(row.shape[1])[None], np.ones_like(row))
            np.testing.assert_allclose(rewards[i, branch - 1], expected[0], rtol=1e-5,
                                       atol=1e-5)
            assert ranks[i, branch - 1] == example['ranks'][on][0] and valid[i, branch - 1]
    assert valid[0].tolist() == [1, 1, 0]
    metrics = evaluate(types.SimpleNamespace(params=state.params))
    assert np.isfinite(metrics['val_loss']) and metrics['val_pairs'] > 0
