"""Expert weights in host memory, streamed to the device in fixed-size pages.

Layout (one `StorePlan`, shared by every MoE layer). The three expert tensors of a layer,
w1, w3 [E, h, f] and w2 [E, f, h], are flattened and each cut into pages of
`page_bytes` (a contiguous slab; the last page of a tensor is shorter when the page size
does not divide it). The layer's page list is w1's pages, then w3's, then w2's; its
first `num_resident` pages stay on the device for good (that is `gpu_weight_fraction`,
rounded down to whole pages), the rest live in host memory and stream.

Device side. A streamed layer is assembled in one of two full-layer *slots* (the double
buffer: layer i computes in one while layer i+1 fills the other). Claiming a slot copies
the layer's resident prefix in; `prefetch_page` issues `jax.device_put(page)` and a
donated, in-place `dynamic_update_slice` of it into the slot, so no per-layer buffer is
ever allocated and pages are independently issuable in any order. `wait(layer)` returns
the slot's arrays; they stay valid until `release(layer)` hands the slot back. A slot
belongs to one *pass*, (layer, step): a model with a single MoE layer runs that layer
in every step, and pass step+1 fills the other slot while step computes in this one.

Device bytes (every one accounted, `device_bytes_by_kind`):
  non_expert        embedding, LM head, norms, attention, routers, dense MLPs
  resident_experts  L_moe · (resident bytes per layer)
  stream_slots      2 · W_E (full-layer slots; none when nothing streams)
  page_staging      (1 − wg) · W_E: pages in flight between device_put and their copy
                    into the slot (worst case: a whole layer issued at once)
  + reservations    e.g. the engine's device KV cache for attention on the device.
So a layer with wg < 1 costs NE + L·wg·W_E + (3 − wg)·W_E; streaming needs less than
keeping everything resident (NE + L·W_E) only when L_moe > 3.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.host_offload.memory import (DEFAULT_PAGE_BYTES, check_host_memory,
                                        default_device, device_sharding, has_pinned_host,
                                        pinned_sharding, steady_malloc)
from moejax.model_config.model import ModelConfig
from moejax.schedule.costs import stream_buffer_bytes

EXPERTS = ("w1", "w3", "w2")
Path = tuple[str, ...]


# ------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Page:
    """`size` elements of the flattened expert tensor `tensor`, from element `start`."""

    tensor: str
    start: int
    size: int


@dataclass(frozen=True)
class StorePlan:
    """Page layout and device-memory footprint of one model under one set of knobs."""

    page_bytes: int
    itemsize: int
    shapes: tuple[tuple[int, ...], ...]  # w1, w3, w2
    pages: tuple[Page, ...]  # one MoE layer's pages: w1's, then w3's, then w2's
    num_resident: int  # pages [0, num_resident) stay on the device
    num_moe_layers: int
    non_expert_bytes: int

    @property
    def layer_bytes(self) -> int:
        """W_E: all expert bytes of one MoE layer."""
        return sum(p.size for p in self.pages) * self.itemsize

    @property
    def resident_pages(self) -> tuple[Page, ...]:
        return self.pages[:self.num_resident]

    @property
    def streamed_pages(self) -> tuple[Page, ...]:
        return self.pages[self.num_resident:]

    @property
    def streaming(self) -> bool:
        return self.num_moe_layers > 0 and self.num_resident < len(self.pages)

    @property
    def streamed_bytes(self) -> int:
        """Bytes one MoE layer streams per pass: (1 − wg) · W_E."""
        return sum(p.size for p in self.streamed_pages) * self.itemsize

    @property
    def gpu_weight_fraction(self) -> float:
        """The resident fraction actually achieved (wg rounded down to whole pages)."""
        w = self.layer_bytes
        return 1.0 if w == 0 else 1.0 - self.streamed_bytes / w

    def resident_elems(self, tensor: str) -> int:
        """Resident pages of a tensor are a prefix of it: its length in elements."""
        return sum(p.size for p in self.resident_pages if p.tensor == tensor)

    def device_bytes_by_kind(self) -> dict[str, int]:
        w, streamed = self.layer_bytes, self.streamed_bytes if self.streaming else 0
        stream = stream_buffer_bytes(w, streamed)
        return {"non_expert": self.non_expert_bytes,
                "resident_experts": self.num_moe_layers * (w - self.streamed_bytes),
                **{k: int(v) for k, v in stream.items()}}

    def device_bytes(self) -> int:
        return sum(self.device_bytes_by_kind().values())


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


def make_pages(cfg: ModelConfig, page_bytes: int) -> tuple[Page, ...]:
    pe = page_bytes // cfg.bytes_per_param
    pages = []
    for name, shape in zip(EXPERTS, expert_shapes(cfg)):
        n = int(np.prod(shape))
        pages += [Page(name, s, min(pe, n - s)) for s in range(0, n, pe)]
    return tuple(pages)


def _plan(cfg, page_bytes, pages, k) -> StorePlan:
    return StorePlan(page_bytes, cfg.bytes_per_param, expert_shapes(cfg), pages, k,
                     cfg.num_moe_layers, cfg.non_expert_bytes())


def _describe(plan: StorePlan, reserved: int) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in plan.device_bytes_by_kind().items() if v)
    return parts + (f", reserved {reserved}" if reserved else "")


def make_plan(cfg: ModelConfig, page_bytes: int | None = None,
              gpu_weight_fraction: float | None = None,
              device_memory_bytes: int | None = None, reserved_bytes: int = 0) -> StorePlan:
    """Choose the resident pages.

    wg given: the most pages whose bytes ≤ wg · W_E (then checked against the budget).
    Only a budget: the most resident pages that fit (all of them when NE + L·W_E fits).
    Neither: wg = 0, every expert streams. Budget too small: ValueError saying by how much.
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
    pages = make_pages(cfg, page_bytes)
    prefix = np.cumsum([0] + [p.size for p in pages])  # elements of the first k pages
    if wg is not None or budget is None:
        target = (wg or 0.0) * prefix[-1]
        k = int(np.searchsorted(prefix, target * (1 + 1e-12), side="right") - 1)
        plan = _plan(cfg, page_bytes, pages, k)
        if budget is not None and plan.device_bytes() + reserved_bytes > budget:
            need = plan.device_bytes() + reserved_bytes
            raise ValueError(f"device_memory_bytes={budget} is too small by {need - budget} "
                             f"bytes for gpu_weight_fraction={wg} (needs {need}: "
                             f"{_describe(plan, reserved_bytes)})")
        return plan
    plans = [_plan(cfg, page_bytes, pages, k) for k in range(len(pages), -1, -1)]
    for plan in plans:
        if plan.device_bytes() + reserved_bytes <= budget:
            return plan
    best = min(plans, key=StorePlan.device_bytes)
    need = best.device_bytes() + reserved_bytes
    raise ValueError(f"device_memory_bytes={budget} is too small by {need - budget} bytes: "
                     f"the smallest placement (gpu_weight_fraction="
                     f"{best.gpu_weight_fraction:.3g}) needs {need} "
                     f"({_describe(best, reserved_bytes)})")


