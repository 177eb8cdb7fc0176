"""Grouped-query attention on the host, in NumPy, over the host KV cache layout.

Layout (see kv_cache.py): a pool of blocks k, v [N, Hkv, bt, d] and a table of pool ids
per row (the contiguous cache is the pool of one-row blocks, bt = S); int8 caches add
per-(block, head, token) float32 scales [N, Hkv, bt]. For one row and kv head, with q
[g, d] (g = Hq / Hkv query heads of the group), per run of consecutive blocks:
    sᵀ = K · qᵀ / √d                 GEMMs [bt, d]·[d, g] reading contiguous keys
    p = softmax(s) over the row's L keys   (float32; 1/ (d/g) of K)
    o = Σ_blocks p · V               GEMMs [g, bt]·[bt, d] reading contiguous values
Measured (OpenBLAS, one thread): K·qᵀ with qᵀ contiguous streams keys at ~19 GB/s,
q·Kᵀ over the same bytes at ~10 GB/s, p·V at ~38 GB/s; hence this orientation,
so the kernel reads each cached byte once: decode is memory-bound at
2·(2·Hkv·d·L·bytes) per row (plus the small q, o), which is the figure compared against the
host's read bandwidth. int8: s = (q·K8ᵀ) ⊙ k_scale and o = (p ⊙ v_scale)·V8. A cache in
any dtype but float32 is converted one block (≤ CONVERT_TOKENS tokens) at a time.

Why NumPy: measured here, XLA:CPU runs these batched skinny GEMMs (g = 4 rows) at
1-6 GB/s, OpenBLAS with one thread per worker at 2-3x that. Rows are split across a host
thread pool (`host_threads()` workers, single-threaded BLAS each), so all host cores work;
calls for different rows may run concurrently from any threads (no shared mutable state).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future

import numpy as np

from moejax.host_offload.memory import host_pool, host_threads

_F32 = np.float32


def _f32(x: np.ndarray) -> np.ndarray:
    """x as float32: the one conversion of cached data (callers pass at most one block)."""
    return x if x.dtype == _F32 else x.astype(_F32)


# Tokens converted at a time from a non-float32 cache (bf16, f16, int8): one block of the
# paged cache, or a 256-token slice of a contiguous row; keeps the float32 copy in L2.
CONVERT_TOKENS = 256


def _softmax_(s: np.ndarray, axis=-1) -> np.ndarray:
    """In-place softmax over `axis` (float32)."""
    s -= s.max(axis=axis, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=axis, keepdims=True)
    return s


def _pieces(tables, lengths, bt: int, merge: bool) -> tuple[int, list]:
    """Cut the (row, block) pairs a decode reads into pieces, each one GEMM per side.

    Pairs go row-major; pair (r, j) reads pool block tables[r, j], tokens [0, m). A piece
    is a run of pairs on consecutive pool blocks with one token range: full blocks of
    one row, or the single (partial) blocks of consecutive one-block rows, which share the
    run's longest range (as the contiguous kernel reads to the chunk's longest row). A
    row's partial last block counts as full when the extra tokens are ≤ 1/8 of the row
    (one GEMM instead of two; masked). merge=False: one pair a piece, its tokens in
    CONVERT_TOKENS slices (a non-float32 cache converts one piece at a time).
    -> (blocks of the longest row, [(pool start, n, index (row, j), t0, t1, one_row)])
    with index a basic index into [b, blocks, ...] (an int and a slice when merged).
    """
    nb = -(-lengths // bt)                                  # [b] blocks each row reads
    row = np.repeat(np.arange(len(lengths)), nb)            # [P]
    j = np.arange(len(row)) - np.repeat(np.cumsum(nb) - nb, nb)
    pid = np.asarray(tables)[row, j]
    m = np.where(j < nb[row] - 1, bt, lengths[row] - j * bt)
    if not merge:
        return int(nb.max()), [
            (a, 1, (r, jj), t0, min(t0 + CONVERT_TOKENS, mm), True)
            for a, r, jj, mm in zip(pid.tolist(), row.tolist(), j.tolist(), m.tolist())
            for t0 in range(0, mm, CONVERT_TOKENS)]
    m[(nb[row] > 1) & (8 * (bt - m) <= lengths[row])] = bt
    kind = np.where(nb[row] == 1, 1, np.where(m == bt, 0, 2))  # full | single | last
    cut = (pid[1:] != pid[:-1] + 1) | (kind[1:] != kind[:-1]) | (kind[1:] == 2) \
        | ((kind[1:] == 0) & (row[1:] != row[:-1]))
    st = np.concatenate([[0], np.flatnonzero(cut) + 1])
    en = np.append(st[1:], len(row)) - 1
    pieces = []
    for a, n, r0, r1, j0, j1, t1 in zip(*(x.tolist() for x in (
            pid[st], en - st + 1, row[st], row[en], j[st], j[en],
            np.maximum.reduceat(m, st)))):
        one = r0 == r1
        at = (r0, slice(j0, j1 + 1)) if one else (slice(r0, r1 + 1), j0)
        pieces.append((a, n, at, 0, t1, one))
    return int(nb.max()), pieces


def decode_blocks(q, k, v, tables, lengths, k_scale=None, v_scale=None) -> np.ndarray:
    """One new query per row over its first lengths[r] tokens, read from pool blocks.

    q [b, Hq, d]; k, v [N, Hkv, bt, d] (the block pool); tables [b, ≥ ceil(len/bt)] pool
    ids of each row's positions j·bt … (j+1)·bt − 1; lengths [b] ≥ 1; int8 scales
    [N, Hkv, bt] -> o [b, Hq, d] float32. A float32 pool is read in place, one GEMM per
    run of consecutive blocks (no gather copy: the kernel is memory-bound); any other
    dtype is converted to float32 one piece (≤ one block, ≤ CONVERT_TOKENS) at a time.
    """
    b, hq, d = q.shape
    hkv, bt, g = k.shape[1], k.shape[2], hq // k.shape[1]
    lengths = np.asarray(lengths, np.int64)
    merge = k.dtype == _F32 and k_scale is None
    nbm, pieces = _pieces(tables, lengths, bt, merge)
    bw = bt if nbm > 1 else int(lengths.max())  # score columns per block
    qt = np.ascontiguousarray((_f32(q) * _F32(1.0 / math.sqrt(d))).reshape(
        b, hkv, g, d).swapaxes(-1, -2))  # [b, Hkv, d, g]
    s5 = _scratch("s5", (b, nbm, hkv, bw, g))  # scores [b, blocks, Hkv, bw, g]
    for a, n, at, t0, t1, _ in pieces:
        kb = _f32(k[a:a + n, :, t0:t1])  # [n, Hkv, t, d]
        if merge:
            np.matmul(kb, qt[at[0]], out=s5[at][:, :, t0:t1])
        else:  # one pair
            si = np.matmul(kb[0], qt[at[0]])  # [Hkv, t, g]
            s5[at][:, t0:t1] = si if k_scale is None else si * k_scale[a, :, t0:t1, None]
    s = _scratch("s", (b, hkv, g, nbm, bw))
    np.copyto(s, s5.transpose(0, 2, 4, 1, 3))
    s = s.reshape(b, hkv, g, nbm * bw)
    np.copyto(s, -np.inf, where=np.arange(nbm * bw) >= lengths[:, None, None, None])
    p = _softmax_(s).reshape(b, hkv, g, nbm, bw)
    o5 = _scratch("o5", (b, nbm, hkv, g, d))  # per-block partial outputs
    o5.fill(0)
    for a, n, at, t0, t1, one in pieces:
        vb = _f32(v[a:a + n, :, t0:t1])  # [n, Hkv, t, d]
        pi = p[at[0], :, :, at[1], t0:t1]
        if merge:  # [Hkv, g, n, t] (one row) or [n, Hkv, g, t] (rows) -> [n, Hkv, g, t]
            np.matmul(pi.transpose(2, 0, 1, 3) if one else pi, vb, out=o5[at])
        else:
            o5[at] += np.matmul(pi if v_scale is None else pi * v_scale[a, :, None, t0:t1],
                                vb[0])
    return o5.sum(axis=1).reshape(b, hq, d)


_local = threading.local()


def _scratch(name: str, shape: tuple) -> np.ndarray:
    """A float32 array of `shape` from this thread's reused buffer `name` (uninitialised).
    Why: fresh multi-MiB temporaries are mmap'ed and page-faulted on every call."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    if bufs.get(name, np.empty(0, _F32)).size < n:
        bufs[name] = np.empty(n, _F32)
    return bufs[name][:n].reshape(shape)


