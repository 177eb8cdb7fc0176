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
    """`openblas_set_num_threads_local` of the OpenBLAS NumPy links, or None.

    CPU attention parallelises over rows with its own thread pool; each worker must run
    its small GEMMs single-threaded or OpenBLAS serialises the concurrent calls (measured
    here: 2 workers × 2 BLAS threads ran no faster than 1 worker). The `_local` variant
    (OpenBLAS ≥ 0.3.27) changes only the calling thread, not the rest of the process.
    """
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
    """Set glibc's malloc thresholds where its *dynamic* rule settles anyway (mmap
    32 MiB, trim 64 MiB), so that streaming runs as fast in a fresh process as later.

    Every streamed page is a fresh device buffer (`jax.device_put`) on the CPU backend.
    glibc mmaps blocks above its mmap threshold (128 KiB in a fresh process; it climbs
    to the block's size, at most 32 MiB, after the first large free), and each mmapped
    block is faulted in and zeroed 4 KiB at a time. Until something frees a big block,
    every 4 MiB page paid that: pages streamed into a slot at 2.3-2.7 GB/s in a fresh
    process and 5.8-7.7 GB/s after a 1 GB buffer was freed, or with these thresholds
    from the start (2-core testbed). Called by the weight store and `calibrate`, so that
    a policy's price and its run see the same allocator. No-op where glibc is absent.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD_BYTES)


@contextlib.contextmanager
def loading_memory():
    """Make freed tensors leave the resident set at once while a checkpoint loads.

    glibc serves allocations below its *dynamic* mmap threshold (it climbs to 32 MiB after
    the first large free) from heaps and per-thread arenas, and keeps freed heap memory
    resident. Loading frees one tensor per parameter (and tensorstore allocates from its
    worker threads' arenas), so without this RSS grew by 1.5-1.9x the weight bytes
    (native format) instead of ~1.1x. Inside: allocations >= 1 MiB are mmapped, so a free
    returns them. After: `steady_malloc`'s thresholds, and a trim. No-op where glibc is
    absent.
    """
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
