"""Lazy, tensor-by-tensor reads of `*.safetensors` files into NumPy.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw
bytes. We parse it ourselves instead of `safetensors.safe_open(framework="np")` because
NumPy has no bfloat16 and that backend refuses BF16 tensors; `ml_dtypes.bfloat16` (shipped
with JAX) reads them without a cast. Each read allocates exactly the tensor and fills it
with one `os.preadv`, so nothing but the tensor being read is ever resident.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(e, data_bytes: int):
    """(dtype, shape, begin, end) of a header entry, or None when it is malformed:
    a known dtype, a list of non-negative int dims, and 0 ≤ begin ≤ end ≤ data_bytes
    with end − begin the tensor's size."""
    if not isinstance(e, dict):
        return None
    dt, shape, offsets = _DTYPES.get(e.get("dtype")), e.get("shape"), e.get("data_offsets")
    if dt is None or not isinstance(shape, list) or not all(_int(d) and d >= 0
                                                            for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_int, offsets)):
        return None
    begin, end = offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
        return None
    return np.dtype(dt), tuple(shape), begin, end


class SafetensorsFile:
    """Header of one file; `read(name)` returns a fresh NumPy array of that tensor."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(os.pread(self._fd, n, 8))
        except (OSError, struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"unreadable safetensors file {path}: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"corrupt safetensors file {path}: the header is not a JSON "
                             "object")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dt = e.get("dtype") if isinstance(e, dict) else None
            if isinstance(dt, str) and dt not in _DTYPES:
                raise ValueError(f"safetensors file {path}: tensor {name!r} has dtype {dt}, "
                                 f"which moejax does not read ({', '.join(_DTYPES)})")
            entry = _entry(e, size - self._base)
            if entry is None:
                raise ValueError(f"corrupt safetensors file {path}: bad entry for {name!r}")
            self.entries[name] = entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only its rows [lo, hi) along axis 0 (`rows`): those are
        contiguous on disk, so a fused tensor's parts are each read once."""
        dt, shape, begin, end = self.entries[name]
        if rows is not None:
            lo, hi = rows
            if not (shape and 0 <= lo <= hi <= shape[0]):
                raise ValueError(f"rows {rows} out of range for {name!r} of shape {shape}")
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            shape, begin, end = (hi - lo,) + shape[1:], begin + lo * row_bytes, \
                begin + hi * row_bytes
        out = np.empty(shape, dt)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < end - begin:  # preadv may return short reads
            k = os.preadv(self._fd, [view[got:]], self._base + begin + got)
            if k <= 0:
                raise ValueError(f"truncated safetensors file {self.path} at {name!r}")
            got += k
        return out

    def close(self):
        os.close(self._fd)


class CheckpointFiles:
    """All shards of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"unreadable index {index}: {e!r}") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"index {index}: weight_map must map tensor names to "
                                 f"shard file names, got {str(weight_map)[:80]}")
            shards = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            shards = ["model.safetensors"]
        else:
            raise ValueError(f"no model.safetensors or model.safetensors.index.json in "
                             f"{directory}")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        for s in shards:
            p = os.path.join(directory, s)
            if not os.path.exists(p):
                raise ValueError(f"missing shard {p} named by the index")
            self.files[s] = f = SafetensorsFile(p)
            for name in f.entries:
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is stored twice: in "
                                     f"{self.where[name].path} and in {p}")
                self.where[name] = f
        if os.path.exists(index):
            bad = [n for n, s in weight_map.items() if n not in self.files[s].entries]
            if bad:
                raise ValueError(f"index {index} names tensors absent from their shard: "
                                 f"{bad[:5]}")

    def names(self) -> set[str]:
        return set(self.where)

    def float_dtype(self) -> str:
        """The floating dtype holding most of the checkpoint's bytes ("float32",
        "bfloat16" or "float16"; float64 reads as float32): what HF's `dtype="auto"`
        loads when config.json names none."""
        nbytes: dict[str, int] = {}
        for f in self.files.values():
            for dt, _, begin, end in f.entries.values():
                if dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16):
                    name = "float32" if dt == np.float64 else dt.name
                    nbytes[name] = nbytes.get(name, 0) + end - begin
        return max(nbytes, key=nbytes.get) if nbytes else "float32"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.where[name].read(name, rows)

    def file_of(self, name: str) -> str:
        return self.where[name].path

    def close(self):
        for f in self.files.values():
            f.close()
