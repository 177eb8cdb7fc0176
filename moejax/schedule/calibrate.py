"""Calibration of the `local` HardwareSpec by microbenchmarks (DESIGN.md §4-§5, MoE-Lens).

The "GPU" is JAX's default device (the CPU on the testbed), the link is `jax.device_put`
host → device and device → pinned host, host memory is NumPy. Measured:

* device GEMM time of one expert's SwiGLU FFN vs tokens, fitted by a line
  t(tokens) = intercept + slope·tokens → `gemm_intercept_s`, `gemm_flops_per_s` = 6·h·f /
  slope (the rate `costs.device_compute_s` then uses);
* device memory read bandwidth (a jitted reduction) and host read bandwidth (NumPy);
* h2d bandwidth by page size (`h2d_curve`: 4, 16 and 64 MiB pages, `copy_bytes` of each,
  ≥ 1 GB by default), d2h bandwidth and the latency of a tiny transfer — each alone: on
  the testbed the model itself shares the cores between copies and compute;
* where the device is the host's own CPU, the cores a page copy takes from compute
  running beside it (`copy_core_demand`: a decode FFN and page copies alone, then
  together);
* in situ, from a short serial run of the real engine on a 2-layer copy of the model:
  the fixed cost of one device op as the executor sees it (`device_op_overhead_s`) and
  the rate the weight store really gets from the link (scales the `h2d_curve`);
* CPU decode attention through `HostKVCache.decode_host` → a fixed cost per call and
  `cpu_attention_bytes_per_s`; host matmul FLOP/s (NumPy, or the device GEMM rate when
  the device is the host's own CPU) → `cpu_flops_per_s`.

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
from moejax.schedule import costs
from moejax.schedule.policy import DEFAULT_PAGE_BYTES


def _median_s(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (compilation, page faults)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _random_experts(m: ModelConfig, seed: int):
    """(w1, w3, w2, key): one layer's E random experts on the default device, and a key
    for the inputs."""
    import jax
    import jax.numpy as jnp

    h, f, e, dt = m.hidden_size, m.expert_ffn_size, m.num_experts, jnp.dtype(m.dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    w1 = (jax.random.normal(keys[0], (e, h, f)) * h**-0.5).astype(dt)
    w3 = (jax.random.normal(keys[1], (e, h, f)) * h**-0.5).astype(dt)
    w2 = (jax.random.normal(keys[2], (e, f, h)) * f**-0.5).astype(dt)
    return w1, w3, w2, keys[3]


def _pinned_sharding(dev):
    """The device's pinned_host sharding, or None where the backend has no such kind."""
    from jax.sharding import SingleDeviceSharding

    try:
        return SingleDeviceSharding(dev, memory_kind="pinned_host")
    except Exception:
        return None


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
    w1, w3, w2, key = _random_experts(m, 0)
    run = jax.jit(moe_ffn, static_argnames="capacity")
    points = []
    for t in token_counts:
        n = t * e  # one choice per token, t rows for every expert
        x = jax.random.normal(key, (n, h)).astype(dt)
        ids = (jnp.arange(n, dtype=jnp.int32) % e)[:, None]
        wts = jnp.ones((n, 1), jnp.float32)
        cap = t if t < SORTED_MIN_ROWS_PER_EXPERT else None
        points.append((n, _median_s(lambda: run(x, wts, ids, w1, w3, w2, capacity=cap)
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


def _cpu_attention_line(m: ModelConfig, batch: int, context: int, repeats: int):
    """(fixed s per call, bytes/s) of the host's decode attention as the schedule runs
    it (`HostKVCache.decode_host`: write the new k, v, attend over the cache), fitted
    through a tiny call (4 rows over 16 keys) and a big one (`batch` rows over
    `context`), with bytes counted as `costs.cpu_attention_s` counts them."""
    from moejax.host_offload.kv_cache import HostKVCache

    points = []
    for b, c in ((4, 16), (batch, context)):
        cache = HostKVCache(m, b, c + 1)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, 1, m.num_heads, m.head_dim)).astype(np.float32)
        kv = rng.standard_normal((b, 1, m.num_kv_heads, m.head_dim)).astype(np.float32)
        pos = np.full(b, c)
        sec = _median_s(lambda: cache.decode_host(0, slice(0, b), q, kv, kv, pos), repeats)
        nbytes = costs.kv_bytes(m, b * (c + 1)) + costs.qkv_bytes(m, b) \
            + costs.attn_out_bytes(m, b)
        points.append((nbytes, sec))
        del cache
    (b0, t0), (b1, t1) = sorted(points)
    if not (b1 > b0 and t1 > t0):  # tiny sizes, noise: no line, the best plain rate
        return 0.0, float(b1 / t1)
    rate = (b1 - b0) / (t1 - t0)
    return max(t0 - b0 / rate, 0.0), float(rate)


def _h2d_curve(copy_bytes: int, repeats: int, sizes=None):
    """((transfer bytes, bytes/s), …): pages of each size streamed as the weight store
    streams them (a `device_put` from pinned host memory written into a preallocated
    device slot), `copy_bytes` in all per size, measured alone (`predict` and `simulate`
    model the sharing of cores with compute themselves)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from moejax.host_offload.weight_store import _write
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES

    dev = jax.devices()[0]
    on_dev = SingleDeviceSharding(dev, memory_kind="device")
    pinned = _pinned_sharding(dev)  # None: stream from NumPy
    sizes = sizes or (DEFAULT_PAGE_BYTES // 4, DEFAULT_PAGE_BYTES, 4 * DEFAULT_PAGE_BYTES)
    host = np.ones(max(copy_bytes, max(sizes)) // 4, np.float32)
    curve = []
    for size in sorted({min(int(s), host.nbytes) // 4 * 4 for s in sizes}):
        page = size // 4
        pages = [host[i:i + page] for i in range(0, host.size - page + 1, page)]
        if pinned is not None:
            pages = [jax.device_put(p, pinned) for p in pages]
        slot = jax.numpy.zeros(page * len(pages), np.float32, device=dev)

        def stream():
            nonlocal slot
            for k, p in enumerate(pages):
                slot = _write(slot, jax.device_put(p, on_dev), np.int32(k * page))
            slot.block_until_ready()
        curve.append((float(size), page * len(pages) * 4 / _median_s(stream, repeats)))
        del pages, slot
    return tuple(curve)


def _link(copy_bytes: int, repeats: int):
    """(h2d curve, d2h bytes/s, latency s) of jax.device_put to/from the default device."""
    import jax
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    curve = _h2d_curve(copy_bytes, repeats)
    x = jax.device_put(np.ones(copy_bytes // 4, np.float32), dev)
    try:
        pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
        d2h_fn = lambda: jax.device_put(x, pinned).block_until_ready()
        d2h_fn()
    except Exception:  # backends without a pinned_host memory kind
        d2h_fn = lambda: np.array(x, copy=True)
    d2h = copy_bytes / _median_s(d2h_fn, repeats)
    tiny = np.ones(1024, np.float32)
    lat = _median_s(lambda: jax.device_put(tiny, dev).block_until_ready(), 5 * repeats)
    return curve, d2h, lat


def _copy_core_demand(m: ModelConfig, repeats: int, pages: int = 192) -> float:
    """Host cores one page copy takes from device compute beside it, where the device is
    the host's CPU (`costs.core_demand`): a memcpy runs on one core but contends for
    memory bandwidth, so it can cost compute more. A decode-sized expert FFN (`moe_ffn`,
    4 rows per expert) runs alone for t_g, `pages` 4 MiB pages stream alone (the store's
    write path) for t_c, then both at once (the copies on a thread, as the executor's
    h2d lane) for a makespan t_b. With compute demanding every core C and a copy d,
    processor sharing gives t_b = t_g + t_c·d/C, so d = C·(t_b − t_g)/t_c; t_g ≈ 3·t_c,
    so the copy overlaps compute throughout. Median of 3·`repeats` alternating trials
    (the machine's memory bandwidth varies; one trial can be off by 50 %)."""
    import threading

    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from moejax.host_offload.weight_store import _write
    from moejax.layers.experts import moe_ffn

    h, e, dt = m.hidden_size, m.num_experts, jnp.dtype(m.dtype)
    w1, w3, w2, key = _random_experts(m, 1)
    x = jax.random.normal(key, (4 * e, h)).astype(dt)
    ids = (jnp.arange(4 * e, dtype=jnp.int32) % e)[:, None]
    wts = jnp.ones((4 * e, 1), jnp.float32)
    ffn = jax.jit(moe_ffn, static_argnames="capacity")
    dev = jax.devices()[0]
    page, ring = DEFAULT_PAGE_BYTES // 16, 8  # float32 elements of a 4 MiB page; slots
    src, pinned = np.ones(page, np.float32), _pinned_sharding(dev)
    if pinned is not None:  # else stream from NumPy
        src = jax.device_put(src, pinned)
    on_dev = SingleDeviceSharding(dev, memory_kind="device")
    slot = jnp.zeros(page * ring, np.float32, device=dev)

    def copies():
        nonlocal slot
        for k in range(pages):
            slot = _write(slot, jax.device_put(src, on_dev), np.int32(k % ring * page))
        slot.block_until_ready()

    one = _median_s(lambda: ffn(x, wts, ids, w1, w3, w2, capacity=4).block_until_ready(),
                    repeats)
    reps = max(3, int(np.ceil(3 * _median_s(copies, repeats) / one)))

    def compute():
        for _ in range(reps):
            ffn(x, wts, ids, w1, w3, w2, capacity=4).block_until_ready()

    def together():
        th = threading.Thread(target=copies)
        th.start()
        compute()
        th.join()
    cores, demands = os.cpu_count() or 1, []
    for _ in range(3 * repeats):
        t_g, t_c, t_b = (_median_s(fn, 1) for fn in (compute, copies, together))
        demands.append(cores * (t_b - t_g) / t_c)
    return float(np.clip(statistics.median(demands), 0.1, 2 * cores))


def _executor_probe(m: ModelConfig, spec: HardwareSpec, repeats: int):
    """In situ: (device op overhead s, h2d rate scale) from a short serial run of the
    real engine on a 2-layer, random-weight copy of `m` streaming every expert in
    4 MiB pages. The overhead is what a decode pre-attention takes beyond its roofline
    price (Python dispatch, parameter plumbing, the block the executor waits on); the
    scale is priced / measured page time (the link as the store really drives it)."""
    import moejax
    from moejax.model import MoEModel
    from moejax.schedule.policy import Policy

    cfg = m.replace(name=f"{m.name}_probe", num_layers=2,
                    dense_layers=tuple(i for i in m.dense_layers if i < 2))
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.0, attention_device="cpu",
                                    kv_cache_device="cpu", page_bytes=DEFAULT_PAGE_BYTES // 4,
                                    overlap=False)
    engine = moejax.Engine(MoEModel.random(cfg, seed=0), policy=pol)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 16)).tolist()
    over, paged, priced = [], 0.0, 0.0
    for i in range(repeats + 1):  # the first run compiles
        engine.generate(prompts, 4)
        run = engine.last_run
        if i == 0:
            continue
        dur = run.trace.end_s - run.trace.start_s
        for e in run.entries:
            if e.op == "pre_attn" and e.stage == "decode":
                over.append(dur[e.id] - costs.gpu_pre_attention_s(cfg, spec, e.tokens))
            elif e.op == "page":
                paged, priced = paged + dur[e.id], priced + costs.h2d_s(spec, e.nbytes)
    return max(float(np.median(over)), 0.0), float(priced / paged)


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
              token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 512), copy_bytes: int = 1 << 30,
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
    on_host = jax.default_backend() == "cpu"
    # first: measured after the 1 GB buffers below, it read 3.2-4 cores instead of
    # 1.8-3 (cause not found; the engines' runs match the lower figures better)
    copy_demand = _copy_core_demand(m, repeats, min(
        192, max(16, copy_bytes // (DEFAULT_PAGE_BYTES // 4)))) if on_host else 1.0
    intercept, slope, gemm_peak, points = _gemm_line(m, counts, repeats)
    dev_read, host_read = _read_rates(read_bytes, repeats)
    curve, d2h, latency = _link(copy_bytes, repeats)
    attn_call, attn = _cpu_attention_line(m, attention_batch, attention_context, repeats)
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
        device_op_overhead_s=0.0, copy_core_demand=copy_demand,
        source=f"moejax.schedule.calibrate() on {jax.devices()[0].device_kind}, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    overhead, scale = _executor_probe(m, spec, repeats)
    curve = tuple((size, rate * scale) for size, rate in curve)
    spec = spec.replace(device_op_overhead_s=overhead, h2d_curve=curve)
    spec = spec.replace(h2d_bytes_per_s=float(costs.h2d_rate(spec, DEFAULT_PAGE_BYTES)))
    if save:
        path = os.path.expanduser(path) if path else calibration_path()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = dict(model=m.name, dtype=m.dtype, gemm_points=points, copy_bytes=copy_bytes,
                    read_bytes=read_bytes, jax=jax.__version__, h2d_in_situ_scale=scale,
                    seconds=time.perf_counter() - start)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"spec": spec.to_json(), "meta": meta}, f, indent=1)
        os.replace(tmp, path)
    return spec
