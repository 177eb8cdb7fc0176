"""Microbenchmarks that calibrate the `local` HardwareSpec (docs/design.md §5; list there).
Device = JAX's default device, link = `jax.device_put`, host = NumPy. Fits: the GEMM
line t = E·t₀ + rows·6hf / R_gemm (`gemm_intercept_s`, `gemm_flops_per_s`), read rates,
the dequantization rates of int8 / int4 experts (`dequant_*_elems_per_s`),
the link alone (d2h, latency), CPU attention (t_call, B_attn), and via `in_situ` the
store's `h2d_curve`, `device_op_overhead_s` and `copy_core_demand`. The in-situ parts run
the real engine because only its data plane shows those rates. Cached as JSON (`cache`).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from moejax.calibration import cache
from moejax.calibration.in_situ import executor_probe, fit_copy_core_demand, overlapped_runs
from moejax.host_offload.kv_cache import HostKVCache
from moejax.host_offload.memory import has_pinned_host, pinned_sharding, steady_malloc
from moejax.layers.experts import moe_ffn
from moejax.model_config.dispatch import SORTED_MIN_ROWS_PER_EXPERT
from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig, get_model
from moejax.schedule import costs
from moejax.schedule.policy import DEFAULT_PAGE_BYTES


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (compilation, page faults)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _random_experts(m: ModelConfig, seed: int):
    """(w1, w3, w2, key): one layer's E random experts on the device, and an input key."""
    h, f, e, dt = m.hidden_size, m.expert_ffn_size, m.num_experts, jnp.dtype(m.dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    w1 = (jax.random.normal(keys[0], (e, h, f)) * h**-0.5).astype(dt)
    w3 = (jax.random.normal(keys[1], (e, h, f)) * h**-0.5).astype(dt)
    w2 = (jax.random.normal(keys[2], (e, f, h)) * f**-0.5).astype(dt)
    return w1, w3, w2, keys[3]


def _gemm_line(m: ModelConfig, token_counts, repeats):
    """(t₀ [s per expert], slope [s per row], best rate [FLOP/s], points) of
    t = E·t₀ + rows·6hf / R_gemm (§5), timing `moe_ffn` at t rows per expert for each
    count, so each size runs the dispatch path (capacity or sorted) it runs in serving."""

    h, f, e, dt = m.hidden_size, m.expert_ffn_size, m.num_experts, jnp.dtype(m.dtype)
    w1, w3, w2, key = _random_experts(m, 0)
    run = jax.jit(moe_ffn, static_argnames="capacity")
    points = []
    for t in token_counts:
        n = t * e  # one choice per token, t rows for every expert
        x = jax.random.normal(key, (n, h)).astype(dt)
        ids = (jnp.arange(n, dtype=jnp.int32) % e)[:, None]
        wts = jnp.ones((n, 1), jnp.float32)
        cap = t if t < SORTED_MIN_ROWS_PER_EXPERT else None
        points.append((n, median_seconds(lambda: run(x, wts, ids, w1, w3, w2, capacity=cap)
                                    .block_until_ready(), repeats)))
    rows, sec = np.array(points, dtype=float).T
    # least squares in relative error (weights 1/t): decode's few rows per expert are
    # priced as well as prefill's many
    slope, intercept = np.polyfit(rows, sec, 1, w=1 / sec) if len(points) > 1 else (
        sec[0] / rows[0], 0.0)
    best_rate = float(np.max(6 * h * f * rows / sec))
    if not slope > 0:  # noise on too few points: fall back to the best achieved rate
        slope, intercept = 6 * h * f / best_rate, 0.0
    return max(float(intercept), 0.0) / e, float(slope), best_rate, points


def _dequant_rates(m: ModelConfig, repeats: int) -> dict[str, float]:
    """{"dequant_int8_elems_per_s", "dequant_int4_elems_per_s"}: expert weights per second
    that `quant.dequantize` (jitted, in the model dtype) turns back into floats, timed
    expert by expert over one layer's w1 as the FFN does (`lax.map`)."""
    from moejax.quant import dequantize, quantize

    w1 = _random_experts(m, 1)[0]
    out = {}
    for dt, bits in (("int8", 8), ("int4", 4)):
        if bits == 4 and m.hidden_size % 2:
            continue
        qt = quantize(w1, bits, m.expert_group_size)
        run = jax.jit(lambda q: jax.lax.map(lambda e: jnp.sum(dequantize(e)), q))
        sec = median_seconds(lambda: run(qt).block_until_ready(), repeats)
        out[f"dequant_{dt}_elems_per_s"] = float(w1.size / sec)
    return out


def _cpu_attention_line(m: ModelConfig, batch: int, context: int, repeats: int):
    """(t_call [s], B_attn [bytes/s]) of `HostKVCache.decode_host`: a line through 4 rows
    × 16 keys and `batch` × `context`, bytes counted as `costs.cpu_attention_s` does."""
    points = []
    for b, c in ((4, 16), (batch, context)):
        kvc = HostKVCache(m, b, c + 1)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, 1, m.num_heads, m.head_dim)).astype(np.float32)
        kv = rng.standard_normal((b, 1, m.num_kv_heads, m.head_dim)).astype(np.float32)
        pos = np.full(b, c)
        sec = median_seconds(lambda: kvc.decode_host(0, slice(0, b), q, kv, kv, pos), repeats)
        nbytes = costs.kv_bytes(m, b * (c + 1)) + costs.qkv_bytes(m, b) \
            + costs.attn_out_bytes(m, b)
        points.append((nbytes, sec))
        del kvc
    (b0, t0), (b1, t1) = sorted(points)
    if not (b1 > b0 and t1 > t0):  # tiny sizes, noise: no line, the best plain rate
        return 0.0, float(b1 / t1)
    rate = (b1 - b0) / (t1 - t0)
    return max(t0 - b0 / rate, 0.0), float(rate)


