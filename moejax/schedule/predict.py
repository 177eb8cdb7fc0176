"""moejax's performance model (docs/design.md §4.3): `costs.py` op prices → layer, step,
job times [s]; decode_s = Σ_{c=s+1}^{s+n−1} (Σ_layers t(c) + LM head + fill), prefill
yields the first token, tokens_per_s = N·n / (prefill_s + decode_s), plus the MoE-Lens
bound. One closed form serves `predict` and the search, so both report the same number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.model_config.workload import Workload
from moejax.schedule import costs
from moejax.schedule.policy import DEFAULT_PAGE_BYTES, Policy
from moejax.schedule.timeline import RESOURCES

DEVICE_MEMORY_USABLE = 0.9  # of gpu_memory_bytes: runtime context, allocator slack
HOST_MEMORY_USABLE = 0.9  # of host_memory_bytes: OS, page cache, the Python process
CAPACITY_SLACK = 1.25  # expert capacity buckets round token counts up (layers/experts.py)


# ----------------------------------------------------------------- MoE-Lens bound
@dataclass(frozen=True)
class MoELensBound:
    """MoE-Lens limit (docs/design.md §4.3): T_max = min(PME·M/δ, T_gpu) [processed tok/s],
    PME = 2(p+g)/((2p+g)·g), δ = max(W − 0.9·gmem, 0)/B_h2d [s], M [KV tokens] beside those
    bytes, T_gpu = FLOP/s / FLOPs per token, generated = T_max·g/(p+g). Only bytes that
    cannot stay on the device count, so T_max bounds every policy, resident experts too."""

    pme: float
    kv_capacity_tokens: float  # M
    delta_s: float  # δ
    kv_bound_tokens_per_s: float  # PME·M/δ
    gpu_bound_tokens_per_s: float  # T_gpu
    processed_tokens_per_s: float  # T_max
    generated_tokens_per_s: float


def moe_lens_bound(model: ModelConfig, hw: HardwareSpec, workload: Workload) -> MoELensBound:
    p, g = workload.prompt_len, workload.gen_len
    pme = 2 * (p + g) / ((2 * p + g) * g)
    must_move = max(model.weight_bytes() - hw.num_devices * hw.gpu_memory_bytes
                    * DEVICE_MEMORY_USABLE, 0.0)
    host = hw.host_memory_bytes * HOST_MEMORY_USABLE - must_move
    m_tokens = max(host, 0.0) / model.kv_bytes_per_token(workload.kv_bytes_per_elem)
    delta = must_move / hw.links_bytes_per_s(hw.h2d_bytes_per_s)
    per_layer = sum(model.attention_proj_flops_per_token()
                    + (model.expert_flops_per_token() if model.is_moe_layer(i)
                       else 2 * 3 * model.hidden_size * model.dense_ffn_size)
                    for i in range(model.num_layers))
    # a sequence runs p + g − 1 tokens through the layers (the last generated token is
    # never fed back) and g through the LM head
    flops = ((p + g - 1) * per_layer + g * 2 * model.hidden_size * model.vocab_size) / (p + g)
    rate = (hw.gemm_flops_per_s or hw.gpu_flops_per_s(model.dtype)) * hw.num_devices
    kv_bound = pme * m_tokens / delta if delta > 0 else float("inf")
    gpu_bound = rate / flops
    t_max = min(kv_bound, gpu_bound)
    return MoELensBound(pme, m_tokens, delta, kv_bound, gpu_bound, t_max, t_max * g / (p + g))


# ---------------------------------------------------------------------- memory
def working_set_bytes(m: ModelConfig, tokens):
    """Live temporaries [bytes] of one micro-batch of `tokens` tokens: the residual plus
    the larger of the attention block and the FFN block (capacity-padded top-k rows)."""
    h = m.hidden_size
    attn_cols = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    ffn_cols = max(m.top_k * CAPACITY_SLACK * (2 * h + 2 * m.expert_ffn_size),
                   2 * h + 2 * m.dense_ffn_size)
    return tokens * (h + max(attn_cols, ffn_cols)) * m.bytes_per_param


def memory_bytes(model: ModelConfig, workload: Workload, ubs, n_ub, wg,
                 attention_device: str = "cpu", kv_cache_device: str = "cpu",
                 devices: int = 1):
    """(peak device, peak host) bytes, broadcastable, affine in wg on [0, 1) (§4.3 Memory):
    device = NE + wg·W_E + [wg < 1]·(2·W_E + (1−wg)·W_E) + max(prefill, decode act) [+ KV],
    host = (1−wg)·W_E [+ KV] + staging; streams mirror HostWeightStore's accounting.
    `devices` k > 1: device bytes of one tensor-parallel device, NE_k + expert terms / k
    (activations counted whole: replicated, an upper bound)."""
    m, s, n = model, workload.prompt_len, workload.gen_len
    b, h, big_n = m.bytes_per_param, m.hidden_size, ubs * n_ub
    kv_total = big_n * (s + n) * m.kv_bytes_per_token(workload.kv_bytes_per_elem)
    qkv_cols = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    working_set = lambda tokens: working_set_bytes(m, tokens)
    logits = ubs * m.vocab_size * costs.LOGITS_BYTES
    # decode: the batch's hidden states (residual + normed), two micro-batches in flight
    decode = 2 * big_n * h * b + 2 * working_set(ubs) + logits
    if attention_device == "gpu":
        decode = decode + 2 * ubs * m.num_heads * (s + n) * 4  # fp32 scores
        if kv_cache_device == "cpu":  # staged cache of two micro-batches
            decode = decode + 2 * costs.kv_bytes(m, ubs * (s + n), workload.kv_bytes_per_elem)
    # prefill: every prompt's hidden states, one micro-batch at a time, fp32 scores
    prefill = big_n * s * h * b + working_set(ubs * s) + ubs * m.num_heads * s * s * 4 + logits
    stream = sum(costs.stream_buffer_bytes(np.where(
        np.asarray(wg) < 1, costs.streamed_expert_bytes(m, wg), 0.0)).values()) \
        if m.num_moe_layers else 0.0
    device = (m.non_expert_bytes_per_device(devices)
              + (wg * m.expert_bytes_total() + stream) / devices
              + np.maximum(prefill, decode) + (kv_total if kv_cache_device == "gpu" else 0))
    host = ((1 - wg) * m.expert_bytes_total() + (kv_total if kv_cache_device == "cpu" else 0)
            + big_n * (qkv_cols + m.num_heads * m.head_dim) * b)
    return device, host


def memory_budgets(hw: HardwareSpec, device_memory_bytes: float | None = None):
    """(device, host) bytes the search may use (device: per device of k);
    `device_memory_bytes` emulates a small GPU."""
    dev = (hw.gpu_memory_bytes * DEVICE_MEMORY_USABLE if device_memory_bytes is None
           else float(device_memory_bytes))
    return dev, hw.host_memory_bytes * HOST_MEMORY_USABLE


# ---------------------------------------------------------------- layer times
def _layer_kinds(m: ModelConfig):
    """(representative layer index, count) per distinct layer kind: MoE and dense."""
    moe = [i for i in range(m.num_layers) if m.is_moe_layer(i)]
    dense = [i for i in range(m.num_layers) if not m.is_moe_layer(i)]
    return [(ls[0], len(ls)) for ls in (moe, dense) if ls]


def _combine(hw, overlap, h2d, d2h, gpu, cpu):
    """Layer time [s] from per-resource busy times (docs/design.md §4.3): serial sum, or
    CGOPipe max(h2d, d2h, gpu, cpu); on `device_is_host` hardware, where all lanes share
    the cores, max(h2d, d2h, Σ_r demand_r·busy_r / cores) (`costs.core_demand`)."""
    if not overlap:
        return h2d + d2h + gpu + cpu
    link = np.maximum(h2d, d2h)
    if hw.device_is_host:
        busy = dict(h2d=h2d, d2h=d2h, gpu=gpu, cpu=cpu)
        shared = sum(costs.core_demand(hw, r) * t for r, t in busy.items()) / hw.cpu_cores
        return np.maximum(link, shared)
    return np.maximum(link, np.maximum(gpu, cpu))


@dataclass(frozen=True)
class Knobs:
    """The knobs `evaluate` prices, for one candidate or as [C, 1] arrays of them."""

    ubs: object
    n_ub: object
    wg: object
    attention_device: str = "cpu"
    kv_cache_device: str = "cpu"
    page_bytes: int = DEFAULT_PAGE_BYTES
    overlap: bool = True


def _stream(m, hw, layer, wg, page_bytes):
    """(h2d s, bytes) of one layer's streamed pages (the FFN reads them where they land:
    nothing is copied on the device)."""
    if not m.is_moe_layer(layer):
        return 0.0, 0.0
    nbytes = costs.streamed_expert_bytes(m, wg)
    return costs.h2d_s(hw, nbytes, costs.num_pages(nbytes, m.page_nbytes(page_bytes))), nbytes


def decode_layer(m, hw, wl, layer, k: Knobs, ctx):
    """(busy per resource, layer time, fill) [s] of one decode layer at context `ctx`."""
    ubs, n_ub, wg, overlap, kvb = k.ubs, k.n_ub, k.wg, k.overlap, wl.kv_bytes_per_elem
    gpu_mb = (costs.gpu_pre_attention_s(m, hw, ubs)
              + costs.gpu_post_attention_s(m, hw, ubs, layer)
              + costs.gpu_ffn_s(m, hw, ubs, layer, wl.imbalance["decode"]))
    h2d, io = _stream(m, hw, layer, wg, k.page_bytes)
    h2d_mb = d2h_mb = cpu_mb = 0.0
    if k.attention_device == "cpu":
        h2d_mb = costs.h2d_s(hw, costs.attn_out_bytes(m, ubs))
        d2h_mb = costs.d2h_s(hw, costs.qkv_bytes(m, ubs))
        io = io + n_ub * (costs.attn_out_bytes(m, ubs) + costs.qkv_bytes(m, ubs))
        cpu_mb = costs.cpu_attention_s(m, hw, ubs, ctx, kvb,
                                       io / n_ub if overlap else 0.0)
    else:
        gpu_mb = gpu_mb + costs.gpu_decode_attention_s(m, hw, ubs, ctx, kvb)
        if k.kv_cache_device == "cpu":  # stream the host cache in, new k/v out
            h2d_mb = costs.h2d_s(hw, costs.kv_bytes(m, ubs * ctx, kvb))
            d2h_mb = costs.d2h_s(hw, costs.kv_bytes(m, ubs, kvb))
    busy = dict(gpu=n_ub * gpu_mb, cpu=n_ub * cpu_mb, h2d=h2d + n_ub * h2d_mb,
                d2h=n_ub * d2h_mb)
    fill = (gpu_mb + cpu_mb + h2d_mb + d2h_mb) if overlap else 0.0
    t = _combine(hw, overlap, **busy)
    if overlap and not hw.device_is_host:
        t = np.maximum(t, _layer_stalls(m, hw, layer, k, gpu_mb, cpu_mb, h2d_mb, d2h_mb))
    return busy, t, fill


def _layer_stalls(m, hw, layer, k: Knobs, gpu_mb, cpu_mb, h2d_mb, d2h_mb):
    """Lower bound [s] on a CGOPipe decode layer from the timeline's edges (§4.3 `stalls`):
    max(n·gpu + chain − gpu, n·cpu + chain − cpu), and for n ≥ 2 n·gpu + chunk + h2d,
    all of one micro-batch, so the closed form tracks `simulate()`. Not used where
    the device is the host: `_combine`'s shared-core sum already charges these."""
    n, wg = k.n_ub, k.wg
    chain = gpu_mb + cpu_mb + h2d_mb + d2h_mb
    t = np.maximum(n * gpu_mb + chain - gpu_mb, n * cpu_mb + chain - cpu_mb)
    if m.is_moe_layer(layer):
        nbytes = costs.streamed_expert_bytes(m, wg)
        pages = costs.num_pages(nbytes, m.page_nbytes(k.page_bytes))
        chunk = costs.h2d_s(hw, nbytes, pages) / n
        t = np.where(n > 1, np.maximum(t, n * gpu_mb + chunk + h2d_mb), t)
    return t


