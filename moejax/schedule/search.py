"""Policy search (docs/design.md §4.3 Search): max predicted end-to-end tokens/s under both
memory budgets over placements {(cpu, cpu), (gpu, gpu)} (the executor schedules no
other), `ubs_grid`, and every feasible n_ub. wg is exact: time is non-increasing in wg
and memory affine below 1, so the best is the largest that fits (WG_STEP grid), or 1
when all fits resident. The grid is hardware-independent, so better hardware never
lowers the optimum; the first best in grid order wins.
"""

from __future__ import annotations

import numpy as np

from moejax.model_config.hardware import HardwareSpec, fmt_bytes
from moejax.model_config.model import ModelConfig
from moejax.model_config.workload import Workload
from moejax.schedule.hrm import ubs_candidates
from moejax.schedule.policy import DEFAULT_PAGE_BYTES, Policy, affine_interval
from moejax.schedule.predict import (Prediction, check_inputs, evaluate, memory_budgets,
                                     memory_bytes, predict)

PLACEMENTS = (("cpu", "cpu"), ("gpu", "gpu"))
MAX_BATCH_SIZE = 1 << 14  # sequences in flight when the workload does not cap them
WG_STEP = 1e-6  # resolution of gpu_weight_fraction
_CHUNK_ELEMS = 1 << 21  # candidates × decode steps priced per NumPy call


def _streaming_line(model, wl, ubs, n_ub, placement=(), devices=1):
    """(d0, d1, h0, h1): device and host bytes at wg = 0 and where the affine line of
    the streaming placements (wg < 1, stream buffers counted) reaches wg = 1 (device:
    per device of k)."""
    d0, h0 = memory_bytes(model, wl, ubs, n_ub, 0.0, *placement, devices=devices)
    dh, hh = memory_bytes(model, wl, ubs, n_ub, 0.5, *placement, devices=devices)
    return d0, 2 * dh - d0, h0, 2 * hh - h0


def _streaming_wg_range(model, hw, wl, ubs, n_ub, placement, budgets):
    """(lo, hi) per candidate: streaming wg (< 1, WG_STEP grid) fitting both budgets."""
    dev_cap, host_cap = budgets
    d0, d1, h0, h1 = _streaming_line(model, wl, ubs, n_ub, placement, hw.num_devices)
    lo, hi = affine_interval(d0, d1 - d0, dev_cap)
    host_terms = [(h0, h1 - h0)]
    if hw.device_is_host:  # device and host share the same RAM
        host_terms.append((d0 + h0, d1 + h1 - d0 - h0))
    for a, b in host_terms:
        lo2, hi2 = affine_interval(a, b, host_cap)
        lo, hi = np.maximum(lo, lo2), np.minimum(hi, hi2)
    hi = np.floor(np.minimum(hi, 1 - WG_STEP) / WG_STEP) / (1 / WG_STEP)
    return np.ceil(lo / WG_STEP) * WG_STEP - 1e-12, hi


def _resident_fits(model, hw, wl, ubs, n_ub, placement, budgets):
    """Whether wg = 1 (every expert resident, no stream buffers) fits."""
    dev_cap, host_cap = budgets
    dr, hr = memory_bytes(model, wl, ubs, n_ub, 1.0, *placement, devices=hw.num_devices)
    fits = (dr <= dev_cap) & (hr <= host_cap)
    return fits & (dr + hr <= host_cap) if hw.device_is_host else fits


def _best_wg(model, hw, wl, ubs, n_ub, placement, budgets):
    """Largest feasible wg per candidate (NaN where none fits)."""
    lo, hi = _streaming_wg_range(model, hw, wl, ubs, n_ub, placement, budgets)
    wg = np.where(hi >= lo, hi, np.nan)
    return np.where(_resident_fits(model, hw, wl, ubs, n_ub, placement, budgets), 1.0, wg)


