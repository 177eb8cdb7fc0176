"""The GPU data plane's contracts, on the CPU: pages are issued on the link lane only
and read where they land, q/k/v go to the host as one transfer, the capacity bucket is
picked on the device, and the allocator's figures are read where a backend has them."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import ops
from moejax.layers.experts import moe_ffn, moe_ffn_parts
from moejax.model_config.dispatch import capacity_bucket, capacity_buckets
from tests.test_engine_offload import model, prompts, reference  # noqa: F401


def test_only_the_link_lane_issues_page_copies(model, prompts, reference):
    e = moejax.Engine(model, gpu_weight_fraction=0.3, page_bytes=4 * 48 * 101 * 3)
    issued, real = [], e.store.prefetch_page

    def spy(*a, **kw):
        out = real(*a, **kw)
        if out is not None:
            issued.append(threading.current_thread().name)
        return out

    e.store.prefetch_page = spy
    assert e.generate(prompts, 6, batching="static") == reference
    assert issued and set(issued) == {"moejax-h2d"}  # never the compute (gpu) lane


def test_qkv_leave_the_device_as_one_transfer(model, prompts, reference):
    e = moejax.Engine(model, gpu_weight_fraction=0.0)
    calls, real = [], moejax.host_offload.HostKVCache.to_host

    def spy(*xs):
        calls.append(len(xs))
        return real(*xs)

    moejax.host_offload.HostKVCache.to_host = staticmethod(spy)
    try:
        assert e.generate(prompts, 6, batching="static") == reference
    finally:
        moejax.host_offload.HostKVCache.to_host = staticmethod(real)
    decode_qkv = [n for n in calls if n == 1]
    assert decode_qkv and set(calls) <= {1, 2}  # 1: packed q/k/v; 2: prefill's k, v


@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
def test_capacity_is_picked_on_the_device_as_the_host_would(tokens):
    cfg = moejax.get_model("tiny_mixtral")
    rng = np.random.default_rng(tokens)
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
    w1, w3 = (jnp.asarray(rng.standard_normal((e, h, f)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, h)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((tokens, h)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(e)[:2] for _ in range(tokens)]), jnp.int32)
    w = jnp.full((tokens, 2), 0.5, jnp.float32)
    host_cap = capacity_bucket(int(np.bincount(np.asarray(ids).ravel(), minlength=e).max()),
                               tokens)
    assert host_cap in capacity_buckets(tokens, 2, e)
    want = moe_ffn(x, w, ids, w1, w3, w2, capacity=host_cap)
    got = ops._moe_ffn(cfg, [(w1, w3, w2)], x, w, ids, "device")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_experts_split_along_the_ffn_axis_sum_to_the_whole():
    rng = np.random.default_rng(0)
    e, h, f, n = 4, 8, 12, 10
    w1, w3 = (jnp.asarray(rng.standard_normal((e, h, f)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, h)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    ids = np.stack([rng.permutation(e)[:2] for _ in range(n)]).astype(np.int32)
    w = np.full((n, 2), 0.5, np.float32)
    parts = [(w1[:, :, a:b], w3[:, :, a:b], w2[:, a:b]) for a, b in ((0, 5), (5, 9), (9, 12))]
    for cap in (None, 8):
        whole = moe_ffn(x, w, ids, w1, w3, w2, capacity=cap)
        split = moe_ffn_parts(x, w, ids, parts, capacity=cap)
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_allocator_figures_are_none_where_the_backend_has_none():
    from moejax.host_offload.memory import device_memory_limit, peak_device_bytes

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        assert device_memory_limit(dev) is None and peak_device_bytes(dev) is None
    else:
        assert device_memory_limit(dev) > 0 and peak_device_bytes(dev) >= 0


def test_a_budget_is_enforced_only_before_the_backend_starts():
    from moejax.host_offload.memory import enforce_device_budget

    with pytest.raises(ValueError, match="before JAX's backend starts"):
        enforce_device_budget(2**30, 2**34)


@pytest.mark.gpu
def test_measured_peak_stays_within_the_predicted_one(model, prompts):
    e = moejax.Engine(model, device_memory_bytes=2**30)
    e.generate(prompts, 6, batching="static")
    run = e.last_run
    assert run.peak_device_bytes_measured is not None
    assert run.peak_device_bytes_measured <= e.store.budget
