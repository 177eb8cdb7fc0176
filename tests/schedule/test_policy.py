import pytest

import numpy as np

from moejax.schedule.policy import (Policy, affine_interval, padded_rows,
                                   prefill_device_rows)


def test_padded_rows_next_power_of_two_at_most_cap():
    assert [padded_rows(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert padded_rows(40, 48) == 48  # a cap that is not a power of two
    assert padded_rows(np.array([3.0, 6.7, 0.0]), 4).tolist() == [4, 4, 1]


def test_prefill_device_rows_pads_the_count_within_the_token_cap():
    assert prefill_device_rows([10, 12, 9], 8) == 4  # 3 prompts -> 4 rows
    assert prefill_device_rows([20, 40, 30], 8, cap=100) == 2  # ⌊100 / 48⌋ = 2 rows
    assert prefill_device_rows([500], 8, cap=100) == 1


def test_from_micro_batches():
    p = Policy.from_micro_batches(324, 14, gpu_weight_fraction=0.056)
    assert p.batch_size == 4536 and p.overlap and p.attention_device == "cpu"


@pytest.mark.parametrize("kw, bad", [
    (dict(batch_size=10, micro_batch_size=3, num_micro_batches=3), "batch_size=10"),
    (dict(batch_size=0, micro_batch_size=0, num_micro_batches=1), "batch_size=0"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, gpu_weight_fraction=1.5),
     "gpu_weight_fraction=1.5"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, attention_device="tpu"),
     "attention_device='tpu'"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, kv_cache_device="gpu"),
     "kv_cache_device='gpu'"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, page_bytes=0),
     "page_bytes=0"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, overlap=1), "overlap=1"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2, max_concurrency=5),
     "max_concurrency=5 exceeds"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2,
          prefill_tokens_per_sweep=0), "prefill_tokens_per_sweep=0"),
    (dict(batch_size=4, micro_batch_size=2, num_micro_batches=2,
          prefill_micro_batch_tokens=2.5), "prefill_micro_batch_tokens=2.5"),
])
def test_validation_names_bad_value(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Policy(**kw)


def test_affine_interval():
    assert affine_interval(2.0, 4.0, 4.0) == (0.0, 0.5)  # 2 + 4x <= 4
    assert affine_interval(5.0, -4.0, 3.0) == (0.5, 1.0)  # 5 - 4x <= 3
    assert affine_interval(1.0, 0.0, 2.0) == (0.0, 1.0)
    lo, hi = affine_interval(3.0, 0.0, 2.0)
    assert lo > hi
    lo, hi = affine_interval(5.0, 1.0, 2.0)
    assert lo > hi
