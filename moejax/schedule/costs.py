"""Op prices [s] per op, layer and micro-batch (docs/design.md §4.1, §4.3): roofline max(FLOPs
/ peak or calibrated GEMM line, bytes / bandwidth), broadcast; `predict` and the simulator share them."""

from __future__ import annotations

import numpy as np

from moejax.schedule.routing import expected_work
from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig

LOGITS_BYTES = 4  # LM-head logits are kept in float32
COPY_DEMAND_PAGE_BYTES = 4 * 2**20  # pages of the runs `calibrate` fits copy_core_demand on


# ------------------------------------------------------------------ generic roofs
def device_compute_s(m: ModelConfig, hw: HardwareSpec, flops, calls=0, weight_bytes=0,
                     split: bool = True):
    """calls·t₀ + weight_bytes·t₀/bytes_expert + flops / R_gemm [s] (§4.3), else flops /
    P_gpu(dtype); t₀ is one expert's weight read. `split`: on k tensor-parallel devices
    each does 1/k of it (heads, FFN columns), at the same time."""
    if split and hw.num_devices > 1:
        k = hw.num_devices
        return device_compute_s(m, hw, flops / k, calls, weight_bytes / k, False)
    if hw.gemm_flops_per_s is not None:
        # t₀ is a float expert's read: quantized experts are read as floats once dequantized
        per_byte = (hw.gemm_intercept_s or 0.0) / m.replace(expert_dtype=None).expert_bytes()
        return (calls * hw.gemm_intercept_s + weight_bytes * per_byte
                + flops / hw.gemm_flops_per_s)
    return flops / hw.gpu_flops_per_s(m.dtype)


def device_op_s(m: ModelConfig, hw: HardwareSpec, flops, nbytes, calls=0, weight_bytes=0,
                split: bool = True):
    """One device op [s]: max(compute, bytes / B_gpu) + `device_op_overhead_s` (t_op);
    `split` as in `device_compute_s` (bytes too: each device reads its share)."""
    k = hw.num_devices if split else 1
    return np.maximum(device_compute_s(m, hw, flops, calls, weight_bytes, split),
                      nbytes / k / hw.gpu_memory_bytes_per_s) + hw.device_op_overhead_s


def allreduce_s(m: ModelConfig, hw: HardwareSpec, tokens, elem_bytes=None):
    """Ring all-reduce of a [tokens, h] partial sum over k devices [s]: latency +
    2·(k−1)/k·tokens·h·bytes / B_allreduce (after o_proj and after w2; 0 for k = 1)."""
    k = hw.num_devices
    if k == 1:
        return 0.0 * np.asarray(tokens, dtype=float)
    b = m.bytes_per_param if elem_bytes is None else elem_bytes
    bw = hw.allreduce_bytes_per_s or hw.d2h_bytes_per_s
    return hw.allreduce_latency_s + 2 * (k - 1) / k * tokens * m.hidden_size * b / bw


def h2d_rate(hw: HardwareSpec, transfer_bytes):
    """B_h2d [bytes/s] by transfer size: `h2d_curve` in log size, else `h2d_bytes_per_s`."""
    if hw.h2d_curve is None:
        return hw.h2d_bytes_per_s
    size, rate = np.array(hw.h2d_curve, dtype=float).T
    x = np.log(np.maximum(np.asarray(transfer_bytes, dtype=float), 1.0))
    return np.interp(x, np.log(size), rate)


def h2d_s(hw: HardwareSpec, nbytes, transfers=1):
    """Host → device copy: transfers·latency + bytes / B_h2d(bytes per transfer). On k
    devices each link carries 1/k of every transfer at once (`links_bytes_per_s`)."""
    per = np.asarray(nbytes, dtype=float) / np.maximum(transfers, 1) / hw.num_devices
    return transfers * hw.link_latency_s + nbytes / hw.links_bytes_per_s(h2d_rate(hw, per))


def d2h_s(hw: HardwareSpec, nbytes, transfers=1):
    """Device → host copy: transfers·latency + bytes / B_d2h (k links as `h2d_s`)."""
    return transfers * hw.link_latency_s + nbytes / hw.links_bytes_per_s(hw.d2h_bytes_per_s)


