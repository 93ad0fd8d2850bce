"""The PPO iteration on a toy model: the rollout layout, scores against direct computation,
β from the config against a traced one, policy evaluation, the KL penalty's hold on the policy,
and learning a rewarded token.

Run: `python -m pytest -q tests/test_ppo.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptstack import losses, rl, rollout
from gptstack.config import ConfigError, GPTConfig, OptimConfig
from gptstack.model import GPT, ScoreModel, read_at_token
from gptstack.optim import make_optimizer
from gptstack.sampling import Sampler, SamplingParams
from gptstack.state import TrainState, create_train_state, init_params
from gptstack.steps import ppo

VOCAB, TARGET, PAD, REWARD, STOP = 16, 3, 13, 14, 15
BATCH, NEW = 16, 8
CONFIG = GPTConfig.preset('toy', vocab_size=VOCAB)


def test_rollout_rows_put_the_reward_token_right_after_the_response():
    rows = rollout.rollout_batch([[5, 6, 7], [8]], np.array([[1, 2, STOP, PAD], [4, 4, 4, 4]]),
                             np.array([3, 4]), prompt_len=4, pad_id=PAD, reward_id=REWARD)
    assert rows['tokens'].tolist() == [[PAD, 5, 6, 7, 1, 2, STOP, REWARD, PAD],
                                       [PAD, PAD, PAD, 8, 4, 4, 4, 4, REWARD]]
    assert rows['segment_ids'].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1, 0],
                                            [0, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert rows['positions'][0, 1:8].tolist() == list(range(7))
    assert rows['positions'][1, 3:].tolist() == list(range(6))
    assert rows['mask'].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_reply_log_probs_equal_a_full_forward_pass_per_reply(mesh_8):
    """The comparison's `log π(reply | prompt)` (rollout rows of mixed prompt and reply
    lengths, a partial last batch, a reply that fills the context) against each reply scored
    alone by the model's plain forward pass, log-softmax summed in NumPy."""
    config = GPTConfig.preset('toy', max_seq_len=64)
    with nnx.use_eager_sharding(False):
        model = GPT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    sampler = Sampler(graphdef, config, mesh_8, 'fsdp', batch_size=8, max_new_tokens=16,
                      stop_ids=[1], pad_id=0)
    rng = np.random.default_rng(0)
    lengths = [(5, 3), (30, 16), (48, 16), (12, 1), (7, 9)] * 2 + [(20, 4)]  # 11: 8 + 3
    prompts = [list(rng.integers(2, config.vocab_size, p)) for p, _ in lengths]
    replies = [rng.integers(2, config.vocab_size, n).astype(np.int32) for _, n in lengths]
    got = rollout.reply_log_probs(graphdef, params, sampler, prompts, replies)

    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    for prompt, reply, value in zip(prompts, replies, got, strict=True):
        tokens = np.asarray([*prompt, *reply], np.int32)[None]
        logits = np.asarray(forward(params, jnp.asarray(tokens))[0], np.float64)
        log_softmax = logits - logits.max(-1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
        expected = sum(log_softmax[len(prompt) + j - 1, token] for j, token in enumerate(reply))
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_oversampling_keeps_the_groups_whose_replies_differ_then_tied_ones_in_order():
    scores = np.array([1, 1, 0, 1, 0, 0, 2, 2, 3, 0, 5, 5], np.float32)  # six groups of 2
    assert rollout.informative_groups(scores, 2, 4).tolist() == [2, 3, 8, 9]
    # Too few differ: the first tied groups fill up, and the sampled order is kept.
    assert rollout.informative_groups(scores, 2, 8).tolist() == [0, 1, 2, 3, 4, 5, 8, 9]
    assert rollout.informative_groups(scores, 6, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_ppo_config_names_its_keys_and_checks_the_rollout_batch():
    with pytest.raises(ConfigError, match=r"rl.ppo.kl_estimator='k2': expected k1 or k3"):
        ppo.PPOConfig(kl_estimator='k2')
    with pytest.raises(ConfigError, match=r'rl.ppo.minibatches=0: expected >= 1'):
        ppo.PPOConfig(minibatches=0)
    ppo.PPOConfig(minibatches=4).check_batch(16)
    with pytest.raises(ConfigError, match=r'^data.batch_size=16 rollouts is not divisible by '
                                          r'rl.ppo.minibatches=3$'):
        ppo.PPOConfig(minibatches=3).check_batch(16)
    with pytest.raises(ConfigError, match=r'rl.ppo.group_size=3 replies per prompt'):
        ppo.PPOConfig(group_size=3).check_batch(16)
    with pytest.raises(ConfigError, match=r"^rl.algorithm='a2c': expected one of ppo, grpo, "
                                          r"rloo$"):
        ppo.PPOConfig(algorithm='a2c')
    with pytest.raises(ConfigError, match=r'^rl.ppo.group_size=1: rl.algorithm=rloo takes its '
                                          r'baseline from the other replies to a prompt, so it '
                                          r'needs at least 2$'):
        ppo.PPOConfig(algorithm='rloo', group_size=1)
    with pytest.raises(ConfigError, match=r"rl.ppo.loss_norm='row': expected token, sequence "
                                          r"or constant"):
        ppo.PPOConfig(loss_norm='row')
    with pytest.raises(ConfigError, match=r'^rl.ppo.oversample=2 keeps the groups whose replies '
                                          r'scored differently, so it needs rl.ppo.group_size '
                                          r'>= 2$'):
        ppo.PPOConfig(oversample=2, group_size=1)
    with pytest.raises(ConfigError, match=r"rl.ppo.kl_in='both': expected auto, reward or loss"):
        ppo.PPOConfig(kl_in='both')
    # GRPO puts the KL in the loss, PPO and RLOO in the reward, unless the config says.
    assert [ppo.PPOConfig(algorithm=a).kl_in_loss for a in ppo.PPOConfig.ALGORITHMS] == [
        False, True, False]
    assert ppo.PPOConfig(algorithm='rloo', kl_in='loss').kl_in_loss
    assert 'algorithm' not in ppo.PPOConfig.tunables()


def test_kl_coef_is_state_only_under_the_controller_and_a_config_beta_is_bit_identical():
    """A fixed β is a constant of the advantages program, an adaptive one a traced leaf of the
    state; at the same value every output agrees bit for bit."""
    keys = jax.random.split(jax.random.key(0), 4)
    b, n = 8, 12
    lengths = jax.random.randint(keys[0], (b,), 1, n + 1)
    mask = (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.int32)
    logp = -jax.random.exponential(keys[1], (b, n))
    scored = {'logp': logp, 'ref_logp': logp + 0.1 * jax.random.normal(keys[2], (b, n)),
              'values': jax.random.normal(keys[3], (b, n)),
              'rm_score': jax.random.normal(keys[0], (b,))}
    truncated = (jnp.arange(b) % 3 == 0).astype(jnp.float32)
    def blank():
        return TrainState(jnp.zeros((), jnp.int32), {}, ())

    fixed = ppo.PPOConfig(kl_coef=0.2, group_size=2, kl_estimator='k3', truncated_penalty=0.5)
    adaptive = ppo.PPOConfig(**{**fixed.__dict__, 'target_kl': 6.0})
    fixed_state = ppo.PPOState.create(blank(), blank(), fixed)
    adaptive_state = ppo.PPOState.create(blank(), blank(), adaptive)
    assert fixed_state.kl_coef is None and len(jax.tree.leaves(adaptive_state)) == \
        len(jax.tree.leaves(fixed_state)) + 1
    outputs = []
    for config, state in ((fixed, fixed_state), (adaptive, adaptive_state)):
        state, advantages, returns, metrics = ppo.make_advantages_fn(config, b)(
            state, scored, mask, scored['rm_score'], truncated)
        outputs.append(jax.device_get((advantages, returns, metrics)))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert outputs[0][2] == outputs[1][2]
    assert outputs[0][2]['kl_coef'] == np.float32(0.2)
    assert float(state.kl_coef) != np.float32(0.2)  # the controller moved it


@pytest.fixture(scope='module')
def toy(mesh_8):
    tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=1000,
                                       weight_decay=0.0, end_lr_ratio=1.0))
    actor_graphdef, actor, _ = create_train_state(
        lambda rngs: GPT(CONFIG, rngs=rngs), tx, mesh_8, 'fsdp', jax.random.key(0))
    critic_graphdef, critic, _ = create_train_state(
        lambda rngs: ScoreModel(CONFIG, rngs=rngs), tx, mesh_8, 'fsdp', jax.random.key(1))
    reward_params = jax.jit(lambda k: init_params(
        lambda rngs: ScoreModel(CONFIG, rngs=rngs), k))(jax.random.key(2))
    sampler = Sampler(actor_graphdef, CONFIG, mesh_8, 'fsdp', batch_size=BATCH,
                      max_new_tokens=NEW, stop_ids=[STOP], pad_id=PAD)
    reference = ppo.Frozen(actor_graphdef, jax.tree.map(jnp.copy, actor.params))
    reward = ppo.Frozen(critic_graphdef, reward_params)

    def judge(prompt_batch, responses, lengths):
        hits = [(row[:n] == TARGET).mean() for row, n in zip(responses, lengths, strict=True)]
        return {'reward': np.asarray(hits, np.float32), 'gold': np.asarray(hits)}

    def make(kl_coef, algorithm='ppo', **settings):
        """The iteration with a fixed β and a fresh state (updates donate it); PPO scores
        replies one by one, GRPO and RLOO in groups of 4."""
        config = ppo.PPOConfig(algorithm=algorithm, kl_coef=kl_coef,
                               group_size=1 if algorithm == 'ppo' else 4, **settings)
        has_critic = algorithm == 'ppo'
        iteration = rollout.PPOIteration(
            config, actor_graphdef=actor_graphdef,
            critic_graphdef=critic_graphdef if has_critic else None, reference=reference,
            reward=reward, sampler=sampler, tx_actor=tx, tx_critic=tx if has_critic else None,
            mesh=mesh_8, rules='fsdp', reward_id=REWARD, verifiable=True, judge=judge)
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
        return iteration, ppo.PPOState.create(copy(actor), copy(critic) if has_critic else None,
                                              config)

    prompts = {'tokens': np.tile([[1, 2, 4, 5]], (BATCH, 1)), 'lengths': np.full(BATCH, 4)}
    return make, prompts, sampler, reference, reward, critic_graphdef


