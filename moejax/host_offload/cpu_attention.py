"""Grouped-query attention on the host, in NumPy, over the host KV cache layout.

Layout (see kv_cache.py): k, v [rows, Hkv, S, d]; int8 caches add per-(row, head, token)
float32 scales k_scale, v_scale [rows, Hkv, S]. For one row and kv head, with q [g, d]
(g = Hq / Hkv query heads of the group):
    sᵀ = K[:L] · qᵀ / √d             one GEMM [L, d]·[d, g] reading L·d contiguous keys
    p = softmax(s) over the L keys   (float32; sᵀ is transposed to [g, L], 1/ (d/g) of K)
    o = p · V[:L]                    one GEMM [g, L]·[L, d] reading L·d contiguous values
Measured here (OpenBLAS, one thread): K·qᵀ with qᵀ contiguous streams keys at ~19 GB/s,
q·Kᵀ over the same bytes at ~10 GB/s, p·V at ~38 GB/s; hence this orientation.
so the kernel reads each cached byte once: decode is memory-bound at
2·(2·Hkv·d·L·bytes) per row (plus the small q, o), which is the figure compared against the
host's read bandwidth. int8: s = (q·K8ᵀ) ⊙ k_scale and o = (p ⊙ v_scale)·V8.

Why NumPy: measured here, XLA:CPU runs these batched skinny GEMMs (g = 4 rows) at
1-6 GB/s, OpenBLAS with one thread per worker at 2-3x that. Rows are split across a host
thread pool (`host_threads()` workers, single-threaded BLAS each), so all host cores work;
calls for different rows may run concurrently from any threads (no shared mutable state).
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import numpy as np

from moejax.host_offload.memory import host_pool, host_threads

_F32 = np.float32


def _f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == _F32 else x.astype(_F32)


def _softmax_(s: np.ndarray) -> np.ndarray:
    """In-place softmax over the last axis (float32)."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def decode_rows(q, k, v, lengths, k_scale=None, v_scale=None) -> np.ndarray:
    """One new query per row over its first lengths[b] cached tokens.

    q [b, Hq, d]; k, v [b, Hkv, S, d]; lengths [b] ≥ 1 -> o [b, Hq, d] float32.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    n = int(lengths.max())
    qt = np.ascontiguousarray((_f32(q) * _F32(1.0 / math.sqrt(d))).reshape(
        b, hkv, hq // hkv, d).swapaxes(-1, -2))  # [b, Hkv, d, g]
    s = np.ascontiguousarray(np.matmul(_f32(k[:, :, :n]), qt).swapaxes(-1, -2))  # [.., g, n]
    if k_scale is not None:
        s *= k_scale[:, :, None, :n]
    for r in np.flatnonzero(lengths < n):
        s[r, :, :, lengths[r]:] = -np.inf
    p = _softmax_(s)
    if v_scale is not None:
        p *= v_scale[:, :, None, :n]
    return np.matmul(p, _f32(v[:, :, :n])).reshape(b, hq, d)


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
    kt = _f32(k[:, :L]).swapaxes(-1, -2)  # [Hkv, d, L] view: big-M GEMMs take either
    vv = _f32(v[:, :L])
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
