"""Means and their standard errors: plain, stratified and paired over prompts.

Every evaluation reports `mean ± standard error` through these, so one definition holds
everywhere: the standard error is the sample standard deviation (ddof 1) over the square root of
the number of values. A comparison of two models on the same prompts is paired (the error of
the mean difference, far smaller than that of either mean when the prompts' difficulty
dominates), and a comparison on a fixed mix of task families and levels can be stratified by
them.
"""

from __future__ import annotations

import math

import numpy as np


def mean_and_stderr(values, strata=None) -> tuple[float, float]:
    """The mean of per-prompt `values` and its standard error.

    Given each value's stratum (say its task family and level), the error is that of the mean
    given how many values each stratum holds (post-stratification): the variance of the values
    around their stratum's mean, pooled over strata, divided by the number of values. With equal
    strata it is the textbook stratified error, the square root of sum_h w_h^2 s_h^2 / n_h.
    Differences between strata, which a fixed set of prompts fixes, then no longer count as
    noise.
    """
    values = np.asarray(values)
    n = len(values)
    if strata is None:
        return float(values.mean()), float(values.std(ddof=1) / math.sqrt(n))
    labels, index = np.unique(np.asarray(strata), return_inverse=True)
    if n <= len(labels):
        raise ValueError(f'{n} values in {len(labels)} strata: a stratified standard error '
                         'needs more values than strata')
    means = np.bincount(index, weights=values) / np.bincount(index)
    variance = ((values - means[index]) ** 2).sum() / (n - len(labels))
    return float(values.mean()), float(math.sqrt(variance / n))


def paired(values, baseline, strata=None) -> tuple[float, float]:
    """The mean gain of `values` over `baseline`, paired value by value (the same prompts), and
    its standard error."""
    return mean_and_stderr(np.asarray(values) - np.asarray(baseline), strata)