def run_iterations(iteration, state, prompts, n):
    history = []
    for i in range(n):
        state, metrics = iteration(state, prompts, jax.random.key(i))
        history.append(metrics)
    return state, history


def test_scores_match_direct_forward_passes(toy, mesh_8):
    make, prompts, sampler, reference, reward, critic_graphdef = toy
    _, state = make(0.1)
    out = sampler(state.actor.params, [list(p) for p in prompts['tokens']], jax.random.key(0))
    rows = rollout.rollout_rows(list(prompts['tokens']), out['tokens'], out['lengths'], sampler,
                                REWARD)
    p = rows['tokens'].shape[1] - rows['mask'].shape[1] - 1
    assert p == 16 and rows['mask'].shape[1] in (8, 16)  # trimmed to the buckets
    score = ppo.make_score_fn(reference.graphdef, reference.graphdef, critic_graphdef,
                              mesh_8, 'fsdp')
    scored = score(state.actor.params, reference.params, state.critic.params, rows)
    rm_score = ppo.make_reward_fn(reward.graphdef, mesh_8, 'fsdp', REWARD)(reward.params, rows)
    logits = nnx.merge(reference.graphdef, state.actor.params)(
        rows['tokens'], rows['positions'], rows['segment_ids'])
    expected = losses.token_log_probs(logits[:, p - 1:-2], rows['tokens'][:, p:-1])
    mask = rows['mask'] > 0
    np.testing.assert_allclose(np.asarray(scored['logp'])[mask], np.asarray(expected)[mask],
                               rtol=1e-4, atol=1e-5)
    # The sampler's own log-probs (KV cache) agree with the full forward pass.
    np.testing.assert_allclose(out['model_logprobs'][mask], np.asarray(expected)[mask],
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(scored['logp']), np.asarray(scored['ref_logp']))
    rm = nnx.merge(reward.graphdef, reward.params)(rows['tokens'], rows['positions'],
                                                   rows['segment_ids'])
    np.testing.assert_allclose(np.asarray(rm_score),
                               np.asarray(read_at_token(rm, rows['tokens'], REWARD)), rtol=1e-5)