def num_pages(nbytes, page_bytes):
    """Pages needed to stream `nbytes` (docs/design.md §2)."""
    return np.ceil(np.asarray(nbytes, dtype=float) / page_bytes)


# --------------------------------------------------------------------- sizes
def qkv_bytes(m: ModelConfig, tokens):
    """q and the new k, v of `tokens` tokens: what CPU attention needs from the device."""
    return tokens * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * m.bytes_per_param


def attn_out_bytes(m: ModelConfig, tokens):
    """Attention output of `tokens` tokens, sent back to the device."""
    return tokens * m.num_heads * m.head_dim * m.bytes_per_param


def kv_bytes(m: ModelConfig, tokens, kv_bytes_per_elem=None):
    """K and V of `tokens` cached tokens in one layer."""
    return tokens * m.kv_bytes_per_token_per_layer(kv_bytes_per_elem)


def streamed_expert_bytes(m: ModelConfig, gpu_weight_fraction):
    """Expert bytes of one MoE layer streamed per pass: (1 − wg)·W_E."""
    return (1 - gpu_weight_fraction) * m.expert_bytes_per_layer()


def stream_buffer_bytes(streamed_bytes) -> dict:
    """{"stream_buffers": 2·(1 − wg)·W_E}, two passes' pages (the store's accounting)."""
    return {"stream_buffers": 2 * np.asarray(streamed_bytes)}


def expected_active_experts(m: ModelConfig, tokens):
    """Experts hit by `tokens` tokens under uniform top-k routing: E·(1 − (1 − k/E)^t)."""
    e = m.num_experts
    return e * (1 - (1 - m.top_k / e) ** np.asarray(tokens, dtype=float))


# ----------------------------------------------------------------- device ops
def gpu_pre_attention_s(m: ModelConfig, hw: HardwareSpec, tokens):
    """RMSNorm + QKV projection + rotary for `tokens` tokens of one layer."""
    qkv_cols = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    flops = 2 * tokens * m.hidden_size * qkv_cols
    weights = m.hidden_size * qkv_cols * m.bytes_per_param
    nbytes = weights + tokens * (m.hidden_size + qkv_cols) * m.bytes_per_param
    return device_op_s(m, hw, flops, nbytes, weight_bytes=weights)


def gpu_post_attention_s(m: ModelConfig, hw: HardwareSpec, tokens, layer: int = 0):
    """Output projection, residual, RMSNorm and (MoE layers) the router: softmax, top-k."""
    h, o_in = m.hidden_size, m.num_heads * m.head_dim
    router = m.num_experts if m.is_moe_layer(layer) else 0
    flops = 2 * tokens * h * (o_in + router)
    weights = h * (o_in + router) * m.bytes_per_param
    nbytes = weights + tokens * (o_in + 3 * h) * m.bytes_per_param
    return device_op_s(m, hw, flops, nbytes, weight_bytes=weights) + allreduce_s(m, hw,
                                                                                 tokens)


def dequant_s(m: ModelConfig, hw: HardwareSpec, elems):
    """Dequantizing `elems` expert weights [s]: elems / the calibrated rate of the
    format (`dequant_int8_elems_per_s`, …), else the roofline of a dequantization fused
    into the GEMM, elems·bits/8 / B_gpu (the codes read once); 0 for float experts."""
    if not m.expert_quantized:
        return 0.0 * np.asarray(elems, dtype=float)
    rate = getattr(hw, f"dequant_{m.expert_dtype}_elems_per_s", None)
    if rate is None:
        rate = hw.gpu_memory_bytes_per_s / (m.expert_bits / 8)
    return np.asarray(elems, dtype=float) / rate


