import numpy as np

from moejax.layers.capacity import (SORTED_MIN_ROWS_PER_EXPERT, capacity_bucket,
                                    expected_rows, max_count_noise, uses_capacity)


def test_capacity_bucket_covers_count_with_bounded_padding():
    for count in range(1, 600):
        c = capacity_bucket(count, 10_000)
        assert count <= c <= max(8, 1.25 * count)
    assert capacity_bucket(50, 40) == 40  # never above the token count


def test_paths_switch_at_the_threshold():
    n = SORTED_MIN_ROWS_PER_EXPERT * 8 // 2  # E = 8, k = 2: exactly the threshold
    assert uses_capacity(n - 1, 2, 8) and not uses_capacity(n, 2, 8)
    assert expected_rows(n, 2, 8) == n * 2  # sorted: exact rows


def test_capacity_path_pads_to_every_expert():
    # 36 tokens, top-2 of 8: mean 9 per expert, max ≈ 9 + √(2 ln 8 · 9 · 0.75) ≈ 14 → 16
    assert expected_rows(36, 2, 8) == 8 * 16
    below = np.arange(1, SORTED_MIN_ROWS_PER_EXPERT * 4)  # all on the capacity path
    assert np.all(np.diff(expected_rows(below, 2, 8)) >= 0)


def test_imbalance_raises_the_expected_capacity():
    # 36 tokens, top-2 of 8: μ = 9; a hot expert at 2× the uniform share: ⌈18 + noise⌉
    noise = max_count_noise(9, 2, 8)
    assert expected_rows(36, 2, 8, imbalance=2.0) == 8 * capacity_bucket(
        int(np.ceil(18 + noise)), 36)
    assert expected_rows(36, 2, 8, imbalance=2.0) > expected_rows(36, 2, 8)
