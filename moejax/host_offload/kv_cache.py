"""The KV cache of every layer in host memory, with CPU attention next to it.

`PagedKVCache` (docs/design.md §7): per layer a block pool k, v [num_blocks, Hkv,
block_tokens, d] and a block table per live sequence; capacity in tokens (MoE-Lens's M).
`reserve(seq, n)` takes the lowest free blocks, `release(seq)` frees them, so sequences
join and leave without a batch × max_len slab, and `decode_blocks` reads runs of
consecutive blocks in place, one GEMM per run. Default 128 tokens a block: half a block
per sequence of reservation rounding. `HostKVCache(cfg, batch_size, max_len)`: one block
of max_len per row (the [B, Hkv, S, d] slab), so both caches share one kernel.
int8: per-(block row, head, token) scale = max|x| / 127 over d (float32 [num_blocks, Hkv,
block_tokens], 4/d extra bytes per element); non-float32 converts ≤ CONVERT_TOKENS at a time.
Steps, for separate timeline streams: to_host (D2H) -> prefill_host / decode_host (store
k, v, CPU attention; write_prefill: store only) -> to_device (H2D); `prefill` / `decode`
chain them. Disjoint sequences may run on concurrent threads (reserve/release lock);
`np.zeros` commits lazily, so unused blocks cost address space, not RAM."""

from __future__ import annotations

import threading

import jax
import numpy as np

