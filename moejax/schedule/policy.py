"""The offloading policy: the knobs the performance model prices and the search picks."""

from __future__ import annotations

import dataclasses

import numpy as np
from dataclasses import dataclass

DEVICES = ("cpu", "gpu")  # where attention runs and the KV cache lives
DEFAULT_PAGE_BYTES = 16 * 2**20  # 16 MiB weight pages (docs/design.md §2)
PAD_MULTIPLE = 16  # prompts are padded to a multiple of this many positions


def padded_len(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """A prompt length rounded up to `multiple`: shapes (and compilations) repeat across
    batches while padding stays below `multiple` positions."""
    return -(-int(n) // multiple) * multiple


@dataclass(frozen=True)
class Policy:
    """How a batch is run (docs/design.md §2-§4).

    batch_size          N = micro_batch_size · num_micro_batches sequences in flight.
    micro_batch_size    ubs: sequences per device kernel call (and per CPU attention call).
    num_micro_batches   n_ub: micro-batches pipelined through each layer (CGOPipe).
    gpu_weight_fraction wg ∈ [0, 1]: fraction of every MoE layer's expert bytes kept
                        resident on the device; the rest is streamed each pass.
    attention_device    where decode attention runs: "cpu" (next to a host KV cache) or
                        "gpu". Prefill attention always runs on the device.
    kv_cache_device     where the KV cache lives: "cpu" (host) or "gpu".
    page_bytes          size of one streamed weight page.
    overlap             True: CGOPipe (a layer costs max over resources); False: serial.
    """

    batch_size: int
    micro_batch_size: int
    num_micro_batches: int
    gpu_weight_fraction: float = 0.0
    attention_device: str = "cpu"
    kv_cache_device: str = "cpu"
    page_bytes: int = DEFAULT_PAGE_BYTES
    overlap: bool = True

    def __post_init__(self):
        for k in ("batch_size", "micro_batch_size", "num_micro_batches", "page_bytes"):
            v = getattr(self, k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Policy: {k}={v!r} must be a positive integer")
            object.__setattr__(self, k, int(v))  # NumPy scalars become plain ints
        if isinstance(self.gpu_weight_fraction, (np.integer, np.floating)):
            object.__setattr__(self, "gpu_weight_fraction", float(self.gpu_weight_fraction))
        if self.batch_size != self.micro_batch_size * self.num_micro_batches:
            raise ValueError(f"Policy: batch_size={self.batch_size} != micro_batch_size="
                             f"{self.micro_batch_size} x num_micro_batches="
                             f"{self.num_micro_batches}")
        wg = self.gpu_weight_fraction
        if not isinstance(wg, (int, float)) or isinstance(wg, bool) or not 0.0 <= wg <= 1.0:
            raise ValueError(f"Policy: gpu_weight_fraction={wg!r} not in [0, 1]")
        for k in ("attention_device", "kv_cache_device"):
            if getattr(self, k) not in DEVICES:
                raise ValueError(f"Policy: {k}={getattr(self, k)!r} not in {DEVICES}")
        if self.attention_device == "cpu" and self.kv_cache_device == "gpu":
            raise ValueError("Policy: kv_cache_device='gpu' needs attention_device='gpu' "
                             "(CPU attention runs next to a host KV cache)")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"Policy: overlap={self.overlap!r} must be a bool")

    @classmethod
    def from_micro_batches(cls, micro_batch_size: int, num_micro_batches: int,
                           **kw) -> "Policy":
        return cls(batch_size=micro_batch_size * num_micro_batches,
                   micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches,
                   **kw)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)


def affine_interval(a, b, cap):
    """The set {x ∈ [0, 1] : a + b·x ≤ cap} as (lo, hi), empty when lo > hi; floats, or
    arrays for array inputs (NumPy-broadcast, so the search solves every candidate at
    once).

    Memory use is affine in `gpu_weight_fraction` (resident bytes grow, streamed and
    host bytes shrink), so every memory budget bounds it to such an interval and the
    inner problem over wg is solved exactly by intersecting them."""
    a, b, cap = (np.asarray(v, dtype=float) for v in (a, b, cap))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (cap - a) / b
    ok = a <= cap
    lo = np.where(b > 0, 0.0, np.where(b < 0, np.maximum(x, 0.0), np.where(ok, 0.0, 1.0)))
    hi = np.where(b > 0, np.minimum(x, 1.0), np.where((b < 0) | ok, 1.0, 0.0))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi
