"""Expert weights in host memory, streamed to the device in pages (docs/design.md §2, §8).

Layout (one `StorePlan` for every MoE layer): the FFN axis f of a layer's experts
w1, w3 [E, h, f] and w2 [E, f, h] is cut into column blocks of `cols` columns; a *page*
is one block of all three tensors, (w1[:, :, a:b], w3[:, :, a:b], w2[:, a:b, :]),
3·E·h·cols elements, at most `page_bytes`. SwiGLU is a sum over f, so a layer's FFN is
the sum of its blocks' FFNs (`layers.experts.moe_ffn_parts`): columns [0, f_r) stay on
the device as one resident part (wg = f_r / f, whole columns), the streamed columns
[f_r, f) are paged, and the FFN reads each page where it landed. No page is copied into
a bigger buffer: a transfer is a `jax.device_put` (DMA on an accelerator), and the only
compute op that waits for a page is the FFN that reads it.

Device bytes (every one accounted, `device_bytes_by_kind`): non_expert (embedding, LM
head, norms, attention, routers, dense MLPs), resident_experts L_moe·wg·W_E, and
stream_buffers 2·(1 − wg)·W_E: the pages of at most two passes (layer, step) are alive
at once (the double buffer: layer i computes while layer i+1's pages land), plus
reservations such as a device KV cache.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.host_offload.memory import (DEFAULT_PAGE_BYTES, check_host_memory,
                                        check_pinned_pool, device_memory_limit,
                                        default_device, device_sharding, has_pinned_host,
                                        pinned_sharding, steady_malloc)
from moejax.host_offload import sharding as tp
from moejax.model_config.model import ModelConfig
from moejax.quant import check_expert, is_qtensor, quantize_expert
from moejax.schedule.costs import stream_buffer_bytes

EXPERTS = ("w1", "w3", "w2")
Path = tuple[str, ...]


# ------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Page:
    """Columns [start, start + cols) of the FFN axis of every expert tensor."""

    start: int
    cols: int


@dataclass(frozen=True)
class StorePlan:
    """Page layout and device-memory footprint of one model under one set of knobs."""

    page_bytes: int  # the knob: a page holds at most this many bytes
    itemsize: int
    shapes: tuple[tuple[int, ...], ...]  # w1, w3, w2 (float shapes)
    resident_cols: int  # columns [0, f_r) of every MoE layer stay on the device
    pages: tuple[Page, ...]  # the streamed columns [f_r, f) in blocks, in order
    num_moe_layers: int
    non_expert_bytes: int  # per device
    shards: int = 1  # k tensor-parallel devices: each holds 1/k of every expert column block
    cfg: ModelConfig | None = None  # its `expert_cols_bytes` sizes every block

    def cols_bytes(self, cols: int) -> int:
        """Bytes of a block of `cols` FFN columns of the three expert tensors, codes and
        scales (`ModelConfig.expert_cols_bytes`; 3·E·h·cols·itemsize for float)."""
        if self.cfg is not None:
            return self.cfg.expert_cols_bytes(cols)
        e, h, _ = self.shapes[0]
        return 3 * e * h * cols * self.itemsize

    @property
    def col_bytes(self) -> float:
        """Bytes of one FFN column of a layer's three expert tensors: 3·E·h·itemsize
        (quantized: amortised over a group)."""
        return self.cfg.expert_col_bytes() if self.cfg is not None else self.cols_bytes(1)

    @property
    def layer_bytes(self) -> int:
        """W_E: all expert bytes of one MoE layer."""
        return self.cols_bytes(self.shapes[0][2])

    @property
    def streamed_pages(self) -> tuple[Page, ...]:
        return self.pages

    @property
    def streaming(self) -> bool:
        return self.num_moe_layers > 0 and bool(self.pages)

    @property
    def streamed_bytes(self) -> int:
        """Bytes one MoE layer streams per pass: (1 − wg) · W_E."""
        return sum(self.cols_bytes(p.cols) for p in self.streamed_pages)

    def page_nbytes(self, page: Page) -> int:
        return self.cols_bytes(page.cols)

    @property
    def gpu_weight_fraction(self) -> float:
        """The resident fraction actually achieved (wg rounded down to whole columns)."""
        w = self.layer_bytes
        return 1.0 if w == 0 else 1.0 - self.streamed_bytes / w

    def device_bytes_by_kind(self) -> dict[str, int]:
        """Bytes on each device (with k shards: 1/k of the expert bytes)."""
        streamed = self.streamed_bytes // self.shards if self.streaming else 0
        return {"non_expert": self.non_expert_bytes,
                "resident_experts": self.num_moe_layers * (self.layer_bytes
                                                           - self.streamed_bytes)
                // self.shards,
                **{k: int(v) for k, v in stream_buffer_bytes(streamed).items()}}

    def device_bytes(self) -> int:
        return sum(self.device_bytes_by_kind().values())


def _cols(name: str, a, lo: int, hi: int):
    """FFN columns [lo, hi) of expert tensor `name`: axis 2 of w1, w3 [E, h, f], axis 1
    of w2 [E, f, h]; a QTensor's scale rows go with them (`quant.QTensor.row_range`)."""
    if is_qtensor(a):
        return a.row_range(lo, hi) if name == "w2" else a.cols(lo, hi)
    return a[:, lo:hi] if name == "w2" else a[:, :, lo:hi]


def _nbytes(a) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(a))


def expert_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
    return (e, h, f), (e, h, f), (e, f, h)


def check_page_bytes(cfg: ModelConfig, page_bytes) -> int:
    b = cfg.bytes_per_param
    if isinstance(page_bytes, bool) or not isinstance(page_bytes, (int, np.integer)) \
            or page_bytes <= 0:
        raise ValueError(f"page_bytes={page_bytes!r} must be a positive integer")
    if page_bytes % b:
        raise ValueError(f"page_bytes={page_bytes} is not a multiple of the {b}-byte "
                         f"{cfg.dtype} element")
    return int(page_bytes)


def make_pages(cfg: ModelConfig, page_bytes: int, first: int = 0,
               shards: int = 1) -> tuple[Page, ...]:
    """Column blocks of `cfg.page_cols` columns (rounded down to a multiple of
    `tp.split_unit`, at least one: each device takes an equal share of whole groups) over
    [first, f); the last one narrower."""
    c, f, u = cfg.page_cols(page_bytes), cfg.expert_ffn_size, tp.split_unit(cfg, shards)
    c = max(u, c // u * u)
    return tuple(Page(s, min(c, f - s)) for s in range(first, f, c))


def aligned_cols(cfg: ModelConfig, cols: int) -> int:
    """`cols` resident columns rounded down to a split the format allows (whole w2
    groups, `ModelConfig.expert_col_align`), or all f."""
    a, f = cfg.expert_col_align(), cfg.expert_ffn_size
    return f if cols >= f else max(int(cols), 0) // a * a


def cols_for_fraction(cfg: ModelConfig, wg: float) -> int:
    """Resident columns of a weight fraction wg: the most (aligned) whose bytes are at
    most wg·W_E, f_r = ⌊wg·W_E / col⌋ (col: bytes of a column, amortised over a group;
    float experts: ⌊wg·f⌋); an aligned f_r's bytes are exactly f_r·col."""
    w, col = cfg.expert_cols_bytes(cfg.expert_ffn_size), cfg.expert_col_bytes()
    return aligned_cols(cfg, int(np.floor(wg * w / col * (1 + 1e-9))))


def _plan(cfg, page_bytes, resident_cols: int, shards: int = 1) -> StorePlan:
    u = tp.split_unit(cfg, shards)
    resident_cols = aligned_cols(cfg, resident_cols) // u * u
    return StorePlan(page_bytes, cfg.bytes_per_param, expert_shapes(cfg), resident_cols,
                     make_pages(cfg, page_bytes, resident_cols, shards), cfg.num_moe_layers,
                     cfg.non_expert_bytes_per_device(shards), shards, cfg)


def _describe(plan: StorePlan, reserved: int) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in plan.device_bytes_by_kind().items() if v)
    return parts + (f", reserved {reserved}" if reserved else "")


def _fitting_cols(cfg, budget: int, shards: int = 1) -> list[int]:
    """Candidate resident column counts for a (per-device) budget, most resident first:
    all f, then the most below f whose bytes fit — NE_k + (L·f_r + 2·(f − f_r))·col/k is
    affine in f_r, so that is a closed form — and 0."""
    f, col, L = cfg.expert_ffn_size, cfg.expert_col_bytes(), cfg.num_moe_layers
    ne, slope = cfg.non_expert_bytes_per_device(shards), (L - 2) * col
    if slope > 0:
        best = int((shards * (budget - ne) - 2 * f * col) // slope)
    else:  # streaming more costs more (or the same): stream as little as possible
        best = f - 1
    best = aligned_cols(cfg, min(max(best, 0), f - 1))
    return [f, best, aligned_cols(cfg, best - cfg.expert_col_align()), 0]


def make_plan(cfg: ModelConfig, page_bytes: int | None = None,
              gpu_weight_fraction: float | None = None,
              device_memory_bytes: int | None = None, reserved_bytes: int = 0,
              shards: int = 1) -> StorePlan:
    """Choose the resident columns f_r of every MoE layer.

    wg given: f_r = ⌊wg·f⌋ (then checked against the budget). Only a budget: the most
    resident columns that fit (all of them when NE + L·W_E fits). Neither: wg = 0,
    every expert streams. Budget too small: ValueError saying by how much. `shards`: k
    tensor-parallel devices, the budget is per device and f_r and every page's columns
    are multiples of k (`host_offload.sharding`).
    """
    page_bytes = check_page_bytes(cfg, DEFAULT_PAGE_BYTES if page_bytes is None
                                  else page_bytes)
    wg = gpu_weight_fraction
    if wg is not None and (isinstance(wg, bool) or not isinstance(wg, (int, float,
                                                                      np.integer, np.floating))
                           or not 0.0 <= wg <= 1.0):
        raise ValueError(f"gpu_weight_fraction={wg!r} not in [0, 1]")
    budget = device_memory_bytes
    if budget is not None and (isinstance(budget, bool) or not isinstance(
            budget, (int, np.integer)) or budget <= 0):
        raise ValueError(f"device_memory_bytes={budget!r} must be a positive integer")
    per = f" per device (of {shards})" if shards > 1 else ""
    if wg is not None or budget is None:
        plan = _plan(cfg, page_bytes, cols_for_fraction(cfg, wg or 0.0), shards)
        if budget is not None and plan.device_bytes() + reserved_bytes > budget:
            need = plan.device_bytes() + reserved_bytes
            raise ValueError(f"device_memory_bytes={budget}{per} is too small by "
                             f"{need - budget} "
                             f"bytes for gpu_weight_fraction={wg} (needs {need}: "
                             f"{_describe(plan, reserved_bytes)})")
        return plan
    plans = [_plan(cfg, page_bytes, c, shards)
             for c in _fitting_cols(cfg, budget - reserved_bytes, shards)]
    for plan in plans:
        if plan.device_bytes() + reserved_bytes <= budget:
            return plan
    best = min(plans, key=StorePlan.device_bytes)
    need = best.device_bytes() + reserved_bytes
    raise ValueError(f"device_memory_bytes={budget}{per} is too small by {need - budget} "
                     "bytes: "
                     f"the smallest placement (gpu_weight_fraction="
                     f"{best.gpu_weight_fraction:.3g}) needs {need} "
                     f"({_describe(best, reserved_bytes)})")


# ---------------------------------------------------------------- device copies
ACCELERATOR_PATH_ENV = "MOEJAX_ACCELERATOR_PATH"


def use_accelerator_path(device: jax.Device, requested: bool | None = None) -> bool:
    """Whether the store takes the accelerator's code path: always off the CPU platform;
    on the CPU testbed when asked (`requested`, else `$MOEJAX_ACCELERATOR_PATH=1`), so CI
    runs it: pinned-host pages copied out of the source, never zero-copy views."""
    if device.platform != "cpu":
        return True
    if requested is not None:
        return bool(requested)
    return os.environ.get(ACCELERATOR_PATH_ENV, "") not in ("", "0")


@dataclass
class _Slot:
    key: tuple[int, int] | None = None  # (layer, step) of the pass that holds it
    pages: dict = field(default_factory=dict)  # streamed page -> (w1, w3, w2) on device
    fence: object = None  # the last op that read the previous user's pages


def in_host_memory(arr) -> bool:
    """Whether a jax array's buffers are host memory (the CPU platform, or a host memory
    kind), so NumPy can view them without a copy."""
    return all(d.platform == "cpu" for d in arr.devices()) or \
        getattr(arr.sharding, "memory_kind", None) in ("pinned_host", "unpinned_host")


def _expert_path(path: Path) -> tuple[int, str] | None:
    if len(path) == 3 and path[0].startswith("layers_") and path[1] == "experts" \
            and path[2] in EXPERTS:
        return int(path[0][len("layers_"):]), path[2]
    return None


# ------------------------------------------------------------------------ store
class HostWeightStore:
    """Every weight of one model: non-expert ones and the resident expert columns on the
    device, the streamed pages in host memory (`host_memory`: "pinned_host", "numpy", or
    "auto": pinned_host copies on the accelerator path, NumPy on the CPU testbed: views of
    adopted host-memory leaves, else copies). `accelerator_path` (default: off the CPU, or
    `$MOEJAX_ACCELERATOR_PATH=1`) makes the CPU backend take the accelerator's path.

    `devices` (k of them): every weight lives on their tensor-parallel mesh (`mesh`,
    `host_offload.sharding`): the budget is per device, each device holds and streams
    1/k of every expert column block. Fill it with `place(path, array)` (the
    `load_hf_params` callback) or `from_params`; then `check_complete()`. Thread-safe:
    prefetch/wait/release may come from any thread.
    """

    def __init__(self, cfg: ModelConfig, *, gpu_weight_fraction: float | None = None,
                 page_bytes: int | None = None, device_memory_bytes: int | None = None,
                 host_memory: str = "auto", device: jax.Device | None = None,
                 accelerator_path: bool | None = None, devices=None):
        self.cfg = cfg
        self.mesh = None if devices is None else tp.make_mesh(devices)
        self.shards = 1 if devices is None else len(self.mesh.devices)
        self.devices = None if devices is None else tuple(self.mesh.devices.flat)
        if self.mesh is not None:
            tp.check_split(cfg, self.shards)
            device = self.mesh.devices.flat[0]
        steady_malloc()  # page buffers from malloc's heaps, not freshly faulted mmaps
        self.device = device or default_device()
        self.accelerator_path = use_accelerator_path(self.device, accelerator_path)
        # no budget given: on an accelerator, what its allocator will hand out
        self.budget = device_memory_limit(self.device) if device_memory_bytes is None \
            else device_memory_bytes
        self.plan = make_plan(cfg, page_bytes, gpu_weight_fraction, self.budget,
                              shards=self.shards)
        self.host_memory = check_host_memory(host_memory)
        if host_memory == "pinned_host" and not has_pinned_host(self.device):
            raise ValueError(f"host_memory='pinned_host' but {self.device} offers no "
                             "pinned_host memory")
        self._dev = device_sharding(self.device)
        self._pin = pinned_sharding(self.device) if has_pinned_host(self.device) else None
        if max((int(np.prod(s)) for s in self.plan.shapes), default=0) >= 2**31:
            raise ValueError("an expert tensor of >= 2^31 elements is not supported")
        if self._host_kind() == "pinned_host" and self.accelerator_path:
            check_pinned_pool(self.plan.num_moe_layers * self.plan.streamed_bytes
                              // self.shards)
        self._dtype = jnp.dtype(cfg.dtype)
        self._bytes = {"non_expert": 0, "resident_experts": 0,
                       "stream_buffers": self.plan.device_bytes_by_kind()["stream_buffers"]}
        self._lock = threading.RLock()
        self._globals: dict = {}
        self._layers: dict[int, dict] = {i: {} for i in range(cfg.num_layers)}
        self._resident: dict[int, dict[str, jax.Array]] = {}
        self._host: dict[int, list[dict]] = {}  # layer -> per streamed page {name: array}
        self._slots = [_Slot() for _ in range(2 if cfg.num_moe_layers else 0)]
        self._placed: set[Path] = set()

    def _where(self, spec, kind: str = "device"):
        """Where an array of PartitionSpec `spec` lives in memory `kind`: this device, or
        with a mesh sharded over it (`host_offload.sharding`)."""
        if self.mesh is None:
            return self._dev if kind == "device" else self._pin
        return tp.sharding(self.mesh, spec, kind)

    @property
    def activation_sharding(self):
        """Where an attention output o [B, T, Hq, d] goes from the host: split by heads
        over the mesh (each device's o_proj reads its heads), None without a mesh."""
        return None if self.mesh is None else tp.sharding(self.mesh, tp.ATTN_OUT_SPEC)

    # ---------------------------------------------------------------- accounting
    @property
    def device_bytes(self) -> int:
        return sum(self._bytes.values())

    @property
    def device_bytes_by_kind(self) -> dict[str, int]:
        return dict(self._bytes)

    @property
    def host_bytes(self) -> int:
        return sum(_nbytes(a) for pages in self._host.values() for p in pages
                   for a in p.values())

    @property
    def gpu_weight_fraction(self) -> float:
        return self.plan.gpu_weight_fraction

    @property
    def stream_buffer_bytes(self) -> int:
        """Device bytes streaming takes: two passes' streamed pages, 2·(1 − wg)·W_E."""
        return self._bytes["stream_buffers"]

    @property
    def page_bytes_setting(self) -> int:
        """The page size this store streams in (the policy knob)."""
        return self.plan.page_bytes

    @property
    def can_lower_weight_fraction(self) -> bool:
        """Whether a lower wg frees device memory: (L−1)·Δwg·W_E where more than one MoE
        layer streams (one streamed layer's slot costs what its resident part saves)."""
        return self.plan.streaming and self.plan.num_moe_layers > 1

    def check_policy(self, policy) -> None:
        """ValueError unless `policy` places the experts as this store does (its wg
        rounded to whole columns, and its page size, unless nothing streams)."""
        plan = make_plan(self.cfg, policy.page_bytes, policy.gpu_weight_fraction)
        if plan.streaming or self.plan.streaming:  # all resident: the page size is moot
            if (plan.page_bytes, plan.resident_cols) != (self.plan.page_bytes,
                                                          self.plan.resident_cols):
                raise ValueError(
                    f"policy (gpu_weight_fraction={policy.gpu_weight_fraction:.6g}, "
                    f"page_bytes={policy.page_bytes}) does not place experts as the "
                    f"HostWeightStore does (gpu_weight_fraction="
                    f"{self.gpu_weight_fraction:.6g}, page_bytes={self.plan.page_bytes})")

    @contextlib.contextmanager
    def kv_reservation(self, nbytes: int):
        """Account a device KV cache of `nbytes` for the block (ValueError past the
        budget), and release it after, however the block ends."""
        self.reserve("kv_cache", nbytes)
        try:
            yield
        finally:
            self.unreserve("kv_cache")

    def _account(self, kind: str, nbytes: int, what: str) -> None:
        with self._lock:
            total = self.device_bytes + nbytes
            if self.budget is not None and total > self.budget:
                raise ValueError(f"placing {what} ({nbytes} bytes) exceeds "
                                 f"device_memory_bytes={self.budget} by "
                                 f"{total - self.budget} bytes")
            self._bytes[kind] = self._bytes.get(kind, 0) + nbytes

    def reserve(self, kind: str, nbytes: int) -> None:
        """Account `nbytes` of device memory someone else places (e.g. a KV cache)."""
        if kind in ("non_expert", "resident_experts", "stream_buffers"):
            raise ValueError(f"reserve: kind {kind!r} is the store's own")
        self._account(kind, int(nbytes), f"reservation {kind!r}")

    def unreserve(self, kind: str) -> None:
        with self._lock:
            self._bytes.pop(kind, None)

    # ------------------------------------------------------------------ placement
    def place(self, path: Path, arr, adopt: bool = False):
        """Put one parameter where it lives; returns the device leaf (None for experts).

        `adopt`: the caller keeps `arr`, so on the CPU testbed host pages may be views of
        it (the accelerator path copies to pinned pages). Loaders pass False and drop
        their array afterwards: the pages then own contiguous copies.
        """
        path = tuple(path)
        with self._lock:
            if path in self._placed:
                raise ValueError(f"parameter {'/'.join(path)} placed twice")
        ex = _expert_path(path)
        if ex is not None and self.cfg.is_moe_layer(ex[0]):
            self._place_expert(ex[0], ex[1], arr, adopt)
            leaf = None
        else:
            spec = tp.param_spec(path)
            self._account("non_expert", tp.per_device_bytes(int(arr.nbytes), spec,
                                                            self.shards), "/".join(path))
            leaf = jax.block_until_ready(jax.device_put(arr, self._where(spec)))
            node = self._layers[int(path[0][7:])] if path[0].startswith("layers_") \
                else self._globals
            for k in path[1 if path[0].startswith("layers_") else 0:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        with self._lock:
            self._placed.add(path)
        return leaf

    def _host_kind(self) -> str:
        """"auto": pinned_host pages on the accelerator path (DMA reads them at link
        speed), else NumPy (on the CPU testbed: views of the source, zero-copy)."""
        if self.host_memory == "auto":
            return "pinned_host" if self.accelerator_path and self._pin is not None \
                else "numpy"
        return self.host_memory

    def _place_expert(self, layer: int, name: str, arr, adopt: bool) -> None:
        where = f"layers_{layer}/experts/{name}"
        if self.cfg.expert_quantized and not is_qtensor(arr):  # quantize on the host
            shape = self.plan.shapes[EXPERTS.index(name)]
            if tuple(arr.shape) != shape:
                raise ValueError(f"{where}: shape {tuple(arr.shape)}, expected {shape}")
            arr, adopt = quantize_expert(self.cfg, np.asarray(arr)), False
        if is_qtensor(arr) or self.cfg.expert_quantized:
            check_expert(self.cfg, where, name, arr)
        else:
            shape = self.plan.shapes[EXPERTS.index(name)]
            if tuple(arr.shape) != shape:
                raise ValueError(f"{where}: shape {tuple(arr.shape)}, expected {shape}")
        leaves = jax.tree_util.tree_leaves(arr)
        on_host = all((isinstance(a, np.ndarray) or not isinstance(a, jax.Array)
                       or in_host_memory(a)) and not (self.accelerator_path
                                                      and isinstance(a, jax.Array))
                      for a in leaves)
        cols = partial(_cols, name)  # (tensor, lo, hi) -> its FFN columns [lo, hi)
        # an accelerator's array is cut there (only its streamed part comes to the host);
        # an array in host memory is viewed, not copied
        if is_qtensor(arr):
            src = jax.tree_util.tree_map(np.asarray if on_host else jnp.asarray, arr)
        else:
            src = np.asarray(arr, dtype=self._dtype) if on_host else \
                jnp.asarray(arr, dtype=self._dtype)
        fr, f = self.plan.resident_cols, self.cfg.expert_ffn_size
        tmap = jax.tree_util.tree_map
        if fr:
            block = cols(src, 0, fr) if fr < f else src
            self._account("resident_experts", _nbytes(block) // self.shards,
                          f"{where}[..{fr}]")
            dev = jax.device_put(block, self._where(tp.EXPERT_SPECS[name]))
            jax.block_until_ready(dev)  # the source may be a loader's buffer, freed next
            self._resident.setdefault(layer, {})[name] = dev
        kind = self._host_kind()
        pages = self._host.setdefault(layer, [{} for _ in self.plan.streamed_pages])
        for i, p in enumerate(self.plan.streamed_pages):
            block = cols(src, p.start, p.start + p.cols)  # [E, h, c] / [E, c, h]
            if kind == "pinned_host":
                pages[i][name] = tmap(lambda a: jax.device_put(
                    np.ascontiguousarray(a), self._where(tp.EXPERT_SPECS[name],
                                                         "pinned_host")), block)
            elif on_host and adopt and not self.accelerator_path:
                pages[i][name] = block  # a view: the one host copy stays the caller's
            else:
                pages[i][name] = tmap(lambda a: np.array(a, copy=True), block)  # owns it
        if kind == "pinned_host":
            jax.block_until_ready([p[name] for p in pages])

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict, **knobs) -> "HostWeightStore":
        """A store from an in-memory parameter tree (its leaves are adopted: the caller
        holds them, so host pages view them where the path allows)."""
        store = cls(cfg, **knobs)
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]
        for kp, leaf in flat:
            path = tuple(k.key for k in kp)
            store.place(path, leaf, adopt=True)
        store.check_complete()
        return store

    def check_complete(self) -> None:
        """ValueError naming a missing parameter: never run a half-placed model."""
        from moejax.checkpoints.hf import param_shapes

        missing = sorted(set(param_shapes(self.cfg)) - self._placed)
        if missing:
            raise ValueError(f"weight store incomplete: {'/'.join(missing[0])} was never "
                             f"placed" + (f" (and {len(missing) - 1} more)"
                                          if len(missing) > 1 else ""))

    # ------------------------------------------------------------------ accessors
    def device_params(self, layer: int) -> dict:
        """Non-expert parameters of layer i (attention, norms, router / dense MLP)."""
        self._check_layer(layer)
        return self._layers[layer]

    def global_params(self) -> dict:
        """embed, final_norm and (untied) lm_head, on the device."""
        return self._globals

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer!r} outside [0, {self.cfg.num_layers})")

    def num_pages(self, layer: int) -> int:
        """Streamed pages of layer i (0 for dense layers and fully resident ones)."""
        self._check_layer(layer)
        return len(self.plan.streamed_pages) if self.cfg.is_moe_layer(layer) else 0

    def resident_bytes(self, layer: int) -> int:
        """Bytes of the layer's resident expert columns."""
        self._check_layer(layer)
        if not self.cfg.is_moe_layer(layer):
            return 0
        return self.plan.layer_bytes - self.plan.streamed_bytes

    def page_bytes(self, layer: int, page: int) -> int:
        self._check_page(layer, page)
        return self.plan.page_nbytes(self.plan.streamed_pages[page])

    def _check_page(self, layer: int, page: int) -> None:
        n = self.num_pages(layer)
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)) \
                or not 0 <= page < n:
            raise ValueError(f"page {page!r} outside [0, {n}) for layer {layer}")

    # ------------------------------------------------------------------ streaming
    def _slot_of(self, layer: int, step: int) -> _Slot:
        """The pass's slot, claimed on first use (at most two passes hold pages)."""
        key = (layer, step)
        for s in self._slots:
            if s.key == key:
                return s
        free = [s for s in self._slots if s.key is None]
        if not free:
            busy = [s.key for s in self._slots]
            raise RuntimeError(f"prefetch of layer {layer} (step {step}): both stream "
                               f"slots are busy ((layer, step) {busy}); release() one "
                               "first")
        free[0].key, free[0].pages, free[0].fence = key, {}, None
        return free[0]

    def _wait_fence(self, layer: int, step: int) -> None:
        """Before a pass claims a slot: wait (on the calling thread, outside the lock)
        for the op that last read the slot's previous pages, so at most two passes'
        pages are ever alive on the device."""
        with self._lock:
            if any(s.key == (layer, step) for s in self._slots):
                return
            fences = [s.fence for s in self._slots if s.key is None]
        if fences and fences[0] is not None:
            jax.block_until_ready(fences[0])

    def prefetch_page(self, layer: int, page: int, step: int = 0):
        """Start copying streamed page `page` of `layer` for pass (layer, step); returns
        at once its (w1, w3, w2) device arrays (async `device_put`s: block on them to
        wait for the page). Re-issuing is a no-op (None)."""
        self._check_page(layer, page)
        self._wait_fence(layer, step)
        with self._lock:
            host = self._host.get(layer)
            if host is None or len(host[page]) < len(EXPERTS):
                raise ValueError(f"layer {layer} page {page} was never placed")
            s = self._slot_of(layer, step)
            if page in s.pages:
                return None
            # with a mesh each device's share of the page comes over its own link
            s.pages[page] = tuple(jax.device_put(host[page][n],
                                                 self._where(tp.EXPERT_SPECS[n]))
                                  for n in EXPERTS)
            return s.pages[page]

    def prefetch(self, layer: int, step: int = 0) -> None:
        """prefetch_page for every streamed page of the layer (returns at once)."""
        for page in range(self.num_pages(layer)):
            self.prefetch_page(layer, page, step)

    def wait(self, layer: int, step: int = 0) -> list[tuple]:
        """The layer's experts as FFN parts [(w1, w3, w2), …]: the resident columns, then
        each streamed page of pass (layer, step) in order (pages not yet prefetched are
        issued now). Does not block: the FFN that reads a page waits for it. Valid until
        release()."""
        self._check_layer(layer)
        if not self.cfg.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is dense: it has no experts")
        res = self._resident.get(layer, {})
        parts = [tuple(res[n] for n in EXPERTS)] if res else []
        if not self.plan.streaming:
            return parts
        self.prefetch(layer, step)
        with self._lock:
            s = self._slot_of(layer, step)
            return parts + [s.pages[j] for j in range(self.num_pages(layer))]

    def release(self, layer: int, step: int = 0, fence=None) -> None:
        """Pass (layer, step) is done with its pages: `fence`, the output of the last op
        that reads them (None: nothing in flight), gates the slot's next claim."""
        self._check_layer(layer)
        with self._lock:
            for s in self._slots:
                if s.key == (layer, step):
                    s.key, s.pages, s.fence = None, {}, fence

    def release_all(self) -> None:
        """Every slot back (after a run that stopped early or failed)."""
        with self._lock:
            for s in self._slots:
                s.key, s.pages = None, {}
