"""Workloads as data: prompt and generation lengths of an offline batch job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def stage_imbalance(prefill: float, decode: float | None = None) -> dict:
    """{stage: expert imbalance} for `simulate`, `predict`; decode defaults to prefill's."""
    return {"prefill": prefill, "decode": prefill if decode is None else decode}


@dataclass(frozen=True)
class Workload:
    """An offline job: each sequence has a `prompt_len`-token prompt, `gen_len` new tokens
    (one by prefill, `gen_len - 1` by decode). `num_sequences`: the whole job (the search's
    batch cap). `kv_bytes_per_elem`: KV element bytes (None: the model's dtype; 1: int8).
    `expert_imbalance` = E·max_e p_e, the hottest expert's share over uniform (1: uniform;
    `RunRecord.expert_imbalance`, docs/design.md §4.3), in prefill and, unless
    `decode_expert_imbalance` is set, decode: generated tokens load experts differently."""

    prompt_len: int
    gen_len: int
    num_sequences: int | None = None
    kv_bytes_per_elem: int | None = None
    name: str = ""
    expert_imbalance: float = 1.0
    decode_expert_imbalance: float | None = None

    def __post_init__(self):
        for k in ("prompt_len", "gen_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Workload: {k}={v!r} must be a positive integer")
        for k in ("num_sequences", "kv_bytes_per_elem"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Workload: {k}={v!r} must be a positive integer or None")
        for k in ("expert_imbalance", "decode_expert_imbalance"):
            v = getattr(self, k)
            if v is None and k.startswith("decode"):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (
                    1.0 <= v < float("inf")):
                raise ValueError(f"Workload: {k}={v!r} must be >= 1")

    @property
    def imbalance(self) -> dict:
        """`stage_imbalance` of this job's two figures."""
        return stage_imbalance(self.expert_imbalance, self.decode_expert_imbalance)

    @property
    def context_len(self) -> int:
        """Tokens per sequence at the end of generation: s + n."""
        return self.prompt_len + self.gen_len

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


_PRESETS: dict[str, Workload] = {
    # MoE-Lightning's MTBench setting (docs/design.md §4): mean prompt 77 tokens,
    # generation 32 / 64 / 128 / 256.
    **{f"mtbench_g{n}": Workload(77, n, name=f"mtbench_g{n}") for n in (32, 64, 128, 256)},
    # Small shapes for the CPU testbed and tests.
    "tiny": Workload(16, 8, name="tiny"),
    "local_demo": Workload(64, 32, name="local_demo"),
}
_PRESETS["mtbench"] = _PRESETS["mtbench_g32"].replace(name="mtbench")


def workload_names() -> list[str]:
    return sorted(_PRESETS)


def get_workload(name: str) -> Workload:
    """Preset by name; an unknown name raises ValueError listing the valid ones."""
    if name not in _PRESETS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(workload_names())}")
    return _PRESETS[name]
