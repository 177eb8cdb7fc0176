"""Routing statistics for pricing the expert GEMMs (docs/design.md §4): how many rows
the dispatch computes for N tokens, in expectation, and the router imbalance a run
showed. The dispatch rules themselves are `model_config.dispatch`."""

from __future__ import annotations

import functools
from statistics import NormalDist

import numpy as np

from moejax.model_config.dispatch import capacity_bucket, sorted_blocks, uses_capacity


def count_quantiles(mean_count, top_k: int, num_experts: int, imbalance: float = 1.0):
    """[..., E] typical per-expert row counts of a call with mean μ per expert: μ + σ·z_j
    at the E normal quantiles z_j = Φ⁻¹((j − ½)/E), σ² = μ(1 − k/E) + s², the binomial
    spread plus a skew s = (imbalance − 1)·μ/√(2 ln E). With E = 8 the hottest count
    then lies ≈ 0.75·(imbalance − 1)·μ above the uniform one's: a Gaussian stand-in for
    the capacity path's `max_count_pmf`, whose hottest expert has imbalance·μ. Sums to
    E·μ."""
    z = np.array([NormalDist().inv_cdf((j + 0.5) / num_experts)
                  for j in range(num_experts)])
    mu = np.asarray(mean_count, dtype=float)[..., None]
    skew = (imbalance - 1) * mu / np.sqrt(2 * np.log(max(num_experts, 2)))
    sigma = np.sqrt(mu * (1 - top_k / num_experts) + skew ** 2)
    return np.maximum(mu + sigma * z, 0.0)


def sorted_work(tokens, top_k: int, num_experts: int, imbalance: float = 1.0):
    """(rows, weight passes) of the sorted path for `tokens` tokens: each expert's count
    c (`count_quantiles`) runs as ⌊c/big⌋ blocks of big then ⌈rest/small⌉ of small
    (`sorted_blocks`), so rows = Σ blocks·size ≥ N·k; every block reads its expert's
    weights again, and the loop body first copies each expert's weights (a read and a
    write: 2·E passes), so passes = Σ blocks + 2·E. Measured on the 2-core CPU at
    h = 768, f = 2688, E = 8, random top-2 routing: within 5 % from 1024 to 8192
    tokens (the blocks alone priced 3-10 % low)."""
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
# imbalance fit: their max count says little about skew, and the independent-count
# model's 2-10 % low max there fitted uniform routing of 1 token at imbalance E/k.
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
    """[N + 1] P(max_e count_e = c) for N tokens' top-k choices among E experts: each
    count binomial (N, k/E), the hottest expert's (N, min(1, imbalance·k/E)), taken as
    independent: P(max ≤ c) = F_hot(c)·F(c)^(E−1), and at least ⌈N·k/E⌉ (some count
    reaches the mean). Against uniform random routing (1000-2000 draws; top-2 of 8,
    top-4 of 16, top-8 of 128): E[max] 2-5 % low at N = 2-32, ≤ 1.5 % from 64 on;
    E[C] 0-3 % low."""
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
    """E[C] = Σ_c P(max = c)·bucket(c) (`max_count_pmf`, `capacity_bucket`): the mean
    capacity the dispatch pads to, not the bucket of the mean max count (that one priced
    decode micro-batches of 32 tokens at C = 14-16 where C averaged 12.1)."""
    n = int(tokens)
    pmf = max_count_pmf(n, top_k, num_experts, float(imbalance))
    return float(pmf @ np.array([capacity_bucket(max(c, 1), n) for c in range(n + 1)]))


def fit_imbalance(calls, top_k: int) -> float:
    """The imbalance under which the expected max counts of these router calls add up
    to their max counts: Σ E[max | N_c, imbalance] = Σ max_c (`expected_max_count`;
    bisection on [1, E/k]). `calls`: per-expert count vectors [E], one per call, N_c =
    Σ counts / k; calls under `MIN_FIT_ROWS_PER_EXPERT` rows per expert are left out.
    1 where no call is left or routing is no hotter than the model's uniform one.
    Uniform routing of 32 tokens (top-2 of 8) fits ~1.1: the model's max runs 3 % low
    there, and the fit makes up for it, so the capacity priced at that size is the one
    the calls padded to."""
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
    """(rows, weight passes) of the expert GEMMs for `tokens` tokens: a pass reads one
    expert's weights (`costs.gpu_ffn_s` prices each at the GEMM line's intercept).

    Capacity path: E·C rows in E passes, C = `expected_capacity` (the hottest expert's
    share `imbalance`× the uniform one). Sorted path: `sorted_work`."""
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
