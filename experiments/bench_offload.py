"""Micro-benchmarks of the host-offload data plane (issue 3), as side-by-side ratios.

    python -m experiments.bench_offload [--layer_mib 192] [--page_mib 1,4,16,64]
        [--batches 64,256,1024] [--contexts 128,512,2048] [--output_json PATH]

(a) Page streaming: one MoE layer's experts (--layer_mib) go host -> device through
    `HostWeightStore.prefetch` + `wait` (device_put per page + in-place copy into the
    slot) at each page size and host memory kind, vs one `jax.device_put` of the same
    bytes and vs a host memcpy into a preallocated buffer; "puts only" is the page
    device_puts without the copy into the slot.
(b) CPU decode attention (`HostKVCache.decode_host`, one layer, every row at the given
    context) in KV bytes read per second, vs a pure read of the same K/V slabs with the
    same thread pool (the host's read bandwidth for exactly these bytes), and vs the same
    attention jitted on the device (`ops.decode_attention`, the reference engine path).
(c) --paged: instead of (a) and (b), the paged cache (`PagedKVCache.decode_host`, blocks
    of --block_tokens, each sequence reserved its context + --paged_headroom tokens, so
    tables have gaps as under continuous batching) at every batch × context, with every
    row at the context ("uniform") and with contexts drawn in [ctx/2, 3·ctx/2]
    ("ragged"); as a fraction of the host's read bandwidth (a pure read of as many pool
    bytes, same threads), next to the contiguous kernel on the same rows. JSON to
    --paged_json.
Every figure is the best of --repeats runs; ratios are taken within one process.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from moejax import ops
from moejax.host_offload import CPUAttention, HostKVCache, HostWeightStore, PagedKVCache
from moejax.host_offload.memory import (available_host_bytes, device_sharding,
                                        has_pinned_host, host_pool, host_threads)
from moejax.model_config.hardware import fmt_bytes
from moejax.model_config.model import ModelConfig, model_names
from experiments.cli import fail, no_extra_args, output_flag, quiet_logs, run

FLAGS = flags.FLAGS
flags.DEFINE_integer("layer_mib", 192, "expert bytes of the streamed layer, MiB",
                     lower_bound=1)
flags.DEFINE_list("page_mib", ["1", "4", "16", "64"], "page sizes to stream, MiB")
flags.DEFINE_list("batches", ["64", "256", "1024"], "decode batch sizes")
flags.DEFINE_list("contexts", ["128", "512", "2048"], "decode context lengths")
flags.DEFINE_integer("max_kv_mib", 1024, "skip (batch, context) whose KV exceeds this",
                     lower_bound=1)
flags.DEFINE_integer("repeats", 3, "runs per figure (best is kept)", lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/bench_offload_cpu.json",
                    "JSON out ('' to skip)")
output_flag("output_json", ".json", allow_empty=True)
flags.DEFINE_bool("paged", False, "run only (c), the paged-cache attention table")
flags.DEFINE_list("block_tokens", ["128"], "(c): block sizes, tokens")
flags.DEFINE_integer("paged_headroom", 128, "(c): tokens reserved past each context",
                     lower_bound=0)
flags.DEFINE_string("paged_json", "experiments/results/bench_offload_paged_cpu.json",
                    "(c): JSON out ('' to skip)")
output_flag("paged_json", ".json", allow_empty=True)


MiB = 2**20


def _positive_numbers(values, integer: bool) -> bool:
    """Integers ≥ 1, or finite MiB sizes of at least one float32 element (4 bytes)."""
    try:
        nums = [int(v) if integer else float(v) for v in values]
    except ValueError:
        return False
    return bool(nums) and all(n >= 1 if integer else math.isfinite(n)
                              and int(n * MiB) // 4 * 4 >= 4 for n in nums)


for _name, _int in (("page_mib", False), ("batches", True), ("contexts", True),
                    ("block_tokens", True)):
    flags.register_validator(_name, lambda v, i=_int: _positive_numbers(v, i),
                             message="must be a comma-separated list of positive "
                             + ("integers" if _int else "finite numbers of at least 4 "
                                "bytes"))

GB = 1e9


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, first-touch of memory)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


# ------------------------------------------------------------ (a) page streaming
def stream_config(layer_bytes: int) -> ModelConfig:
    """A float32 config whose MoE layer holds ~layer_bytes of experts (E=8, h=1024)."""
    f = max(8, layer_bytes // (3 * 8 * 1024 * 4))
    return ModelConfig(name="bench_stream", family="mixtral", vocab_size=128,
                       hidden_size=1024, expert_ffn_size=f, num_layers=3, num_heads=8,
                       num_kv_heads=2, head_dim=128, num_experts=8, top_k=2,
                       dtype="float32")


def streaming_store(cfg, page_bytes: int, host_memory: str, tensors) -> HostWeightStore:
    store = HostWeightStore(cfg, gpu_weight_fraction=0.0, page_bytes=page_bytes,
                            host_memory=host_memory)
    for i in range(cfg.num_layers):
        for name, a in tensors.items():
            store.place((f"layers_{i}", "experts", name), a)
    return store


def bench_streaming(repeats: int) -> dict:
    cfg = stream_config(FLAGS.layer_mib * MiB)
    w = cfg.expert_bytes_per_layer()
    rng = np.random.default_rng(0)
    shapes = dict(zip(("w1", "w3", "w2"), [(8, 1024, cfg.expert_ffn_size)] * 2
                      + [(8, cfg.expert_ffn_size, 1024)]))
    tensors = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
    flat = np.concatenate([a.reshape(-1) for a in tensors.values()])
    dst = np.empty_like(flat)
    dev = jax.devices()[0]
    kinds = ["pinned_host", "numpy"] if has_pinned_host(dev) else ["numpy"]
    out = {"layer_bytes": w, "host_kinds": kinds}
    out["memcpy_GBps"] = w / best_time(lambda: np.copyto(dst, flat), repeats) / GB
    for kind in kinds:
        src = jax.device_put(flat, jax.sharding.SingleDeviceSharding(
            dev, memory_kind="pinned_host")) if kind == "pinned_host" else flat
        out[f"one_device_put_{kind}_GBps"] = w / best_time(
            lambda: jax.device_put(src, device_sharding(dev)).block_until_ready(),
            repeats) / GB
        del src
    rows = []
    for mib in map(float, FLAGS.page_mib):
        for kind in kinds:
            store = streaming_store(cfg, int(mib * MiB) // 4 * 4, kind, tensors)
            layer = iter(range(10**9))

            def one_layer():
                i = next(layer) % cfg.num_layers
                store.prefetch(i)
                jax.block_until_ready(store.wait(i))  # wait() itself does not block
                store.release(i)

            t = best_time(one_layer, repeats)
            pages = store._host[0]
            t_put = best_time(lambda: jax.block_until_ready(
                [jax.device_put(p, device_sharding(dev)) for p in pages]), repeats)
            rows.append({"page_mib": mib, "host_memory": kind, "pages": store.num_pages(0),
                         "GBps": w / t / GB, "puts_only_GBps": w / t_put / GB,
                         "vs_one_device_put": w / t / GB / out[f"one_device_put_{kind}_GBps"],
                         "vs_memcpy": w / t / GB / out["memcpy_GBps"]})
            del store
    out["pages"] = rows
    return out


# ------------------------------------------------------------ (b) CPU attention
flags.DEFINE_enum("attn_model", "mixtral_4l_1024", model_names(),
                  "preset whose heads attention uses")


def pure_read(kv: HostKVCache, attention: CPUAttention) -> float:
    """Seconds for the pool to read every byte of layer 0's K and V slabs (np.max)."""
    k, v = kv.k[0], kv.v[0]

    def read(c):
        return float(k[c].max()) + float(v[c].max())

    t = time.perf_counter()
    attention.map(read, attention.chunks(kv.batch_size, 2 * k[0].nbytes))
    return time.perf_counter() - t


