"""In-situ probes: short runs of the real Engine on a 2-layer random copy of the model,
for the figures only the engine's own data plane shows (the link rate the weight store
gets per page size, the fixed cost of a device op, the cores a copy takes from compute)."""

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
    """`repeats` overlapped runs (`engine.RunRecord`s) of the real engine on `model`,
    the probe's 2-layer random copy: every expert streamed in `COPY_DEMAND_PAGE_BYTES`
    pages, 32 sequences of 32 tokens in one micro-batch, 16 new tokens, attention on
    the CPU."""
    pol = Policy.from_micro_batches(32, 1, gpu_weight_fraction=0.0, attention_device="cpu",
                                    kv_cache_device="cpu",
                                    page_bytes=costs.COPY_DEMAND_PAGE_BYTES, overlap=True)
    engine = Engine(model, policy=pol)
    prompts = np.random.default_rng(0).integers(1, model.config.vocab_size,
                                                (32, 32)).tolist()
    runs = []
    for i in range(repeats + 1):  # the first run compiles
        engine.generate(prompts, 16)
        runs += [engine.last_run] if i else []
    return runs


def fit_copy_core_demand(m: ModelConfig, spec: HardwareSpec, runs) -> float:
    """`copy_core_demand` where the device is the host's CPU: the host cores one page
    copy takes from compute beside it (`costs.core_demand`). A memcpy runs on one core
    but contends for memory bandwidth and cache, so it can cost compute more than a
    core. For each of the `overlapped_runs`, the demand with which `simulate` of that
    run's timeline takes as long as its decode did (bisection: the simulated time grows
    with the demand), clipped to [0.1, 2·cores]; the median over the runs. On the
    2-core testbed: 1.5-2.4 — and ~4 when the runs come after the calibration's 1 GB
    buffers, so they run first. Prefill is not fitted: a 2-layer run's prefill is
    mostly pipeline fill, and its fits ranged from 0.1 to 6."""
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
    """The serial probe: 8 sequences in 2 micro-batches, every expert streamed in pages
    of `page_bytes`, attention on the CPU."""
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.0, attention_device="cpu",
                                    kv_cache_device="cpu", page_bytes=int(page_bytes),
                                    overlap=False)
    return Engine(model, policy=pol)


def _page_rate(run, page_bytes: int, latency_s: float) -> float:
    """Bytes/s one run's weight store got from the link: bytes / (time − pages·latency)
    over its full pages (all its pages where a tensor is smaller than a page)."""
    dur = run.trace.end_s - run.trace.start_s
    pages = [(e.nbytes, dur[e.id]) for e in run.entries if e.op == "page"]
    full = [p for p in pages if p[0] == page_bytes] or pages
    nbytes, sec = (float(sum(x)) for x in zip(*full))
    return nbytes / max(sec - len(full) * latency_s, 0.5 * sec)


def page_rates(model, page_bytes: int, runs: int, latency_s: float = 0.0,
               records: list | None = None) -> list[float]:
    """Bytes/s of the link as the weight store sees it, one figure per serial run of the
    probe (`_probe_engine`) on `model` (a 2-layer random copy: `probe_model`), after one
    run that compiles. One 0.7 s run of the 2-core testbed reads 4.1-6.1 GB/s at 4 MiB
    pages: take a median of several, near the runs it is to price
    (`experiments.ablations` re-measures it in every round of its rows). `records`, if
    given, receives each timed run's `RunRecord`."""
    engine = _probe_engine(model, page_bytes)
    prompts = np.random.default_rng(0).integers(1, model.config.vocab_size,
                                                (8, 16)).tolist()
    rates = []
    for i in range(runs + 1):  # the first run compiles
        engine.generate(prompts, 4)
        if i:
            rates.append(_page_rate(engine.last_run, int(page_bytes), latency_s))
            if records is not None:
                records.append(engine.last_run)
    return rates


def probe_model(m: ModelConfig):
    """The random-weight 2-layer copy of `m` the in-situ probes run."""
    return MoEModel.random(_probe_config(m), seed=0)


def executor_probe(m: ModelConfig, sizes, latency_s: float, repeats: int):
    """In situ: (decode pre-attention (tokens, s) pairs, h2d curve, the probe model —
    for `overlapped_runs`) from short serial runs of the real engine on a 2-layer,
    random-weight copy of `m` streaming every expert in pages of each of `sizes`
    bytes. The pre-attentions (first size's runs) give the fixed cost of one device op
    beyond its roofline price (Python dispatch, parameter plumbing, the block the
    executor waits on); the curve is the rate the weight store really gets per page
    size: the median of `PAGE_RATE_RUNS_PER_REPEAT`·repeats runs' `_page_rate`s (one
    run's swings ±15 %). Standalone copies of 64 MiB read 1.6× faster than the store's,
    or 3.5× slower when measured after them (fresh big buffers fault their pages in),
    so this runs before any big buffer."""
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