def prefill_layer(m, hw, wl, layer, k: Knobs):
    """(busy per resource, layer time, fill) [s] of one prefill layer; fill =
    min(h2d, n_ub·gpu) + one micro-batch's k/v copy, the part of a two-stage stream →
    compute pipeline (L·max(a, b) + min(a, b)) that nothing overlaps."""
    ubs, n_ub, overlap = k.ubs, k.n_ub, k.overlap
    s, tok = wl.prompt_len, ubs * wl.prompt_len
    gpu_mb = (costs.gpu_pre_attention_s(m, hw, tok)
              + costs.gpu_prefill_attention_s(m, hw, ubs, s)
              + costs.gpu_post_attention_s(m, hw, tok, layer)
              + costs.gpu_ffn_s(m, hw, tok, layer, wl.imbalance["prefill"]))
    h2d, _ = _stream(m, hw, layer, k.wg, k.page_bytes)
    d2h_mb = (costs.d2h_s(hw, costs.kv_bytes(m, tok, wl.kv_bytes_per_elem))
              if k.kv_cache_device == "cpu" else 0.0)
    busy = dict(gpu=n_ub * gpu_mb, cpu=0.0 * gpu_mb, h2d=h2d, d2h=n_ub * d2h_mb)
    fill = (np.minimum(h2d, n_ub * gpu_mb) + d2h_mb) if overlap else 0.0
    return busy, _combine(hw, overlap, **busy), fill


