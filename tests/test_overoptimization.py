"""The over-optimisation fits against closed forms and a reference solve:
`python -m pytest -q tests/test_overoptimization.py`."""

import math

import numpy as np
import pytest

from gptstack.evals import overoptimization as oo


def test_best_of_n_kl_is_the_kl_of_the_best_of_n_distribution():
    # M equally likely outcomes with distinct rewards: best-of-n picks the i-th lowest with
    # probability ((i + 1)^n - i^n) / M^n. Its KL from the uniform tends to ln n - (n - 1) / n.
    m = 20_000
    for n in (1, 2, 4, 16):
        i = np.arange(m, dtype=np.float64)
        p = ((i + 1) ** n - i ** n) / m ** n
        kl = float(np.sum(np.where(p > 0, p * np.log(p * m), 0.0)))
        assert oo.best_of_n_kl(n) == pytest.approx(kl, abs=2e-3)
    assert oo.best_of_n_kl(1) == 0.0


@pytest.mark.parametrize('form, alpha, beta, peak_d', [
    ('bon', 0.30, 0.10, 1.5),
    ('rl', 0.20, 0.05, math.exp(3.0)),
])
def test_fits_recover_the_forms_and_their_peaks(form, alpha, beta, peak_d):
    d = np.sqrt(oo.best_of_n_kl(2 ** np.arange(7)))  # N = 1 ... 64; d = 0 at N = 1
    truth = oo.Fit(form, alpha, beta)
    fitted = oo.fit(form, d, truth(d))
    assert (fitted.alpha, fitted.beta) == pytest.approx((alpha, beta), rel=1e-9)
    assert fitted.peak_d == pytest.approx(peak_d)
    assert fitted.peak_kl == pytest.approx(peak_d ** 2)
    assert truth(0.0) == 0.0


def test_fit_is_the_least_squares_solution():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.1, 2.0, 30)
    gain = 0.2 * d - 0.07 * d * np.log(d) + rng.normal(0, 0.01, 30)
    # The normal equations of the columns (d, -c), c = d ln d, solved by Cramer's rule.
    c = d * np.log(d)
    sdd, sdc, scc = np.sum(d * d), np.sum(d * c), np.sum(c * c)
    sdy, scy = np.sum(d * gain), np.sum(c * gain)
    det = sdd * scc - sdc * sdc
    alpha = (sdy * scc - sdc * scy) / det
    beta = (sdc * sdy - sdd * scy) / det
    fitted = oo.fit('rl', d, gain)
    assert (fitted.alpha, fitted.beta) == pytest.approx((alpha, beta), rel=1e-9)
    assert (fitted.alpha, fitted.beta) == pytest.approx((0.2, 0.07), abs=0.02)


def test_a_fit_needs_two_points_away_from_the_origin():
    with pytest.raises(ValueError, match='needs two points with d > 0, got 1'):
        oo.fit('bon', [0.0, 1.0], [0.0, 0.1])
    assert oo.Fit('bon', 0.1, -0.2).peak_kl == math.inf
