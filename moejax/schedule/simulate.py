"""Price a timeline with the performance model: earliest-start list scheduling.

Each entry costs what `moejax.schedule.costs` says its op costs (the same functions
`predict()` composes). With `policy.overlap`, every resource runs its entries in list
order, an entry starting at max(resource free, deps done); without it, the whole list
runs serially. Where the "GPU" computes on the host cores (`hw.device_is_host`, the
local testbed) gpu and cpu entries share one lane, as `predict()` assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.schedule import costs
from moejax.schedule.policy import Policy
from moejax.schedule.timeline import RESOURCES, Entry, stage_seconds


def _concurrent_host_bytes(m: ModelConfig, policy: Policy, layer: int) -> float:
    """Bytes the link moves through host memory during one micro-batch's CPU attention
    (MoE-Lens contention, as in `predict`)."""
    if not policy.overlap:
        return 0.0
    ubs, n = policy.micro_batch_size, policy.num_micro_batches
    stream = costs.streamed_expert_bytes(m, policy.gpu_weight_fraction) \
        if m.is_moe_layer(layer) else 0.0
    return (stream + n * (costs.qkv_bytes(m, ubs) + costs.attn_out_bytes(m, ubs))) / n


def price(e: Entry, m: ModelConfig, hw: HardwareSpec, policy: Policy,
          kv_bytes_per_elem: int | None = None) -> float:
    """Seconds one entry takes on its resource."""
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
        return float(costs.cpu_attention_s(m, hw, t, ctx, kv_bytes_per_elem,
                                           _concurrent_host_bytes(m, policy, e.layer)))
    if e.op == "h2d_attn":
        return float(costs.h2d_s(hw, costs.attn_out_bytes(m, t)))
    if e.op == "post_attn":
        return float(costs.gpu_post_attention_s(m, hw, t, e.layer)
                     + costs.gpu_ffn_s(m, hw, t, e.layer))
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


def lane(resource: str, hw: HardwareSpec) -> str:
    return "gpu" if hw.device_is_host and resource == "cpu" else resource


def simulate(entries: list[Entry], m: ModelConfig, hw: HardwareSpec, policy: Policy,
             kv_bytes_per_elem: int | None = None) -> Simulation:
    n = len(entries)
    start, end = np.zeros(n), np.zeros(n)
    free = {r: 0.0 for r in RESOURCES}
    busy = {r: 0.0 for r in RESOURCES}
    last_end = 0.0
    for e in entries:
        d = price(e, m, hw, policy, kv_bytes_per_elem)
        ready = max((end[i] for i in e.deps), default=0.0)
        r = lane(e.resource, hw)
        s = max(ready, free[r]) if policy.overlap else max(ready, last_end)
        start[e.id], end[e.id] = s, s + d
        free[r] = last_end = s + d if policy.overlap else s + d
        busy[e.resource] += d
    return Simulation(start, end, float(end.max(initial=0.0)), busy)