# ------------------------------------------------------------------ evaluation
def _rows(x, shape):
    return np.broadcast_to(x, shape)


def evaluate(model: ModelConfig, hw: HardwareSpec, workload: Workload, ubs, n_ub, wg,
             attention_device: str = "cpu", kv_cache_device: str = "cpu",
             page_bytes: int = DEFAULT_PAGE_BYTES, overlap: bool = True) -> dict:
    """One batch's times for candidates ubs, n_ub, wg [C] → dict of [C] arrays [s, tok/s]:
    prefill_s, decode_s, tokens_per_s, decode_tokens_per_s, decode_layer_s (first step,
    first layer kind), pipeline_fill_s, busy_<gpu|cpu|h2d|d2h>_s."""
    m, wl = model, workload
    ubs, n_ub, wg = (np.asarray(a, dtype=float).reshape(-1, 1) for a in (ubs, n_ub, wg))
    c = ubs.shape[0]
    ctx = wl.prompt_len + np.arange(1, wl.gen_len, dtype=float)[None, :]  # steps [1, n-1]
    steps = (c, ctx.shape[1])
    busy = {r: np.zeros((c, 1)) for r in RESOURCES}
    prefill, step, fill_p, fill_d, first_layer = (np.zeros((c, 1)), np.zeros(steps),
                                                  np.zeros((c, 1)), np.zeros(steps), None)
    knobs = Knobs(ubs, n_ub, wg, attention_device, kv_cache_device, page_bytes, overlap)
    for layer, count in _layer_kinds(m):
        b, t, f = prefill_layer(m, hw, wl, layer, knobs)
        prefill, fill_p = prefill + count * t, np.maximum(fill_p, f)
        for r in RESOURCES:
            busy[r] = busy[r] + count * _rows(b[r], (c, 1))
        b, t, f = decode_layer(m, hw, wl, layer, knobs, ctx)
        step, fill_d = step + count * _rows(t, steps), np.maximum(fill_d, f)
        first_layer = _rows(t, steps)[:, :1] if first_layer is None else first_layer
        for r in RESOURCES:
            busy[r] = busy[r] + count * _rows(b[r], steps).sum(axis=1, keepdims=True)
    lm = n_ub * costs.gpu_lm_head_s(m, hw, ubs)  # one token per sequence, per pass
    n_steps = ctx.shape[1]
    busy["gpu"] = busy["gpu"] + (1 + n_steps) * lm
    prefill = prefill + lm + fill_p
    decode = (step + lm + fill_d).sum(axis=1, keepdims=True)
    big_n = ubs * n_ub
    with np.errstate(divide="ignore", invalid="ignore"):
        dec_tps = np.where(n_steps > 0, big_n * n_steps / decode, 0.0)
    out = dict(prefill_s=prefill, decode_s=decode,
               tokens_per_s=big_n * wl.gen_len / (prefill + decode),
               decode_tokens_per_s=dec_tps,
               decode_layer_s=first_layer if n_steps else np.zeros((c, 1)),
               pipeline_fill_s=fill_p + fill_d.sum(axis=1, keepdims=True))
    out.update({f"busy_{r}_s": busy[r] for r in RESOURCES})
    return {k: np.asarray(v, dtype=float).reshape(c) for k, v in out.items()}


