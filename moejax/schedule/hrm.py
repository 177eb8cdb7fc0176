"""MoE-Lightning's policy model, reproduced exactly (docs/design.md §4.2): decode stage,
attention and KV on the CPU, T = max(ctog, cpu_T, gpu_T) per layer, throughput =
N·n / (T·L·(n − 1)) [decode tok/s]. Its own approximations (fp16 = 2 bytes, 0.86·gmem,
0.8·cmem) are kept so its published policy (324 × 14, wg ≈ 0.056, 944.66 tok/s on
`l4_moe_lightning`) comes out; do not "fix" them with `ModelConfig` helpers (`costs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moejax.model_config.hardware import GiB, HardwareSpec
from moejax.model_config.model import ModelConfig
from moejax.schedule.policy import Policy, affine_interval

FP16_BYTES = 2  # MoE-Lightning counts every weight and activation as fp16
GPU_MEMORY_CAP = 0.86  # usable fraction of gmem in MoE-Lightning's constraint
CPU_MEMORY_CAP = 0.8  # usable fraction of cmem


@dataclass(frozen=True)
class MoELightningResult:
    """One evaluated MoE-Lightning policy; times are per layer of one decode step."""

    policy: Policy
    decode_tokens_per_s: float
    layer_s: float  # T
    ctog_s: float
    cpu_s: float
    gpu_s: float
    gpu_memory_bytes: float  # max(prefill, decode) peak of MoE-Lightning's formula
    cpu_memory_bytes: float


def expert_bytes_per_layer(m: ModelConfig) -> float:
    """W_E = 2·3·h·f·E (fp16)."""
    return FP16_BYTES * 3 * m.hidden_size * m.expert_ffn_size * m.num_experts


def ctog_s(m: ModelConfig, hw: HardwareSpec, wg: float) -> float:
    """Weight stream of one layer: (1 − wg)·W_E / B_pcie."""
    return (1 - wg) * expert_bytes_per_layer(m) / hw.h2d_bytes_per_s


def gpu_s(m: ModelConfig, hw: HardwareSpec, ubs: int, n_ub: int) -> float:
    """n_ub · max(2·ubs·h·f·3·k / P_gpu, (2·ubs·h + 2·ubs·f + W_E) / B_gpu)."""
    h, f, k = m.hidden_size, m.expert_ffn_size, m.top_k
    compute = 2 * ubs * h * f * 3 * k / hw.gpu_fp16_flops_per_s
    memory = ((2 * ubs * h + 2 * ubs * f + expert_bytes_per_layer(m))
              / hw.gpu_memory_bytes_per_s)
    return n_ub * max(compute, memory)


def attention_flops(m: ModelConfig, ubs: int, s: int, n: int) -> float:
    """ubs·(s+n)·heads·(2·head_dim + 2) per micro-batch."""
    return ubs * (s + n) * m.num_heads * (2 * m.head_dim + 2)


def attention_bytes(m: ModelConfig, ubs: int, s: int, n: int) -> float:
    """2·(2·ubs·heads·head_dim + 2·ubs·(s+n)·kv_heads·head_dim) per micro-batch."""
    d = m.head_dim
    return 2 * (2 * ubs * m.num_heads * d + 2 * ubs * (s + n) * m.num_kv_heads * d)


def cpu_s(m: ModelConfig, hw: HardwareSpec, ubs: int, n_ub: int, s: int, n: int) -> float:
    """n_ub · max(attn_flops / P_cpu, attn_bytes / B_cpu)."""
    return n_ub * max(attention_flops(m, ubs, s, n) / hw.cpu_flops_per_s,
                      attention_bytes(m, ubs, s, n) / hw.host_memory_bytes_per_s)


def gpu_memory_bytes(m: ModelConfig, ubs: int, n_ub: int, s: int, wg: float,
                     stage: str = "prefill") -> float:
    """w_other + wg·W_E·L + act + 2·(1−wg)·W_E + inter, with
    act = 4·h·ubs·s + 2·h·N·s + 8·s·h_kv·ubs (prefill) or 4·h·N (decode),
    inter = 2.4·(ubs·k·h·s + 3·ubs·k·f·s), w_other = L·(4h² + 4h²/g), h_kv = h/g."""
    h, f, k, L, g = m.hidden_size, m.expert_ffn_size, m.top_k, m.num_layers, m.group_size
    we, big_n, h_kv = expert_bytes_per_layer(m), ubs * n_ub, h / g
    w_other = L * (4 * h * h + 4 * h * h / g)
    inter = 2.4 * (ubs * k * h * s + 3 * ubs * k * f * s)
    if stage == "prefill":
        act = 4 * h * ubs * s + 2 * h * big_n * s + 8 * s * h_kv * ubs
    elif stage == "decode":
        act = 4 * h * big_n
    else:
        raise ValueError(f"stage={stage!r} not in ('prefill', 'decode')")
    return w_other + wg * we * L + act + 2 * (1 - wg) * we + inter


def cpu_memory_bytes(m: ModelConfig, ubs: int, n_ub: int, s: int, n: int,
                     wg: float) -> float:
    """(1−wg)·W_E·L + 4·(s+n)·h_kv·N·L + 2·h·N·s + 2·(1−wg)·W_E."""
    h, L = m.hidden_size, m.num_layers
    we, big_n, h_kv = expert_bytes_per_layer(m), ubs * n_ub, h / m.group_size
    return ((1 - wg) * we * L + 4 * (s + n) * h_kv * big_n * L + 2 * h * big_n * s
            + 2 * (1 - wg) * we)


def _wg_interval(m, hw, ubs, n_ub, s, n):
    """(lo, hi, why): feasible wg under both memory caps; `why` names the short memory."""
    lo, hi = 0.0, 1.0
    gcap = GPU_MEMORY_CAP * hw.gpu_memory_bytes
    for stage in ("prefill", "decode"):
        g0 = gpu_memory_bytes(m, ubs, n_ub, s, 0.0, stage)
        g1 = gpu_memory_bytes(m, ubs, n_ub, s, 1.0, stage)
        a, b = affine_interval(g0, g1 - g0, gcap)
        if a > b:
            return a, b, (f"GPU memory short by {(min(g0, g1) - gcap) / GiB:.2f} GiB "
                          f"({stage})")
        lo, hi = max(lo, a), min(hi, b)
    c0 = cpu_memory_bytes(m, ubs, n_ub, s, n, 0.0)
    c1 = cpu_memory_bytes(m, ubs, n_ub, s, n, 1.0)
    ccap = CPU_MEMORY_CAP * hw.host_memory_bytes
    a, b = affine_interval(c0, c1 - c0, ccap)
    if max(lo, a) > min(hi, b):
        short = c0 + (c1 - c0) * hi - ccap
        return 1.0, 0.0, f"CPU memory short by {short / GiB:.2f} GiB (at wg={hi:.3f})"
    return max(lo, a), min(hi, b), ""


def _check(m: ModelConfig, hw: HardwareSpec, prompt_len: int, gen_len: int,
           **sizes) -> None:
    if not isinstance(m, ModelConfig):
        raise ValueError(f"model={m!r} is not a ModelConfig")
    if not isinstance(hw, HardwareSpec):
        raise ValueError(f"hw={hw!r} is not a HardwareSpec")
    for k, v in dict(prompt_len=prompt_len, **sizes).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive integer")
    if not isinstance(gen_len, int) or gen_len < 2:
        raise ValueError(f"gen_len={gen_len!r} must be an integer >= 2 "
                         "(MoE-Lightning's throughput divides by n - 1)")


def _evaluate(m, hw, s, n, ubs, n_ub):
    """(result, why) at the best wg: the smallest with ctog ≤ max(cpu_T, gpu_T), clamped
    into the feasible interval (T is non-increasing in wg, so this is exact)."""
    lo, hi, why = _wg_interval(m, hw, ubs, n_ub, s, n)
    if lo > hi:
        return None, why
    c, g = cpu_s(m, hw, ubs, n_ub, s, n), gpu_s(m, hw, ubs, n_ub)
    need = 1.0 - max(c, g) * hw.h2d_bytes_per_s / expert_bytes_per_layer(m)
    wg = min(max(need, lo), hi)
    ctog = ctog_s(m, hw, wg)
    t = max(ctog, c, g)
    big_n = ubs * n_ub
    policy = Policy(batch_size=big_n, micro_batch_size=ubs, num_micro_batches=n_ub,
                    gpu_weight_fraction=float(wg), attention_device="cpu",
                    kv_cache_device="cpu")
    gmem = max(gpu_memory_bytes(m, ubs, n_ub, s, wg, st) for st in ("prefill", "decode"))
    return MoELightningResult(
        policy=policy, decode_tokens_per_s=big_n * n / (t * m.num_layers * (n - 1)),
        layer_s=t, ctog_s=ctog, cpu_s=c, gpu_s=g, gpu_memory_bytes=gmem,
        cpu_memory_bytes=cpu_memory_bytes(m, ubs, n_ub, s, n, wg)), ""


def moe_lightning_evaluate(model: ModelConfig, hw: HardwareSpec, prompt_len: int,
                           gen_len: int, micro_batch_size: int,
                           num_micro_batches: int) -> MoELightningResult:
    """MoE-Lightning's prediction for one (ubs, n_ub); ValueError if no wg fits memory."""
    _check(model, hw, prompt_len, gen_len, micro_batch_size=micro_batch_size,
           num_micro_batches=num_micro_batches)
    hw = hw.aggregated()  # k devices: its model prices an ideal tensor parallel
    r, why = _evaluate(model, hw, prompt_len, gen_len, micro_batch_size, num_micro_batches)
    if r is None:
        raise ValueError(f"infeasible micro_batch_size={micro_batch_size} x "
                         f"num_micro_batches={num_micro_batches}: {why}")
    return r


def ubs_candidates():
    """MoE-Lightning's micro-batch grid: 1, 2, 3, 4, then 36, 68, … in steps of 32."""
    yield from (1, 2, 3, 4)
    ubs = 36
    while True:
        yield ubs
        ubs += 32


def moe_lightning_search(model: ModelConfig, hw: HardwareSpec, prompt_len: int,
                         gen_len: int) -> MoELightningResult:
    """Exhaustive search of docs/design.md §4.2 over the ubs grid and feasible n_ub (each
    loop stops at the first infeasible value); the first best decode throughput wins."""
    _check(model, hw, prompt_len, gen_len)
    hw = hw.aggregated()  # k devices: its model prices an ideal tensor parallel
    best, first_why = None, ""
    for ubs in ubs_candidates():
        n_ub, any_feasible = 1, False
        while True:
            r, why = _evaluate(model, hw, prompt_len, gen_len, ubs, n_ub)
            if r is None:
                first_why = first_why or why
                break
            any_feasible = True
            if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s:
                best = r
            n_ub += 1
        if not any_feasible:
            break
    if best is None:
        raise ValueError(f"MoE-Lightning: nothing fits for {model.name} on {hw.name}: "
                         f"{first_why}")
    return best
