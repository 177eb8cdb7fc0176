"""Routing statistics that price the expert GEMMs (docs/design.md §4.3): expected rows
and weight passes of the dispatch (`model_config.dispatch`) and a run's fitted imbalance."""

from __future__ import annotations

import functools
from statistics import NormalDist

import numpy as np

from moejax.model_config.dispatch import capacity_bucket, sorted_blocks, uses_capacity


def count_quantiles(mean_count, top_k: int, num_experts: int, imbalance: float = 1.0):
    """[..., E] typical per-expert counts for mean μ: μ + σ·z_j, z_j = Φ⁻¹((j − ½)/E),
    σ² = μ(1 − k/E) + s², s = (imbalance − 1)·μ/√(2 ln E); sums to E·μ. A Gaussian
    stand-in for `max_count_pmf`'s skew, cheap enough for the sorted path's sizes."""
    z = np.array([NormalDist().inv_cdf((j + 0.5) / num_experts)
                  for j in range(num_experts)])
    mu = np.asarray(mean_count, dtype=float)[..., None]
    skew = (imbalance - 1) * mu / np.sqrt(2 * np.log(max(num_experts, 2)))
    sigma = np.sqrt(mu * (1 - top_k / num_experts) + skew ** 2)
    return np.maximum(mu + sigma * z, 0.0)


def sorted_work(tokens, top_k: int, num_experts: int, imbalance: float = 1.0):
    """(rows, weight passes) of the sorted path: count c (`count_quantiles`) runs as ⌊c/big⌋
    blocks of big then ⌈rest/small⌉ of small (`sorted_blocks`); rows = Σ blocks·size,
    passes = Σ blocks + 2·E, since every block rereads its expert and the loop body
    copies each expert's weights once (a read and a write)."""
    n = np.asarray(tokens, dtype=float)
    mu = n * top_k / num_experts
    blocks = np.vectorize(sorted_blocks, otypes=[float, float])(mu)
    big, small = (b[..., None] for b in blocks)
    c = np.round(count_quantiles(mu, top_k, num_experts, imbalance))
    n_big = np.floor(c / big)
    n_small = np.ceil((c - n_big * big) / small)
    return (np.sum(n_big * big + n_small * small, axis=-1),
            np.sum(n_big + n_small, axis=-1) + 2 * num_experts)


# Calls with fewer (token, choice) rows per expert than this are left out of the
# imbalance fit: their max count says little about skew.
MIN_FIT_ROWS_PER_EXPERT = 8


@functools.lru_cache(maxsize=64)
def _binomial_cdf(n: int, p: float) -> np.ndarray:
    """[n + 1] P(X ≤ c), X ~ Binomial(n, p). Read-only (cached: ≤ 64·(n+1) floats)."""
    c = np.arange(n + 1)
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1)))))
    q = min(max(p, 1e-12), 1 - 1e-12)
    log_pmf = (log_fact[n] - log_fact[c] - log_fact[n - c]
               + c * np.log(q) + (n - c) * np.log1p(-q))
    cdf = np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)
    cdf.setflags(write=False)
    return cdf


def max_count_pmf(tokens: int, top_k: int, num_experts: int,
                  imbalance: float = 1.0) -> np.ndarray:
    """[N + 1] P(max_e count_e = c): counts ~ Binomial(N, k/E), the hottest's Binomial(N,
    min(1, imbalance·k/E)), taken as independent: P(max ≤ c) = F_hot(c)·F(c)^(E−1), and
    max ≥ ⌈N·k/E⌉ since some count reaches the mean."""
    n, p = int(tokens), top_k / num_experts
    cdf = _binomial_cdf(n, min(1.0, imbalance * p)) * _binomial_cdf(n, p) ** (num_experts - 1)
    cdf[:int(np.ceil(n * p - 1e-9))] = 0.0
    pmf = np.diff(cdf, prepend=0.0)
    return pmf / pmf.sum()


def expected_max_count(tokens: int, top_k: int, num_experts: int,
                       imbalance: float = 1.0) -> float:
    """E[max_e count_e] under `max_count_pmf`."""
    pmf = max_count_pmf(int(tokens), top_k, num_experts, float(imbalance))
    return float(pmf @ np.arange(pmf.size))


@functools.lru_cache(maxsize=4096)
def expected_capacity(tokens: int, top_k: int, num_experts: int,
                      imbalance: float = 1.0) -> float:
    """E[C] = Σ_c P(max = c)·bucket(c) [rows per expert] (§4.3): the mean capacity the
    dispatch pads to, which the bucket of the mean max count overstates."""
    n = int(tokens)
    pmf = max_count_pmf(n, top_k, num_experts, float(imbalance))
    return float(pmf @ np.array([capacity_bucket(max(c, 1), n) for c in range(n + 1)]))


def fit_imbalance(calls, top_k: int) -> float:
    """Imbalance ∈ [1, E/k] with Σ E[max | N_c, imbalance] = Σ max_c over `calls` (per-call
    count vectors [E], N_c = Σ counts / k; bisection), so priced capacities match those
    padded to. Calls under `MIN_FIT_ROWS_PER_EXPERT` are skipped; 1 if none is left."""
    by_shape: dict = {}
    for c in calls:
        c = np.asarray(c)
        n = int(round(c.sum() / top_k))
        if n * top_k < MIN_FIT_ROWS_PER_EXPERT * c.size:
            continue
        n_max = by_shape.setdefault((n, c.size), [0, 0.0])
        n_max[0] += 1
        n_max[1] += float(c.max())
    if not by_shape:
        return 1.0

    def excess(imb):
        return sum(k * expected_max_count(n, top_k, e, imb) - mx
                   for (n, e), (k, mx) in by_shape.items())
    lo, hi = 1.0, max(e for _, e in by_shape) / top_k
    if excess(lo) >= 0:
        return 1.0
    if excess(hi) <= 0:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return round((lo + hi) / 2, 6)  # a cache key for expected_capacity


def expected_work(tokens, top_k: int, num_experts: int, imbalance: float = 1.0):
    """(rows, weight passes) of the expert GEMMs (§4.3); a pass reads one expert's weights.
    Capacity path: E·C rows in E passes, C = `expected_capacity`; sorted: `sorted_work`."""
    n = np.asarray(tokens, dtype=float)
    cap = uses_capacity(n, top_k, num_experts)
    capacity = np.vectorize(
        lambda t, c: expected_capacity(t, top_k, num_experts, imbalance) if c else 0.0,
        otypes=[float])(np.round(n), cap)
    rows, calls = sorted_work(n, top_k, num_experts, imbalance)
    return (np.where(cap, num_experts * capacity, rows),
            np.where(cap, float(num_experts), calls))


def expected_rows(tokens, top_k: int, num_experts: int, imbalance: float = 1.0):
    """Rows the expert GEMMs compute for `tokens` tokens (`expected_work`)."""
    return expected_work(tokens, top_k, num_experts, imbalance)[0]
