"""Continuous batching in the performance model (docs/design.md §7, MoE-Lens): a job runs
as *sweeps*, one forward over every layer = one pass over the streamed experts, serving
every running sequence's next token and the prefill of the sequences admitted since the
last sweep (`timeline.build_sweep` is the same sweep as data).

- `sweep_s`: a sweep's time from the op prices of `costs`, composed per layer as
  `predict.decode_layer` composes a static step (busy lanes, CGOPipe max, stalls);
- `admission`: the scheduler at sweep granularity over a job's requests — FIFO while
  the KV reservations fit (prompt + max new tokens, or the planned growth), ≤ the
  prefill budget per sweep; one token per sweep (the first in its prefill sweep); KV
  freed on finishing;
- `predict_continuous`: end to end (the admission's sweeps, each priced) and steady
  state (Little's law on the KV reservation), beside the MoE-Lens bound;
- `search_continuous`: the knobs under the device and host budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.model_config.workload import Workload
from moejax.schedule import costs
from moejax.schedule.policy import Policy, affine_interval, padded_len
from moejax.schedule.predict import (Knobs, MoELensBound, _combine, _layer_kinds, _stream,
                                     check_inputs, memory_budgets, moe_lens_bound,
                                     working_set_bytes)


# ------------------------------------------------------------------ sweep shape
@dataclass(frozen=True)
class SweepShape:
    """A sweep's micro-batches as two uniform groups (arrays broadcast): `n_d` decode
    micro-batches of `rows_d` rows whose new tokens attend to `ctx_d` keys each (mean,
    itself included), `n_p` prefill micro-batches of `rows_p` prompts padded to `len_p`
    (the mean over micro-batches of different padding: their padded tokens are exact)."""

    n_d: object
    rows_d: object
    ctx_d: object
    n_p: object = 0.0
    rows_p: object = 0.0
    len_p: object = 0.0

    @classmethod
    def of(cls, decode, prefill) -> "SweepShape":
        """The shape of `build_sweep(decode, prefill)`'s micro-batches, as their means."""
        d_rows = sum(len(g) for g in decode)
        p_rows = sum(len(g) for g in prefill)
        padded = sum(len(g) * padded_len(max(g)) for g in prefill)
        keys = sum(len(g) * -(-sum(g) // len(g)) for g in decode)  # as build_sweep rounds
        return cls(len(decode), d_rows / max(len(decode), 1), keys / max(d_rows, 1),
                   len(prefill),
                   p_rows / max(len(prefill), 1), padded / max(p_rows, 1))


def _decode_mb(m, hw, wl, layer, rows, ctx, host_bytes):
    """(pre, post, cpu, h2d, d2h) [s] of one decode micro-batch of one layer: device
    pre-attention, post-attention + FFN, CPU attention and the two transfers."""
    pre = costs.gpu_pre_attention_s(m, hw, rows)
    post = (costs.gpu_post_attention_s(m, hw, rows, layer)
            + costs.gpu_ffn_s(m, hw, rows, layer, wl.imbalance["decode"]))
    cpu = costs.cpu_attention_s(m, hw, rows, ctx, wl.kv_bytes_per_elem, host_bytes)
    return (pre, post, cpu, costs.h2d_s(hw, costs.attn_out_bytes(m, rows)),
            costs.d2h_s(hw, costs.qkv_bytes(m, rows)))


def _prefill_mb(m, hw, wl, layer, rows, s):
    """(pre + attention, post + FFN, d2h of k/v) [s] of one prefill micro-batch of
    `rows` prompts padded to `s`."""
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
    rows_d, rows_p = np.maximum(sh.rows_d, 1), np.maximum(sh.rows_p, 1)
    stream_s, stream = _stream(m, hw, layer, k.wg, k.page_bytes)
    act = costs.attn_out_bytes(m, rows_d) + costs.qkv_bytes(m, rows_d)
    host = (stream / np.maximum(sh.n_d, 1) + act) if k.overlap else 0.0
    d = [np.where(has_d, x, 0.0) for x in _decode_mb(m, hw, wl, layer, rows_d, sh.ctx_d, host)]
    p = [np.where(has_p, x, 0.0) for x in
         _prefill_mb(m, hw, wl, layer, rows_p, np.maximum(sh.len_p, 1))]
    return has_d, d, p, stream_s


def sweep_layer(m, hw, wl, layer, k: Knobs, sh: "SweepShape"):
    """(link busy a, the rest b) [s] of one layer of a sweep. Busy: gpu = n_d·(pre_d +
    post_d) + n_p·(pre_p + post_p), cpu = n_d·c_d, h2d = a = stream + n_d·h_d, d2h =
    n_d·d_d + n_p·d_p; b = max of the other lanes (`predict._combine`) and the stalls of
    the sweep's order (`build_sweep`: d_0..d_{n_d−2}, prefills, d_last):
      gpu + the wait for the first decode output, x = max(d2h + cpu, stream/n) + h2d
        (it also queues behind the first chunk of the next pages), less the GPU work
        queued before its post (pre of the next, or the prefill posts when it is last);
      cpu + the GPU work before the first CPU attention + d2h + (h2d + post_d) after it;
      the last output behind (n−1)/n of the next pages: (n−1)/n·stream + h_d + post_d;
      d_{n_d−2}'s output behind (n_d−1)/n of them, then its post, the prefills and
        d_last: (n_d−1)/n·stream + h_d + post_d + [(n_p−1)·(pre_p + post_p) + pre_d +
        max(post_p, x)] + post_d;
      the two-slot cycle 2·t ≥ stream + Σ posts (a pass's posts wait for all its
      pages; the pass after next waits for them to free the slot)."""
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
    """Time [s] of one sweep, broadcast over `sh`'s arrays (and a `Knobs`' wg), from
    per-layer a (link) and b (the rest, stalls included; `sweep_layer`):
        max(Σ_l max(a_l, b_l), Σ_l b_l + heads, Σ_l b_l − post_last + stream_0/n)
    — the link runs from the sweep's start (layer 0's pages came with the previous
    sweep); the LM heads follow the last layer; the next sweep's last chunk of pages
    follows the last output. [+ layer 0's stream if `first_pages`.] Op prices: `costs`."""
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
    """LM heads [s] of a sweep's micro-batches: one token per sequence."""
    return (np.where(np.asarray(sh.n_d) > 0, sh.n_d * costs.gpu_lm_head_s(
        m, hw, np.maximum(sh.rows_d, 1)), 0.0) + np.where(np.asarray(sh.n_p) > 0, sh.n_p
        * costs.gpu_lm_head_s(m, hw, np.maximum(sh.rows_p, 1)), 0.0))


# ------------------------------------------------------------------- memory
def kv_capacity_tokens(m: ModelConfig, hw: HardwareSpec, wl: Workload, batch_size, wg,
                       host_kv_bytes: float | None = None, device_bytes=0.0):
    """M [KV tokens] the host holds beside the streamed experts, broadcast: host_kv_bytes
    / kv_bytes_per_token, where host_kv_bytes defaults to 0.9·host − (1 − wg)·W_E·L_moe −
    staging of q/k/v/o for `batch_size` rows [− the device bytes where the device is
    the host]. Every admitted sequence reserves prompt + max new tokens of it."""
    if host_kv_bytes is None:
        staging = batch_size * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim \
            * m.bytes_per_param
        host_kv_bytes = (memory_budgets(hw)[1] - (1 - np.asarray(wg)) * m.expert_bytes_total()
                         - staging - (device_bytes if hw.device_is_host else 0.0))
    return np.maximum(host_kv_bytes, 0.0) / m.kv_bytes_per_token(wl.kv_bytes_per_elem)


def _prefill_tokens(wl: Workload, policy_budget, concurrency) -> float:
    """Padded prompt tokens of a sweep's prefill at most: the budget, else everything."""
    return (float(policy_budget) if policy_budget is not None
            else concurrency * padded_len(max(wl.prompt_lens or (wl.prompt_len,))))


def device_bytes(m: ModelConfig, wl: Workload, ubs, batch_size, wg, prefill_tokens,
                 prefill_mb_tokens=None):
    """Peak device bytes of a continuous policy, broadcast, affine in wg on [0, 1):
    NE + wg·W_E·L_moe + [wg < 1]·2·(1 − wg)·W_E (stream buffers) + activations: 2·N·h·b
    (every decode row's hidden states) + T·h·b (the sweep's prefill tokens) + the larger
    working set of two decode micro-batches and one prefill micro-batch of T_mb tokens
    (with its fp32 scores, T_mb·heads·s·4 at the longest prompt s) + logits."""
    h, b = m.hidden_size, m.bytes_per_param
    t_mb = prefill_tokens if prefill_mb_tokens is None else np.minimum(prefill_mb_tokens,
                                                                       prefill_tokens)
    s = padded_len(max(wl.prompt_lens or (wl.prompt_len,)))
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
    """The sweeps of a job under continuous batching (one entry per sweep, arrays):
    `shape` (its micro-batches), `tokens` generated, `running` sequences holding KV."""

    shape: SweepShape
    tokens: np.ndarray
    running: np.ndarray
    reserved_tokens: np.ndarray  # KV reserved during the sweep


def _pack_prefill(prompts, cap) -> list[list[int]]:
    """A sweep's prompts, sorted by length (less padding), into micro-batches of ≤ cap
    padded tokens (rows × padded longest; a longer prompt alone); cap None: one."""
    groups: list[list[int]] = []
    for p in sorted(prompts):
        g = groups[-1] if groups else None
        if g is not None and (cap is None or (len(g) + 1) * padded_len(max(max(g), p)) <= cap):
            g.append(p)
        else:
            groups.append([p])
    return groups


def admission(requests, kv_tokens: float, policy: Policy) -> Admission:
    """Continuous batching at sweep granularity (docs/design.md §7). Before each sweep,
    admit FIFO while the KV plan fits `kv_tokens` at every future sweep, the running
    sequences stay ≤ `policy.concurrency`, and the admitted Σ padded prompts ≤
    `policy.prefill_tokens_per_sweep` (at least one). A sequence admitted at sweep s
    holds, during sweep s + j (j < g), p + g tokens (`kv_reservation="max"`) or p + j + 1
    ("lookahead"); it generates one token per sweep (its first in its prefill sweep)
    and frees its KV on finishing. ValueError if a request can never fit."""
    p_all = np.array([r[0] for r in requests], dtype=np.int64)
    g_all = np.array([r[1] for r in requests], dtype=np.int64)
    if (p_all + g_all).max(initial=0) > kv_tokens:
        raise ValueError(f"a request of {int((p_all + g_all).max())} tokens (prompt + "
                         f"max new) exceeds the KV capacity of {kv_tokens:.0f} tokens")
    ubs, budget = policy.micro_batch_size, policy.prefill_tokens_per_sweep
    grow = policy.kv_reservation == "lookahead"
    ramp = 1.0 + np.arange(int(g_all.max(initial=1)) + 1)
    occ = np.zeros(ramp.size)  # lookahead: planned KV tokens per sweep, from this one
    reserved = 0  # max: KV reserved now (it only falls until the next admission)
    act_p = act_g = act_n = np.zeros(0, dtype=np.int64)
    nxt, out = 0, []
    while nxt < len(p_all) or act_p.size:
        adm, tok = [], 0
        while nxt < len(p_all) and act_p.size + len(adm) < policy.concurrency:
            p, g = int(p_all[nxt]), int(g_all[nxt])
            if budget is not None and adm and tok + padded_len(p) > budget:
                break
            if grow:
                plan = occ[:g] + p + ramp[:g]
                if plan.max() > kv_tokens:
                    break
                occ[:g] = plan
            elif reserved + p + g > kv_tokens:
                break
            reserved += p + g
            adm.append(nxt)
            tok, nxt = tok + padded_len(p), nxt + 1
        rows = act_p.size
        groups = _pack_prefill([int(p_all[i]) for i in adm], policy.prefill_micro_batch_tokens)
        n_d = -(-rows // ubs)
        padded = sum(len(g) * padded_len(max(g)) for g in groups)
        out.append((n_d, rows / max(n_d, 1), (act_p + act_n).sum() / max(rows, 1),
                    len(groups), len(adm) / max(len(groups), 1), padded / max(len(adm), 1),
                    rows + len(adm), rows + len(adm), occ[0] if grow else reserved))
        occ = np.append(occ[1:], 0.0)
        act_p = np.concatenate([act_p, p_all[adm]])
        act_g = np.concatenate([act_g, g_all[adm]])
        act_n = np.concatenate([act_n + 1, np.ones(len(adm), dtype=np.int64)])
        done = act_n >= act_g
        reserved -= int((act_p[done] + act_g[done]).sum())
        act_p, act_g, act_n = act_p[~done], act_g[~done], act_n[~done]
    cols = np.array(out, dtype=float).T if out else np.zeros((9, 0))
    return Admission(SweepShape(*cols[:6]), cols[6], cols[7], cols[8])


# ------------------------------------------------------------------ steady state
def steady_state(wl: Workload, kv_tokens, ubs, concurrency, prefill_budget=None,
                 prefill_mb_tokens=None, kv_reservation: str = "max"):
    """(admissions per sweep λ, running C, SweepShape), broadcast. Little's law on the
    reservations — over its g sweeps a sequence holds p + g KV tokens ("max") or
    p + (g+1)/2 on average ("lookahead"), r tokens in all:
        λ = min(M / E[r·g], C_max / E[g], B / E[padded p])   [sequences / sweep]
    C = λ·E[g] tokens per sweep; decode rows R = λ·(E[g] − 1) over ⌈R/ubs⌉ micro-batches
    with Σ contexts λ·E[(g−1)·p + g(g−1)/2]; the prefill of λ prompts of mean padded
    length in ⌈λ·E[pp]/T_mb⌉ micro-batches (padding to a group's longest is left out)."""
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
    n_p = (np.ones_like(lam) if prefill_mb_tokens is None
           else np.maximum(np.ceil(lam * pp.mean() / prefill_mb_tokens - 1e-9), 1))
    shape = SweepShape(n_d, rows / np.maximum(n_d, 1), ctx, n_p, lam / n_p,
                       np.full_like(lam, pp.mean()))
    return lam, lam * g.mean(), shape


# ------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class ContinuousPrediction:
    """A job under continuous batching: `tokens_per_s` end to end (Σ g / Σ sweep times,
    ramp-up and drain included), `steady_tokens_per_s` = C / steady sweep time, beside
    the MoE-Lens `limit_tokens_per_s` [generated tok/s]; times [s], KV [tokens]."""

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
    """Predict `policy` under continuous batching over the job's `requests` (default
    `workload.requests()`: the trace, or `num_sequences` of it, cycled): `admission`'s
    sweeps each priced by `sweep_s` (the first also loads layer 0's pages), the steady
    state by `steady_state`. KV capacity: `kv_capacity_tokens`."""
    check_inputs(model, hw, workload)
    _check_policy(policy)
    m, wl, pol = model, workload, policy
    peak = float(device_bytes(m, wl, pol.micro_batch_size, pol.batch_size,
                              pol.gpu_weight_fraction,
                              _prefill_tokens(wl, pol.prefill_tokens_per_sweep,
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
    """[C] arrays (ubs, n_ub, B, T_mb (0: = B), wg, M) of every grid point that fits: wg
    the largest the device budget allows (memory is affine in wg below 1; 1 if all fits
    resident), M = `kv_capacity_tokens` at it, ≥ the longest request."""
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
    kv = kv_capacity_tokens(m, hw, wl, c[0] * c[1], c[4], host_kv_bytes, dev_at)
    longest = max(p + g for p, g in wl.requests(len(wl.prompt_lens or (1,))))
    ok = kv >= longest
    return [x[ok] for x in c] + [kv[ok]]


def search_continuous(model: ModelConfig, hw: HardwareSpec, workload: Workload,
                      device_memory_bytes: float | None = None,
                      host_kv_bytes: float | None = None, kv_reservation: str = "max"):
    """(policy, ContinuousPrediction) of the highest predicted end-to-end tokens/s under
    continuous batching, over ubs (`search.ubs_grid`), n_ub ∈ `MICRO_BATCH_COUNTS`,
    prefill budgets B ∈ `PREFILL_BUDGETS` split into micro-batches of T_mb ∈
    `PREFILL_MICRO_BATCHES`; wg the largest the device budget allows (`device_bytes`);
    concurrency ubs·n_ub within the KV the host holds (`kv_capacity_tokens`, or
    `host_kv_bytes`). Per T_mb, the (ubs, n_ub) pairs are ranked by their best steady-state
    tokens/s (one vectorised `sweep_s`); the `TOP_GROUPS` leaders' jobs are simulated
    (`predict_continuous`) at every B up to `RAMP_BUDGET` × the unthrottled steady
    prefill: a smaller B throttles admission, a larger one buys ramp-up at the price of
    device memory (wg) and long prefill sweeps. First best wins.
    `kv_reservation` is the admission rule (`Policy.kv_reservation`), not searched."""
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
