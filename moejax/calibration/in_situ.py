"""In-situ probes (docs/design.md §5): short runs of the real Engine on a 2-layer random
copy of the model, for figures only its data plane shows (store link rate per page size,
device-op fixed cost, `copy_core_demand`)."""

from __future__ import annotations

import logging

import numpy as np

from moejax.engine import Engine
from moejax.model import MoEModel
from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.schedule import costs
from moejax.schedule.policy import Policy
from moejax.schedule.simulate import simulate

PAGE_RATE_RUNS_PER_REPEAT = 2  # probe runs per calibration repeat, for each page size
def _probe_config(m: ModelConfig) -> ModelConfig:
    """A 2-layer copy of `m` for the in-situ runs of the real engine."""
    dense = tuple(i for i in m.dense_layers if i < 2)
    return m.replace(name=f"{m.name}_probe", num_layers=2,  # ≥ 1 MoE layer to stream
                     dense_layers=dense if len(dense) < 2 else ())


def overlapped_runs(model, repeats: int):
    """`repeats` overlapped `RunRecord`s on the probe `model`: 32 × 32-token prompts, one
    micro-batch, 16 new tokens, CPU attention, experts in `COPY_DEMAND_PAGE_BYTES` pages."""
    pol = Policy.from_micro_batches(32, 1, gpu_weight_fraction=0.0, attention_device="cpu",
                                    kv_cache_device="cpu",
                                    page_bytes=costs.COPY_DEMAND_PAGE_BYTES, overlap=True)
    engine = Engine(model, policy=pol)
    prompts = np.random.default_rng(0).integers(1, model.config.vocab_size,
                                                (32, 32)).tolist()
    runs = []
    for i in range(repeats + 1):  # the first run compiles
        engine.generate(prompts, 16, batching="static")
        runs += [engine.last_run] if i else []
    return runs


def fit_copy_core_demand(m: ModelConfig, spec: HardwareSpec, runs) -> float:
    """`copy_core_demand` c [cores] (§5): median over `runs` of the c ∈ [0.1, 2·cores] at
    which `simulate` matches the run's decode_s (bisection; time grows with c). Decode
    only: a 2-layer prefill is mostly pipeline fill."""
    cfg = _probe_config(m)

    def fit(run):
        lo, hi = 0.1, 2.0 * spec.cpu_cores
        for _ in range(20):
            d = (lo + hi) / 2
            sim = simulate(run.entries, cfg, spec.replace(copy_core_demand=d), run.policy,
                           imbalance=run.imbalance)
            lo, hi = (d, hi) if sim.stage_s(run.entries, "decode") < run.decode_s \
                else (lo, d)
        return (lo + hi) / 2
    d = float(np.median([fit(r) for r in runs]))
    if not 0.1 * 1.01 < d < 2.0 * spec.cpu_cores * 0.99:
        logging.warning("copy_core_demand fit %.3g sits at its bound [0.1, %g]: the "
                        "overlapped runs did not bracket it", d, 2.0 * spec.cpu_cores)
    return d


def _probe_engine(model, page_bytes: int):
    """Serial probe Engine: 4 × 2 sequences, `page_bytes` expert pages, CPU attention."""
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.0, attention_device="cpu",
                                    kv_cache_device="cpu", page_bytes=int(page_bytes),
                                    overlap=False)
    return Engine(model, policy=pol)


def _page_rate(run, page_bytes: int, latency_s: float) -> float:
    """Link rate [bytes/s] one run's store got: bytes / (time − pages·latency) over its
    full pages (all pages where a tensor is smaller than one)."""
    dur = run.trace.end_s - run.trace.start_s
    pages = [(e.nbytes, dur[e.id]) for e in run.entries if e.op == "page"]
    full = [p for p in pages if p[0] == page_bytes] or pages
    nbytes, sec = (float(sum(x)) for x in zip(*full))
    return nbytes / max(sec - len(full) * latency_s, 0.5 * sec)


def page_rates(model, page_bytes: int, runs: int, latency_s: float = 0.0,
               records: list | None = None) -> list[float]:
    """Store link rate [bytes/s] per timed `_probe_engine` run (noisy: take a median);
    `records`, if given, receives each timed run's `RunRecord`."""
    engine = _probe_engine(model, page_bytes)
    prompts = np.random.default_rng(0).integers(1, model.config.vocab_size,
                                                (8, 16)).tolist()
    rates = []
    for i in range(runs + 1):  # the first run compiles
        engine.generate(prompts, 4, batching="static")
        if i:
            rates.append(_page_rate(engine.last_run, int(page_bytes), latency_s))
            if records is not None:
                records.append(engine.last_run)
    return rates


def probe_model(m: ModelConfig):
    """The random-weight 2-layer copy of `m` the in-situ probes run."""
    return MoEModel.random(_probe_config(m), seed=0)


def executor_probe(m: ModelConfig, sizes, latency_s: float, repeats: int):
    """(decode pre-attention (tokens, s) pairs for t_op, h2d curve of per-size medians of
    `PAGE_RATE_RUNS_PER_REPEAT`·repeats `page_rates`, probe model). Run it before any big
    buffer: fresh buffers' page faults change later copies' speed."""
    model = probe_model(m)
    pre, curve = [], []
    for size in sizes:
        runs = []
        rates = page_rates(model, size, PAGE_RATE_RUNS_PER_REPEAT * repeats, latency_s,
                           runs)
        for run in runs if not curve else ():
            dur = run.trace.end_s - run.trace.start_s
            pre += [(e.tokens, dur[e.id]) for e in run.entries
                    if e.op == "pre_attn" and e.stage == "decode"]
        curve.append((float(size), float(np.median(rates))))
    return pre, tuple(curve), model


