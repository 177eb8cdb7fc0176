"""Host KV cache + CPU attention equal the device attention of moejax.layers/ops."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import ops
from moejax.host_offload import CPUAttention, HostKVCache
from moejax.layers.attention import causal_mask, gqa_attention

CFG = moejax.get_model("tiny_mixtral")  # Hq 4, Hkv 2, d 16, float32
B, T, S = 4, 8, 12
LENS = np.array([8, 5, 1, 3])


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(0)
    return rand(rng, B, T, 4, 16), rand(rng, B, T, 2, 16), rand(rng, B, T, 2, 16)


def reference_prefill(q, k, v):
    am = jnp.asarray(np.arange(T)[None] < LENS[:, None], jnp.int32)
    return np.asarray(gqa_attention(q, k, v, causal_mask(am)))


def reference_decode(k, v, steps):
    """ops.write_prefill + ops.decode_attention: the device path of Engine(model)."""
    kc, vc = jnp.zeros((B, S, 2, 16)), jnp.zeros((B, S, 2, 16))
    kc, vc = ops.write_prefill(kc, vc, k, v)
    outs, pos = [], jnp.asarray(LENS)
    for q1, k1, v1 in steps:
        o, kc, vc = ops.decode_attention(kc, vc, q1, k1, v1, pos)
        outs.append(np.asarray(o))
        pos = pos + 1
    return outs


def decode_steps(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [(rand(rng, B, 1, 4, 16), rand(rng, B, 1, 2, 16), rand(rng, B, 1, 2, 16))
            for _ in range(n)]


def test_layout_is_one_contiguous_slab_per_row_and_head():
    kv = HostKVCache(CFG, B, S)
    assert kv.k[0].shape == kv.v[0].shape == (B, 2, S, 16)
    assert kv.nbytes == 2 * CFG.num_layers * B * S * 2 * 16 * 4


def test_prefill_matches_device_attention_incl_padding_queries(prompt):
    kv = HostKVCache(CFG, B, S)
    o = np.asarray(kv.prefill(0, slice(0, B), *prompt, LENS))
    np.testing.assert_allclose(o, reference_prefill(*prompt), rtol=1e-5, atol=1e-6)


def test_decode_matches_device_decode_attention(prompt):
    kv = HostKVCache(CFG, B, S)
    kv.prefill(1, slice(0, B), *prompt, LENS)
    steps = decode_steps()
    ref = reference_decode(prompt[1], prompt[2], steps)
    for j, (q1, k1, v1) in enumerate(steps):
        o = np.asarray(kv.decode(1, slice(0, B), q1, k1, v1, LENS + j))
        np.testing.assert_allclose(o, ref[j], rtol=1e-5, atol=1e-6)


def test_explicit_steps_equal_the_wrapper(prompt):
    a, b = HostKVCache(CFG, B, S), HostKVCache(CFG, B, S)
    q, k, v = a.to_host(*map(jnp.asarray, prompt))
    o = a.to_device(a.prefill_host(0, slice(0, B), q, k, v, LENS))
    np.testing.assert_array_equal(np.asarray(o),
                                  np.asarray(b.prefill(0, slice(0, B), *prompt, LENS)))


def test_row_slices_from_concurrent_threads_equal_one_call(prompt):
    whole, parts = HostKVCache(CFG, B, S), HostKVCache(CFG, B, S)
    whole.prefill(0, slice(0, B), *prompt, LENS)
    (q1, k1, v1), = decode_steps(1)
    ref = np.asarray(whole.decode(0, slice(0, B), q1, k1, v1, LENS))
    out = np.zeros_like(ref)

    def micro_batch(sl):
        parts.prefill(0, sl, *(x[sl] for x in prompt), LENS[sl])
        out[sl] = np.asarray(parts.decode(0, sl, q1[sl], k1[sl], v1[sl], LENS[sl]))

    threads = [threading.Thread(target=micro_batch, args=(sl,))
               for sl in (slice(0, 1), slice(1, 3), slice(3, 4))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)  # GEMM sizes differ


def test_single_thread_equals_pool(prompt):
    a = HostKVCache(CFG, B, S, attention=CPUAttention(1))
    b = HostKVCache(CFG, B, S, attention=CPUAttention(2))
    np.testing.assert_array_equal(np.asarray(a.prefill(0, slice(0, B), *prompt, LENS)),
                                  np.asarray(b.prefill(0, slice(0, B), *prompt, LENS)))
    (q1, k1, v1), = decode_steps(1)
    np.testing.assert_allclose(np.asarray(a.decode(0, slice(0, B), q1, k1, v1, LENS)),
                               np.asarray(b.decode(0, slice(0, B), q1, k1, v1, LENS)),
                               rtol=1e-6, atol=1e-7)


def test_int8_cache_accuracy(prompt):
    """int8 (per row/head/token scales) vs float attention output: ≤ 2 % of max |o|."""
    kv = HostKVCache(CFG, B, S, kv_dtype="int8")
    o = np.asarray(kv.prefill(0, slice(0, B), *prompt, LENS))
    ref = reference_prefill(*prompt)
    assert kv.k[0].dtype == np.int8
    assert np.abs(o - ref).max() / np.abs(ref).max() < 2e-2
    (q1, k1, v1), = decode_steps(1)
    d = np.asarray(kv.decode(0, slice(0, B), q1, k1, v1, LENS))
    r = reference_decode(prompt[1], prompt[2], [(q1, k1, v1)])[0]
    assert np.abs(d - r).max() / np.abs(r).max() < 2e-2


@pytest.mark.parametrize("rows,pos,needle", [
    (slice(0, 3), LENS, "do not match"),
    (slice(0, 4, 2), LENS, "contiguous slice"),
    (slice(0, 4), LENS + S, "positions \\+ 1 must be"),
])
def test_bad_rows_and_positions(rows, pos, needle):
    kv = HostKVCache(CFG, B, S)
    (q1, k1, v1), = decode_steps(1)
    with pytest.raises(ValueError, match=needle):
        kv.decode_host(0, rows, q1, k1, v1, pos)


@pytest.mark.parametrize("kw,needle", [(dict(kv_dtype="int4"), "kv_dtype='int4'"),
                                       (dict(max_len=0), "max_len=0")])
def test_bad_cache_arguments(kw, needle):
    with pytest.raises(ValueError, match=needle):
        HostKVCache(CFG, **{"batch_size": B, "max_len": S, **kw})


def test_cache_larger_than_free_host_memory_is_refused_up_front():
    with pytest.raises(ValueError, match=r"host KV cache of 1000000 sequences .* needs"):
        HostKVCache(CFG, 1_000_000, 100_000)