def _max_feasible(ok, limit: int) -> int:
    """Largest n in [1, limit] with ok(n), given ok is monotone (true then false)."""
    if not ok(1):
        return 0
    n = 1
    while n < limit and ok(min(2 * n, limit)):
        n = min(2 * n, limit)
    if n == limit:
        return n
    lo, hi = n, min(2 * n, limit)  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _infeasible_error(model, hw, wl, budgets) -> ValueError:
    dev_cap, host_cap = budgets
    d0, d1, h0, h1 = _streaming_line(model, wl, 1, 1, devices=hw.num_devices)
    # all resident: no stream buffers
    dr, hr = memory_bytes(model, wl, 1, 1, 1.0, devices=hw.num_devices)
    need = min(d0, d1, dr)
    parts = []
    if need > dev_cap:
        parts.append(f"device memory is short by {fmt_bytes(need - dev_cap)} "
                     f"(needs {fmt_bytes(need)}, budget {fmt_bytes(dev_cap)})")
    else:  # the least host memory among the placements the device budget allows
        hosts = [hr + (dr if hw.device_is_host else 0)] if dr <= dev_cap else []
        if min(d0, d1) <= dev_cap:
            hi = 1.0 if d1 <= dev_cap else (dev_cap - d0) / (d1 - d0)
            hosts.append(h0 + (h1 - h0) * hi
                         + ((d0 + (d1 - d0) * hi) if hw.device_is_host else 0))
        host = min(hosts)
        parts.append(f"host memory is short by {fmt_bytes(host - host_cap)} (needs "
                     f"{fmt_bytes(host)}, budget {fmt_bytes(host_cap)})")
    return ValueError(f"no policy fits {model.name} on {hw.name} (prompt "
                      f"{wl.prompt_len}, gen {wl.gen_len}) even at batch 1: "
                      + "; ".join(parts))


def ubs_grid(cap: int) -> list[int]:
    """Ascending ubs ≤ `cap`: `hrm.ubs_candidates` ∪ powers of two ∪ {cap}."""
    grid = {cap} | {1 << i for i in range(cap.bit_length())}
    for ubs in ubs_candidates():
        if ubs > cap:
            break
        grid.add(ubs)
    return sorted(grid)


