"""Price a timeline by earliest-start list scheduling (docs/design.md §3), each entry at
its `costs` price: with `policy.overlap` an entry starts at max(resource free, deps
done), else the list runs serially; on `device_is_host` hardware the resources share the
host cores (processor sharing, `costs.core_demand`), as `predict` assumes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.schedule import costs
from moejax.schedule.policy import Policy
from moejax.schedule.timeline import RESOURCES, Entry, stage_seconds, sweep_seconds


def _concurrent_host_bytes(m: ModelConfig, policy: Policy, entries: list[Entry]) -> dict:
    """{(step, layer): bytes} the link moves through host memory per CPU attention of that
    pass (§4.3): (stream + Σ its micro-batches' q/k/v + output bytes) / their count, from
    the entries themselves, so a sweep's ragged micro-batches are priced as they are."""
    if not policy.overlap:
        return {}
    acts: dict = {}
    for e in entries:
        if e.op == "cpu_attn":
            n, b = acts.get((e.step, e.layer), (0, 0.0))
            acts[(e.step, e.layer)] = (n + 1, b + costs.qkv_bytes(m, e.tokens)
                                       + costs.attn_out_bytes(m, e.tokens))
    stream = lambda layer: (costs.streamed_expert_bytes(m, policy.gpu_weight_fraction)
                            if m.is_moe_layer(layer) else 0.0)
    return {(s, layer): (stream(layer) + b) / n for (s, layer), (n, b) in acts.items()}


def _uniform_host_bytes(m: ModelConfig, policy: Policy, layer: int) -> float:
    """`_concurrent_host_bytes` of a pass of n_ub micro-batches of ubs."""
    if not policy.overlap:
        return 0.0
    ubs, n = policy.micro_batch_size, policy.num_micro_batches
    stream = costs.streamed_expert_bytes(m, policy.gpu_weight_fraction) \
        if m.is_moe_layer(layer) else 0.0
    return (stream + n * (costs.qkv_bytes(m, ubs) + costs.attn_out_bytes(m, ubs))) / n


def _stage_imbalance(imbalance, stage: str) -> float:
    """`imbalance` of `stage`: one figure, or {stage: figure} as `Workload.imbalance`."""
    return float(imbalance[stage] if isinstance(imbalance, dict) else imbalance)


def price(e: Entry, m: ModelConfig, hw: HardwareSpec, policy: Policy,
          kv_bytes_per_elem: int | None = None, imbalance: float | dict = 1.0,
          concurrent_host_bytes: float | None = None) -> float:
    """Seconds one entry takes on its resource alone; `imbalance` as `_stage_imbalance`;
    `concurrent_host_bytes` of a cpu_attn (None: `policy`'s uniform micro-batches)."""
    t, ctx = e.tokens, e.context
    if e.op == "page":
        return float(costs.h2d_s(hw, e.nbytes))
    if e.op == "embed":
        return 0.0  # a gather of t rows: negligible, and not in predict()
    if e.op == "pre_attn":
        return float(costs.gpu_pre_attention_s(m, hw, t))
    if e.op == "attn":
        if e.stage == "prefill":
            return float(costs.gpu_prefill_attention_s(m, hw, t // ctx, ctx))
        return float(costs.gpu_decode_attention_s(m, hw, t, ctx, kv_bytes_per_elem))
    if e.op == "d2h_qkv":
        return float(costs.d2h_s(hw, costs.qkv_bytes(m, t)))
    if e.op == "d2h_kv":
        return float(costs.d2h_s(hw, costs.kv_bytes(m, t, kv_bytes_per_elem)))
    if e.op == "cpu_attn":
        if concurrent_host_bytes is None:
            concurrent_host_bytes = _uniform_host_bytes(m, policy, e.layer)
        return float(costs.cpu_attention_s(m, hw, t, ctx, kv_bytes_per_elem,
                                           concurrent_host_bytes))
    if e.op == "h2d_attn":
        return float(costs.h2d_s(hw, costs.attn_out_bytes(m, t)))
    if e.op == "post_attn":
        return float(costs.gpu_post_attention_s(m, hw, t, e.layer)
                     + costs.gpu_ffn_s(m, hw, t, e.layer,
                                       _stage_imbalance(imbalance, e.stage)))
    if e.op == "head":
        return float(costs.gpu_lm_head_s(m, hw, t))
    raise ValueError(f"no price for op {e.op!r}")


@dataclass(frozen=True)
class Simulation:
    """Predicted start/end (s) of every entry, makespan, busy seconds per resource."""

    start_s: np.ndarray
    end_s: np.ndarray
    makespan_s: float
    busy_s: dict

    def utilisation(self) -> dict:
        return {r: b / self.makespan_s if self.makespan_s else 0.0
                for r, b in self.busy_s.items()}

    def stage_s(self, entries: list[Entry], stage: str) -> float:
        return stage_seconds(entries, self.end_s, stage)

    def sweep_s(self, entries: list[Entry]) -> float:
        return sweep_seconds(entries, self.end_s)


def simulate(entries: list[Entry], m: ModelConfig, hw: HardwareSpec, policy: Policy,
             kv_bytes_per_elem: int | None = None,
             imbalance: float | dict = 1.0) -> Simulation:
    """Start/end of every entry of a timeline or a sweep (`build_sweep`); a sweep's cpu
    attention is priced with its own micro-batches' link traffic."""
    host = _concurrent_host_bytes(m, policy, entries)
    dur = [price(e, m, hw, policy, kv_bytes_per_elem, imbalance,
                 host.get((e.step, e.layer), 0.0) if e.op == "cpu_attn" else None)
           for e in entries]
    start, end = np.zeros(len(entries)), np.zeros(len(entries))
    if not policy.overlap:
        t = 0.0
        for e in entries:
            start[e.id], end[e.id] = t, t + dur[e.id]
            t = end[e.id]
    elif hw.device_is_host:
        _shared_cores(entries, dur, hw, start, end)
    else:
        free = {r: 0.0 for r in RESOURCES}
        for e in entries:
            s = max(max((end[i] for i in e.deps), default=0.0), free[e.resource])
            start[e.id], end[e.id] = s, s + dur[e.id]
            free[e.resource] = end[e.id]
    busy = {r: 0.0 for r in RESOURCES}
    for e in entries:
        busy[e.resource] += dur[e.id]
    return Simulation(start, end, float(end.max(initial=0.0)), busy)


def _shared_cores(entries, dur, hw: HardwareSpec, start, end):
    """Event-driven processor sharing, filling start/end in place: one running entry per
    resource, in list order once deps are done, each at min(1, cores / Σ demand)."""
    queues = {r: deque(e for e in entries if e.resource == r) for r in RESOURCES}
    finished = np.zeros(len(entries), bool)
    running: dict[str, list] = {}  # resource -> [entry, work left (s alone)]
    t = 0.0
    while True:
        for r, q in queues.items():
            if r not in running and q and all(finished[d] for d in q[0].deps):
                e = q.popleft()
                start[e.id] = t
                running[r] = [e, dur[e.id]]
        if not running:
            break
        rate = min(1.0, hw.cpu_cores / sum(costs.core_demand(hw, r) for r in running))
        step = min(left for _, left in running.values())  # work of the first to finish
        t += step / rate
        for r in list(running):
            running[r][1] -= step
            if running[r][1] <= 1e-12:
                e = running.pop(r)[0]
                end[e.id], finished[e.id] = t, True
    if not finished.all():
        raise ValueError("timeline deadlocks: an entry waits on one that never runs")
