"""Calibration of the `local` HardwareSpec by microbenchmarks (DESIGN.md §4-§5, MoE-Lens).

The "GPU" is JAX's default device (the CPU on the testbed), the link is `jax.device_put`
host → device and device → pinned host, host memory is NumPy. Measured:

* device GEMM time of one expert's SwiGLU FFN vs tokens, fitted by a line
  t(tokens) = intercept + slope·tokens → `gemm_intercept_s`, `gemm_flops_per_s` = 6·h·f /
  slope (the rate `costs.device_compute_s` then uses);
* device memory read bandwidth (a jitted reduction) and host read bandwidth (NumPy);
* h2d / d2h bandwidth with `copy_bytes` copies (≥ 1 GB by default: the link is slower
  than nominal) and the latency of a tiny transfer;
* CPU decode attention (GQA over a host KV cache) → `cpu_attention_bytes_per_s`; host
  matmul FLOP/s (NumPy, or the device GEMM rate when the device is the host's own CPU)
  → `cpu_flops_per_s`.

The result is cached as JSON (`hardware.calibration_path()`); the defaults take well
under 60 s on 2 cores. Tests pass tiny sizes.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

from moejax.model_config.hardware import HardwareSpec, calibration_path
from moejax.model_config.model import ModelConfig, get_model


def _median_s(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (compilation, page faults)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gemm_line(m: ModelConfig, token_counts, repeats):
    """Expert FFN time vs rows on the default device, measured with the dispatch that
    runs (`layers.experts.moe_ffn`, all E experts of one layer): each count t is spread
    as t rows per expert (the capacity path below `SORTED_MIN_ROWS_PER_EXPERT`, the
    sorted path above). Fits time = E·intercept + rows·6hf / rate and returns
    (intercept per expert, slope per row of one expert, best rate, points)."""
    import jax
    import jax.numpy as jnp

    from moejax.layers.capacity import SORTED_MIN_ROWS_PER_EXPERT
    from moejax.layers.experts import moe_ffn

    h, f, e, dt = m.hidden_size, m.expert_ffn_size, m.num_experts, jnp.dtype(m.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    w1 = (jax.random.normal(keys[0], (e, h, f)) * h**-0.5).astype(dt)
    w3 = (jax.random.normal(keys[1], (e, h, f)) * h**-0.5).astype(dt)
    w2 = (jax.random.normal(keys[2], (e, f, h)) * f**-0.5).astype(dt)
    run = jax.jit(moe_ffn, static_argnames="capacity")
    points = []
    for t in token_counts:
        n = t * e  # one choice per token, t rows for every expert
        x = jax.random.normal(keys[3], (n, h)).astype(dt)
        ids = (jnp.arange(n, dtype=jnp.int32) % e)[:, None]
        wts = jnp.ones((n, 1), jnp.float32)
        cap = t if t < SORTED_MIN_ROWS_PER_EXPERT else None
        points.append((n, _median_s(lambda: run(x, wts, ids, w1, w3, w2, capacity=cap)
                                    .block_until_ready(), repeats)))
    rows, sec = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(rows, sec, 1) if len(points) > 1 else (
        sec[0] / rows[0], 0.0)
    best_rate = float(np.max(6 * h * f * rows / sec))
    if not slope > 0:  # noise on too few points: fall back to the best achieved rate
        slope, intercept = 6 * h * f / best_rate, 0.0
    return max(float(intercept), 0.0) / e, float(slope), best_rate, points


def _attention_fn():
    try:
        from moejax.layers.attention import gqa_attention
        return gqa_attention
    except ImportError:  # self-contained GQA decode attention
        import jax
        import jax.numpy as jnp

        def gqa_attention(q, k, v, mask):
            b, t, hq, d = q.shape
            qg = q.reshape(b, t, k.shape[2], hq // k.shape[2], d)
            s = jnp.einsum("btkgd,bskd->bkgts", qg, k) / jnp.sqrt(jnp.float32(d))
            s = jnp.where(mask[:, None, None], s, jnp.finfo(s.dtype).min)
            o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v)
            return o.reshape(b, t, hq, d)
        return gqa_attention


def _cpu_attention_rate(m: ModelConfig, batch: int, context: int, repeats: int) -> float:
    """KV bytes per second that a jitted GQA decode attention reads on the host CPU."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    dt = jnp.dtype(m.dtype)
    with jax.default_device(cpu):
        q = jnp.ones((batch, 1, m.num_heads, m.head_dim), dt)
        k = jnp.ones((batch, context, m.num_kv_heads, m.head_dim), dt)
        mask = jnp.ones((batch, 1, context), bool)
        attn = jax.jit(_attention_fn())
        sec = _median_s(lambda: attn(q, k, k, mask).block_until_ready(), repeats)
    return batch * context * m.kv_bytes_per_token_per_layer() / sec


