"""The accelerator's code path on the CPU backend (`MOEJAX_ACCELERATOR_PATH=1`): pinned
host pages copied out of the source, no zero-copy views, ops that do not block, budgets
through the store. The offloaded engine's parity and budget tests run again on it."""

import pytest

from tests.test_engine_offload import (  # noqa: F401 (fixtures and tests run here again)
    model, prompts, reference, reference_logits,
    test_batch_whose_activations_do_not_fit_is_refused_before_running,
    test_budget_that_fits_only_streaming_every_expert,
    test_device_kv_cache_over_budget_is_refused, test_greedy_tokens_identical,
    test_prefill_logits_within_1e5, test_searched_micro_batching_keeps_to_the_budget)


@pytest.fixture(autouse=True)
def accelerator_path(monkeypatch):
    monkeypatch.setenv("MOEJAX_ACCELERATOR_PATH", "1")


def test_the_switch_is_on(model):
    import moejax

    e = moejax.Engine(model, gpu_weight_fraction=0.5)
    assert e.store.accelerator_path


def test_pinned_pool_too_small_is_refused_up_front(model, monkeypatch):
    import moejax

    monkeypatch.setenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "0.000001")
    with pytest.raises(ValueError, match="pinned host memory but the pool holds .*short by"):
        moejax.Engine(model, gpu_weight_fraction=0.0)
