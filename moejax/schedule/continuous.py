"""Continuous batching in the performance model (docs/design.md §7, MoE-Lens): a job runs
as sweeps, one forward over every layer = one pass over the streamed experts, serving every
running sequence's next token and the prefills admitted since (`timeline.build_sweep`).
`sweep_s` prices a sweep from `costs`; `admission` schedules FIFO within the KV and prefill
budgets; `predict_continuous` gives end to end and steady state (Little's law) beside the
MoE-Lens bound; `search_continuous` picks the knobs under the device and host budgets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.model_config.workload import Workload
from moejax.schedule import costs
from moejax.schedule.policy import (Policy, affine_interval, padded_len, padded_rows,
                                    prefill_device_rows, prefill_rows)
from moejax.schedule.predict import (Knobs, MoELensBound, _combine, _layer_kinds, _stream,
                                     check_inputs, memory_budgets, moe_lens_bound,
                                     working_set_bytes)
from moejax.schedule.timeline import sweep_micro_batches


# ------------------------------------------------------------------ sweep shape
@dataclass(frozen=True)
class SweepShape:
    """A sweep as two uniform groups (arrays broadcast): `n_d` decode micro-batches of `rows_d`
    rows attending to `ctx_d` keys (mean, itself included); `n_p` prefill micro-batches of
    `rows_p` prompts padded to `len_p` (mean over device rows; padded tokens exact). The
    device runs `dev_rows_d`, `dev_rows_p` rows a micro-batch (`padded_rows`; None: rows)."""

    n_d: object
    rows_d: object
    ctx_d: object
    n_p: object = 0.0
    rows_p: object = 0.0
    len_p: object = 0.0
    dev_rows_d: object = None
    dev_rows_p: object = None

    @classmethod
    def of(cls, decode, prefill, policy: Policy) -> "SweepShape":
        """The shape of `build_sweep(policy, decode, prefill)`'s micro-batches, as means."""
        mbs = sweep_micro_batches(decode, prefill, policy)
        dec = [m for m in mbs if m[0] == "decode"]
        pre = [m for m in mbs if m[0] == "prefill"]
        d_rows = sum(m[3] for m in dec)
        keys = sum(m[3] * m[2] for m in dec)  # as build_sweep rounds
        p_dev = sum(m[1] // m[2] for m in pre)
        n_d, n_p = max(len(dec), 1), max(len(pre), 1)
        return cls(len(dec), d_rows / n_d, keys / max(d_rows, 1), len(pre),
                   sum(len(g) for g in prefill) / n_p, sum(m[1] for m in pre) / max(p_dev, 1),
                   sum(m[1] for m in dec) / n_d, p_dev / n_p)

    @property
    def device_rows(self) -> tuple:
        """(decode, prefill) rows a micro-batch the device runs."""
        return (self.rows_d if self.dev_rows_d is None else self.dev_rows_d,
                self.rows_p if self.dev_rows_p is None else self.dev_rows_p)


def _decode_mb(m, hw, wl, layer, rows, dev, ctx, host_bytes):
    """(pre, post + FFN, cpu attention, h2d, d2h) [s] of one decode micro-batch of `rows`
    (`dev` on the device), one layer."""
    pre = costs.gpu_pre_attention_s(m, hw, dev)
    post = (costs.gpu_post_attention_s(m, hw, dev, layer)
            + costs.gpu_ffn_s(m, hw, dev, layer, wl.imbalance["decode"]))
    cpu = costs.cpu_attention_s(m, hw, rows, ctx, wl.kv_bytes_per_elem, host_bytes)
    return (pre, post, cpu, costs.h2d_s(hw, costs.attn_out_bytes(m, dev)),
            costs.d2h_s(hw, costs.qkv_bytes(m, dev)))


def _prefill_mb(m, hw, wl, layer, rows, s):
    """(pre + attention, post + FFN, d2h of k/v) [s] of `rows` prompts padded to `s`."""
    tok = rows * s
    pre = costs.gpu_pre_attention_s(m, hw, tok) + costs.gpu_prefill_attention_s(m, hw, rows, s)
    post = (costs.gpu_post_attention_s(m, hw, tok, layer)
            + costs.gpu_ffn_s(m, hw, tok, layer, wl.imbalance["prefill"]))
    return pre, post, costs.d2h_s(hw, costs.kv_bytes(m, tok, wl.kv_bytes_per_elem))


def knobs_of(policy) -> Knobs:
    """`policy` as the `Knobs` the sweep prices read (wg, page_bytes, overlap); Knobs as is."""
    if isinstance(policy, Knobs):
        return policy
    p = policy
    return Knobs(p.micro_batch_size, p.num_micro_batches, p.gpu_weight_fraction,
                 p.attention_device, p.kv_cache_device, p.page_bytes, p.overlap)


def _mb_prices(m, hw, wl, layer, k: Knobs, sh: "SweepShape"):
    """Per-micro-batch prices (0 where a group is empty) and the layer's stream [s]."""
    has_d, has_p = np.asarray(sh.n_d) > 0, np.asarray(sh.n_p) > 0
    rows_d = np.maximum(sh.rows_d, 1)
    dev_d, dev_p = (np.maximum(r, 1) for r in sh.device_rows)
    stream_s, stream = _stream(m, hw, layer, k.wg, k.page_bytes)
    act = costs.attn_out_bytes(m, dev_d) + costs.qkv_bytes(m, dev_d)
    host = (stream / np.maximum(sh.n_d, 1) + act) if k.overlap else 0.0
    d = [np.where(has_d, x, 0.0)
         for x in _decode_mb(m, hw, wl, layer, rows_d, dev_d, sh.ctx_d, host)]
    p = [np.where(has_p, x, 0.0) for x in
         _prefill_mb(m, hw, wl, layer, dev_p, np.maximum(sh.len_p, 1))]
    return has_d, d, p, stream_s


def sweep_layer(m, hw, wl, layer, k: Knobs, sh: "SweepShape"):
    """(link busy a, the rest b) [s] of one layer. Busy: gpu = n_d·(pre_d + post_d) +
    n_p·(pre_p + post_p), cpu = n_d·c_d, h2d = a = stream + n_d·h_d, d2h = n_d·d_d + n_p·d_p;
    b = max(other lanes (`predict._combine`), stalls of the order d_0..d_{n_d−2}, prefills, d_last):
      gpu + wait for the first decode output x = max(d2h + cpu, stream/n) + h2d, less GPU work
        queued before its post (pre of the next, or the prefill posts when it is last);
      cpu + GPU work before the first CPU attention + d2h + (h2d + post_d) after it;
      (n−1)/n·stream + h_d + post_d (last output behind the next pages);
      (n_d−1)/n·stream + h_d + post_d + [(n_p−1)·(pre_p + post_p) + pre_d + max(post_p, x)]
        + post_d (d_{n_d−2}, then the prefills and d_last);
      two-slot cycle 2·t ≥ stream + Σ posts (the pass after next waits for the slot)."""
    has_d, (pre_d, post_d, c_d, h_d, d_d), (pre_p, post_p, d_p), stream_s = \
        _mb_prices(m, hw, wl, layer, k, sh)
    n_d, n_p = np.asarray(sh.n_d, dtype=float), np.asarray(sh.n_p, dtype=float)
    n = n_d + n_p
    busy = dict(gpu=n_d * (pre_d + post_d) + n_p * (pre_p + post_p), cpu=n_d * c_d,
                h2d=stream_s + n_d * h_d, d2h=n_d * d_d + n_p * d_p)
    if not k.overlap or hw.device_is_host:  # no stalls: `_combine` charges sharing
        return busy["h2d"], _combine(hw, k.overlap, **busy)
    prefill_first = (n_d == 1) & (n_p > 0)
    x = np.where(prefill_first, d_d + c_d, np.maximum(d_d + c_d, stream_s / n)) + h_d
    ahead = np.where(prefill_first, n_p * post_p, np.where(
        n == 1, 0.0, np.where((n_d == 2) & (n_p > 0), pre_p, pre_d)))
    head = np.where(prefill_first, n_p * pre_p, 0.0) + pre_d + d_d
    b = np.maximum(np.maximum(busy["gpu"], busy["cpu"]), busy["d2h"])
    b = np.maximum(b, np.where(has_d, busy["gpu"] + np.maximum(x - ahead, 0.0), 0.0))
    b = np.maximum(b, np.where(has_d, busy["cpu"] + head + h_d + post_d, 0.0))
    if m.is_moe_layer(layer):
        last = np.where(has_d, (n - 1) / n * stream_s + h_d + post_d, 0.0)
        b = np.maximum(b, np.where(n > 1, last, 0.0))
        tail = np.where(n_p > 0, (n_p - 1) * (pre_p + post_p) + pre_d
                        + np.maximum(post_p, d_d + c_d + h_d), 0.0) + post_d
        b = np.maximum(b, np.where(n_d > 1, (n_d - 1) / n * stream_s + h_d + post_d
                                   + tail, 0.0))
        b = np.maximum(b, (stream_s + n_d * post_d + n_p * post_p) / 2)
    return busy["h2d"], b


def sweep_s(m: ModelConfig, hw: HardwareSpec, wl: Workload, policy, sh: SweepShape,
            first_pages: bool = False):
    """Time [s] of one sweep, broadcast over `sh` (and a `Knobs`' wg), from `sweep_layer`'s a, b:
        max(Σ_l max(a_l, b_l), Σ_l b_l + heads, Σ_l b_l − post_last + stream_0/n)
    [+ layer 0's stream if `first_pages`]: the link starts at the sweep's start, LM heads
    follow the last layer, the next sweep's last pages follow the last output."""
    k = knobs_of(policy)
    link = chain = 0.0
    for layer, count in _layer_kinds(m):
        a, b = sweep_layer(m, hw, wl, layer, k, sh)
        link, chain = link + count * np.maximum(a, b), chain + count * b
    has_d, d, p, _ = _mb_prices(m, hw, wl, m.num_layers - 1, k, sh)
    stream0 = _stream(m, hw, 0, k.wg, k.page_bytes)[0]
    t = np.maximum(link, chain + _heads_s(m, hw, sh))
    if k.overlap and not hw.device_is_host:
        t = np.maximum(t, chain - np.where(has_d, d[1], p[1]) + stream0 / (sh.n_d + sh.n_p))
    return t + (stream0 if first_pages else 0.0)


def _heads_s(m, hw, sh: SweepShape):
    """LM heads [s] of a sweep's micro-batches: one token per device row."""
    dev_d, dev_p = (np.maximum(r, 1) for r in sh.device_rows)
    return (np.where(np.asarray(sh.n_d) > 0, sh.n_d * costs.gpu_lm_head_s(m, hw, dev_d), 0.0)
            + np.where(np.asarray(sh.n_p) > 0, sh.n_p * costs.gpu_lm_head_s(m, hw, dev_p),
                       0.0))


# ------------------------------------------------------------------- memory
def kv_capacity_tokens(m: ModelConfig, hw: HardwareSpec, wl: Workload, batch_size, wg,
                       host_kv_bytes: float | None = None, device_bytes=0.0):
    """M [KV tokens] = host_kv_bytes / kv_bytes_per_token, broadcast; host_kv_bytes defaults to
    0.9·host − (1 − wg)·W_E·L_moe − q/k/v/o staging of `batch_size` rows [− device bytes where
    the device is the host]. Each admitted sequence reserves prompt + max new tokens."""
    if host_kv_bytes is None:
        staging = batch_size * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim \
            * m.bytes_per_param
        host_kv_bytes = (memory_budgets(hw)[1] - (1 - np.asarray(wg)) * m.expert_bytes_total()
                         - staging - (device_bytes if hw.device_is_host else 0.0))
    return np.maximum(host_kv_bytes, 0.0) / m.kv_bytes_per_token(wl.kv_bytes_per_elem)


def prefill_tokens(wl: Workload, policy_budget, concurrency) -> float:
    """Padded prompt tokens of a sweep's prefill at most: the budget, else everything."""
    return (float(policy_budget) if policy_budget is not None
            else concurrency * padded_len(max(wl.prompt_lens or (wl.prompt_len,))))


def device_bytes(m: ModelConfig, wl: Workload, ubs, batch_size, wg, prefill_tokens,
                 prefill_mb_tokens=None):
    """Peak device bytes, broadcast, affine in wg on [0, 1): NE + wg·W_E·L_moe +
    [wg < 1]·2·(1 − wg)·W_E + 2·N·h·b + T·h·b + max(2 decode micro-batch working sets, one
    prefill of T_mb tokens + T_mb·heads·s·4 fp32 scores at the longest prompt s) + logits."""
    h, b = m.hidden_size, m.bytes_per_param
    s = padded_len(max(wl.prompt_lens or (wl.prompt_len,)))
    t_mb = np.minimum(prefill_tokens, ubs * s)  # `pack_prefill`: ≤ ubs prompts, ≤ cap tokens
    if prefill_mb_tokens is not None:
        t_mb = np.minimum(t_mb, prefill_mb_tokens)
    prefill_ws = working_set_bytes(m, t_mb) + t_mb * m.num_heads * s * 4
    act = (2 * batch_size * h * b + prefill_tokens * h * b
           + np.maximum(2 * working_set_bytes(m, ubs), prefill_ws)
           + np.maximum(ubs, t_mb / s) * m.vocab_size * costs.LOGITS_BYTES)
    wg = np.asarray(wg, dtype=float)
    stream = np.where(wg < 1, sum(costs.stream_buffer_bytes(
        costs.streamed_expert_bytes(m, wg)).values()), 0.0) if m.num_moe_layers else 0.0
    return m.non_expert_bytes() + wg * m.expert_bytes_total() + stream + act


# ---------------------------------------------------------------- admission
@dataclass(frozen=True)
class Admission:
    """Per sweep (arrays): `shape`, `tokens` generated, `running` sequences holding KV."""

    shape: SweepShape
    tokens: np.ndarray
    running: np.ndarray
    reserved_tokens: np.ndarray  # KV reserved during the sweep


def pack_prefill(prompt_lens, ubs: int, cap=None) -> list[list[int]]:
    """A sweep's prefill micro-batches, the one rule the engine and the model share:
    positions into `prompt_lens`, sorted by length, each group at most `prefill_rows` of
    its longest padded prompt (≤ ubs prompts, ≤ cap padded tokens; a longer one alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(prompt_lens)), key=lambda j: prompt_lens[j]):
        g = groups[-1] if groups else None
        if g is not None and len(g) < prefill_rows(padded_len(
                max(prompt_lens[g[-1]], prompt_lens[i])), ubs, cap):
            g.append(i)
        else:
            groups.append([i])
    return groups


def admit(requests, start: int, running: int, policy: Policy, try_reserve) -> int:
    """How many of requests[start:] ((prompt, max_new) pairs, FIFO) the next sweep admits,
    the one rule the engine and the model share: while running + admitted <
    `policy.concurrency`, their padded prompts sum to ≤ `policy.prefill_tokens_per_sweep`
    (the first always counts) and `try_reserve(p, g)` reserves the KV (False: stop)."""
    budget, n, tok = policy.prefill_tokens_per_sweep, 0, 0
    while start + n < len(requests) and running + n < policy.concurrency:
        p, g = requests[start + n]
        if budget is not None and n and tok + padded_len(p) > budget:
            break
        if not try_reserve(int(p), int(g)):
            break
        n, tok = n + 1, tok + padded_len(p)
    return n


class KVPlan:
    """KV each admitted sequence will hold at every future sweep, in units of `unit` tokens
    (1 for the model, the block size for the engine's paged cache), against `capacity`
    units: the one reservation rule of the engine and the model. Admitted at sweep s, a
    sequence of prompt p and at most g new tokens holds at s + j (j < g) ⌈(p + g)/unit⌉
    ("max") or ⌈(p + j + 1)/unit⌉ ("lookahead": its KV as it grows). A sequence is admitted
    only if the plan stays within capacity at every future sweep; outputs only end early
    (EOS), so no sequence is ever preempted. `finish` drops the rest of an early finisher's
    plan, `advance` moves to the next sweep."""

    def __init__(self, capacity: float, horizon: int, unit: int = 1,
                 kv_reservation: str = "max"):
        self.capacity, self.unit = float(capacity), int(unit)
        self.lookahead = kv_reservation == "lookahead"
        self.occ = np.zeros(int(horizon) + 1)  # [sweeps from now] planned units
        self.sweep, self._live = 0, {}  # seq -> (its plan, sweep admitted)

    def tokens(self, p: int, g: int, age):
        """KV tokens the sequence holds `age` sweeps after its admission (age < g)."""
        return p + 1 + age if self.lookahead else p + g + 0 * age  # (shaped as age)

    def try_reserve(self, p: int, g: int, seq=None) -> bool:
        """Admit (True) if the plan stays within capacity; `seq` (a key) tracks it for
        `finish`."""
        need = -(-self.tokens(int(p), int(g), np.arange(int(g))) // self.unit).astype(float)
        if need.size >= self.occ.size:
            self.occ = np.append(self.occ, np.zeros(need.size - self.occ.size + 1))
        plan = self.occ[:need.size] + need
        if plan.max(initial=0.0) > self.capacity:
            return False
        self.occ[:need.size] = plan
        if seq is not None:
            self._live[seq] = (need, self.sweep)
        return True

    def finish(self, seq) -> None:
        """Tracked `seq` ended at this sweep: its units from the next sweep on are free."""
        need, s0 = self._live.pop(seq)
        rest = need[self.sweep - s0 + 1:]
        self.occ[1:1 + rest.size] -= rest

    def advance(self) -> None:
        self.occ = np.append(self.occ[1:], 0.0)
        self.sweep += 1

    @property
    def now(self) -> float:
        """Units planned for the current sweep."""
        return float(self.occ[0])


def admission(requests, kv_tokens: float, policy: Policy) -> Admission:
    """Continuous batching per sweep (docs/design.md §7): admit FIFO while the `KVPlan` of
    `kv_tokens` admits (policy.kv_reservation), running ≤ `policy.concurrency`, Σ padded
    prompts ≤ `policy.prefill_tokens_per_sweep` (≥ one); one token per sweep. ValueError if
    a request never fits."""
    p_all = np.array([r[0] for r in requests], dtype=np.int64)
    g_all = np.array([r[1] for r in requests], dtype=np.int64)
    if (p_all + g_all).max(initial=0) > kv_tokens:
        raise ValueError(f"a request of {int((p_all + g_all).max())} tokens (prompt + "
                         f"max new) exceeds the KV capacity of {kv_tokens:.0f} tokens")
    ubs = policy.micro_batch_size
    plan = KVPlan(kv_tokens, int(g_all.max(initial=1)), 1, policy.kv_reservation)
    act_p = act_g = act_n = np.zeros(0, dtype=np.int64)
    nxt, out, reqs = 0, [], list(zip(p_all.tolist(), g_all.tolist()))
    while nxt < len(p_all) or act_p.size:
        n = admit(reqs, nxt, act_p.size, policy, plan.try_reserve)
        adm, nxt = list(range(nxt, nxt + n)), nxt + n
        rows = act_p.size
        lens = [int(p_all[i]) for i in adm]
        cap = policy.prefill_micro_batch_tokens
        groups = [[lens[j] for j in g] for g in pack_prefill(lens, ubs, cap)]
        n_d = -(-rows // ubs)
        dev_d = sum(padded_rows(min(ubs, rows - j), ubs) for j in range(0, rows, ubs))
        dev_p = [prefill_device_rows(g, ubs, cap) for g in groups]
        padded = sum(r * padded_len(max(g)) for r, g in zip(dev_p, groups))
        n_g = max(len(groups), 1)
        out.append((n_d, rows / max(n_d, 1), (act_p + act_n).sum() / max(rows, 1),
                    len(groups), len(adm) / n_g, padded / max(sum(dev_p), 1),
                    dev_d / max(n_d, 1), sum(dev_p) / n_g,
                    rows + len(adm), rows + len(adm), plan.now))
        plan.advance()
        act_p = np.concatenate([act_p, p_all[adm]])
        act_g = np.concatenate([act_g, g_all[adm]])
        act_n = np.concatenate([act_n + 1, np.ones(len(adm), dtype=np.int64)])
        done = act_n >= act_g
        act_p, act_g, act_n = act_p[~done], act_g[~done], act_n[~done]
    cols = np.array(out, dtype=float).T if out else np.zeros((11, 0))
    return Admission(SweepShape(*cols[:8]), cols[8], cols[9], cols[10])


# ------------------------------------------------------------------ steady state
def steady_state(wl: Workload, kv_tokens, ubs, concurrency, prefill_budget=None,
                 prefill_mb_tokens=None, kv_reservation: str = "max"):
    """(admissions per sweep λ, running C, SweepShape), broadcast; Little's law with r = p + g
    ("max") or p + (g+1)/2 ("lookahead") KV tokens held over g sweeps:
        λ = min(M / E[r·g], C_max / E[g], B / E[padded p])   [sequences / sweep]
    C = λ·E[g]; decode rows R = λ·(E[g] − 1) in ⌈R/ubs⌉ micro-batches, Σ contexts
    λ·E[(g−1)·p + g(g−1)/2]; prefill in max(⌈λ/ubs⌉, ⌈λ·E[pp]/T_mb⌉) micro-batches; the device
    runs the mean rows `padded_rows` (the last decode micro-batch; length padding left out)."""
    req = np.array(wl.requests(len(wl.prompt_lens) if wl.prompt_lens else 1), dtype=float)
    p, g = req[:, 0], req[:, 1]
    pp = np.array([padded_len(int(x)) for x in p], dtype=float)
    held = p + (g + 1) / 2 if kv_reservation == "lookahead" else p + g
    lam = np.minimum(np.asarray(kv_tokens, dtype=float) / np.mean(held * g),
                     np.asarray(concurrency, dtype=float) / g.mean())
    if prefill_budget is not None:
        lam = np.minimum(lam, np.asarray(prefill_budget, dtype=float) / pp.mean())
    rows = lam * (g.mean() - 1)
    n_d = np.ceil(rows / ubs - 1e-9)
    ctx = lam * np.mean((g - 1) * p + g * (g - 1) / 2) / np.maximum(rows, 1e-9)
    n_p = np.maximum(np.ceil(lam / ubs - 1e-9), 1)  # `pack_prefill`: ≤ ubs prompts a group
    cap_p = ubs
    if prefill_mb_tokens is not None:
        n_p = np.maximum(n_p, np.ceil(lam * pp.mean() / prefill_mb_tokens - 1e-9))
        cap_p = np.maximum(1, np.minimum(ubs, np.floor(prefill_mb_tokens / pp.mean())))
    last = rows - np.maximum(n_d - 1, 0) * ubs  # the last decode micro-batch, padded
    dev_d = (np.maximum(n_d - 1, 0) * ubs + padded_rows(last, ubs)) / np.maximum(n_d, 1)
    shape = SweepShape(n_d, rows / np.maximum(n_d, 1), ctx, n_p, lam / n_p,
                       np.full_like(lam, pp.mean()), dev_d, padded_rows(lam / n_p, cap_p))
    return lam, lam * g.mean(), shape


# ------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class ContinuousPrediction:
    """`tokens_per_s` end to end (Σ g / Σ sweep times), `steady_tokens_per_s` = C / steady
    sweep, MoE-Lens `limit_tokens_per_s` [generated tok/s]; times [s], KV [tokens]."""

    policy: Policy
    tokens_per_s: float
    steady_tokens_per_s: float
    limit_tokens_per_s: float
    sweeps: int
    total_s: float
    sweep_s: float  # steady-state sweep
    mean_concurrency: float  # time-weighted over the job's sweeps
    steady_concurrency: float
    steady_admissions_per_sweep: float
    kv_capacity_tokens: float
    peak_device_bytes: float
    bound: MoELensBound

    @property
    def fraction_of_limit(self) -> float:
        return self.tokens_per_s / self.limit_tokens_per_s


def _check_policy(policy: Policy):
    if not isinstance(policy, Policy):
        raise ValueError(f"policy={policy!r} is not a Policy")
    if policy.attention_device != "cpu" or policy.kv_cache_device != "cpu":
        raise ValueError("continuous batching runs decode attention on the cpu next to "
                         "the host KV cache (attention_device='cpu', kv_cache_device='cpu')")


def predict_continuous(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                       policy: Policy, host_kv_bytes: float | None = None,
                       requests=None) -> ContinuousPrediction:
    """`admission` of `requests` (default `workload.requests()`) priced by `sweep_s` (the first
    also loads layer 0's pages), steady state by `steady_state`, KV by `kv_capacity_tokens`."""
    check_inputs(model, hw, workload)
    _check_policy(policy)
    m, wl, pol = model, workload, policy
    peak = float(device_bytes(m, wl, pol.micro_batch_size, pol.batch_size,
                              pol.gpu_weight_fraction,
                              prefill_tokens(wl, pol.prefill_tokens_per_sweep,
                                              pol.concurrency),
                              pol.prefill_micro_batch_tokens))
    kv = float(kv_capacity_tokens(m, hw, wl, pol.batch_size, pol.gpu_weight_fraction,
                                  host_kv_bytes, peak))
    adm = admission(requests if requests is not None else wl.requests(), kv, pol)
    times = sweep_s(m, hw, wl, pol, adm.shape)
    times = np.asarray(times, dtype=float) + np.where(
        np.arange(times.size) == 0, _stream(m, hw, 0, pol.gpu_weight_fraction,
                                            pol.page_bytes)[0], 0.0)
    lam, conc, sh = steady_state(wl, kv, pol.micro_batch_size, pol.concurrency,
                                 pol.prefill_tokens_per_sweep, pol.prefill_micro_batch_tokens,
                                 pol.kv_reservation)
    t_steady = float(sweep_s(m, hw, wl, pol, sh))
    bound = moe_lens_bound(m, hw, wl)
    total = float(times.sum())
    return ContinuousPrediction(
        policy=pol, tokens_per_s=float(adm.tokens.sum()) / total,
        steady_tokens_per_s=float(conc) / t_steady,
        limit_tokens_per_s=bound.generated_tokens_per_s, sweeps=int(times.size),
        total_s=total, sweep_s=t_steady,
        mean_concurrency=float((adm.running * times).sum() / total),
        steady_concurrency=float(conc), steady_admissions_per_sweep=float(lam),
        kv_capacity_tokens=kv, peak_device_bytes=peak, bound=bound)


# ------------------------------------------------------------------ search
PREFILL_BUDGETS = tuple(1 << i for i in range(9, 21))  # 512 … 1M padded tokens / sweep
PREFILL_MICRO_BATCHES = (None, 2048, 8192, 16384)  # tokens per prefill micro-batch
MICRO_BATCH_COUNTS = tuple(range(1, 17)) + (20, 24, 32, 48, 64)
TOP_GROUPS = 1  # (ubs, n_ub) leaders per T_mb whose jobs are simulated at every budget
RAMP_BUDGET = 16  # budgets beyond this × the steady prefill are not simulated


def _candidates(m, hw, wl, dev_cap, host_kv_bytes, cap):
    """[C] arrays (ubs, n_ub, B, T_mb (0: = B), wg, M) that fit: wg the largest the device budget
    allows (affine below 1; 1 if all fits), M = `kv_capacity_tokens` ≥ the longest request."""
    from moejax.schedule.search import WG_STEP, ubs_grid

    grid = [(u, n, b, t or 0) for u in ubs_grid(cap) for n in MICRO_BATCH_COUNTS
            if u * n <= cap for b in PREFILL_BUDGETS for t in PREFILL_MICRO_BATCHES
            if t is None or t < b]
    ubs, n_ub, bud, tmb = (np.array(c, dtype=float) for c in zip(*grid))
    t_mb = np.where(tmb > 0, tmb, bud)
    dev = lambda wg: device_bytes(m, wl, ubs, ubs * n_ub, wg, bud, t_mb)
    d0, dh, dr = dev(0.0), dev(0.5), dev(1.0)
    lo, hi = affine_interval(d0, 2 * (dh - d0), dev_cap)
    hi = np.floor(np.minimum(hi, 1 - WG_STEP) / WG_STEP) * WG_STEP
    wg = np.where(dr <= dev_cap, 1.0, np.where(hi >= lo, hi, np.nan))
    ok = ~np.isnan(wg)
    c = [x[ok] for x in (ubs, n_ub, bud, tmb, wg)]
    dev_at = device_bytes(m, wl, c[0], c[0] * c[1], c[4], c[2], np.where(c[3] > 0, c[3], c[2]))
    kv = np.broadcast_to(kv_capacity_tokens(m, hw, wl, c[0] * c[1], c[4], host_kv_bytes,
                                            dev_at), c[0].shape)  # a given budget: scalar
    longest = max(p + g for p, g in wl.requests(len(wl.prompt_lens or (1,))))
    ok = kv >= longest
    return [x[ok] for x in c] + [kv[ok]]


def search_continuous(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                      device_memory_bytes: float | None = None,
                      host_kv_bytes: float | None = None, kv_reservation: str = "max"):
    """(policy, ContinuousPrediction) with the best predicted end-to-end tokens/s over ubs, n_ub ∈
    `MICRO_BATCH_COUNTS`, B ∈ `PREFILL_BUDGETS`, T_mb ∈ `PREFILL_MICRO_BATCHES`, wg by `device_bytes`.
    (ubs, n_ub) are ranked per T_mb by steady-state tokens/s; the `TOP_GROUPS` leaders are simulated
    at every B ≤ `RAMP_BUDGET` × the unthrottled steady prefill, because B trades throttled
    admission against ramp-up, device memory and long sweeps. First best wins; `kv_reservation`
    is the admission rule, not searched."""
    from moejax.schedule.search import MAX_BATCH_SIZE

    check_inputs(model, hw, workload)
    dev_cap, _ = memory_budgets(hw, device_memory_bytes)
    cap = min(workload.num_sequences or MAX_BATCH_SIZE, MAX_BATCH_SIZE)
    ubs, n_ub, bud, tmb, wg, kv = _candidates(model, hw, workload, dev_cap, host_kv_bytes,
                                              cap)
    if ubs.size == 0:
        raise ValueError(f"no continuous-batching policy fits {model.name} on {hw.name} "
                         f"(device budget {dev_cap / 2**30:.1f} GiB)")
    _, conc, sh = steady_state(workload, kv, ubs, ubs * n_ub, bud,
                               np.where(tmb > 0, tmb, bud), kv_reservation)
    tps = conc / sweep_s(model, hw, workload, Knobs(ubs, n_ub, wg), sh)
    free = steady_state(workload, kv, ubs, ubs * n_ub, None, None, kv_reservation)[2]
    need = free.n_p * free.rows_p * free.len_p * (1 - 1e-9)  # unthrottled prefill/sweep
    groups: dict = {}
    for i in np.argsort(-tps, kind="stable"):
        groups.setdefault(tmb[i], {}).setdefault((ubs[i], n_ub[i]), []).append(i)
    best = None
    leaders = [g for by_t in groups.values() for g in list(by_t.values())[:TOP_GROUPS]]
    for members in leaders:
        for i in sorted(members, key=lambda j: bud[j]):
            if bud[i] > RAMP_BUDGET * max(need[i], PREFILL_BUDGETS[0]):
                continue  # far beyond what the steady state admits
            pol = Policy.from_micro_batches(
                int(ubs[i]), int(n_ub[i]), gpu_weight_fraction=float(wg[i]),
                prefill_tokens_per_sweep=int(bud[i]),
                prefill_micro_batch_tokens=int(tmb[i]) if tmb[i] else None,
                kv_reservation=kv_reservation)
            pred = predict_continuous(model, hw, workload, pol, host_kv_bytes)
            if best is None or pred.tokens_per_s > best[1].tokens_per_s:
                best = (pol, pred)
    return best