# ------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class Prediction:
    """One batch of `policy.batch_size` sequences: times and `busy_s` [s], throughputs and
    the MoE-Lens `limit_tokens_per_s` [generated tok/s], peaks [bytes]."""

    policy: Policy
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # N·n / (prefill_s + decode_s), end to end
    decode_tokens_per_s: float  # N·(n−1) / decode_s
    limit_tokens_per_s: float
    busy_s: dict = field(default_factory=dict)
    peak_device_bytes: float = 0.0
    peak_host_bytes: float = 0.0
    decode_layer_s: float = 0.0  # one MoE layer of the first decode step
    pipeline_fill_s: float = 0.0
    bound: MoELensBound | None = None

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def bottleneck(self) -> str:
        """The busiest resource over the whole batch."""
        return max(RESOURCES, key=lambda r: self.busy_s[r])


def check_inputs(model, hw, workload):
    """ValueError unless model, hw and workload are a ModelConfig, HardwareSpec, Workload."""
    for name, v, t in (("model", model, ModelConfig), ("hw", hw, HardwareSpec),
                       ("workload", workload, Workload)):
        if not isinstance(v, t):
            raise ValueError(f"{name}={v!r} is not a {t.__name__}")


def predict(model: ModelConfig, hw: HardwareSpec, workload: Workload,
            policy: Policy) -> Prediction:
    """Predict `policy`'s times and throughput; peaks are not checked against budgets."""
    check_inputs(model, hw, workload)
    if not isinstance(policy, Policy):
        raise ValueError(f"policy={policy!r} is not a Policy")
    p = policy
    r = evaluate(model, hw, workload, [p.micro_batch_size], [p.num_micro_batches],
                 [p.gpu_weight_fraction], p.attention_device, p.kv_cache_device,
                 p.page_bytes, p.overlap)
    dev, host = memory_bytes(model, workload, p.micro_batch_size, p.num_micro_batches,
                             p.gpu_weight_fraction, p.attention_device, p.kv_cache_device,
                             devices=hw.num_devices)
    bound = moe_lens_bound(model, hw, workload)
    f = {k: float(v[0]) for k, v in r.items()}
    return Prediction(
        policy=p, prefill_s=f["prefill_s"], decode_s=f["decode_s"],
        tokens_per_s=f["tokens_per_s"], decode_tokens_per_s=f["decode_tokens_per_s"],
        limit_tokens_per_s=bound.generated_tokens_per_s,
        busy_s={res: f[f"busy_{res}_s"] for res in RESOURCES},
        peak_device_bytes=float(dev), peak_host_bytes=float(host),
        decode_layer_s=f["decode_layer_s"], pipeline_fill_s=f["pipeline_fill_s"],
        bound=bound)
