"""Host memory kinds and host-thread plumbing shared by the weight store and CPU attention.

Host memory is a `pinned_host` memory-kind JAX array where the backend offers that kind
(page-locked: the DMA engine reads it directly, so H2D runs at link speed) and NumPy
otherwise. `jax.devices()[0].addressable_memories()` lists the kinds; the CPU backend of
jax 0.10 offers `device`, `pinned_host` and `unpinned_host`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

MiB = 2**20
from moejax.schedule.policy import DEFAULT_PAGE_BYTES  # noqa: E402,F401  (one default)
HOST_MEMORY_KINDS = ("auto", "pinned_host", "numpy")


def default_device() -> jax.Device:
    """The accelerator ("GPU"); on the CPU-only testbed, the default CPU device."""
    return jax.devices()[0]


def has_pinned_host(device: jax.Device) -> bool:
    return "pinned_host" in {m.kind for m in device.addressable_memories()}


def device_sharding(device: jax.Device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="device")


def pinned_sharding(device: jax.Device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="pinned_host")


def check_host_memory(kind: str) -> str:
    if kind not in HOST_MEMORY_KINDS:
        raise ValueError(f"host_memory={kind!r} not in {HOST_MEMORY_KINDS}")
    return kind


def available_host_bytes() -> int | None:
    """Host RAM the kernel can still hand out (MemAvailable of /proc/meminfo), or None
    where that is not readable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def to_host_copy(x) -> np.ndarray:
    """D2H: a NumPy copy that owns its memory (never a view of a device buffer)."""
    return np.array(x, copy=True)


# --------------------------------------------------------------- BLAS and threads
@functools.cache
def _openblas_set_local():
    """`openblas_set_num_threads_local` of the OpenBLAS NumPy links, or None: CPU
    attention's pool workers each run their GEMMs single-threaded (concurrent
    multi-threaded calls serialise); the `_local` variant (OpenBLAS ≥ 0.3.27) changes only
    the calling thread."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(libs):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def single_threaded_blas() -> None:
    """Make this thread's BLAS calls single-threaded (thread-pool initializer)."""
    fn = _openblas_set_local()
    if fn is not None:
        fn(1)


def host_threads() -> int:
    """Host cores available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@functools.cache
def host_pool(num_threads: int) -> ThreadPoolExecutor:
    """One shared pool per size (thread-safe to submit to from any thread)."""
    return ThreadPoolExecutor(num_threads, thread_name_prefix="moejax-host",
                              initializer=single_threaded_blas)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
STEADY_MMAP_THRESHOLD_BYTES = 32 * MiB  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
STEADY_TRIM_THRESHOLD_BYTES = 64 * MiB  # twice that, as glibc's dynamic rule sets it


def steady_malloc() -> None:
    """Set glibc's malloc thresholds where its dynamic rule settles anyway (mmap 32 MiB,
    trim 64 MiB), so streaming runs as fast in a fresh process as later: every streamed
    page is a fresh buffer, and below the settled threshold each one was mmapped and
    faulted in anew (history: experiments/results/README.md). Called by the weight store
    and calibration, so a policy's price and its run see one allocator. No-op without
    glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD_BYTES)


@contextlib.contextmanager
def loading_memory():
    """Make freed tensors leave the resident set at once while a checkpoint loads: inside,
    allocations ≥ 1 MiB are mmapped, so a free returns them (glibc otherwise keeps freed
    heap memory resident and loading RSS grew well past the weight bytes); after,
    `steady_malloc`'s thresholds and a trim. No-op without glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        steady_malloc()
        libc.malloc_trim(0)


# ---------------------------------------------------------------- device budgets
PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_POOL_DEFAULT_GB = 64  # XLA's GPU pinned host pool when the variable is unset
GiB = 2**30


def enforce_device_budget(nbytes: int, total_bytes: int) -> float:
    """Make the allocator enforce a device budget (docs/design.md §8): no preallocation,
    and XLA_PYTHON_CLIENT_MEM_FRACTION = nbytes / total_bytes, which caps the BFC
    allocator. Must run before the backend starts (ValueError after); returns the fraction.
    Read the limit back with `device_memory_limit` once the backend is up."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ValueError("enforce_device_budget must run before JAX's backend starts "
                         "(call it before the first jax.devices() or array)")
    if not 0 < nbytes <= total_bytes:
        raise ValueError(f"device budget {nbytes} bytes must be in (0, {total_bytes}]")
    frac = nbytes / total_bytes
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{frac:.6f}"
    return frac


def _stats(device: jax.Device) -> dict:
    try:
        return device.memory_stats() or {}
    except Exception:  # backends without allocator statistics
        return {}


def device_memory_limit(device: jax.Device) -> int | None:
    """The allocator's limit (`memory_stats()["bytes_limit"]`), None where not reported
    (the CPU backend): the usable device size, not a fixed share of the nominal one."""
    v = _stats(device).get("bytes_limit")
    return None if v is None else int(v)


def peak_device_bytes(device: jax.Device) -> int | None:
    """The allocator's high-water mark (`peak_bytes_in_use`), None where not reported."""
    v = _stats(device).get("peak_bytes_in_use")
    return None if v is None else int(v)


def pinned_pool_bytes() -> int:
    """Bytes of XLA's pinned host pool on a GPU: $XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB
    (default 64 GiB)."""
    raw = os.environ.get(PINNED_POOL_ENV)
    try:
        return int(float(raw) * GiB) if raw else PINNED_POOL_DEFAULT_GB * GiB
    except ValueError:
        raise ValueError(f"{PINNED_POOL_ENV}={raw!r} is not a number of GB") from None


def check_pinned_pool(nbytes: int) -> None:
    """ValueError naming the shortfall when `nbytes` of pinned host pages exceed the
    pool, before anything is placed (Mixtral's experts are ~90 GB in bf16)."""
    pool = pinned_pool_bytes()
    if nbytes > pool:
        raise ValueError(f"the streamed experts need {nbytes / GiB:.2f} GiB of pinned host "
                         f"memory but the pool holds {pool / GiB:.2f} GiB (short by "
                         f"{(nbytes - pool) / GiB:.2f} GiB): set {PINNED_POOL_ENV} "
                         "before starting, or keep more experts on the device")


def on_accelerator(device: jax.Device | None = None) -> bool:
    """Whether the device ("GPU") is an accelerator, not the CPU testbed."""
    return (device or default_device()).platform != "cpu"


def default_dtype(device: jax.Device | None = None) -> str:
    """bfloat16 on an accelerator; float32 on the CPU testbed (and for the oracle)."""
    return "bfloat16" if on_accelerator(device) else "float32"