def _search_placement(model, hw, wl, placement, budgets, cap):
    """Best (tokens/s, ubs, n_ub, wg) for one placement, or None."""
    best = None
    steps = max(wl.gen_len - 1, 1)
    for ubs in ubs_grid(cap):
        feasible = lambda n: not np.isnan(_best_wg(model, hw, wl, ubs, n, placement, budgets))
        n_max = _max_feasible(feasible, cap // ubs)
        if n_max == 0:
            break
        n_ub = np.arange(1, n_max + 1, dtype=float)
        wg = _best_wg(model, hw, wl, ubs, n_ub, placement, budgets)
        chunk = max(1, _CHUNK_ELEMS // steps)
        for i in range(0, n_max, chunk):
            sl = slice(i, i + chunk)
            tps = evaluate(model, hw, wl, np.full(n_ub[sl].shape, float(ubs)), n_ub[sl],
                           wg[sl], *placement, DEFAULT_PAGE_BYTES, True)["tokens_per_s"]
            j = int(np.argmax(tps))
            if best is None or tps[j] > best[0]:
                best = (float(tps[j]), ubs, int(n_ub[sl][j]), float(wg[sl][j]))
    return best


def fitting_weight_fraction(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                            policy: Policy, device_memory_bytes: float | None = None
                            ) -> float | None:
    """Largest wg ≤ the policy's that fits `memory_budgets` with its batching and
    placement (1 if all-resident fits), or None; keeps ablation rows runnable."""
    budgets = memory_budgets(hw, device_memory_bytes)
    args = (model, hw, workload, policy.micro_batch_size,
            np.array([float(policy.num_micro_batches)]),
            (policy.attention_device, policy.kv_cache_device), budgets)
    if policy.gpu_weight_fraction >= 1 and _resident_fits(*args)[0]:
        return 1.0
    lo, hi = (float(x[0]) for x in _streaming_wg_range(*args))
    wg = min(hi, policy.gpu_weight_fraction)
    return wg if wg >= lo else None


def search_policy(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                  device_memory_bytes: float | None = None) -> tuple[Policy, Prediction]:
    """(policy, prediction) of highest predicted tokens/s within `memory_budgets`;
    ValueError naming the short memory when nothing fits."""
    check_inputs(model, hw, workload)
    if device_memory_bytes is not None and not (
            isinstance(device_memory_bytes, (int, float)) and device_memory_bytes > 0):
        raise ValueError(f"device_memory_bytes={device_memory_bytes!r} must be > 0")
    budgets = memory_budgets(hw, device_memory_bytes)
    cap = min(workload.num_sequences or MAX_BATCH_SIZE, MAX_BATCH_SIZE)
    best, best_placement = None, None
    for placement in PLACEMENTS:
        r = _search_placement(model, hw, workload, placement, budgets, cap)
        if r is not None and (best is None or r[0] > best[0]):
            best, best_placement = r, placement
    if best is None:
        raise _infeasible_error(model, hw, workload, budgets)
    _, ubs, n_ub, wg = best
    policy = Policy.from_micro_batches(ubs, n_ub, gpu_weight_fraction=wg,
                                       attention_device=best_placement[0],
                                       kv_cache_device=best_placement[1],
                                       page_bytes=DEFAULT_PAGE_BYTES, overlap=True)
    return policy, predict(model, hw, workload, policy)


MICRO_BATCH_CHOICES = (1, 2, 4, 8)  # micro-batch counts an engine's batch considers


def search_micro_batches(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                         batch: int, placement: Policy,
                         device_memory_bytes: float | None = None,
                         choices=MICRO_BATCH_CHOICES) -> Policy:
    """`placement` with the fastest predicted n_ub ∈ `choices` (ubs = ⌈batch/n_ub⌉) whose
    device peak fits `device_memory_bytes` (None: no limit), else the closest to fitting;
    how an Engine micro-batches a batch it was given."""
    check_inputs(model, hw, workload)
    best = None
    for n in choices:
        ubs = -(-batch // n)
        if n > 1 and ubs * (n - 1) >= batch:  # fewer micro-batches hold it already
            continue
        pol = placement.replace(batch_size=ubs * n, micro_batch_size=ubs,
                                num_micro_batches=n)
        dev = float(memory_bytes(model, workload, ubs, n, pol.gpu_weight_fraction,
                                 pol.attention_device, pol.kv_cache_device,
                                 devices=hw.num_devices)[0])
        fits = device_memory_bytes is None or dev <= device_memory_bytes
        key = (fits, predict(model, hw, workload, pol).tokens_per_s if fits else -dev)
        if best is None or key > best[0]:
            best = (key, pol)
    return best[1]


def search_expert_dtype(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                        allowed_expert_dtypes, device_memory_bytes: float | None = None,
                        group_size: int | None = None):
    """(config, policy, prediction) of the fastest `search_policy` over the expert
    formats in `allowed_expert_dtypes` (None = the model dtype, "int8", "int4"): the
    chosen format is the returned config's `expert_dtype`, never applied silently; no
    format outside the list is tried. ValueError if the list is empty or names another
    format, or if nothing fits under any of them."""
    from moejax.model_config.model import EXPERT_BITS

    allowed = tuple(allowed_expert_dtypes or ())
    bad = [d for d in allowed if d is not None and d not in EXPERT_BITS]
    if not allowed or bad:
        raise ValueError(f"allowed_expert_dtypes={allowed_expert_dtypes!r}: give a non-empty "
                         "list of None, 'int8', 'int4'")
    best, errors = None, []
    for dt in allowed:
        cfg = model.replace(expert_dtype=dt, **({"expert_group_size": group_size}
                                                if group_size else {}))
        try:
            pol, pred = search_policy(cfg, hw, workload, device_memory_bytes)
        except ValueError as e:
            errors.append(str(e))
            continue
        if best is None or pred.tokens_per_s > best[2].tokens_per_s:
            best = (cfg, pol, pred)
    if best is None:
        raise ValueError(errors[0])
    return best
