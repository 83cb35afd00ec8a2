"""The few statistics the scripts report, as plain float64 functions: a mean with its standard
error, pass@k, pairwise accuracy, Pearson's and Spearman's correlation and the large-sample SE of a
correlation."""

import math

import numpy as np


def mean_se(values: list[float]) -> tuple[float, float]:
    """-> (mean, SE = sample std / sqrt(n)); the SE of a single value is nan (one seed says nothing
    of noise)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. 2021 (eq. 1) from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k): the chance that k of the n, drawn without replacement, hold a correct
    one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> tuple[float, float]:
    """(n,) scores of the preferred and the other text -> (accuracy, binomial SE sqrt(p(1-p)/n)).
    A tie scores 1/2: a scorer without an opinion is as good as a coin, not always wrong."""
    p = float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))
    return p, math.sqrt(p * (1 - p) / len(chosen))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """(n,), (n,) -> Pearson's r in float64 (nan when either vector is constant)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else math.nan


def average_ranks(x: np.ndarray) -> np.ndarray:
    """(n,) -> 1-based ranks, tied values sharing the mean of their ranks
    ([5, 1, 5] -> [2.5, 1, 2.5])."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (the tie-corrected form)."""
    return pearson(average_ranks(np.asarray(x)), average_ranks(np.asarray(y)))


def corr_se(r: float, n: int) -> float:
    """Large-sample SE of a correlation coefficient: (1 - r²)/sqrt(n - 1)."""
    return (1 - r * r) / math.sqrt(n - 1)
