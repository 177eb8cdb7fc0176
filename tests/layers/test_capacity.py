import numpy as np

from moejax.layers.capacity import (SORTED_MIN_ROWS_PER_EXPERT, capacity_bucket,
                                    count_quantiles, expected_rows, expected_work,
                                    max_count_noise, sorted_blocks, sorted_work,
                                    uses_capacity)


def test_capacity_bucket_covers_count_with_bounded_padding():
    for count in range(1, 600):
        c = capacity_bucket(count, 10_000)
        assert count <= c <= max(8, 1.25 * count)
    assert capacity_bucket(50, 40) == 40  # never above the token count


def test_paths_switch_at_the_threshold():
    n = SORTED_MIN_ROWS_PER_EXPERT * 8 // 2  # E = 8, k = 2: exactly the threshold
    assert uses_capacity(n - 1, 2, 8) and not uses_capacity(n, 2, 8)
    small = sorted_blocks(n * 2 / 8)[1]
    assert n * 2 <= expected_rows(n, 2, 8) < n * 2 + 8 * small  # sorted: N·k + padding


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


def test_count_quantiles_sum_to_the_rows_and_spread_with_imbalance():
    even, skewed = count_quantiles(256, 2, 8), count_quantiles(256, 2, 8, imbalance=1.5)
    assert np.isclose(even.sum(), 8 * 256) and np.isclose(skewed.sum(), 8 * 256)
    assert np.all(np.diff(even) > 0) and skewed.max() - skewed.min() > even.max() - even.min()


def test_sorted_work_counts_each_block_its_padding_and_the_weight_copy():
    # 1024 tokens, top-2 of 8: μ = 256 → blocks (256, 64); counts below 256 run as four
    # 64-row blocks, above as 256 + 64: padding < 64 rows per expert, ≥ 1 call each
    # typical counts 235 244 249 254 | 258 263 268 277: 4 × (4·64) + 4 × (256 + 64)
    assert sorted_blocks(256) == (256, 64)
    assert np.array_equal(np.round(count_quantiles(256, 2, 8)),
                          [235, 244, 249, 254, 258, 263, 268, 277])
    # passes: one per block, and 2·E for the copy of the weights into the loop body
    assert sorted_work(1024, 2, 8) == (4 * 256 + 4 * 320, 4 * 4 + 4 * 2 + 2 * 8)


def test_expected_work_takes_the_capacity_path_below_the_threshold():
    rows, calls = expected_work(36, 2, 8)
    assert rows == expected_rows(36, 2, 8) and calls == 8