def decode_rows(q, k, v, lengths, k_scale=None, v_scale=None) -> np.ndarray:
    """One new query per row over its first lengths[b] cached tokens.

    q [b, Hq, d]; k, v [b, Hkv, S, d]; lengths [b] ≥ 1 -> o [b, Hq, d] float32. The
    contiguous layout is a pool of b one-row blocks: `decode_blocks` with table [[r]].
    """
    return decode_blocks(q, k, v, np.arange(len(q))[:, None], lengths, k_scale, v_scale)


def gather_f32(k, blocks, length: int) -> np.ndarray:
    """The first `length` tokens of pool blocks `blocks` (k [N, Hkv, bt, d]) as one float32
    [Hkv, length, d], converted ≤ one block and ≤ CONVERT_TOKENS at a time (a view when
    float32 and within one block)."""
    hkv, bt, d = k.shape[1:]
    if k.dtype == _F32 and length <= bt:
        return k[int(blocks[0]), :, :length]  # a view: nothing to gather or convert
    out = np.empty((hkv, length, d), _F32)
    t0 = 0
    while t0 < length:
        blk, o0 = int(blocks[t0 // bt]), t0 % bt
        t1 = min(length, t0 + CONVERT_TOKENS, t0 - o0 + bt)
        out[:, t0:t1] = _f32(k[blk, :, o0:o0 + t1 - t0])
        t0 = t1
    return out


def prefill_row(q, k, v, length: int, k_scale=None, v_scale=None,
                block: int = 256) -> np.ndarray:
    """Causal attention of one right-padded prompt over its own first `length` keys.

    q [T, Hq, d]; k, v [Hkv, S, d] -> o [T, Hq, d] float32. Query t sees keys
    j ≤ min(t, length − 1): real queries are causal, padding queries (t ≥ length) see
    every real key, exactly as the device reference `causal_mask` does. Queries go in
    blocks of `block` so the scores stay [Hq, block, length].
    """
    t_all, hq, d = q.shape
    hkv, g, L = k.shape[0], hq // k.shape[0], int(length)
    kt = _row_f32(k, L).swapaxes(-1, -2)  # [Hkv, d, L] view: big-M GEMMs take either
    vv = _row_f32(v, L)
    out = np.empty((t_all, hq, d), _F32)
    for t0 in range(0, t_all, block):
        t1 = min(t_all, t0 + block)
        qb = _f32(q[t0:t1]).reshape(t1 - t0, hkv, g, d).transpose(1, 2, 0, 3)
        s = np.matmul(qb * _F32(1.0 / math.sqrt(d)), kt[:, None])  # [Hkv, g, tb, L]
        if k_scale is not None:
            s *= k_scale[:, None, None, :L]
        last = np.minimum(np.arange(t0, t1), L - 1)
        s[..., np.arange(L)[None, :] > last[:, None]] = -np.inf
        p = _softmax_(s)
        if v_scale is not None:
            p *= v_scale[:, None, None, :L]
        o = np.matmul(p, vv[:, None])  # [Hkv, g, tb, d]
        out[t0:t1] = o.transpose(2, 0, 1, 3).reshape(t1 - t0, hq, d)
    return out


def _row_f32(k, length: int) -> np.ndarray:
    """k[:, :length] of one row [Hkv, S, d] as float32 (a view when it already is)."""
    return gather_f32(k[None], [0], length)


class CPUAttention:
    """Runs the row kernels on `num_threads` host threads (default: all host cores)."""

    def __init__(self, num_threads: int | None = None):
        n = host_threads() if num_threads is None else num_threads
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_threads={num_threads!r} must be a positive integer")
        self.num_threads = n

    def chunks(self, rows: int, bytes_per_row: int = 0,
               max_chunk_bytes: int = 64 * 2**20) -> list[slice]:
        """Row ranges: one per thread (measured: finer splits only add dispatch cost), or
        a multiple of that so no chunk reads more than `max_chunk_bytes` of KV (keeps the
        [rows, Hkv, g, L] scores temporaries small)."""
        n = self.num_threads
        k = max(1, -(-rows * bytes_per_row // max_chunk_bytes))
        k = max(1, min(rows, -(-k // n) * n))
        bounds = np.linspace(0, rows, k + 1).astype(int)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def map(self, fn, items) -> list:
        """[fn(x) for x in items], on the pool when more than one thread is configured."""
        items = list(items)
        if self.num_threads == 1 or len(items) == 1:
            return [fn(x) for x in items]
        futures: list[Future] = [host_pool(self.num_threads).submit(fn, x) for x in items]
        return [f.result() for f in futures]
