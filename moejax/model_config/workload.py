"""Workloads as data: prompt and generation lengths of an offline batch job, fixed or
per request (a trace, `load_trace`)."""

from __future__ import annotations

import dataclasses
import json
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
    `decode_expert_imbalance` is set, decode: generated tokens load experts differently.
    `prompt_lens`, `gen_lens`: per-request lengths (a trace; both or neither, equal
    length); then `prompt_len`, `gen_len` are their means rounded (`from_lengths`), which
    the fixed-length models (`predict`, the MoE-Lens bound) price."""

    prompt_len: int
    gen_len: int
    num_sequences: int | None = None
    kv_bytes_per_elem: int | None = None
    name: str = ""
    expert_imbalance: float = 1.0
    decode_expert_imbalance: float | None = None
    prompt_lens: tuple[int, ...] | None = None
    gen_lens: tuple[int, ...] | None = None

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
        self._check_lengths()

    def _check_lengths(self):
        """Lists: both or neither, non-empty tuples of positive ints of one length, with
        `prompt_len`, `gen_len` their rounded means."""
        lists = (self.prompt_lens, self.gen_lens)
        if lists == (None, None):
            return
        if None in lists:
            raise ValueError("Workload: prompt_lens and gen_lens come together")
        for k, fixed in (("prompt_lens", "prompt_len"), ("gen_lens", "gen_len")):
            v = getattr(self, k)
            if isinstance(v, list):
                v = tuple(v)
                object.__setattr__(self, k, v)
            if not isinstance(v, tuple) or not v or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
                raise ValueError(f"Workload: {k} must be a non-empty tuple of positive "
                                 f"integers, got {_short(v)}")
            if getattr(self, fixed) != _mean(v):
                raise ValueError(f"Workload: {fixed}={getattr(self, fixed)} is not the "
                                 f"mean of {k}, {_mean(v)} (use Workload.from_lengths)")
        if len(self.prompt_lens) != len(self.gen_lens):
            raise ValueError(f"Workload: {len(self.prompt_lens)} prompt_lens but "
                             f"{len(self.gen_lens)} gen_lens")

    @classmethod
    def from_lengths(cls, prompt_lens, gen_lens, **kw) -> "Workload":
        """A trace's workload: per-request lengths, their rounded means as the fixed ones."""
        p, g = tuple(int(x) for x in prompt_lens), tuple(int(x) for x in gen_lens)
        if not p or not g:
            raise ValueError("Workload.from_lengths: empty length lists")
        return cls(_mean(p), _mean(g), prompt_lens=p, gen_lens=g, **kw)

    def requests(self, count: int | None = None) -> list[tuple[int, int]]:
        """[(prompt, gen)] of the job's `count` requests (default `num_sequences`, else the
        trace's length, else 1): the trace cycled, or the fixed lengths repeated."""
        pairs = (list(zip(self.prompt_lens, self.gen_lens)) if self.prompt_lens
                 else [(self.prompt_len, self.gen_len)])
        n = count or self.num_sequences or len(pairs)
        return [pairs[i % len(pairs)] for i in range(n)]

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


def _mean(v) -> int:
    return max(1, round(sum(v) / len(v)))


def _short(v) -> str:
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


def load_trace(path: str, **kw) -> Workload:
    """A JSON trace {"name", "source", "requests": [{"prompt_len", "output_len"}, ...]} as
    a Workload (`from_lengths`; `kw` sets the other fields); a malformed file is a
    ValueError naming it."""
    try:
        with open(path) as f:
            doc = json.load(f)
        reqs = doc["requests"]
        p = [r["prompt_len"] for r in reqs]
        g = [r["output_len"] for r in reqs]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"load_trace({path!r}): not a trace ({type(e).__name__}: {e})")
    if any(not isinstance(x, int) or isinstance(x, bool) for x in p + g):
        raise ValueError(f"load_trace({path!r}): lengths must be integers")
    kw.setdefault("name", str(doc.get("name", "")))
    return Workload.from_lengths(p, g, **kw)


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