from moejax.host_offload.cpu_attention import (
    CPUAttention,
    decode_blocks,
    gather_f32,
    prefill_row,
)
from moejax.host_offload.memory import (
    available_host_bytes,
    default_device,
    device_sharding,
)
from moejax.model_config.model import ModelConfig

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., d] -> (int8 [..., d], float32 scale [...]) with x ≈ q · scale."""
    x = x.astype(np.float32, copy=False)
    scale = np.abs(x).max(axis=-1) / np.float32(127.0)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


DEFAULT_BLOCK_TOKENS = 128


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")
    return int(v)


class PagedKVCache:
    """K and V of `cfg.num_layers` layers in a pool of blocks shared by live sequences.

    k[i], v[i] [num_blocks, Hkv, block_tokens, d] (int8: k_scale[i], v_scale[i] [num_blocks,
    Hkv, block_tokens]), num_blocks = ceil(capacity_tokens / block_tokens); position p of a
    sequence is block table[p // block_tokens], slot p % block_tokens. Why: capacity counted
    in tokens (docs/design.md §7) lets any-length sequences join and leave."""

    def __init__(self, cfg: ModelConfig, capacity_tokens: int,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, kv_dtype: str | None = None,
                 attention: CPUAttention | None = None, device: jax.Device | None = None):
        bt = _positive("block_tokens", block_tokens)
        n = -(-_positive("capacity_tokens", capacity_tokens) // bt)
        kv_dtype = cfg.dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} not in {KV_DTYPES}")
        self.cfg, self.block_tokens, self.num_blocks = cfg, bt, n
        self.kv_dtype, self.int8 = kv_dtype, kv_dtype == "int8"
        self.attention = attention or CPUAttention()
        self.device = device or default_device()
        self._dev = device_sharding(self.device)
        self._out_dtype = jax.numpy.dtype(cfg.dtype)
        dt = np.dtype(jax.numpy.dtype(kv_dtype))
        H, d, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        need = 2 * L * n * H * bt * (d * dt.itemsize + 4 * self.int8)
        free = available_host_bytes()
        if free is not None and need > free:  # np.zeros would commit it lazily: OOM later
            raise ValueError(f"the paged host KV cache of {n * bt} tokens needs "
                             f"{need / 2**30:.2f} GiB; only {free / 2**30:.2f} GiB of host "
                             "memory is available")
        self.k = [np.zeros((n, H, bt, d), dt) for _ in range(L)]
        self.v = [np.zeros((n, H, bt, d), dt) for _ in range(L)]
        self.k_scale = [np.ones((n, H, bt), np.float32) for _ in range(L)] \
            if self.int8 else None
        self.v_scale = [np.ones((n, H, bt), np.float32) for _ in range(L)] \
            if self.int8 else None
        self._free = np.ones(n, bool)  # [num_blocks]
        self._tables: dict = {}        # seq -> int64 [blocks] pool ids
        self._reserved: dict = {}      # seq -> tokens reserved
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ blocks
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    @property
    def num_free_blocks(self) -> int:
        return int(self._free.sum())

    @property
    def free_tokens(self) -> int:
        return self.num_free_blocks * self.block_tokens

    @property
    def live_sequences(self) -> list:
        return list(self._tables)

    @property
    def nbytes(self) -> int:
        arrays = self.k + self.v + (self.k_scale + self.v_scale if self.int8 else [])
        return sum(a.nbytes for a in arrays)

    def table(self, seq) -> np.ndarray:
        """Pool ids of `seq`'s blocks, in position order."""
        if seq not in self._tables:
            raise ValueError(f"sequence {seq!r} holds no blocks (reserve it first)")
        return self._tables[seq]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ⌈num_tokens / block_tokens⌉."""
        return -(-int(num_tokens) // self.block_tokens)

    def reserve(self, seq, num_tokens: int) -> None:
        """Lowest free blocks covering `num_tokens` (consecutive: one GEMM per run)."""
        num_tokens = _positive("num_tokens", num_tokens)
        need = self.blocks_for(num_tokens)
        with self._lock:
            if seq in self._tables:
                raise ValueError(f"sequence {seq!r} already holds "
                                 f"{self._reserved[seq]} tokens; release it first")
            free = np.flatnonzero(self._free)
            if need > len(free):
                raise ValueError(
                    f"cannot reserve {num_tokens} tokens for sequence {seq!r}: only "
                    f"{len(free) * self.block_tokens} of {self.capacity_tokens} tokens "
                    f"are free (blocks of {self.block_tokens})")
            blocks = free[:need]
            self._free[blocks] = False
            self._tables[seq], self._reserved[seq] = blocks, num_tokens

    def grow(self, seq, num_tokens: int) -> None:
        """Extend `seq`'s reservation to `num_tokens` (no-op if it holds that many): the
        block after its last if free (one run for the kernel), else the lowest free ones.
        Why: lookahead admission takes a sequence's blocks as its KV grows."""
        num_tokens = _positive("num_tokens", num_tokens)
        with self._lock:
            blocks = self.table(seq)
            need = self.blocks_for(num_tokens) - len(blocks)
            if need > 0:
                free = np.flatnonzero(self._free)
                if need > len(free):
                    raise ValueError(
                        f"cannot grow sequence {seq!r} to {num_tokens} tokens: only "
                        f"{len(free) * self.block_tokens} tokens are free")
                nxt = blocks[-1] + 1
                at = np.searchsorted(free, nxt)
                run = free[at:at + need]
                new = run if len(run) == need and run[-1] - nxt == need - 1 else free[:need]
                self._free[new] = False
                self._tables[seq] = np.concatenate([blocks, new])
            self._reserved[seq] = max(self._reserved[seq], num_tokens)

    def release(self, seq) -> None:
        """Free `seq`'s blocks at once (their contents are left; a new owner overwrites)."""
        with self._lock:
            blocks = self.table(seq)
            self._free[blocks] = True
            del self._tables[seq], self._reserved[seq]

    # ------------------------------------------------------------------ checks
    def _layer(self, layer: int) -> None:
        if not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.cfg.num_layers})")

    def _seq_tables(self, seqs, n: int) -> list[np.ndarray]:
        seqs = list(seqs)
        if len(seqs) != n:
            raise ValueError(f"{len(seqs)} sequences do not match {n} input rows")
        return [self.table(s) for s in seqs]

    def _lengths(self, seqs, lengths, n: int, what: str) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        cap = np.array([self._reserved.get(s, 0) for s in seqs], np.int64)
        if lengths.shape != (n,) or lengths.min() < 1 or (lengths > cap).any():
            raise ValueError(f"{what} must be {n} values in [1, reserved tokens "
                             f"{cap.tolist()[:8]}], got {lengths.tolist()[:8]}")
        return lengths

    @staticmethod
    def _padded(tables: list[np.ndarray]) -> np.ndarray:
        """[b, max blocks] int64, short tables padded with their last id (never read)."""
        n = np.array([len(t) for t in tables])
        start = np.cumsum(n) - n
        j = np.minimum(np.arange(n.max())[None], n[:, None] - 1)  # [b, max blocks]
        return np.concatenate(tables)[start[:, None] + j]

    # ------------------------------------------------------------------ steps
    @staticmethod
    def to_host(*xs) -> tuple[np.ndarray, ...]:
        """D2H: device arrays -> NumPy (a copy on a GPU; may alias on the CPU backend)."""
        return tuple(np.asarray(x) for x in xs)

    def to_device(self, o: np.ndarray, sharding=None) -> jax.Array:
        """H2D: attention output, cast to the model dtype, onto the device (or split as
        `sharding` says over a tensor-parallel mesh)."""
        return jax.device_put(o.astype(self._out_dtype, copy=False),
                              self._dev if sharding is None else sharding)

    def _store(self, layer: int, blocks: np.ndarray, pos: np.ndarray, k, v) -> None:
        """k, v [n, Hkv, d] at positions pos [n] in pool blocks [n]."""
        off = pos % self.block_tokens
        if self.int8:
            k, ks = quantize_int8(k)
            v, vs = quantize_int8(v)
            self.k_scale[layer][blocks, :, off] = ks
            self.v_scale[layer][blocks, :, off] = vs
        self.k[layer][blocks, :, off] = k
        self.v[layer][blocks, :, off] = v

    def _write_row(self, layer: int, table: np.ndarray, k, v, n: int) -> None:
        pos = np.arange(n)
        self._store(layer, table[pos // self.block_tokens], pos, k[:n], v[:n])

    def _scales(self, layer: int):
        return (self.k_scale[layer], self.v_scale[layer]) if self.int8 else (None, None)

    def write_prefill(self, layer: int, seqs, k, v, lengths) -> None:
        """Store prompt k, v [b, T, Hkv, d] rows' first lengths[i] tokens (no attention)."""
        self._layer(layer)
        tables = self._seq_tables(seqs, k.shape[0])
        self._write_prefill(layer, tables, k, v,
                            self._lengths(seqs, lengths, k.shape[0], "lengths"))

    def _write_prefill(self, layer: int, tables, k, v, lengths: np.ndarray) -> None:
        for i, t in enumerate(tables):
            self._write_row(layer, t, k[i], v[i], int(lengths[i]))

    def prefill_host(self, layer: int, seqs, q, k, v, lengths) -> np.ndarray:
        """write_prefill, then causal `prefill_row` of q [b, T, Hq, d] -> o [b, T, Hq, d]
        float32."""
        b, t = q.shape[:2]
        self._layer(layer)
        tables = self._seq_tables(seqs, b)
        lengths = self._lengths(seqs, lengths, b, "lengths")
        if lengths.max() > t:
            raise ValueError(f"lengths {lengths.max()} exceed the {t} prompt positions")
        return self._prefill(layer, tables, q, k, v, lengths)

    def _prefill(self, layer: int, tables, q, k, v, lengths: np.ndarray) -> np.ndarray:
        b = q.shape[0]
        out = np.empty(q.shape, np.float32)
        kp, vp = self.k[layer], self.v[layer]
        ksp, vsp = self._scales(layer)

        def one(i: int) -> None:
            tb, L = tables[i], int(lengths[i])
            self._write_row(layer, tb, k[i], v[i], L)
            ks, vs = (None if x is None else _row_scales(x, tb, L) for x in (ksp, vsp))
            out[i] = prefill_row(q[i], gather_f32(kp, tb, L), gather_f32(vp, tb, L), L,
                                 ks, vs)

        self.attention.map(one, range(b))
        return out

    def decode_host(self, layer: int, seqs, q, k_new, v_new, positions) -> np.ndarray:
        """Store k, v [b, 1, Hkv, d] at positions[i] of seqs[i]; attend q [b, 1, Hq, d] to
        positions ≤ positions[i] -> o [b, 1, Hq, d] float32."""
        b = q.shape[0]
        self._layer(layer)
        seqs = list(seqs)
        tables = self._padded(self._seq_tables(seqs, b))  # [b, blocks]
        lengths = self._lengths(seqs, np.asarray(positions) + 1, b, "positions + 1")
        return self._decode(layer, tables, q, k_new, v_new, lengths)

    def _decode(self, layer: int, tables: np.ndarray, q, k_new, v_new,
                lengths: np.ndarray) -> np.ndarray:
        """decode_host over checked tables [b, blocks] and lengths [b] = positions + 1."""
        b = q.shape[0]
        out = np.empty(q.shape, np.float32)
        kp, vp = self.k[layer], self.v[layer]

        def chunk(c: slice) -> None:
            pos, tb = lengths[c] - 1, tables[c]
            blocks = tb[np.arange(len(pos)), pos // self.block_tokens]
            self._store(layer, blocks, pos, k_new[c, 0], v_new[c, 0])
            out[c, 0] = decode_blocks(q[c, 0], kp, vp, tb, lengths[c], *self._scales(layer))

        row_bytes = 2 * int(lengths.max()) * self.cfg.num_kv_heads * self.cfg.head_dim \
            * kp.itemsize
        self.attention.map(chunk, self.attention.chunks(b, row_bytes))
        return out

    # ------------------------------------------------------------------ wrappers
    def prefill(self, layer: int, seqs, q, k, v, lengths) -> jax.Array:
        """D2H of q, k, v; prefill_host; H2D of o."""
        q, k, v = self.to_host(q, k, v)
        return self.to_device(self.prefill_host(layer, seqs, q, k, v, lengths))

    def decode(self, layer: int, seqs, q, k_new, v_new, positions) -> jax.Array:
        """D2H of q, k_new, v_new; decode_host; H2D of o."""
        q, k_new, v_new = self.to_host(q, k_new, v_new)
        return self.to_device(self.decode_host(layer, seqs, q, k_new, v_new, positions))


def _row_scales(scale: np.ndarray, blocks: np.ndarray, length: int) -> np.ndarray:
    """scale pool [N, Hkv, bt] -> the sequence's first `length` scales [Hkv, length]."""
    n = -(-length // scale.shape[2])
    s = scale[blocks[:n]]  # [n, Hkv, bt]
    return s.transpose(1, 0, 2).reshape(s.shape[1], -1)[:, :length]


class HostKVCache:
    """K, V of `cfg.num_layers` layers, k[i], v[i] [B, Hkv, S, d] (int8 scales [B, Hkv, S]): a
    `PagedKVCache` with one block of max_len tokens per row, row r = sequence r = block r."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 kv_dtype: str | None = None, attention: CPUAttention | None = None,
                 device: jax.Device | None = None):
        B, S = _positive("batch_size", batch_size), _positive("max_len", max_len)
        kv_dtype = cfg.dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} not in {KV_DTYPES}")
        dt = np.dtype(jax.numpy.dtype(kv_dtype))
        H, d = cfg.num_kv_heads, cfg.head_dim
        need = 2 * cfg.num_layers * B * H * S * (d * dt.itemsize + 4 * (kv_dtype == "int8"))
        free = available_host_bytes()
        if free is not None and need > free:
            raise ValueError(f"the host KV cache of {B} sequences × {S} positions needs "
                             f"{need / 2**30:.2f} GiB; only {free / 2**30:.2f} GiB of host "
                             "memory is available")
        self.paged = PagedKVCache(cfg, B * S, S, kv_dtype, attention, device)
        for r in range(B):
            self.paged.reserve(r, S)
        self.cfg, self.batch_size, self.max_len = cfg, B, S
        self.kv_dtype, self.int8 = kv_dtype, self.paged.int8
        self.attention, self.device = self.paged.attention, self.paged.device
        self.k, self.v = self.paged.k, self.paged.v
        self.k_scale, self.v_scale = self.paged.k_scale, self.paged.v_scale
        self.to_device = self.paged.to_device

    @property
    def nbytes(self) -> int:
        return self.paged.nbytes

    # ------------------------------------------------------------------ checks
    def _rows(self, layer: int, rows: slice, n: int) -> np.ndarray:
        """The rows' block tables [n, 1] ([r] each) after checking the layer and slice."""
        self.paged._layer(layer)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a contiguous slice, got {rows!r}")
        r = range(*rows.indices(self.batch_size))
        if len(r) != n or (rows.stop is not None and rows.stop > self.batch_size):
            raise ValueError(f"rows {rows} of a {self.batch_size}-row cache do not match "
                             f"{n} input rows")
        return np.arange(r.start, r.stop)[:, None]

    def _lengths(self, lengths, n: int, what: str) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if lengths.shape != (n,) or lengths.min() < 1 or lengths.max() > self.max_len:
            raise ValueError(f"{what} must be {n} values in [1, {self.max_len}], got "
                             f"{lengths.tolist()[:8]}")
        return lengths

    # ------------------------------------------------------------------ steps
    to_host = staticmethod(PagedKVCache.to_host)

    def write_prefill(self, layer: int, rows: slice, k, v, lengths) -> None:
        """Store prompt k, v [b, T, Hkv, d] (first lengths[r] tokens) without attending."""
        t = self._rows(layer, rows, k.shape[0])
        self.paged._write_prefill(layer, t, k, v, self._lengths(lengths, len(t), "lengths"))

    def prefill_host(self, layer: int, rows: slice, q, k, v, lengths) -> np.ndarray:
        """Store prompt k, v [b, T, Hkv, d] and attend q [b, T, Hq, d] causally -> o [b, T, Hq, d]
        float32."""
        t = self._rows(layer, rows, q.shape[0])
        lengths = self._lengths(lengths, len(t), "lengths")
        if lengths.max() > q.shape[1]:
            raise ValueError(f"lengths {lengths.max()} exceed the {q.shape[1]} prompt "
                             "positions")
        return self.paged._prefill(layer, t, q, k, v, lengths)

    def decode_host(self, layer: int, rows: slice, q, k_new, v_new, positions) -> np.ndarray:
        """Store k, v [b, 1, Hkv, d] at slot positions[r]; attend q [b, 1, Hq, d] to slots ≤
        positions[r] -> o [b, 1, Hq, d] float32."""
        t = self._rows(layer, rows, q.shape[0])
        lengths = self._lengths(np.asarray(positions) + 1, len(t), "positions + 1")
        return self.paged._decode(layer, t, q, k_new, v_new, lengths)

    # ------------------------------------------------------------------ wrappers
    prefill = PagedKVCache.prefill
    decode = PagedKVCache.decode
