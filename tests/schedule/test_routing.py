import numpy as np
import pytest

from moejax.model_config.dispatch import (SORTED_MIN_ROWS_PER_EXPERT, capacity_bucket,
                                       uses_capacity)
from moejax.schedule.routing import (count_quantiles, expected_capacity, expected_max_count,
                                     expected_rows, expected_work, fit_imbalance, sorted_blocks,
                                     sorted_work)


def _random_routing(tokens, draws=2000, seed=0):
    """[draws, 8] per-expert counts of uniform random top-2-of-8 routing."""
    rng = np.random.default_rng(seed)
    choice = np.argsort(rng.random((draws, tokens, 8)), axis=-1)[..., :2]
    return np.stack([np.bincount(c.ravel(), minlength=8) for c in choice])


def test_paths_switch_at_the_threshold():
    n = SORTED_MIN_ROWS_PER_EXPERT * 8 // 2  # E = 8, k = 2: exactly the threshold
    assert uses_capacity(n - 1, 2, 8) and not uses_capacity(n, 2, 8)
    small = sorted_blocks(n * 2 / 8)[1]
    assert n * 2 <= expected_rows(n, 2, 8) < n * 2 + 8 * small  # sorted: N·k + padding


def test_capacity_path_pads_every_expert_to_the_expected_bucket():
    # 36 tokens, top-2 of 8: E·E[C], C the bucket of the max count (≥ 9 = the mean)
    assert 8 * 9 < expected_rows(36, 2, 8) == 8 * expected_capacity(36, 2, 8) <= 8 * 36
    below = np.arange(1, SORTED_MIN_ROWS_PER_EXPERT * 4)  # all on the capacity path
    assert np.all(np.diff(expected_rows(below, 2, 8)) >= -1e-9)


def test_expected_capacity_matches_random_routing():
    for tokens in (16, 32, 64):
        counts = _random_routing(tokens)
        seen = np.mean([capacity_bucket(c.max(), tokens) for c in counts])
        assert expected_capacity(tokens, 2, 8) == pytest.approx(seen, rel=0.05)
        assert expected_max_count(tokens, 2, 8) == pytest.approx(counts.max(1).mean(),
                                                                 rel=0.05)


def test_imbalance_raises_the_expected_capacity():
    assert expected_capacity(36, 2, 8, imbalance=2.0) > expected_capacity(36, 2, 8)
    # the hot expert's mean count is 2× the uniform 9: the max is at least that
    assert expected_max_count(36, 2, 8, imbalance=2.0) >= 18


def test_fit_imbalance_inverts_the_expected_max_count():
    calls = [np.array([40, 8, 8, 8]), np.array([16, 16, 16, 16])]  # top-2 of 4, N = 32
    imb = fit_imbalance(calls, 2)
    assert 1 < imb <= 2
    assert 2 * expected_max_count(32, 2, 4, imb) == pytest.approx(56, abs=1e-3)


def test_fit_imbalance_leaves_out_calls_too_small_to_show_skew():
    # 1 token, top-2 of 8: the max is always 1; such calls once fitted imbalance E/k = 4
    assert fit_imbalance([np.array([1, 1, 0, 0, 0, 0, 0, 0])] * 5, 2) == 1.0
    assert expected_max_count(1, 2, 8) == pytest.approx(1.0)  # some count reaches the mean


def test_fitted_imbalance_prices_the_capacity_the_routing_needed():
    # uniform routing fits a little above 1 (independent counts' max runs ~3 % low);
    # what matters is that the fit prices the capacity the calls padded to
    counts = _random_routing(32, draws=300)
    imb = fit_imbalance(list(counts), 2)
    assert 1 <= imb < 1.3
    seen = np.mean([capacity_bucket(c.max(), 32) for c in counts])
    assert expected_capacity(32, 2, 8, imb) == pytest.approx(seen, rel=0.03)
    assert fit_imbalance([np.full(4, 1000)], 2) == 1.0  # never below uniform
    assert fit_imbalance([], 2) == 1.0


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