def _link(copy_bytes: int, repeats: int):
    """(h2d bytes/s, d2h bytes/s, latency s) of jax.device_put to/from the default device."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from moejax.host_offload.weight_store import _write
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES

    dev = jax.devices()[0]
    host = np.ones(copy_bytes // 4, np.float32)
    # h2d as the weight store streams: pages from (pinned) host memory, each written into
    # a preallocated device slot — ≥ 1 GB in all by default
    page = min(DEFAULT_PAGE_BYTES // 4 // 4, host.size)
    pages = [host[i:i + page] for i in range(0, host.size - page + 1, page)]
    try:
        pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
        pages = [jax.device_put(p, pinned) for p in pages]
    except Exception:  # no pinned_host memory kind: stream from NumPy
        pass
    slot = jax.numpy.zeros(page * len(pages), np.float32, device=dev)

    on_dev = SingleDeviceSharding(dev, memory_kind="device")

    def stream():
        nonlocal slot
        for k, p in enumerate(pages):
            slot = _write(slot, jax.device_put(p, on_dev), np.int32(k * page))
        slot.block_until_ready()
    stream()
    h2d = page * len(pages) * 4 / _median_s(stream, repeats)
    if jax.default_backend() == "cpu":
        # the "device" is these cores: while the schedule streams pages the same cores
        # run the expert GEMMs, so the rate that matters is the one under that load
        h2d = page * len(pages) * 4 / _median_s(lambda: _under_load(stream), repeats)
    x = jax.device_put(host, dev)
    try:
        pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
        d2h_fn = lambda: jax.device_put(x, pinned).block_until_ready()
        d2h_fn()
    except Exception:  # backends without a pinned_host memory kind
        d2h_fn = lambda: np.array(x, copy=True)
    d2h = copy_bytes / _median_s(d2h_fn, repeats)
    tiny = np.ones(1024, np.float32)
    lat = _median_s(lambda: jax.device_put(tiny, dev).block_until_ready(), 5 * repeats)
    return h2d, d2h, lat


def _under_load(fn):
    """Run fn while another thread keeps a jitted GEMM busy (like the executor's gpu
    lane during streaming)."""
    import threading

    import jax
    import jax.numpy as jnp

    a = jnp.ones((768, 2688), jnp.float32)
    x = jnp.ones((256, 768), jnp.float32)
    mm = jax.jit(lambda x, a: (x @ a) @ a.T)
    mm(x, a).block_until_ready()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            mm(x, a).block_until_ready()
    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()


def _op_overhead(m: ModelConfig, repeats: int) -> float:
    """Seconds of one small device op end to end (dispatch, wake-up, block) while pages
    stream (on a host-backed device both share the cores): a pre-attention-sized GEMM of
    8 rows, minus its own memory-roofline time."""
    import jax
    import jax.numpy as jnp

    h = m.hidden_size
    w = jnp.ones((h, 2 * h), jnp.float32)
    x = jnp.ones((8, h), jnp.float32)
    op = jax.jit(lambda x, w: jnp.tanh(x @ w))
    op(x, w).block_until_ready()

    def many():
        for _ in range(50):
            op(x, w).block_until_ready()
    t = _median_s(lambda: _under_load(many) if jax.default_backend() == "cpu" else many(),
                  repeats) / 50
    return max(t - w.nbytes / 20e9, 0.0)


def _read_rates(read_bytes: int, repeats: int):
    """(device read bytes/s, host read bytes/s): jitted sum on the device, NumPy sum."""
    import jax
    import jax.numpy as jnp

    host = np.ones(read_bytes // 4, np.float32)
    host_rate = read_bytes / _median_s(lambda: host.sum(), repeats)
    x = jax.device_put(host)
    total = jax.jit(jnp.sum)
    dev_rate = read_bytes / _median_s(lambda: total(x).block_until_ready(), repeats)
    return dev_rate, host_rate


def _host_flops(repeats: int, n: int = 1024) -> float:
    a = np.ones((n, n), np.float32)
    return 2 * n**3 / _median_s(lambda: a @ a, repeats)


def _memory_sizes():
    import jax

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    return float(stats.get("bytes_limit", host)), float(host)


def calibrate(model: ModelConfig | str = "mixtral_4l_1024", *,
              token_counts=(8, 16, 32, 64, 128, 512), copy_bytes: int = 1 << 30,
              read_bytes: int = 1 << 30, attention_batch: int = 64,
              attention_context: int = 512, repeats: int = 3, path: str | None = None,
              save: bool = True) -> HardwareSpec:
    """Measure this machine and return its `local` HardwareSpec; with `save`, write it to
    `path` (default `hardware.calibration_path()`) as {"spec": …, "meta": …}."""
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
    import jax

    start = time.perf_counter()
    intercept, slope, gemm_peak, points = _gemm_line(m, counts, repeats)
    dev_read, host_read = _read_rates(read_bytes, repeats)
    h2d, d2h, latency = _link(copy_bytes, repeats)
    attn = _cpu_attention_rate(m, attention_batch, attention_context, repeats)
    overhead = _op_overhead(m, repeats)
    gpu_mem, host_mem = _memory_sizes()
    on_host = jax.default_backend() == "cpu"
    host_flops = _host_flops(repeats)
    if on_host:  # the "GPU" is these cores: XLA's GEMM rate is a host rate too
        host_flops = max(host_flops, gemm_peak)
    spec = HardwareSpec(
        name="local", gpu_fp16_flops_per_s=gemm_peak, gpu_fp32_flops_per_s=gemm_peak,
        gpu_memory_bytes=gpu_mem, gpu_memory_bytes_per_s=dev_read,
        cpu_flops_per_s=host_flops, host_memory_bytes=host_mem,
        host_memory_bytes_per_s=host_read, h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h,
        cpu_cores=os.cpu_count() or 1, link_latency_s=latency,
        device_is_host=on_host, gemm_intercept_s=intercept,
        gemm_flops_per_s=6 * m.hidden_size * m.expert_ffn_size / slope,  # per row
        cpu_attention_bytes_per_s=attn, device_op_overhead_s=overhead,
        source=f"moejax.schedule.calibrate() on {jax.devices()[0].device_kind}, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    if save:
        path = os.path.expanduser(path) if path else calibration_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = dict(model=m.name, dtype=m.dtype, gemm_points=points, copy_bytes=copy_bytes,
                    read_bytes=read_bytes, jax=jax.__version__,
                    seconds=time.perf_counter() - start)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"spec": spec.to_json(), "meta": meta}, f, indent=1)
        os.replace(tmp, path)
    return spec
