"""Expert-dispatch shape rules (docs/design.md §4.3), shared by layers, runtime and costs."""

from __future__ import annotations

import numpy as np

# Mean rows per expert N·k/E from which the sorted path (≈ N·k rows) replaces the
# capacity path (E·C rows): where their measured costs cross (experiments/results/).
SORTED_MIN_ROWS_PER_EXPERT = 256


def capacity_bucket(max_count: int, num_tokens: int) -> int:
    """C ≥ max_count in quarter-octave steps (≤ 25 % padding), ≥ 8, ≤ num_tokens."""
    if max_count <= 8:
        c = 8
    else:
        step = 1 << max(0, int(max_count).bit_length() - 3)
        c = -(-int(max_count) // step) * step
    return int(min(c, num_tokens))


def uses_capacity(tokens, top_k: int, num_experts: int):
    """True where `tokens` tokens take the capacity path (NumPy-broadcastable)."""
    return np.asarray(tokens) * top_k < SORTED_MIN_ROWS_PER_EXPERT * num_experts


def sorted_blocks(rows_per_expert: float) -> tuple[int, int]:
    """(big, small): big = 2^⌊log2 mean⌋ in [8, 512], small = big/4 in [8, 64]."""
    big = 8
    while big < 512 and 2 * big <= rows_per_expert:
        big *= 2
    return big, max(8, min(64, big // 4))


def capacity_buckets(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
    """Ascending capacities for max counts in [⌈N·k/E⌉, N]: the device picks one."""
    lo = max(1, -(-num_tokens * top_k // num_experts))
    return tuple(sorted({capacity_bucket(c, num_tokens) for c in range(lo, num_tokens + 1)}))
