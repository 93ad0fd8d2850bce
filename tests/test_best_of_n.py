"""Best-of-N's estimator against brute force: `python -m pytest -q tests/test_best_of_n.py`."""

import itertools

import jax
import numpy as np
import pytest

from gptstack.data.preference import completion_row
from gptstack.evals.best_of_n import best_of_n, curve, expected_best_of_n, reward_scorer
from gptstack.evals.overoptimization import best_of_n_kl


def test_expected_best_of_n_equals_the_average_over_every_subset():
    rng = np.random.default_rng(0)
    rewards, gold = rng.normal(size=(5, 7)), rng.random(size=(5, 7))
    for n in range(1, 8):
        brute = [np.mean([gold[p, max(subset, key=lambda i: rewards[p, i])]
                          for subset in itertools.combinations(range(7), n)])
                 for p in range(5)]
        np.testing.assert_allclose(expected_best_of_n(rewards, gold, n), brute, rtol=1e-12)
    np.testing.assert_allclose(expected_best_of_n(rewards, gold, 1), gold.mean(axis=1))
    np.testing.assert_allclose(expected_best_of_n(rewards, gold, 7),
                               gold[np.arange(5), rewards.argmax(axis=1)])
    with pytest.raises(ValueError, match='best-of-8 needs 1 <= n <= 7'):
        expected_best_of_n(rewards, gold, 8)


def test_curve_over_a_pool_of_eight_against_brute_force():
    rng = np.random.default_rng(1)
    rewards, gold = rng.normal(size=(6, 8)), rng.random(size=(6, 8))
    out = curve(rewards, gold)
    assert list(out) == [1, 2, 4, 8]
    for n, entry in out.items():
        subsets = list(itertools.combinations(range(8), n))
        pick = [[max(s, key=lambda i: rewards[p, i]) for s in subsets] for p in range(6)]
        by_rm = np.mean([[gold[p, i] for i in row] for p, row in enumerate(pick)], axis=1)
        proxy = np.mean([[rewards[p, i] for i in row] for p, row in enumerate(pick)], axis=1)
        assert entry['rm'] == pytest.approx(by_rm.mean())
        assert entry['gain'] == pytest.approx((by_rm - gold.mean(axis=1)).mean())
        assert entry['proxy'] == pytest.approx(proxy.mean())
        assert entry['kl'] == pytest.approx(float(best_of_n_kl(n)))
        assert entry['oracle'] == pytest.approx(np.mean(
            [np.mean([gold[p, list(s)].max() for s in subsets]) for p in range(6)]))


class FakeSampler:
    """Stands in for `Sampler`: row `i` of every call answers with the one token `BASE + i`."""

    batch_size, max_new_tokens, stop_ids = 4, 2, np.array([0])

    def fitted(self, prompt):
        return prompt

    def __call__(self, params, prompts, key, sampling, max_new_tokens, first_step):
        tokens = np.array([[BASE + i, 0] for i in range(len(prompts))], np.int32)
        return {'tokens': tokens, 'lengths': np.ones(len(prompts), np.int32)}


BASE = 300


def test_best_of_n_returns_the_reply_the_scorer_likes_best(tokenizer):
    text = {i: tokenizer.decode([BASE + i]) for i in range(4)}
    assert len(set(text.values())) == 4
    value = {text[0]: 1.0, text[1]: 3.0, text[2]: -1.0, text[3]: 5.0}

    def scorer(prompts, completions):
        return np.array([value[c[0]['content']] for c in completions])

    conversations = [[{'role': 'user', 'content': 'a'}], [{'role': 'user', 'content': 'b'}]]
    picks, rewards = best_of_n(FakeSampler(), None, tokenizer, scorer, conversations, 3,
                               jax.random.key(0), None)
    # Conversation 0 gets rows 0-2 of the first batch, conversation 1 its row 3 and rows 0-1 of
    # the next one.
    np.testing.assert_array_equal(rewards, [[1.0, 3.0, -1.0], [5.0, 1.0, 3.0]])
    assert picks == [text[1], text[3]]


def test_reward_scorer_pads_to_the_longest_row_or_a_fixed_width(tokenizer):
    """Rows are padded to the call's longest, rounded up to 32, or always to `seq_len` with
    `fixed_width`; a row longer than `seq_len` keeps its last `seq_len` tokens, the reward
    token included."""
    seen = []

    def score_fn(params, tokens, positions, segments):
        seen.append(tokens.copy())
        return segments.sum(axis=1).astype(np.float32)  # each row's length

    prompts = [[{'role': 'user', 'content': 'hi'}], [{'role': 'user', 'content': 'word ' * 40}]]
    replies = [[{'role': 'assistant', 'content': 'ok'}]] * 2
    short, long_ = (completion_row(tokenizer, p, r) for p, r in zip(prompts, replies,
                                                                      strict=True))
    assert len(short) < 32 < len(long_) and len(long_) > 48
    rewards = reward_scorer(score_fn, None, tokenizer, 4, 64)(prompts[:1], replies[:1])
    assert seen[-1].shape == (4, 32) and rewards.tolist() == [len(short)]
    rewards = reward_scorer(score_fn, None, tokenizer, 4, 48)(prompts, replies)
    assert seen[-1].shape == (4, 48) and rewards.tolist() == [len(short), 48]
    np.testing.assert_array_equal(seen[-1][1], long_[-48:])
    reward_scorer(score_fn, None, tokenizer, 4, 256, fixed_width=True)(prompts[:1], replies[:1])
    assert seen[-1].shape == (4, 256)