def device_attention_s(cfg, b: int, s: int, q, k, v, repeats: int) -> float:
    shape = (b, s, cfg.num_kv_heads, cfg.head_dim)
    caches = [jnp.full(shape, 0.01, jnp.float32), jnp.full(shape, 0.01, jnp.float32)]
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    pos = jnp.full((b,), s - 1, jnp.int32)

    def step():
        o, caches[0], caches[1] = ops.decode_attention(caches[0], caches[1], q, k, v, pos)
        o.block_until_ready()

    t = best_time(step, repeats)
    del caches
    return t


def _attention_setup():
    """(one-layer float32 --attn_model config, CPUAttention, rng) of the attention rows."""
    from moejax.model_config.model import get_model

    cfg = get_model(FLAGS.attn_model).replace(num_layers=1, dtype="float32",
                                              max_positions=1 << 20)
    return cfg, CPUAttention(), np.random.default_rng(0)


def bench_attention(repeats: int) -> dict:
    cfg, attention, rng = _attention_setup()
    rows = []
    for b in map(int, FLAGS.batches):
        for s in map(int, FLAGS.contexts):
            kv_bytes = b * s * cfg.kv_bytes_per_token_per_layer(4)
            if kv_bytes > FLAGS.max_kv_mib * MiB:
                rows.append({"batch": b, "context": s, "kv_bytes": kv_bytes,
                             "skipped": f"KV > --max_kv_mib={FLAGS.max_kv_mib}"})
                continue
            kv = HostKVCache(cfg, b, s, attention=attention)
            kv.k[0][...] = 0.01
            kv.v[0][...] = 0.01
            q = rng.standard_normal((b, 1, cfg.num_heads, cfg.head_dim), np.float32)
            kn = rng.standard_normal((b, 1, cfg.num_kv_heads, cfg.head_dim), np.float32)
            vn = rng.standard_normal((b, 1, cfg.num_kv_heads, cfg.head_dim), np.float32)
            pos = np.full(b, s - 1)
            t_cpu = best_time(lambda: kv.decode_host(0, slice(0, b), q, kn, vn, pos),
                              repeats)
            t_read = best_time(lambda: pure_read(kv, attention), repeats)
            del kv
            t_dev = device_attention_s(cfg, b, s, q, kn, vn, repeats)
            rows.append({"batch": b, "context": s, "kv_bytes": kv_bytes,
                         "cpu_attn_GBps": kv_bytes / t_cpu / GB,
                         "host_read_GBps": kv_bytes / t_read / GB,
                         "device_attn_GBps": kv_bytes / t_dev / GB,
                         "cpu_vs_read": t_read / t_cpu, "cpu_vs_device": t_dev / t_cpu})
    return {"model": FLAGS.attn_model, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "kv_dtype": "float32", "threads": attention.num_threads, "rows": rows}


