"""The expert dispatch's shape rules (layers/experts.py): which of its two exact paths a
token count takes, the capacity bucket, the sorted path's row blocks. Pure Python, so
the layers, the runtime and the cost model (`schedule.routing`) share one definition.

- capacity path: tokens scattered into an [E, C, h] buffer, C = the router's max count
  rounded up to a bucket: every expert computes C rows;
- sorted path (≥ SORTED_MIN_ROWS_PER_EXPERT rows per expert on average): each expert
  over its own rows in row blocks, ≈ N·k rows plus each expert's last block's padding.
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


def sorted_blocks(rows_per_expert: float) -> tuple[int, int]:
    """(big, small) row-block sizes of the sorted path for a mean of `rows_per_expert`
    rows per expert: an expert's rows run as ⌊count/big⌋ blocks of `big`, then the rest
    in blocks of `small` (padding < small rows per expert). big = the largest power of
    two ≤ the mean, in [8, 512]; 512 + 64 measured best at ~1024 rows per expert
    (256 + 64, 256 + 128 and 1024 + 128 were 2-4 % slower)."""
    big = 8
    while big < 512 and 2 * big <= rows_per_expert:
        big *= 2
    return big, max(8, min(64, big // 4))
