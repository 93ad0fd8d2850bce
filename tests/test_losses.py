"""Losses against NumPy references: `python -m pytest -q tests/test_losses.py`."""

import itertools
import math

import numpy as np

from gptstack import losses


def reference_next_token_loss(logits, targets, mask):
    """Explicit loop in float64: sum of -log softmax(logits)[target] over counted positions."""
    total, count = 0.0, 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                row = logits[b, t].astype(np.float64)
                log_z = row.max() + math.log(np.exp(row - row.max()).sum())
                total += log_z - row[targets[b, t]]
                count += 1
    return total, count


def test_next_token_loss_matches_numpy_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 7))
    mask = rng.integers(0, 2, size=(3, 7))
    loss_sum, count = losses.next_token_loss(logits, targets, mask)
    ref_sum, ref_count = reference_next_token_loss(logits, targets, mask)
    np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-5)
    assert float(count) == ref_count == mask.sum()


def test_masked_positions_do_not_change_the_loss():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(2, 5))
    mask = np.ones((2, 5), np.int32)
    mask[0, 3] = mask[1, 0] = 0
    base = losses.next_token_loss(logits, targets, mask)
    # Anything at a masked position (its logits or its target) is irrelevant.
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[0, 3] = 100.0 * rng.normal(size=9)
    targets2[1, 0] = (targets2[1, 0] + 1) % 9
    changed = losses.next_token_loss(logits2, targets2, mask)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(changed))
    # ... while an unmasked position does count.
    targets2[0, 0] = (targets2[0, 0] + 1) % 9
    assert float(losses.next_token_loss(logits2, targets2, mask)[0]) != float(base[0])


def test_uniform_logits_give_log_vocab():
    loss_sum, count = losses.next_token_loss(np.zeros((2, 3, 50), np.float32),
                                             np.zeros((2, 3), np.int32), np.ones((2, 3)))
    np.testing.assert_allclose(float(loss_sum / count), math.log(50), rtol=1e-6)


def reference_ranking_loss(rewards, ranks, valid, margin):
    """Explicit loop in float64: each prompt's mean -log sigmoid over its ordered pairs, summed
    over the prompts that have a pair."""
    total, prompts = 0.0, 0
    for b in range(rewards.shape[0]):
        pair_losses = []
        for i, j in itertools.permutations(range(rewards.shape[1]), 2):
            if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
                d = float(rewards[b, i]) - float(rewards[b, j]) - margin
                assert math.isfinite(d)
                pair_losses.append(math.log1p(math.exp(-d)))
        if pair_losses:
            total += sum(pair_losses) / len(pair_losses)
            prompts += 1
    return total, prompts


def test_k_way_loss_is_the_mean_over_all_pairs_of_each_prompt():
    rng = np.random.default_rng(2)
    rewards = rng.normal(scale=2.0, size=(6, 5)).astype(np.float32)
    ranks = rng.integers(0, 3, size=(6, 5))  # plenty of ties
    valid = rng.integers(0, 2, size=(6, 5))
    valid[0] = 1
    valid[1] = 0  # a padding group: no pairs, not counted
    ranks[2] = 1  # all tied: no pairs
    rewards[valid == 0] = np.nan  # empty slots are ignored whatever they hold
    for margin in (0.0, 0.5):
        loss_sum, count = losses.ranking_loss(rewards, ranks, valid, margin)
        ref_sum, ref_count = reference_ranking_loss(rewards, ranks, valid, margin)
        np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-5)
        assert float(count) == ref_count
    assert ref_count < 6  # the padding and all-tied groups were left out


def test_k_way_loss_with_two_completions_is_the_pairwise_loss():
    rng = np.random.default_rng(3)
    better, worse = rng.normal(size=(2, 8)).astype(np.float32)
    swap = rng.integers(0, 2, size=8).astype(bool)  # the better one in either slot
    rewards = np.where(swap[:, None], np.stack([worse, better], 1), np.stack([better, worse], 1))
    ranks = np.where(swap[:, None], [[2, 1]], [[1, 2]])
    loss_sum, count = losses.ranking_loss(rewards, ranks, np.ones((8, 2)), margin=0.25)
    pairwise = losses.pairwise_loss(better, worse, margin=0.25)
    np.testing.assert_allclose(float(loss_sum), float(pairwise.sum()), rtol=1e-6)
    assert float(count) == 8
    np.testing.assert_allclose(np.asarray(pairwise),
                               np.log1p(np.exp(-(better - worse - 0.25))), rtol=1e-5)


def reference_dpo(logp, ref_logp, ranks, valid, beta, kind, smoothing, pairs):
    """Explicit loop in float64 over each group's preference pairs."""
    total, groups, correct, n_pairs = 0.0, 0, 0, 0
    for b in range(logp.shape[0]):
        slots = [k for k in range(logp.shape[1]) if valid[b, k]]
        ordered = [(i, j) for i in slots for j in slots if ranks[b, i] < ranks[b, j]]
        if pairs == 'best_worst' and ordered:
            best = min(ranks[b, k] for k in slots)
            worst = max(ranks[b, k] for k in slots)
            ordered = [(i, j) for i, j in ordered if ranks[b, i] == best and ranks[b, j] == worst]
        if not ordered:
            continue
        pair_losses = []
        for i, j in ordered:
            h = (float(logp[b, i]) - ref_logp[b, i]) - (float(logp[b, j]) - ref_logp[b, j])
            if kind == 'ipo':
                pair_losses.append((h - 1 / (2 * beta)) ** 2)
            else:
                log_sig = -math.log1p(math.exp(-beta * h))
                log_sig_neg = -math.log1p(math.exp(beta * h))
                pair_losses.append(-(1 - smoothing) * log_sig - smoothing * log_sig_neg)
            correct += 1.0 if h > 0 else 0.5 if h == 0 else 0.0
        total += sum(pair_losses) / len(pair_losses)
        groups += 1
        n_pairs += len(ordered)
    return total, groups, correct, n_pairs


def test_dpo_ipo_and_conservative_dpo_match_a_numpy_loop_over_pairs():
    rng = np.random.default_rng(4)
    logp = rng.normal(-20, 3, size=(6, 4)).astype(np.float32)
    ref_logp = (logp + rng.normal(0, 1, size=(6, 4))).astype(np.float32)
    ranks = rng.integers(1, 4, size=(6, 4))
    valid = np.ones((6, 4), np.int32)
    valid[1] = 0  # a padding group
    valid[2, 3] = 0  # a group of three
    ranks[3] = 2  # all tied
    for kind, beta, smoothing in (('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.2), ('ipo', 0.1, 0.0)):
        for pairs in ('all', 'best_worst'):
            mask = losses.preference_pairs(ranks, valid, pairs)
            loss_sum, count, sums = losses.dpo_loss(logp, ref_logp, mask, beta, kind, smoothing)
            ref_total, ref_groups, ref_correct, ref_pairs = reference_dpo(
                logp, ref_logp, ranks, valid, beta, kind, smoothing, pairs)
            np.testing.assert_allclose(float(loss_sum), ref_total, rtol=1e-5)
            assert (float(count), float(sums['correct']), float(sums['pairs'])) == (
                ref_groups, ref_correct, ref_pairs)
    assert ref_groups == 4  # the padding and the all-tied groups have no pair
    all_pairs = float(losses.preference_pairs(ranks, valid, 'all').sum())
    assert float(losses.preference_pairs(ranks, valid, 'best_worst').sum()) < all_pairs
