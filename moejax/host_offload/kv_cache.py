"""The KV cache of every layer in host memory, with CPU attention next to it.

Layout decision: **preallocated per batch, contiguous per row** (not paged blocks).
moejax runs static offline batches: the rows and their maximum length (prompt + new
tokens) are known before the first step, so one slab per layer and tensor, k and v
[B, Hkv, S, d], wastes only the ragged tail of short rows, and buys what a memory-bound
kernel needs: each (row, head) is one contiguous [S, d] stream read by one GEMM, there is
no block table to gather through, and a micro-batch is a plain row slice. Paged blocks
would pay off with continuous batching (rows joining and leaving), which is not this
workload. `np.zeros` memory is committed lazily, so unused tails of the slab cost
address space, not RAM.

int8 (`kv_dtype="int8"`): symmetric per-(row, head, token) quantisation, scale =
max|x| / 127 over the head's d elements (float32 scales [B, Hkv, S], 4/d extra bytes per
element). Accuracy vs the float cache is measured in tests/host_offload/test_kv_cache.py.

Steps (so an executor can put them on different timeline streams):
  to_host(q, k, v)            D2H: device arrays -> NumPy
  prefill_host / decode_host  write the new k, v into rows, CPU attention -> NumPy o
  to_device(o)                H2D
`prefill` / `decode` chain the three. Calls for disjoint row slices of a layer may run
concurrently from different threads: the only shared state is the cache slabs, and each
call writes only its own rows.
"""

from __future__ import annotations

import jax
import numpy as np

