"""Reward-model over-optimisation, measured as Gao, Schulman & Hilton (2022) measure it: the gold
score gained against the distance the policy moved, `d = sqrt(KL)` from the initial policy.

Their functional forms, fitted by least squares (both are linear in `alpha` and `beta`):

    best-of-N:  R_bon(d) = d (alpha - beta d),        KL_bon(N) = ln N - (N - 1) / N
    RL:         R_RL(d)  = d (alpha - beta ln d)

`R` is the gain over the initial policy (gold or proxy score minus its value at `d = 0`). The
gold score peaks where the fitted form does: `d* = alpha / (2 beta)` for best-of-N and
`d* = exp(alpha / beta - 1)` for RL, at `KL* = d*^2`; the proxy keeps rising past it when the
policy over-optimises the reward model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def best_of_n_kl(n) -> np.ndarray:
    """The KL of best-of-N sampling from the policy it samples: `ln N - (N - 1) / N`."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


@dataclasses.dataclass(frozen=True)
class Fit:
    """A fitted form `R(d)`, and where it peaks (`d*`, `KL* = d*^2`; inf if it never turns)."""

    form: str
    alpha: float
    beta: float

    def __call__(self, d) -> np.ndarray:
        d = np.asarray(d, np.float64)
        if self.form == 'bon':
            return d * (self.alpha - self.beta * d)
        with np.errstate(divide='ignore', invalid='ignore'):
            return np.where(d > 0, d * (self.alpha - self.beta * np.log(np.where(d > 0, d, 1))),
                            0.0)

    @property
    def peak_d(self) -> float:
        if self.beta <= 0:
            return math.inf
        if self.form == 'bon':
            return self.alpha / (2 * self.beta)
        return math.exp(self.alpha / self.beta - 1)

    @property
    def peak_kl(self) -> float:
        return self.peak_d ** 2

    def describe(self) -> str:
        shape = 'd (α - β d)' if self.form == 'bon' else 'd (α - β ln d)'
        peak = (f'peak at KL {self.peak_kl:.3g} nats' if math.isfinite(self.peak_kl)
                else 'no peak (β <= 0)')
        return f'R(d) = {shape}, α = {self.alpha:.4g}, β = {self.beta:.4g}; {peak}'


def fit(form: str, d, gain) -> Fit:
    """Least-squares `alpha, beta` of `form` ('bon' or 'rl') through the points `(d, gain)`."""
    if form not in ('bon', 'rl'):
        raise ValueError(f'form {form!r}: expected bon or rl')
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    keep = d > 0  # R(0) = 0 by construction: the origin says nothing about alpha or beta
    if keep.sum() < 2:
        raise ValueError(f'a fit of two parameters needs two points with d > 0, got {keep.sum()}')
    d, gain = d[keep], gain[keep]
    curvature = d * d if form == 'bon' else d * np.log(d)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -curvature], axis=1), gain, rcond=None)
    return Fit(form, float(alpha), float(beta))