# ------------------------------------------------------------ (c) paged attention
def pool_read_s(kv: PagedKVCache, nbytes: int, attention: CPUAttention) -> float:
    """Seconds for the pool to read the first nbytes of layer 0's K and V blocks."""
    n = max(1, nbytes // (2 * kv.k[0][0].nbytes))
    k, v = kv.k[0][:n], kv.v[0][:n]

    def read(c):
        return float(k[c].max()) + float(v[c].max())

    t = time.perf_counter()
    attention.map(read, attention.chunks(n, 2 * k[0].nbytes))
    return time.perf_counter() - t


def paged_cell(cfg, attention, b: int, lens: np.ndarray, bt: int, rng, repeats: int):
    """One row of (c): paged and contiguous decode over rows of `lens` tokens."""
    per_token = cfg.kv_bytes_per_token_per_layer(4)
    kv_bytes = int(lens.sum()) * per_token
    q = rng.standard_normal((b, 1, cfg.num_heads, cfg.head_dim), np.float32)
    kn = rng.standard_normal((b, 1, cfg.num_kv_heads, cfg.head_dim), np.float32)
    reserve = lens + FLAGS.paged_headroom
    kv = PagedKVCache(cfg, int((-(-reserve // bt)).sum()) * bt, bt, attention=attention)
    for i in rng.permutation(b):  # pool order differs from batch order
        kv.reserve(int(i), int(reserve[i]))
    kv.k[0][...] = 0.01
    kv.v[0][...] = 0.01
    seqs = list(range(b))
    t_paged = best_time(lambda: kv.decode_host(0, seqs, q, kn, kn, lens - 1), repeats)
    t_read = best_time(lambda: pool_read_s(kv, kv_bytes, attention), repeats)
    del kv
    hk = HostKVCache(cfg, b, int(lens.max()), attention=attention)
    hk.k[0][...] = 0.01
    hk.v[0][...] = 0.01
    t_contig = best_time(lambda: hk.decode_host(0, slice(0, b), q, kn, kn, lens - 1),
                         repeats)
    del hk
    return {"kv_bytes": kv_bytes, "paged_GBps": kv_bytes / t_paged / GB,
            "contiguous_GBps": kv_bytes / t_contig / GB,
            "host_read_GBps": kv_bytes / t_read / GB,
            "paged_vs_read": t_read / t_paged, "contiguous_vs_read": t_read / t_contig}


def bench_paged(repeats: int) -> dict:
    cfg, attention, rng = _attention_setup()
    rows = []
    for bt in map(int, FLAGS.block_tokens):
        for b in map(int, FLAGS.batches):
            for s in map(int, FLAGS.contexts):
                for kind in ("uniform", "ragged"):
                    lens = np.full(b, s) if kind == "uniform" else \
                        rng.integers(max(1, s // 2), s * 3 // 2 + 1, b)
                    row = {"block_tokens": bt, "batch": b, "context": s, "lengths": kind}
                    kv_bytes = int(lens.sum()) * cfg.kv_bytes_per_token_per_layer(4)
                    if kv_bytes > FLAGS.max_kv_mib * MiB:
                        rows.append({**row, "kv_bytes": kv_bytes,
                                     "skipped": f"KV > --max_kv_mib={FLAGS.max_kv_mib}"})
                        continue
                    rows.append({**row, **paged_cell(cfg, attention, b, lens, bt, rng,
                                                     repeats)})
                    print(_paged_line(rows[-1]), flush=True)
    return {"model": FLAGS.attn_model, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "kv_dtype": "float32", "threads": attention.num_threads,
            "headroom_tokens": FLAGS.paged_headroom, "rows": rows}


PAGED_HEADER = (f"{'block':>5} {'batch':>6} {'ctx':>5} {'lengths':>8} {'KV MiB':>7} "
                f"{'paged':>7} {'contig':>7} {'read':>7} {'paged/read':>10} "
                f"{'contig/read':>11}")


def _paged_line(r: dict) -> str:
    head = (f"{r['block_tokens']:>5} {r['batch']:>6} {r['context']:>5} {r['lengths']:>8} "
            f"{r['kv_bytes'] / MiB:>7.0f}")
    if "skipped" in r:
        return f"{head}   skipped: {r['skipped']}"
    return (f"{head} {r['paged_GBps']:>7.2f} {r['contiguous_GBps']:>7.2f} "
            f"{r['host_read_GBps']:>7.2f} {r['paged_vs_read']:>10.0%} "
            f"{r['contiguous_vs_read']:>11.0%}")


def print_paged(a: dict) -> None:
    print(f"\n(c) paged decode attention, {a['model']} heads {a['num_heads']}/"
          f"{a['num_kv_heads']} d {a['head_dim']}, {a['kv_dtype']} KV, {a['threads']} "
          f"host threads, +{a['headroom_tokens']} reserved tokens a row (KV GB/s)")
    print(PAGED_HEADER)
    for r in a["rows"]:
        print(_paged_line(r))


# ------------------------------------------------------------------- report
def print_tables(res: dict) -> None:
    s = res["streaming"]
    print(f"\n(a) page streaming of one {s['layer_bytes'] / MiB:.0f} MiB layer   host memcpy "
          f"{s['memcpy_GBps']:.2f} GB/s   " + "   ".join(
              f"one device_put from {k} {s[f'one_device_put_{k}_GBps']:.2f} GB/s"
              for k in s["host_kinds"]))
    print(f"{'page MiB':>9} {'host':>12} {'pages':>6} {'GB/s':>7} {'vs 1 put':>9} "
          f"{'vs memcpy':>9} {'puts only':>9}")
    for r in s["pages"]:
        print(f"{r['page_mib']:>9g} {r['host_memory']:>12} {r['pages']:>6} {r['GBps']:>7.2f} "
              f"{r['vs_one_device_put']:>8.0%} {r['vs_memcpy']:>9.0%} "
              f"{r['puts_only_GBps']:>9.2f}")
    a = res["attention"]
    print(f"\n(b) decode attention, {a['model']} heads {a['num_heads']}/{a['num_kv_heads']} "
          f"d {a['head_dim']}, {a['kv_dtype']} KV, {a['threads']} host threads (KV GB/s)")
    print(f"{'batch':>6} {'ctx':>5} {'KV MiB':>7} {'CPU attn':>9} {'host read':>9} "
          f"{'CPU/read':>8} {'device attn':>11} {'CPU/dev':>8}")
    for r in a["rows"]:
        head = f"{r['batch']:>6} {r['context']:>5} {r['kv_bytes'] / MiB:>7.0f}"
        if "skipped" in r:
            print(f"{head}   skipped: {r['skipped']}")
            continue
        print(f"{head} {r['cpu_attn_GBps']:>9.2f} {r['host_read_GBps']:>9.2f} "
              f"{r['cpu_vs_read']:>8.0%} {r['device_attn_GBps']:>11.2f} "
              f"{r['cpu_vs_device']:>7.1f}x")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


# Host copies of the streamed layer alive at once: the three tensors, their flat copy,
# the memcpy target, a device copy (host memory on XLA:CPU), a pinned copy, two slots.
LAYER_COPIES = 7


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    need, avail = LAYER_COPIES * FLAGS.layer_mib * MiB, available_host_bytes()
    if avail is not None and need > avail:
        fail(f"--layer_mib={FLAGS.layer_mib}: the streaming benchmark holds ~"
             f"{LAYER_COPIES} copies of the layer ({fmt_bytes(need)}); "
             f"{fmt_bytes(avail)} of host memory is available")
    t = time.perf_counter()
    res = {"machine": {"platform": platform.platform(), "processor": cpu_model(),
                       "host_threads": host_threads(), "jax": jax.__version__,
                       "device": str(jax.devices()[0]),
                       "pinned_host": has_pinned_host(jax.devices()[0]),
                       "loadavg_1m_at_start": os.getloadavg()[0]},
           "command": "python -m experiments.bench_offload " + " ".join(
               f"--{k}={','.join(v) if isinstance(v, list) else v}"
               for k, v in FLAGS.flag_values_dict().items()
               if k in ("layer_mib", "page_mib", "batches", "contexts", "max_kv_mib",
                        "repeats", "attn_model", "paged", "block_tokens",
                        "paged_headroom"))}
    host_pool(host_threads())  # start the pool outside any timing
    if FLAGS.paged:
        return paged_main(res, t)
    res["streaming"] = bench_streaming(FLAGS.repeats)
    res["attention"] = bench_attention(FLAGS.repeats)
    res["wall_s"] = time.perf_counter() - t
    print_tables(res)
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {FLAGS.output_json} ({res['wall_s']:.0f} s)")


def paged_main(res: dict, t0: float) -> None:
    print(PAGED_HEADER)
    res["paged_attention"] = bench_paged(FLAGS.repeats)
    res["wall_s"] = time.perf_counter() - t0
    print_paged(res["paged_attention"])
    if FLAGS.paged_json:
        os.makedirs(os.path.dirname(FLAGS.paged_json) or ".", exist_ok=True)
        with open(FLAGS.paged_json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {FLAGS.paged_json} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    run(main)
