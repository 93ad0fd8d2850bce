"""Best-of-N's estimator against brute force: `python -m pytest -q tests/test_best_of_n.py`."""

import itertools

import numpy as np
import pytest

from gptstack.best_of_n import expected_best_of_n


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
