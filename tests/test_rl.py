"""PPO's pieces against NumPy references: `python -m pytest -q tests/test_rl.py`."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gptstack import losses, rl


def response_mask(lengths, width):
    return (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def reference_gae(rewards, values, lengths, gamma, lam):
    """The textbook backward loop over each row's own length."""
    advantages = np.zeros_like(rewards, np.float64)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages, (advantages + values) * response_mask(lengths, rewards.shape[1])


def test_gae_matches_a_numpy_loop_with_finished_rows():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, 4, 9)).astype(np.float32)
    lengths = [9, 5, 1, 0]  # a full row, a finished row, a single token, an empty row
    mask = response_mask(lengths, 9)
    # Whatever sits past the end of a row must not leak in.
    rewards, values = np.where(mask > 0, rewards, 1e3), np.where(mask > 0, values, -1e3)
    for gamma, lam in ((1.0, 0.95), (0.9, 1.0), (0.99, 0.0)):
        advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
        ref_advantages, ref_returns = reference_gae(rewards, values, lengths, gamma, lam)
        np.testing.assert_allclose(np.asarray(advantages), ref_advantages * mask, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(returns), ref_returns, rtol=1e-5, atol=1e-4)


def test_clipped_surrogate_and_value_loss_match_numpy():
    rng = np.random.default_rng(1)
    logp, old_logp, advantages, values, old_values, returns = (
        rng.normal(scale=0.3, size=(6, 3, 7)).astype(np.float32))
    mask = response_mask([7, 4, 0], 7)
    loss_sum, sums = losses.ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    ref_loss, ref_clipped, ref_kl = 0.0, 0, 0.0
    value_sum, value_clipped = losses.ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    ref_value, ref_value_clipped = 0.0, 0
    for b in range(3):
        for t in range(7):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old_logp[b, t])
            a = advantages[b, t]
            unclipped, clipped = ratio * a, min(max(ratio, 0.8), 1.2) * a
            ref_loss += -min(unclipped, clipped)
            ref_clipped += clipped < unclipped
            ref_kl += ratio - 1 - math.log(ratio)
            v_clip = old_values[b, t] + min(max(values[b, t] - old_values[b, t], -0.2), 0.2)
            plain, limited = (values[b, t] - returns[b, t]) ** 2, (v_clip - returns[b, t]) ** 2
            ref_value += 0.5 * max(plain, limited)
            ref_value_clipped += limited > plain
    np.testing.assert_allclose(float(loss_sum), ref_loss, rtol=1e-5)
    assert float(sums['count']) == 11 and float(sums['clipped']) == ref_clipped > 0
    np.testing.assert_allclose(float(sums['approx_kl']), ref_kl, rtol=1e-4)
    np.testing.assert_allclose(float(value_sum), ref_value, rtol=1e-5)
    assert float(value_clipped) == ref_value_clipped > 0


def test_kl_estimators_and_their_means():
    rng = np.random.default_rng(2)
    p_logits, q_logits = rng.normal(size=(2, 5))
    p, q = np.exp(p_logits) / np.exp(p_logits).sum(), np.exp(q_logits) / np.exp(q_logits).sum()
    exact = float(np.sum(p * np.log(p / q)))
    samples = rng.choice(5, size=200_000, p=p)
    logp, logq = jnp.log(p[samples]), jnp.log(q[samples])
    for estimator in ('k1', 'k3'):
        estimate = float(jnp.mean(losses.kl_penalty(logp, logq, estimator)))
        assert abs(estimate - exact) < 0.01, estimator
    assert float(jnp.min(losses.kl_penalty(logp, logq, 'k3'))) >= 0
    with pytest.raises(ValueError, match="KL estimator 'k2': expected k1 or k3"):
        losses.kl_penalty(logp, logq, 'k2')


