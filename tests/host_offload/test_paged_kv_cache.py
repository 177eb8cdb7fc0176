"""The paged host KV cache: same attention as the contiguous kernel, blocks reused at once."""

import threading

import ml_dtypes
import numpy as np
import pytest

import moejax
from moejax.host_offload import CPUAttention, HostKVCache, PagedKVCache, cpu_attention
from tests.host_offload.test_kv_cache import rand

CFG = moejax.get_model("tiny_mixtral")  # Hq 4, Hkv 2, d 16, float32
BT, T = 4, 11
LENS = np.array([11, 5, 1, 8, 4])  # ragged: 3, 2, 1, 2, 1 blocks of 4
SEQS = [7, "b", 3, (1, 2), 40]     # any hashable keys
B = len(LENS)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(0)
    return rand(rng, B, T, 4, 16), rand(rng, B, T, 2, 16), rand(rng, B, T, 2, 16)


def decode_steps(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [(rand(rng, B, 1, 4, 16), rand(rng, B, 1, 2, 16), rand(rng, B, 1, 2, 16))
            for _ in range(n)]


def paged(kv_dtype=None, capacity=128, extra=3, order=None, pad=True, **kw):
    """A paged cache holding SEQS (reserved LENS + extra tokens), reserved in `order`
    after a fragmenting reserve/release, so one table skips a block; a one-block
    sequence between them unless pad=False."""
    kv = PagedKVCache(CFG, capacity, BT, kv_dtype, **kw)
    kv.reserve("gap", BT)
    kv.reserve("pin", 1)
    kv.release("gap")  # the first sequence's table is [0, 2, 3, ...]
    for i in order or range(B):
        kv.reserve(SEQS[i], int(LENS[i]) + extra)
        if pad:  # else a row that fills its blocks runs on into the next row's
            kv.reserve(("pad", i), 1)
    assert any(np.diff(kv.table(s)).max(initial=1) > 1 for s in SEQS)
    return kv


def contiguous(kv_dtype=None):
    return HostKVCache(CFG, B, T + 3, kv_dtype)


def run(kv, seqs, prompt, layer=1):
    """prefill_host then 3 decode steps -> the 4 outputs."""
    outs = [kv.prefill_host(layer, seqs, *prompt, LENS)]
    for j, (q1, k1, v1) in enumerate(decode_steps()):
        outs.append(kv.decode_host(layer, seqs, q1, k1, v1, LENS + j))
    return outs


def run_both(a, b, prompt):
    return list(zip(run(a, SEQS, prompt), run(b, slice(0, B), prompt)))


@pytest.mark.parametrize("order,pad", [(None, True), ([4, 2, 0, 3, 1], True), (None, False)])
def test_paged_equals_contiguous_float32_ragged(prompt, order, pad):
    kv = paged(order=order, pad=pad)
    for o_paged, o_contig in run_both(kv, contiguous(), prompt):
        np.testing.assert_allclose(o_paged, o_contig, rtol=1e-5, atol=1e-6)


def test_paged_equals_contiguous_int8_within_bound(prompt):
    ref = run_both(paged(), contiguous(), prompt)
    got = run_both(paged("int8"), contiguous("int8"), prompt)
    for (p8, c8), (_, c32) in zip(got, ref):
        np.testing.assert_allclose(p8, c8, rtol=1e-5, atol=1e-5)
        assert np.abs(p8 - c32).max() / np.abs(c32).max() < 2e-2


def test_write_prefill_then_decode_equals_prefill_host(prompt):
    a, b = paged(), paged()
    a.prefill_host(0, SEQS, *prompt, LENS)
    b.write_prefill(0, SEQS, prompt[1], prompt[2], LENS)
    (q1, k1, v1), = decode_steps(1)
    np.testing.assert_array_equal(a.decode_host(0, SEQS, q1, k1, v1, LENS),
                                  b.decode_host(0, SEQS, q1, k1, v1, LENS))


def test_disjoint_sequences_from_concurrent_threads(prompt):
    whole, parts = paged(), paged()
    whole.prefill_host(0, SEQS, *prompt, LENS)
    (q1, k1, v1), = decode_steps(1)
    ref = whole.decode_host(0, SEQS, q1, k1, v1, LENS)
    out = np.zeros_like(ref)

    def micro_batch(sl):
        parts.prefill_host(0, SEQS[sl], *(x[sl] for x in prompt), LENS[sl])
        out[sl] = parts.decode_host(0, SEQS[sl], q1[sl], k1[sl], v1[sl], LENS[sl])

    threads = [threading.Thread(target=micro_batch, args=(sl,))
               for sl in (slice(0, 2), slice(2, 3), slice(3, 5))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_blocks_are_reused_at_once_after_release():
    kv = PagedKVCache(CFG, 10 * BT, BT)
    nbytes = kv.nbytes
    kv.reserve(0, 2 * BT)
    kv.reserve("a", 3 * BT + 1)
    blocks = kv.table("a").copy()
    assert kv.free_tokens == 10 * BT - 6 * BT and kv.num_free_blocks == 4
    kv.release("a")
    assert kv.free_tokens == 8 * BT and kv.live_sequences == [0]
    kv.reserve("b", 4 * BT)
    np.testing.assert_array_equal(kv.table("b"), blocks)
    assert kv.nbytes == nbytes and kv.num_free_blocks == 4


def test_grow_takes_the_next_block_else_the_lowest_free():
    kv = PagedKVCache(CFG, 8 * BT, BT)
    kv.reserve("a", BT)          # [0]
    kv.grow("a", 2 * BT)         # the next block is free: [0, 1]
    kv.reserve("b", 1)           # [2]
    kv.grow("a", 2 * BT - 1)     # already holds that many: unchanged
    np.testing.assert_array_equal(kv.table("a"), [0, 1])
    kv.grow("a", 3 * BT + 1)     # block 2 is taken: the lowest free, 3 and 4
    np.testing.assert_array_equal(kv.table("a"), [0, 1, 3, 4])
    assert kv.num_free_blocks == 3
    with pytest.raises(ValueError, match=r"^cannot grow sequence 'b' to 17 tokens: only "
                                         r"12 tokens are free"):
        kv.grow("b", 4 * BT + 1)
    np.testing.assert_array_equal(kv.table("b"), [2])  # a refused grow changes nothing
    kv.release("a")
    assert kv.num_free_blocks == 7


def test_grown_sequence_attends_as_one_reserved_at_full_length(prompt):
    """A sequence grown block by block (lookahead) reads as one reserved up front."""
    grown, full = PagedKVCache(CFG, 128, BT), PagedKVCache(CFG, 128, BT)
    for i, s in enumerate(SEQS):
        grown.reserve(s, int(LENS[i]))
        grown.reserve(("pad", i), 1)  # the next block is taken: grow jumps over it
        full.reserve(s, int(LENS[i]) + 3)
    q, k, v = prompt
    outs = [kv.prefill_host(1, SEQS, q, k, v, LENS) for kv in (grown, full)]
    for j, (q1, k1, v1) in enumerate(decode_steps()):
        for i, s in enumerate(SEQS):
            grown.grow(s, int(LENS[i]) + j + 1)
        outs += [kv.decode_host(1, SEQS, q1, k1, v1, LENS + j) for kv in (grown, full)]
    for a, b in zip(outs[::2], outs[1::2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_free_tokens_accounting():
    kv = PagedKVCache(CFG, 10 * BT + 1, BT)  # rounds up to whole blocks
    assert kv.capacity_tokens == kv.free_tokens == 11 * BT and kv.num_blocks == 11
    kv.reserve(1, 1)           # one block even for one token
    kv.reserve(2, BT)
    kv.reserve(3, BT + 1)      # two blocks
    assert kv.free_tokens == 7 * BT and sorted(kv.live_sequences) == [1, 2, 3]
    kv.release(3)
    kv.release(1)
    assert kv.free_tokens == 10 * BT and kv.live_sequences == [2]


def test_reserve_beyond_capacity_names_both_sizes():
    kv = PagedKVCache(CFG, 8 * BT, BT)
    kv.reserve("x", 5 * BT)
    with pytest.raises(ValueError, match=r"^cannot reserve 13 tokens .*only 12 of 32 "
                                         r"tokens are free[^\n]*$"):
        kv.reserve("y", 13)
    assert kv.free_tokens == 3 * BT and kv.live_sequences == ["x"]


@pytest.mark.parametrize("call,needle", [
    (lambda kv: kv.reserve(7, 1), "already holds"),
    (lambda kv: kv.release("nope"), "holds no blocks"),
    (lambda kv: kv.reserve(9, 0), "num_tokens=0"),
    (lambda kv: kv.decode_host(0, SEQS, *decode_steps(1)[0], LENS + 3),
     "positions \\+ 1 must be"),
    (lambda kv: kv.decode_host(0, SEQS[:4], *decode_steps(1)[0], LENS),
     "4 sequences do not match 5"),
    (lambda kv: kv.decode_host(9, SEQS, *decode_steps(1)[0], LENS), "layer 9"),
])
def test_bad_calls(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(paged(extra=0))


def test_pool_bytes_follow_capacity_not_batch_times_max_len():
    per_token = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4
    small, large = PagedKVCache(CFG, 16 * BT, BT), PagedKVCache(CFG, 64 * BT, BT)
    assert small.nbytes == 16 * BT * per_token and large.nbytes == 64 * BT * per_token
    assert small.k[0].shape == (16, CFG.num_kv_heads, BT, CFG.head_dim)
    for i in range(16):  # 16 one-token sequences fill it; nothing grows
        small.reserve(i, 1)
    assert small.free_tokens == 0 and small.nbytes == 16 * BT * per_token
    int8 = PagedKVCache(CFG, 16 * BT, BT, "int8")
    assert int8.nbytes == 16 * BT * 2 * CFG.num_layers * CFG.num_kv_heads \
        * (CFG.head_dim + 4)


@pytest.fixture
def converted(monkeypatch):
    """Shapes of every non-float32 array the kernels convert to float32."""
    shapes, real = [], cpu_attention._f32

    def spy(x):
        if x.dtype != np.float32:
            shapes.append(x.shape)
        return real(x)

    monkeypatch.setattr(cpu_attention, "_f32", spy)
    return shapes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_caches_convert_one_block_at_a_time(prompt, converted, dtype):
    ref32, contig = run(paged(), SEQS, prompt), run(contiguous(dtype), slice(0, B), prompt)
    converted.clear()
    got = run(paged(dtype), SEQS, prompt)
    one_block = CFG.num_kv_heads * BT * CFG.head_dim
    assert converted and max(int(np.prod(s)) for s in converted) <= one_block
    for p, c, p32 in zip(got, contig, ref32):
        np.testing.assert_allclose(p, c, rtol=1e-5, atol=1e-5)
        assert np.abs(p - p32).max() / np.abs(p32).max() < 2e-2


def test_contiguous_bf16_converts_at_most_convert_tokens(converted, monkeypatch):
    monkeypatch.setattr(cpu_attention, "CONVERT_TOKENS", 4)
    rng = np.random.default_rng(2)
    k, v = (rand(rng, 3, 2, 20, 16).astype(ml_dtypes.bfloat16) for _ in range(2))
    q = rand(rng, 3, 4, 16)
    lens = np.array([20, 7, 13])
    o = cpu_attention.decode_rows(q, k, v, lens)
    o32 = cpu_attention.decode_rows(q, k.astype(np.float32), v.astype(np.float32), lens)
    np.testing.assert_allclose(o, o32, rtol=1e-5, atol=1e-6)
    cpu_attention.prefill_row(rand(rng, 9, 4, 16), k[0], v[0], 9)
    assert max(int(np.prod(s)) for s in converted) <= 2 * 4 * 16


def test_single_thread_equals_pool(prompt):
    a, b = paged(attention=CPUAttention(1)), paged(attention=CPUAttention(2))
    for x, y in zip(run(a, SEQS, prompt), run(b, SEQS, prompt)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
