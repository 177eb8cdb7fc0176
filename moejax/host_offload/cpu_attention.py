"""Grouped-query attention on the host, in NumPy, over the host KV layout (kv_cache.py).
Pool k, v [N, Hkv, bt, d] + pool ids per row (contiguous cache: one-row blocks, bt = S);
int8 adds float32 scales [N, Hkv, bt]. Per row, kv head, q [g, d] (g = Hq/Hkv), block run:
  sᵀ = K·qᵀ/√d ([bt, d]·[d, g]); p = softmax(s) over L keys (float32; 1/(d/g) of K);
  o = Σ_blocks p·V ([g, bt]·[bt, d]); int8: s = (q·K8ᵀ) ⊙ k_scale, o = (p ⊙ v_scale)·V8.
Decode is memory-bound at 2·(2·Hkv·d·L·bytes) per row (vs the host's read bandwidth); why
K·qᵀ in single-threaded OpenBLAS per `host_threads()` worker: each byte read once, fastest.
Non-float32 converts ≤ CONVERT_TOKENS at a time; calls for distinct rows are thread-safe."""

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
    """-> (blocks of longest row, [(pool start, n, index, t0, t1, one_row)]): runs of
    pairs (r, j) on consecutive blocks, one GEMM each (a partial last block read whole
    if ≤ 1/8 of the row more); merge=False: one pair a piece, CONVERT_TOKENS slices."""
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
    """q [b, Hq, d]; pool k, v [N, Hkv, bt, d]; tables [b, ≥ ceil(len/bt)]; lengths [b] ≥ 1;
    scales [N, Hkv, bt] -> o [b, Hq, d] f32. float32 is read in place (memory-bound)."""
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
    """Reused per-thread float32 buffer `name` of `shape`: fresh temporaries page-fault."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    if bufs.get(name, np.empty(0, _F32)).size < n:
        bufs[name] = np.empty(n, _F32)
    return bufs[name][:n].reshape(shape)


def decode_rows(q, k, v, lengths, k_scale=None, v_scale=None) -> np.ndarray:
    """q [b, Hq, d], k, v [b, Hkv, S, d], lengths [b] -> o [b, Hq, d]; table [[r]]."""
    return decode_blocks(q, k, v, np.arange(len(q))[:, None], lengths, k_scale, v_scale)


def gather_f32(k, blocks, length: int) -> np.ndarray:
    """First `length` tokens of pool `blocks` -> float32 [Hkv, length, d] (view if can)."""
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
    """q [T, Hq, d]; k, v [Hkv, S, d] -> o [T, Hq, d]; query t sees keys j ≤ min(t, L − 1)
    (L = length, as `causal_mask`); float32, query blocks of `block`: scores [Hq, block, L]."""
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
        """A row range per thread (× k so none reads > `max_chunk_bytes` of KV)."""
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