def test_group_centring_subtracts_each_prompts_mean_score():
    scores = np.array([1.0, 2.0, 6.0, -1.0, 0.5, 0.5, 3.0, 7.0], np.float32)
    expected = scores.copy()
    for start in range(0, len(scores), 4):  # groups of 4 consecutive replies
        expected[start:start + 4] -= scores[start:start + 4].mean()
    np.testing.assert_allclose(np.asarray(rl.center_groups(jnp.asarray(scores), 4)), expected,
                               atol=1e-6)
    assert expected[:4].tolist() == [-1.0, 0.0, 4.0, -3.0]
    # A group of one is its own mean: every score becomes 0 (PPO centres only groups of 2+).
    assert not np.asarray(rl.center_groups(jnp.asarray(scores), 1)).any()


def test_whitening_running_moments_and_kl_controller():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 6)).astype(np.float32)
    mask = response_mask([6, 3, 1, 0], 6)
    white = np.asarray(rl.whiten(x, mask))
    counted = white[mask > 0]
    assert abs(counted.mean()) < 1e-5 and abs(counted.std() - 1) < 1e-3
    assert (white[mask == 0] == 0).all()
    moments = rl.RunningMoments.create()
    chunks = [rng.normal(loc=1.5, scale=0.5, size=n) for n in (5, 17, 40)]
    for chunk in chunks:
        moments = moments.update(jnp.asarray(chunk, jnp.float32))
    everything = np.concatenate(chunks)
    np.testing.assert_allclose(float(moments.mean), everything.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(moments.var), everything.var(), rtol=1e-4)
    # Above the target the coefficient grows, below it shrinks, by at most 20% per horizon.
    assert float(rl.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(12.0), 6.0, 100, 100)) == \
        pytest.approx(0.12)
    assert float(rl.adaptive_kl_coef(jnp.float32(0.1), jnp.float32(5.4), 6.0, 1000, 100)) == \
        pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_grpo_and_rloo_baselines_match_numpy_loops():
    scores = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.3, -1.0, 4.0, 0.0],
                      np.float32)
    group = 4
    grpo, dr_grpo, rloo = (np.asarray(x) for x in (
        rl.group_advantages(scores, group), rl.group_advantages(scores, group, False),
        rl.leave_one_out(scores, group)))
    for g in range(len(scores) // group):
        rows = scores[g * group:(g + 1) * group].astype(np.float64)
        for i in range(group):
            others = [rows[j] for j in range(group) if j != i]
            centred = rows[i] - rows.mean()
            assert rloo[g * group + i] == pytest.approx(rows[i] - np.mean(others), abs=1e-6)
            assert dr_grpo[g * group + i] == pytest.approx(centred, abs=1e-6)
            assert grpo[g * group + i] == pytest.approx(centred / (rows.std(ddof=1) + 1e-6),
                                                        rel=1e-5, abs=1e-6)
    assert np.all(grpo[4:8] == 0.0) and np.all(rloo[4:8] == 0.0)  # a tied group teaches nothing
    assert float(rl.tied_groups(scores, group)) == pytest.approx(1 / 3)
    assert float(rl.tied_groups(scores, 2)) == pytest.approx(3 / 6)


def test_token_normalisations_weigh_tokens_replies_or_a_constant():
    rng = np.random.default_rng(3)
    loss = rng.normal(size=(3, 5)).astype(np.float32)
    lengths = [5, 2, 0]
    mask = response_mask(lengths, 5)

    def reduce(how):
        weights, denominator = losses.token_normalisation(jnp.asarray(mask), how, max_len=8)
        return float(jnp.sum(loss * weights) / denominator)

    counted = [loss[b, :n] for b, n in enumerate(lengths)]
    assert reduce('token') == pytest.approx(np.concatenate(counted).mean(), rel=1e-6)
    # Each reply's mean, an empty reply counting 0, then the mean over the replies.
    assert reduce('sequence') == pytest.approx(
        np.mean([c.mean() if len(c) else 0.0 for c in counted]), rel=1e-6)
    assert reduce('constant') == pytest.approx(np.concatenate(counted).sum() / (3 * 8), rel=1e-6)
    with pytest.raises(ValueError, match='expected token, sequence or constant'):
        losses.token_normalisation(jnp.asarray(mask), 'row', 8)