def gpu_ffn_s(m: ModelConfig, hw: HardwareSpec, tokens, layer: int = 0,
              imbalance: float = 1.0):
    """FFN [s]: MoE = `expected_work` rows and passes (§4.3), t₀ per pass, plus (quantized
    experts) `dequant_s` of the whole layer, 3·h·f·E weights: both dispatch paths
    dequantize every expert's part once per call; dense: MLP."""
    h, b = m.hidden_size, m.bytes_per_param
    if m.is_moe_layer(layer):
        rows, calls = expected_work(tokens, m.top_k, m.num_experts, imbalance)
        flops = rows * 2 * m.expert_params()
        nbytes = m.expert_bytes_per_layer() + rows * (2 * h + 3 * m.expert_ffn_size) * b
        # k devices: each dequantizes its 1/k, and the partial sums are reduced in float32
        # (ops._tp_moe_ffn)
        return (device_op_s(m, hw, flops, nbytes, calls=calls)
                + dequant_s(m, hw, m.num_experts * m.expert_params() / hw.num_devices)
                + allreduce_s(m, hw, tokens, 4))
    f = m.dense_ffn_size
    flops = tokens * 2 * 3 * h * f
    nbytes = (3 * h * f + tokens * (2 * h + 3 * f)) * b
    return device_op_s(m, hw, flops, nbytes)


def gpu_lm_head_s(m: ModelConfig, hw: HardwareSpec, tokens):
    """Final norm + LM head for `tokens` tokens (one per sequence and step)."""
    flops = 2 * tokens * m.hidden_size * m.vocab_size
    weights = m.hidden_size * m.vocab_size * m.bytes_per_param
    nbytes = weights + tokens * m.hidden_size * m.bytes_per_param \
        + tokens * m.vocab_size * LOGITS_BYTES
    # replicated on k devices (host_offload/sharding.py): every device runs all of it
    return device_op_s(m, hw, flops, nbytes, weight_bytes=weights, split=False)


def gpu_decode_attention_s(m: ModelConfig, hw: HardwareSpec, tokens, context_len,
                           kv_bytes_per_elem=None):
    """Decode attention on the device: `tokens` queries, each over `context_len` keys."""
    flops = tokens * m.attention_core_flops(context_len)
    nbytes = kv_bytes(m, tokens * context_len, kv_bytes_per_elem) \
        + 2 * attn_out_bytes(m, tokens)
    return device_op_s(m, hw, flops, nbytes)


def gpu_prefill_attention_s(m: ModelConfig, hw: HardwareSpec, seqs, prompt_len):
    """Causal prefill attention [s]; FLOPs = seqs·heads·(2·head_dim + 2)·s(s+1)/2."""
    s = prompt_len
    flops = seqs * m.num_heads * (2 * m.head_dim + 2) * s * (s + 1) / 2
    nbytes = qkv_bytes(m, seqs * s) + attn_out_bytes(m, seqs * s)
    return device_op_s(m, hw, flops, nbytes)


# -------------------------------------------------------------------- host ops
def cpu_attention_s(m: ModelConfig, hw: HardwareSpec, tokens, context_len,
                    kv_bytes_per_elem=None, concurrent_host_bytes=0.0):
    """CPU decode attention over context_len + 1 keys [s] (§2 step 3, §4.3): t_call + max(flops
    / P_cpu, bytes / B_attn, (bytes + concurrent_host_bytes) / B_host), the last MoE-Lens's
    B_mem ≥ B_kv + B_io (dropped where `device_is_host`: `core_demand` charges it)."""
    if hw.device_is_host:
        concurrent_host_bytes = 0.0
    flops = tokens * m.attention_core_flops(context_len)
    nbytes = kv_bytes(m, tokens * (context_len + 1), kv_bytes_per_elem) \
        + qkv_bytes(m, tokens) + attn_out_bytes(m, tokens)
    b_attn = hw.cpu_attention_bytes_per_s or hw.host_memory_bytes_per_s
    return hw.cpu_attention_call_s + np.maximum(
        np.maximum(flops / hw.cpu_flops_per_s, nbytes / b_attn),
        (nbytes + concurrent_host_bytes) / hw.host_memory_bytes_per_s)


# ------------------------------------------------------------ shared host cores
def core_demand(hw: HardwareSpec, resource: str) -> float:
    """Cores an op of `resource` occupies where `device_is_host` (§5): copies `copy_core_demand`."""
    return float(hw.copy_core_demand if resource in ("h2d", "d2h") else hw.cpu_cores)