def test_evaluate_replies_to_any_number_of_prompts_with_scores_and_kl(toy):
    make, _, sampler, _, _, _ = toy
    iteration, state = make(0.1)
    prompts = [[1, 2, 4, 5 + i % 3] for i in range(BATCH + 4)]  # two batches, one filled up
    key = jax.random.key(7)
    sample = iteration.evaluate(state, prompts, key, SamplingParams(temperature=1.0))
    assert len(sample.replies) == sample.rm_score.shape[0] == sample.kl.shape[0] == BATCH + 4
    assert np.all(sample.kl == 0.0)  # the actor is still the reference
    first = sampler(state.actor.params, prompts[:BATCH], jax.random.fold_in(key, 0))
    for reply, row, length in zip(sample.replies[:BATCH], first['tokens'], first['lengths'],
                                  strict=True):
        np.testing.assert_array_equal(reply, row[:length])
    again = iteration.evaluate(state, prompts, key, SamplingParams(temperature=1.0),
                               score=False)
    assert again.rm_score is None and again.kl is None
    for a, b in zip(sample.replies, again.replies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_rewarded_token_rises_without_kl_and_a_large_kl_holds_the_policy(toy):
    make, prompts, *_ = toy
    _, free = run_iterations(*make(0.0), prompts, 12)
    _, held = run_iterations(*make(10.0), prompts, 12)
    assert free[0]['nonfinite'] == 0 and free[0]['gold'] < 0.25
    assert np.mean([m['gold'] for m in free[-3:]]) > 2 * free[0]['gold'] + 0.1
    assert free[-1]['kl'] > 1.0
    assert np.mean([m['kl'] for m in held[-3:]]) < 0.2 * free[-1]['kl']
    assert np.mean([m['gold'] for m in held[-3:]]) < np.mean([m['gold'] for m in free[-3:]])
    assert {m['kl_coef'] for m in free} == {0.0} and {m['kl_coef'] for m in held} == {10.0}
    for key in ('clipfrac', 'approx_kl', 'value_loss', 'explained_variance', 'entropy',
                'tokens_per_sec/generate', 'time/update'):
        assert np.isfinite(free[-1][key]), key


@pytest.mark.parametrize('algorithm', ['grpo', 'rloo'])
def test_critic_free_algorithms_learn_the_rewarded_token_without_a_critic(toy, algorithm):
    make, prompts, *_ = toy
    prompts = {k: v[:BATCH // 4] for k, v in prompts.items()}  # each answered 4 times
    state, free = run_iterations(*make(0.0, algorithm), prompts, 12)
    assert state.critic is None  # nothing of a critic is built, trained or stored
    assert free[0]['nonfinite'] == 0 and free[0]['gold'] < 0.25
    assert np.mean([m['gold'] for m in free[-3:]]) > 2 * free[0]['gold'] + 0.1
    assert not {'value_loss', 'explained_variance', 'critic_grad_norm'} & set(free[-1])
    assert ('kl_loss' in free[-1]) == (algorithm == 'grpo')  # GRPO's KL is a loss term
    if algorithm == 'rloo':  # twice the prompts sampled, the groups that differ trained on
        oversampled = {k: np.tile(v, (2,) + (1,) * (v.ndim - 1)) for k, v in prompts.items()}
        _, kept = run_iterations(*make(0.0, algorithm, oversample=2), oversampled, 3)
        # Half the sampled groups are trained on: tied ones only when over half are tied.
        for m in kept:
            assert m['tied_groups'] == pytest.approx(max(0.0, 2 * m['sampled_tied_groups'] - 1))
    if algorithm == 'grpo':  # ... which holds the policy when β is large
        _, held = run_iterations(*make(10.0, algorithm), prompts, 12)
        assert np.mean([m['kl'] for m in held[-3:]]) < 0.2 * free[-1]['kl']
        assert held[-1]['non_score_reward'] == 0.0 and held[-1]['kl_loss'] > 0.0


def test_critic_free_advantages_are_the_group_baselines_of_score_and_kl_penalty():
    keys = jax.random.split(jax.random.key(5), 3)
    b, n, beta = 8, 6, 0.3
    lengths = jax.random.randint(keys[0], (b,), 1, n + 1)
    mask = (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.int32)
    logp = -jax.random.exponential(keys[1], (b, n))
    scored = {'logp': logp, 'ref_logp': logp + 0.2 * jax.random.normal(keys[2], (b, n))}
    score = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    kl = np.asarray(((scored['logp'] - scored['ref_logp']) * mask).sum(axis=1))
    truncated = jnp.zeros(b)
    expected = {('grpo', 'loss'): np.asarray(score), ('grpo', 'reward'): score - beta * kl,
                ('rloo', 'reward'): score - beta * kl}
    for (algorithm, kl_in), total in expected.items():
        config = ppo.PPOConfig(algorithm=algorithm, kl_in=kl_in, kl_coef=beta)
        state = ppo.PPOState.create(TrainState(jnp.zeros((), jnp.int32), {}, ()), None, config)
        _, advantages, returns, metrics = ppo.make_advantages_fn(config, b)(
            state, scored, mask, score, truncated)
        baseline = rl.group_advantages if algorithm == 'grpo' else rl.leave_one_out
        per_reply = np.asarray(baseline(jnp.asarray(total, jnp.float32), 4))
        assert returns is None
        np.testing.assert_allclose(np.asarray(advantages), per_reply[:, None] * np.asarray(mask),
                                   rtol=1e-5, atol=1e-6)
        assert float(metrics['tied_groups']) == 0.5  # the second group is tied