H2D_SIZES = (DEFAULT_PAGE_BYTES // 4, DEFAULT_PAGE_BYTES, 4 * DEFAULT_PAGE_BYTES)


def _h2d_curve(copy_bytes: int, repeats: int, sizes=H2D_SIZES):
    """((transfer bytes, bytes/s), …): `copy_bytes` per size streamed as the store does
    (one `device_put` per page, from pinned host pages where the backend has them),
    alone, since the model prices core sharing itself."""
    dev = jax.devices()[0]
    on_dev = SingleDeviceSharding(dev, memory_kind="device")
    pinned = (pinned_sharding(dev) if has_pinned_host(dev) else None)  # None: NumPy
    host = np.ones(max(copy_bytes, max(sizes)) // 4, np.float32)
    curve = []
    for size in sorted({min(int(s), host.nbytes) // 4 * 4 for s in sizes}):
        page = size // 4
        pages = [host[i:i + page] for i in range(0, host.size - page + 1, page)]
        if pinned is not None:
            pages = [jax.device_put(p, pinned) for p in pages]

        def stream():
            jax.block_until_ready([jax.device_put(p, on_dev) for p in pages])
        curve.append((float(size), page * len(pages) * 4 / median_seconds(stream, repeats)))
        del pages
    return tuple(curve)


def _latency(repeats: int) -> float:
    """Seconds of a tiny (4 KiB) `jax.device_put` to the default device."""
    tiny = np.ones(1024, np.float32)
    dev = jax.devices()[0]
    return median_seconds(lambda: jax.device_put(tiny, dev).block_until_ready(), 5 * repeats)


def _link(copy_bytes: int, repeats: int):
    """(h2d curve, d2h bytes/s) to and from the default device, alone; d2h into the
    memory the engine copies into (`HostKVCache.to_host`: NumPy)."""
    dev = jax.devices()[0]
    curve = _h2d_curve(copy_bytes, repeats)
    x = jax.device_put(np.ones(copy_bytes // 4, np.float32), dev)
    d2h_fn = lambda: np.array(HostKVCache.to_host(x)[0], copy=True)
    return curve, copy_bytes / median_seconds(d2h_fn, repeats)


def _read_rates(read_bytes: int, repeats: int):
    """(device read bytes/s, host read bytes/s): jitted sum on the device, NumPy sum."""
    host = np.ones(read_bytes // 4, np.float32)
    host_rate = read_bytes / median_seconds(lambda: host.sum(), repeats)
    x = jax.device_put(host)
    total = jax.jit(jnp.sum)
    dev_rate = read_bytes / median_seconds(lambda: total(x).block_until_ready(), repeats)
    return dev_rate, host_rate


def _host_flops(repeats: int, n: int = 1024) -> float:
    a = np.ones((n, n), np.float32)
    return 2 * n**3 / median_seconds(lambda: a @ a, repeats)


def _memory_sizes():
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    return float(stats.get("bytes_limit", host)), float(host)


def calibrate(model: ModelConfig | str = "mixtral_4l_1024", *,
              token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 512), copy_bytes: int = 1 << 30,
              read_bytes: int = 1 << 30, attention_batch: int = 64,
              attention_context: int = 512, repeats: int = 3, path: str | None = None,
              save: bool = True) -> HardwareSpec:
    """Measure this machine → its `local` HardwareSpec; with `save`, cache it at `path`."""
    m = get_model(model) if isinstance(model, str) else model
    if not isinstance(m, ModelConfig):
        raise ValueError(f"model={model!r} is not a ModelConfig or preset name")
    counts = tuple(token_counts)
    if not counts or any(not isinstance(t, int) or t < 1 for t in counts):
        raise ValueError(f"token_counts={token_counts!r} must be positive integers")
    for k, v in dict(copy_bytes=copy_bytes, read_bytes=read_bytes, repeats=repeats,
                     attention_batch=attention_batch,
                     attention_context=attention_context).items():
        if not isinstance(v, int) or v < (4 if k.endswith("bytes") else 1):
            raise ValueError(f"{k}={v!r} must be a positive integer")


    steady_malloc()  # the allocator the engine's weight store runs with
    start = time.perf_counter()
    on_host = jax.default_backend() == "cpu"
    # the pages policies use: 1/4, 1 and 4 × the default page, and a whole layer's
    # experts (whole-layer transfers run at their own rate)
    sizes = [min(s, copy_bytes) // 4 * 4 for s in (*H2D_SIZES, m.expert_bytes_per_layer())]
    latency = _latency(repeats)
    # the engine's runs first: the big buffers below change later copies' speed and
    # contention (process state, not the machine)
    pre_attn, curve, probe = executor_probe(m, sorted(set(sizes)), latency, repeats)
    runs = overlapped_runs(probe, 2 * repeats - 1) if on_host else []
    del probe
    intercept, slope, gemm_peak, points = _gemm_line(m, counts, repeats)
    dev_read, host_read = _read_rates(read_bytes, repeats)
    alone, d2h = _link(copy_bytes, repeats)
    attn_call, attn = _cpu_attention_line(m, attention_batch, attention_context, repeats)
    dequant = _dequant_rates(m, repeats)
    gpu_mem, host_mem = _memory_sizes()
    host_flops = _host_flops(repeats)
    if on_host:  # the "GPU" is these cores: XLA's GEMM rate is a host rate too
        host_flops = max(host_flops, gemm_peak)
    spec = HardwareSpec(
        name="local", gpu_fp16_flops_per_s=gemm_peak, gpu_fp32_flops_per_s=gemm_peak,
        gpu_memory_bytes=gpu_mem, gpu_memory_bytes_per_s=dev_read,
        cpu_flops_per_s=host_flops, host_memory_bytes=host_mem,
        host_memory_bytes_per_s=host_read, d2h_bytes_per_s=d2h, h2d_curve=curve,
        h2d_bytes_per_s=curve[0][1],  # set below: the curve's rate at the default page
        cpu_cores=os.cpu_count() or 1, link_latency_s=latency,
        device_is_host=on_host, gemm_intercept_s=intercept,
        gemm_flops_per_s=6 * m.hidden_size * m.expert_ffn_size / slope,  # per row
        cpu_attention_bytes_per_s=attn, cpu_attention_call_s=attn_call,
        device_op_overhead_s=0.0, **dequant,
        source=f"moejax.schedule.calibrate() on {jax.devices()[0].device_kind}, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    overhead = max(float(np.median([t - costs.gpu_pre_attention_s(m, spec, n)
                                    for n, t in pre_attn])), 0.0)
    spec = spec.replace(device_op_overhead_s=overhead)
    spec = spec.replace(h2d_bytes_per_s=float(costs.h2d_rate(spec, DEFAULT_PAGE_BYTES)))
    if on_host:
        spec = spec.replace(copy_core_demand=fit_copy_core_demand(m, spec, runs))
    if save:
        path = os.path.expanduser(path) if path else cache.calibration_path()
        meta = dict(model=m.name, dtype=m.dtype, gemm_points=points, copy_bytes=copy_bytes,
                    read_bytes=read_bytes, h2d_curve_alone=alone,
                    seconds=time.perf_counter() - start,
                    **cache.cache_stamp(m))
        cache.write_cache(path, spec, meta)
    return spec