# ---------------------------------------------------------------- device copies
@partial(jax.jit, donate_argnums=0)
def write_into(buf: jax.Array, data: jax.Array, offset) -> jax.Array:
    """buf.flat[offset : offset + data.size] = data, in place (buf is donated)."""
    flat = jax.lax.dynamic_update_slice(buf.reshape(-1), data.reshape(-1).astype(buf.dtype),
                                        (offset,))
    return flat.reshape(buf.shape)


@dataclass
class _Slot:
    key: tuple[int, int] | None = None  # (layer, step) of the pass that holds it
    bufs: list | None = None  # [w1, w3, w2] device arrays of full shape
    issued: set = field(default_factory=set)


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
    """Every weight of one model: non-expert ones and the resident expert pages on the
    device, the other expert pages in host memory (`host_memory`: "pinned_host",
    "numpy", or "auto" = pinned_host where the backend offers it, except that NumPy
    arrays the caller keeps (`place(..., adopt=True)`) are used in place, zero-copy).

    Fill it with `place(path, array)` (the `load_hf_params` callback) or `from_params`;
    then `check_complete()`. Thread-safe: prefetch/wait/release may come from any thread.
    """

    def __init__(self, cfg: ModelConfig, *, gpu_weight_fraction: float | None = None,
                 page_bytes: int | None = None, device_memory_bytes: int | None = None,
                 host_memory: str = "auto", device: jax.Device | None = None):
        self.cfg = cfg
        self.budget = device_memory_bytes
        steady_malloc()  # page buffers from malloc's heaps, not freshly faulted mmaps
        self.plan = make_plan(cfg, page_bytes, gpu_weight_fraction, device_memory_bytes)
        self.device = device or default_device()
        self.host_memory = check_host_memory(host_memory)
        if host_memory == "pinned_host" and not has_pinned_host(self.device):
            raise ValueError(f"host_memory='pinned_host' but {self.device} offers no "
                             "pinned_host memory")
        self._dev = device_sharding(self.device)
        self._pin = pinned_sharding(self.device) if has_pinned_host(self.device) else None
        if max((int(np.prod(s)) for s in self.plan.shapes), default=0) >= 2**31:
            raise ValueError("an expert tensor of >= 2^31 elements is not supported")
        self._dtype = jnp.dtype(cfg.dtype)
        kinds = self.plan.device_bytes_by_kind()
        self._bytes = {"non_expert": 0, "resident_experts": 0,
                       "stream_slots": kinds["stream_slots"],
                       "page_staging": kinds["page_staging"]}
        self._lock = threading.RLock()
        self._globals: dict = {}
        self._layers: dict[int, dict] = {i: {} for i in range(cfg.num_layers)}
        self._resident: dict[int, dict[str, jax.Array]] = {}
        self._host: dict[int, list] = {}
        self._slots = [_Slot() for _ in range(2 if cfg.num_moe_layers else 0)]
        self._placed: set[Path] = set()

    # ---------------------------------------------------------------- accounting
    @property
    def device_bytes(self) -> int:
        return sum(self._bytes.values())

    @property
    def device_bytes_by_kind(self) -> dict[str, int]:
        return dict(self._bytes)

    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for pages in self._host.values() for p in pages if p is not None)

    @property
    def gpu_weight_fraction(self) -> float:
        return self.plan.gpu_weight_fraction

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
        rounded to this store's pages, and its page size, unless nothing streams)."""
        plan = make_plan(self.cfg, policy.page_bytes, policy.gpu_weight_fraction)
        if plan.streaming or self.plan.streaming:  # all resident: the page size is moot
            if (plan.page_bytes, plan.num_resident) != (self.plan.page_bytes,
                                                         self.plan.num_resident):
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
        if kind in ("non_expert", "resident_experts", "stream_slots", "page_staging"):
            raise ValueError(f"reserve: kind {kind!r} is the store's own")
        self._account(kind, int(nbytes), f"reservation {kind!r}")

    def unreserve(self, kind: str) -> None:
        with self._lock:
            self._bytes.pop(kind, None)

    # ------------------------------------------------------------------ placement
    def place(self, path: Path, arr, adopt: bool = False):
        """Put one parameter where it lives; returns the device leaf (None for experts).

        `adopt`: the caller keeps `arr` (a NumPy array), so host pages may be views of it
        instead of copies. Loaders pass False and drop their array afterwards.
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
            self._account("non_expert", int(arr.nbytes), "/".join(path))
            leaf = jax.block_until_ready(jax.device_put(arr, self._dev))
            node = self._layers[int(path[0][7:])] if path[0].startswith("layers_") \
                else self._globals
            for k in path[1 if path[0].startswith("layers_") else 0:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        with self._lock:
            self._placed.add(path)
        return leaf

    def _host_kind(self, is_numpy: bool, adopt: bool) -> str:
        if self.host_memory == "auto":
            if (is_numpy and adopt) or self._pin is None:
                return "numpy"
            return "pinned_host"
        return self.host_memory

    def _place_expert(self, layer: int, name: str, arr, adopt: bool) -> None:
        t = EXPERTS.index(name)
        shape = self.plan.shapes[t]
        if tuple(arr.shape) != shape:
            raise ValueError(f"layers_{layer}/experts/{name}: shape {tuple(arr.shape)}, "
                             f"expected {shape}")
        is_numpy = isinstance(arr, np.ndarray)
        on_host = is_numpy or not isinstance(arr, jax.Array) or in_host_memory(arr)
        # An accelerator's array is cut there: only its streamed part comes to the host.
        # An array in host memory is viewed, not copied.
        flat = np.asarray(arr, dtype=self._dtype).reshape(-1) if on_host else \
            jnp.ravel(jnp.asarray(arr, dtype=self._dtype))
        r = self.plan.resident_elems(name)
        if r:
            self._account("resident_experts", r * self.plan.itemsize,
                          f"layers_{layer}/experts/{name}[:{r}]")
            if r == flat.size and not is_numpy:
                dev = jax.device_put(arr, self._dev)  # already a device array: no copy
            else:
                dev = jax.device_put(flat[:r] if r < flat.size else flat.reshape(shape),
                                     self._dev)
            jax.block_until_ready(dev)  # the source may be a loader's buffer, freed next
            self._resident.setdefault(layer, {})[name] = dev
        streamed = [(i, p) for i, p in enumerate(self.plan.streamed_pages) if p.tensor == name]
        if not streamed:
            self._host.setdefault(layer, [None] * len(self.plan.streamed_pages))
            return
        kind = self._host_kind(is_numpy, adopt)
        lo, hi = streamed[0][1].start, streamed[-1][1].start + streamed[-1][1].size
        src = flat[lo:hi] if on_host else np.asarray(flat[lo:hi])  # to the host, once
        if kind == "numpy" and not is_numpy and on_host:
            src = np.array(src, copy=True)  # never a view of device memory
        pages = self._host.setdefault(layer, [None] * len(self.plan.streamed_pages))
        for i, p in streamed:
            view = src[p.start - lo:p.start - lo + p.size]
            pages[i] = jax.device_put(view, self._pin) if kind == "pinned_host" else view
        if kind == "pinned_host":
            jax.block_until_ready([pages[i] for i, _ in streamed])

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict, **knobs) -> "HostWeightStore":
        """A store from an in-memory parameter tree (NumPy expert leaves are adopted)."""
        store = cls(cfg, **knobs)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for kp, leaf in flat:
            path = tuple(k.key for k in kp)
            store.place(path, leaf, adopt=isinstance(leaf, np.ndarray))
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
        """Bytes of the layer's expert prefix kept on the device (copied into its stream
        slot when a pass claims one)."""
        self._check_layer(layer)
        if not self.cfg.is_moe_layer(layer):
            return 0
        return sum(p.size for p in self.plan.resident_pages) * self.plan.itemsize

    def page_bytes(self, layer: int, page: int) -> int:
        self._check_page(layer, page)
        return self.plan.streamed_pages[page].size * self.plan.itemsize

    def _check_page(self, layer: int, page: int) -> None:
        n = self.num_pages(layer)
        if isinstance(page, bool) or not isinstance(page, (int, np.integer)) \
                or not 0 <= page < n:
            raise ValueError(f"page {page!r} outside [0, {n}) for layer {layer}")

    # ------------------------------------------------------------------ streaming
    def _slot_of(self, layer: int, step: int) -> _Slot:
        """The pass's slot, claimed (and the layer's resident prefix copied in) on first
        use."""
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
        s = free[0]
        if s.bufs is None:
            s.bufs = [jnp.zeros(shape, self._dtype, device=self._dev)
                      for shape in self.plan.shapes]
        for t, name in enumerate(EXPERTS):
            res = self._resident.get(layer, {}).get(name)
            if res is not None:
                s.bufs[t] = write_into(s.bufs[t], res, np.int32(0))
        s.key, s.issued = key, set()
        return s

    def prefetch_page(self, layer: int, page: int, step: int = 0) -> jax.Array | None:
        """Start copying streamed page `page` of `layer` into the slot of pass
        (layer, step); returns at once (an async `device_put` and an async in-place
        copy) the slot tensor the page is written into — block on it to wait for this
        page. Re-issuing is a no-op (None)."""
        self._check_page(layer, page)
        with self._lock:
            host = self._host.get(layer, [None] * (page + 1))[page]
            if host is None:
                raise ValueError(f"layer {layer} page {page} was never placed")
            s = self._slot_of(layer, step)
            if page in s.issued:
                return None
            p = self.plan.streamed_pages[page]
            t = EXPERTS.index(p.tensor)
            s.bufs[t] = write_into(s.bufs[t], jax.device_put(host, self._dev), np.int32(p.start))
            s.issued.add(page)
            return s.bufs[t]

    def prefetch(self, layer: int, step: int = 0) -> None:
        """prefetch_page for every streamed page of the layer (returns at once)."""
        for page in range(self.num_pages(layer)):
            self.prefetch_page(layer, page, step)

    def wait(self, layer: int, step: int = 0) -> dict[str, jax.Array]:
        """{'w1', 'w3', 'w2'}: the layer's full experts on the device, once every page
        of pass (layer, step) has landed (pages not yet prefetched are issued now).
        Valid until release()."""
        self._check_layer(layer)
        if not self.cfg.is_moe_layer(layer):
            raise ValueError(f"layer {layer} is dense: it has no experts")
        if not self.plan.streaming:
            return dict(self._resident[layer])
        self.prefetch(layer, step)
        with self._lock:
            bufs = list(self._slot_of(layer, step).bufs)
        jax.block_until_ready(bufs)
        return dict(zip(EXPERTS, bufs))

    def release(self, layer: int, step: int = 0) -> None:
        """Pass (layer, step) is done with its slot (its arrays from wait() become
        invalid as soon as another pass's pages are written there)."""
        self._check_layer(layer)
        with self._lock:
            for s in self._slots:
                if s.key == (layer, step):
                    s.key, s.issued = None, set()

    def release_all(self) -> None:
        """Every slot back (after a run that stopped early or failed)."""
        with self._lock:
            for s in self._slots:
                s.key, s.issued = None, set()