from moejax.host_offload.cpu_attention import CPUAttention, decode_rows, prefill_row
from moejax.host_offload.memory import available_host_bytes, default_device, device_sharding
from moejax.model_config.model import ModelConfig

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., d] -> (int8 [..., d], float32 scale [...]) with x ≈ q · scale."""
    x = x.astype(np.float32, copy=False)
    scale = np.abs(x).max(axis=-1) / np.float32(127.0)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


class HostKVCache:
    """K and V of `cfg.num_layers` layers for `batch_size` rows of up to `max_len` tokens.

    k[i], v[i] [B, Hkv, S, d] (NumPy; int8 adds k_scale[i], v_scale[i] [B, Hkv, S]).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 kv_dtype: str | None = None, attention: CPUAttention | None = None,
                 device: jax.Device | None = None):
        for k, v in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{k}={v!r} must be a positive integer")
        kv_dtype = cfg.dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} not in {KV_DTYPES}")
        self.cfg, self.batch_size, self.max_len = cfg, int(batch_size), int(max_len)
        self.kv_dtype, self.int8 = kv_dtype, kv_dtype == "int8"
        self.attention = attention or CPUAttention()
        self.device = device or default_device()
        self._dev = device_sharding(self.device)
        self._out_dtype = jax.numpy.dtype(cfg.dtype)
        dt = np.dtype(jax.numpy.dtype(kv_dtype))
        B, H, d, S = self.batch_size, cfg.num_kv_heads, cfg.head_dim, self.max_len
        need = 2 * cfg.num_layers * B * H * S * (d * dt.itemsize + 4 * self.int8)
        free = available_host_bytes()
        if free is not None and need > free:  # np.zeros would commit it lazily: OOM later
            raise ValueError(f"the host KV cache of {B} sequences × {S} positions needs "
                             f"{need / 2**30:.2f} GiB; only {free / 2**30:.2f} GiB of host "
                             "memory is available")
        self.k = [np.zeros((B, H, S, d), dt) for _ in range(cfg.num_layers)]
        self.v = [np.zeros((B, H, S, d), dt) for _ in range(cfg.num_layers)]
        self.k_scale = [np.ones((B, H, S), np.float32) for _ in range(cfg.num_layers)] \
            if self.int8 else None
        self.v_scale = [np.ones((B, H, S), np.float32) for _ in range(cfg.num_layers)] \
            if self.int8 else None

    @property
    def nbytes(self) -> int:
        arrays = self.k + self.v + (self.k_scale + self.v_scale if self.int8 else [])
        return sum(a.nbytes for a in arrays)

    # ------------------------------------------------------------------ checks
    def _rows(self, layer: int, rows: slice, n: int) -> range:
        if not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.cfg.num_layers})")
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a contiguous slice, got {rows!r}")
        r = range(*rows.indices(self.batch_size))
        if len(r) != n or (rows.stop is not None and rows.stop > self.batch_size):
            raise ValueError(f"rows {rows} of a {self.batch_size}-row cache do not match "
                             f"{n} input rows")
        return r

    def _lengths(self, lengths, n: int, what: str) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if lengths.shape != (n,) or lengths.min() < 1 or lengths.max() > self.max_len:
            raise ValueError(f"{what} must be {n} values in [1, {self.max_len}], got "
                             f"{lengths.tolist()[:8]}")
        return lengths

    # ------------------------------------------------------------------ steps
    @staticmethod
    def to_host(*xs) -> tuple[np.ndarray, ...]:
        """D2H: device arrays -> NumPy (a copy on a GPU; may alias on the CPU backend)."""
        return tuple(np.asarray(x) for x in xs)

    def to_device(self, o: np.ndarray) -> jax.Array:
        """H2D: attention output, cast to the model dtype, onto the device."""
        return jax.device_put(o.astype(self._out_dtype, copy=False), self._dev)

    def _store(self, layer: int, row: int, sl, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [n, Hkv, d] into row `row`, token positions `sl` (slice or index array)."""
        if self.int8:
            k, ks = quantize_int8(k)
            v, vs = quantize_int8(v)
            self.k_scale[layer][row][:, sl] = ks.T
            self.v_scale[layer][row][:, sl] = vs.T
        self.k[layer][row][:, sl] = k.transpose(1, 0, 2)
        self.v[layer][row][:, sl] = v.transpose(1, 0, 2)

    def _scales(self, layer: int, rows):
        if not self.int8:
            return None, None
        return self.k_scale[layer][rows], self.v_scale[layer][rows]

    def write_prefill(self, layer: int, rows: slice, k, v, lengths) -> None:
        """Store prompt k, v [b, T, Hkv, d] (first lengths[r] tokens of each row) without
        attending: the path where prefill attention ran on the device."""
        b = k.shape[0]
        r = self._rows(layer, rows, b)
        lengths = self._lengths(lengths, b, "lengths")
        for i in range(b):
            self._store(layer, r.start + i, slice(0, int(lengths[i])), k[i, :lengths[i]],
                        v[i, :lengths[i]])

    def prefill_host(self, layer: int, rows: slice, q, k, v, lengths) -> np.ndarray:
        """Write prompt k, v [b, T, Hkv, d] (first lengths[r] tokens of each row) and
        attend q [b, T, Hq, d] causally over them -> o [b, T, Hq, d] float32."""
        b, t = q.shape[:2]
        r = self._rows(layer, rows, b)
        lengths = self._lengths(lengths, b, "lengths")
        if lengths.max() > t:
            raise ValueError(f"lengths {lengths.max()} exceed the {t} prompt positions")
        out = np.empty(q.shape, np.float32)

        def one(i: int) -> None:
            row, L = r.start + i, int(lengths[i])
            self._store(layer, row, slice(0, L), k[i, :L], v[i, :L])
            ks, vs = self._scales(layer, row)
            out[i] = prefill_row(q[i], self.k[layer][row], self.v[layer][row], L, ks, vs)

        self.attention.map(one, range(b))
        return out

    def decode_host(self, layer: int, rows: slice, q, k_new, v_new, positions) -> np.ndarray:
        """Write the new k, v [b, 1, Hkv, d] at slot positions[r] of each row and attend
        q [b, 1, Hq, d] over slots ≤ positions[r] -> o [b, 1, Hq, d] float32."""
        b = q.shape[0]
        r = self._rows(layer, rows, b)
        lengths = self._lengths(np.asarray(positions) + 1, b, "positions + 1")
        out = np.empty(q.shape, np.float32)

        def chunk(c: slice) -> None:
            rr = slice(r.start + c.start, r.start + c.stop)
            idx = np.arange(rr.start, rr.stop)
            pos = lengths[c] - 1
            kn, vn = k_new[c, 0], v_new[c, 0]  # [n, Hkv, d]
            if self.int8:
                kn, ks = quantize_int8(kn)
                vn, vs = quantize_int8(vn)
                self.k_scale[layer][idx, :, pos] = ks
                self.v_scale[layer][idx, :, pos] = vs
            self.k[layer][idx, :, pos] = kn
            self.v[layer][idx, :, pos] = vn
            ks, vs = self._scales(layer, rr)
            out[c, 0] = decode_rows(q[c, 0], self.k[layer][rr], self.v[layer][rr],
                                    lengths[c], ks, vs)

        row_bytes = 2 * int(lengths.max()) * self.cfg.num_kv_heads * self.cfg.head_dim \
            * self.k[layer].itemsize
        self.attention.map(chunk, self.attention.chunks(b, row_bytes))
        return out

    # ------------------------------------------------------------------ wrappers
    def prefill(self, layer: int, rows: slice, q, k, v, lengths) -> jax.Array:
        """D2H of q, k, v; prefill_host; H2D of o."""
        q, k, v = self.to_host(q, k, v)
        return self.to_device(self.prefill_host(layer, rows, q, k, v, lengths))

    def decode(self, layer: int, rows: slice, q, k_new, v_new, positions) -> jax.Array:
        """D2H of q, k_new, v_new; decode_host; H2D of o."""
        q, k_new, v_new = self.to_host(q, k_new, v_new)
        return self.to_device(self.decode_host(layer, rows, q, k_new, v_new, positions))
