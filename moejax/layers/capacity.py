"""How many rows the expert GEMMs compute: shared by the dispatch (`ops`) and the op
prices (`schedule.costs`), so the model prices exactly what runs. Pure Python/NumPy.

Two exact paths (layers/experts.py): with few (token, choice) rows per expert the
*capacity* path scatters tokens into an [E, C, h] buffer — every expert computes C rows,
C = the router's max count rounded up to a bucket; with many (≥ SORTED_MIN_ROWS_PER_EXPERT
on average) the *sorted* path runs each expert over its own rows only (≈ N·k rows).
"""

from __future__ import annotations

import numpy as np

# Mean rows per expert from which the sorted path replaces the capacity path (measured
# on the 2-core CPU at h = 1024, f = 3584, E = 8: equal at 128–256 rows per expert).
SORTED_MIN_ROWS_PER_EXPERT = 256


def capacity_bucket(max_count: int, num_tokens: int) -> int:
    """Expert capacity C ≥ max_count, rounded up to a quarter-octave step (≤ 25 % padding,
    few distinct compiled shapes), at least 8, never above the token count (dropless)."""
    if max_count <= 8:
        c = 8
    else:
        step = 1 << max(0, int(max_count).bit_length() - 3)
        c = -(-int(max_count) // step) * step
    return int(min(c, num_tokens))


def uses_capacity(tokens, top_k: int, num_experts: int):
    """True where `tokens` tokens take the capacity path (NumPy-broadcastable)."""
    return np.asarray(tokens) * top_k < SORTED_MIN_ROWS_PER_EXPERT * num_experts


def max_count_noise(mean_count, top_k: int, num_experts: int):
    """σ·√(2 ln E), σ² = μ(1 − k/E): how far the largest of E counts of mean μ lies
    above μ by chance alone (Gaussian tail)."""
    mu = np.asarray(mean_count, dtype=float)
    return np.sqrt(2 * np.log(num_experts) * mu * (1 - top_k / num_experts))


def expected_rows(tokens, top_k: int, num_experts: int, imbalance: float = 1.0):
    """Rows the expert GEMMs compute for `tokens` tokens.

    Sorted path: N·k. Capacity path: E·C with C = bucket(expected max count); with the
    hottest expert getting `imbalance`× the uniform share, the max of E counts of mean
    μ = N·k/E is ≈ imbalance·μ + σ·√(2 ln E), σ² = μ(1 − k/E) (Gaussian tail)."""
    n = np.asarray(tokens, dtype=float)
    mu = n * top_k / num_experts
    mx = np.minimum(n, np.ceil(imbalance * mu + max_count_noise(mu, top_k, num_experts)))
    bucket = np.vectorize(capacity_bucket, otypes=[float])(np.maximum(mx, 1), n)
    return np.where(uses_capacity(n, top_k, num_experts), num_experts * bucket,
                    n * top_k)
