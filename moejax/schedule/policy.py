"""The offloading policy: the knobs the performance model prices and the search picks."""

from __future__ import annotations

import dataclasses

import numpy as np
from dataclasses import dataclass

DEVICES = ("cpu", "gpu")  # where attention runs and the KV cache lives
DEFAULT_PAGE_BYTES = 64 * 2**20  # 64 MiB weight pages: a page is an FFN part too (§8)
KV_RESERVATIONS = ("max", "lookahead")  # continuous batching's KV admission rule
PAD_MULTIPLE = 16  # prompts are padded to a multiple of this many positions


def padded_len(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """`n` rounded up to `multiple`, so shapes (and compilations) repeat across batches."""
    return -(-int(n) // multiple) * multiple


def padded_rows(rows, cap):
    """Rows a micro-batch of `rows` real rows is padded to on the device, broadcast: the
    next power of two, at most `cap`. Shapes (and compilations) still repeat across sweeps,
    ⌈log2 cap⌉ + 1 of them, while a nearly empty micro-batch costs its own rows, not cap's."""
    r = np.minimum(cap, 2.0 ** np.ceil(np.log2(np.maximum(rows, 1))))
    return int(r) if isinstance(rows, (int, np.integer)) and np.ndim(cap) == 0 else r


def prefill_rows(padded: int, ubs: int, cap=None) -> int:
    """Rows a prefill micro-batch of padded prompt length `padded` holds at most: ubs, or
    with a token cap ⌊cap / padded⌋ (at least 1) where fewer. It depends on the length
    alone, so with `padded_rows` the jitted shapes repeat across sweeps."""
    return ubs if cap is None else max(1, min(ubs, int(cap) // int(padded)))


def prefill_device_rows(prompt_lens, ubs: int, cap=None) -> int:
    """Device rows of a prefill micro-batch of these prompts: `padded_rows` of their
    count, at most `prefill_rows` of the longest padded prompt. The runtime pads to it,
    the timeline and the model price it."""
    return padded_rows(len(prompt_lens), prefill_rows(padded_len(max(prompt_lens)), ubs, cap))


@dataclass(frozen=True)
class Policy:
    """How a batch is run (docs/design.md §2-§4): N = ubs·n_ub sequences, n_ub micro-batches
    of ubs pipelined per layer (CGOPipe); wg ∈ [0, 1] of each MoE layer's expert bytes
    resident, the rest streamed in `page_bytes` pages; decode attention and KV cache on
    "cpu" or "gpu" (prefill attention always on the device); overlap: CGOPipe, else serial.
    Continuous batching (§7, `schedule/continuous.py`; a static batch ignores these): a
    sweep's decode rows run as ⌈rows/ubs⌉ micro-batches of ≤ ubs (so ≤ n_ub of them);
    `max_concurrency` caps the sequences holding KV (None: batch_size);
    `prefill_tokens_per_sweep` caps a sweep's admitted padded prompt tokens (None: as KV
    allows; a longer prompt is admitted alone); `prefill_micro_batch_tokens` splits them
    into micro-batches of at most that many (None: one). `kv_reservation`: "max" reserves
    prompt + max new tokens at admission; "lookahead" reserves each sequence's KV as it
    will grow (prompt + tokens so far), admitting only where that plan fits at every
    future sweep; neither preempts (a sequence never outgrows its max new tokens)."""

    batch_size: int
    micro_batch_size: int
    num_micro_batches: int
    gpu_weight_fraction: float = 0.0
    attention_device: str = "cpu"
    kv_cache_device: str = "cpu"
    page_bytes: int = DEFAULT_PAGE_BYTES
    overlap: bool = True
    max_concurrency: int | None = None
    prefill_tokens_per_sweep: int | None = None
    prefill_micro_batch_tokens: int | None = None
    kv_reservation: str = "max"

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
        for k in ("max_concurrency", "prefill_tokens_per_sweep", "prefill_micro_batch_tokens"):
            v = getattr(self, k)
            if v is None:
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Policy: {k}={v!r} must be a positive integer or None")
            object.__setattr__(self, k, int(v))
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"Policy: kv_reservation={self.kv_reservation!r} not in "
                             f"{KV_RESERVATIONS}")
        if (self.max_concurrency or 0) > self.batch_size:
            raise ValueError(f"Policy: max_concurrency={self.max_concurrency} exceeds "
                             f"batch_size={self.batch_size} (every running sequence "
                             "decodes in the next sweep)")

    @property
    def concurrency(self) -> int:
        """Sequences that may hold KV at once under continuous batching."""
        return self.max_concurrency or self.batch_size

    @classmethod
    def from_micro_batches(cls, micro_batch_size: int, num_micro_batches: int,
                           **kw) -> "Policy":
        return cls(batch_size=micro_batch_size * num_micro_batches,
                   micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches,
                   **kw)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)


def affine_interval(a, b, cap):
    """{x ∈ [0, 1] : a + b·x ≤ cap} as (lo, hi), empty when lo > hi; broadcasts. Memory is
    affine in wg, so intersecting these intervals solves the search's wg exactly."""
    a, b, cap = (np.asarray(v, dtype=float) for v in (a, b, cap))
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (cap - a) / b
    ok = a <= cap
    lo = np.where(b > 0, 0.0, np.where(b < 0, np.maximum(x, 0.0), np.where(ok, 0.0, 1.0)))
    hi = np.where(b > 0, np.minimum(x, 1.0), np.where((b < 0) | ok, 1.0, 0.0))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi
