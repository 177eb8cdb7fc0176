"""Hierarchical roofline (MoE-Lightning's figure) with the searched policy's operating points.

    python -m experiments.roofline --config mixtral_l4 --out /tmp/roofline.png
    python -m experiments.roofline --config mixtral_l4 --table   # + comparison table

Roofs: device compute and memory, host compute and memory, and the host→device link
(cross-level roof B_h2d·I). Points: CPU decode attention and the MoE FFN of the policy
`search_policy` picks, at their intensity and the performance the model predicts; the
FFN appears twice, against device memory (per micro-batch) and against the link (per
layer pass of the whole batch). Vertical lines: attention intensity for the model's KV
dtype and narrower ones (bf16/int8/int4). Turning points P1 (link meets host compute)
and P2 (link meets device compute) are marked (docs/design.md §4).
"""

from __future__ import annotations

import os

from absl import flags

from experiments.cli import (fail, finite_flag, no_extra_args, output_flag, quiet_logs,
                             run)

from moejax.model_config.hardware import get_hardware, hardware_names
from moejax.model_config.model import get_model, model_names
from moejax.model_config.setups import get_setup, setup_names
from moejax.model_config.workload import Workload, get_workload, workload_names


FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "mixtral_l4", setup_names(), "model + hardware + workload")
flags.DEFINE_string("out", None,
                    "PNG path (default experiments/results/roofline_<config>[_<overrides>].png)")
flags.DEFINE_string("hardware", None, f"override the hardware: {', '.join(hardware_names())}")
flags.DEFINE_string("model", None, f"override the model: {', '.join(model_names())}")
flags.DEFINE_string("workload", None, f"override the workload: {', '.join(workload_names())}")
flags.DEFINE_float("device_memory_gib", None,
                   "device memory budget in GiB (default: the config's, else 90% of the device)")
flags.DEFINE_bool("table", False, "also print MoE-Lightning vs moejax vs limit, gen 32-256")
flags.register_validator("hardware", lambda v: v is None or v in hardware_names(),
                         message=f"must be one of {', '.join(hardware_names())}")
flags.register_validator("model", lambda v: v is None or v in model_names(),
                         message=f"must be one of {', '.join(model_names())}")
flags.register_validator("workload", lambda v: v is None or v in workload_names(),
                         message=f"must be one of {', '.join(workload_names())}")
finite_flag("device_memory_gib", positive=True)
output_flag("out", ".png")


def operating_points(model, hw, workload, policy):
    """{name: (intensity FLOP/byte, predicted FLOP/s)} of attention and FFN."""
    from moejax.schedule import costs
    from moejax.schedule.predict import predict

    ubs, n_ub = policy.micro_batch_size, policy.num_micro_batches
    ctx = workload.prompt_len + workload.gen_len // 2  # mid-generation context
    kvb = workload.kv_bytes_per_elem
    a_flops = ubs * model.attention_core_flops(ctx)
    a_bytes = (costs.kv_bytes(model, ubs * (ctx + 1), kvb) + costs.qkv_bytes(model, ubs)
               + costs.attn_out_bytes(model, ubs))
    if policy.attention_device == "cpu":
        a_time = costs.cpu_attention_s(model, hw, ubs, ctx, kvb)
    else:
        a_time = costs.gpu_decode_attention_s(model, hw, ubs, ctx, kvb)
    f_flops = ubs * model.expert_flops_per_token()
    f_bytes = (costs.expected_active_experts(model, ubs) * model.expert_bytes()
               + ubs * model.top_k * (2 * model.hidden_size + 3 * model.expert_ffn_size)
               * model.bytes_per_param)
    f_time = costs.gpu_ffn_s(model, hw, ubs)
    layer_s = predict(model, hw, workload, policy).decode_layer_s
    streamed = max(costs.streamed_expert_bytes(model, policy.gpu_weight_fraction), 1.0)
    return {
        f"attention ({policy.attention_device}, ubs={ubs})": (a_flops / a_bytes,
                                                              a_flops / a_time),
        f"MoE FFN vs device memory (ubs={ubs})": (f_flops / f_bytes, f_flops / f_time),
        f"MoE FFN vs link (N={ubs * n_ub})": (n_ub * f_flops / streamed,
                                              n_ub * f_flops / layer_s),
    }


def plot(model, hw, workload, policy, pred, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.logspace(-1, 4.5, 400)
    p_gpu, p_cpu = hw.gpu_flops_per_s(model.dtype), hw.cpu_flops_per_s
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for (name, peak, bw), color in zip(
            (("device", p_gpu, hw.gpu_memory_bytes_per_s),
             ("host", p_cpu, hw.host_memory_bytes_per_s)), ("C0", "C1")):
        ax.loglog(x, np.minimum(peak, bw * x), color, lw=2,
                  label=f"{name}: {peak / 1e12:.3g} TFLOP/s, {bw / 1e9:.0f} GB/s")
    ax.loglog(x, np.minimum(p_gpu, hw.h2d_bytes_per_s * x), "C2--", lw=2,
              label=f"host→device link: {hw.h2d_bytes_per_s / 1e9:.1f} GB/s")
    for name, i in (("P1", p_cpu / hw.h2d_bytes_per_s), ("P2", p_gpu / hw.h2d_bytes_per_s)):
        y = hw.h2d_bytes_per_s * i
        ax.plot([i], [y], "ko", ms=5)
        ax.annotate(f"{name}  I={i:.0f}", (i, y), textcoords="offset points",
                    xytext=(6, -12), fontsize=9)
    kv_int = model.attention_core_flops(1) / (2 * model.num_kv_heads * model.head_dim)
    kv_elems = [e for e in (4, 2, 1, 0.5) if e <= model.bytes_per_param][:3]
    for elem, style in zip(kv_elems, (":", "-.", "--")):
        ax.axvline(kv_int / elem, color="gray", ls=style, lw=1,
                   label=f"attention intensity, {8 * elem:g}-bit KV")
    markers = iter(("s", "^", "D"))
    for (name, (i, perf)), c in zip(operating_points(model, hw, workload, policy).items(),
                                    ("C3", "C4", "C5")):
        ax.plot([i], [perf], next(markers), color=c, ms=9,
                label=f"{name}: {perf / 1e12:.3g} TFLOP/s")
    ax.set_xlabel("operational intensity (FLOP / byte)")
    ax.set_ylabel("attainable performance (FLOP/s)")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(min(p_cpu, hw.h2d_bytes_per_s) / 50, p_gpu * 3)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"Hierarchical roofline: {model.name} on {hw.name}, prompt "
                 f"{workload.prompt_len} / gen {workload.gen_len}\n"
                 f"policy N={policy.batch_size} = {policy.micro_batch_size}×"
                 f"{policy.num_micro_batches}, wg={policy.gpu_weight_fraction:.3f}: "
                 f"{pred.tokens_per_s:.0f} tok/s end to end (limit "
                 f"{pred.limit_tokens_per_s:.0f})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def comparison_table(model, hw, prompt_len: int, gens=(32, 64, 128, 256),
                     device_memory_bytes: float | None = None) -> str:
    """Markdown: MoE-Lightning's reproduced decode tok/s (its own memory model, the
    whole device), moejax's predicted end-to-end tok/s with its searched policy under
    `device_memory_bytes`, and the MoE-Lens limit, per generation length."""
    from moejax.schedule import moe_lightning_search, search_policy

    rows = ["| gen | MoE-Lightning decode tok/s (ubs×n_ub, wg) | moejax e2e tok/s "
            "(ubs×n_ub, wg) | moejax decode tok/s | limit tok/s |",
            "|---|---|---|---|---|"]
    for g in gens:
        ml = moe_lightning_search(model, hw, prompt_len, g)
        pol, pr = search_policy(model, hw, Workload(prompt_len, g),
                                device_memory_bytes=device_memory_bytes)
        rows.append(
            f"| {g} | {ml.decode_tokens_per_s:.2f} ({ml.policy.micro_batch_size}×"
            f"{ml.policy.num_micro_batches}, {ml.policy.gpu_weight_fraction:.3f}) | "
            f"{pr.tokens_per_s:.1f} ({pol.micro_batch_size}×{pol.num_micro_batches}, "
            f"{pol.gpu_weight_fraction:.3f}) | {pr.decode_tokens_per_s:.1f} | "
            f"{pr.limit_tokens_per_s:.1f} |")
    return "\n".join(rows)


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    from moejax.schedule import search_policy

    setup = get_setup(FLAGS.config)
    dev_gib = FLAGS.device_memory_gib or setup.device_memory_gib
    dev_bytes = None if dev_gib is None else dev_gib * 2**30
    model = get_model(FLAGS.model) if FLAGS.model else setup.model
    hw = get_hardware(FLAGS.hardware) if FLAGS.hardware else setup.hardware
    workload = get_workload(FLAGS.workload) if FLAGS.workload else setup.workload
    if dev_bytes is not None and dev_bytes > hw.gpu_memory_bytes:
        fail(f"--device_memory_gib={dev_gib:g} exceeds {hw.name}'s "
             f"{hw.gpu_memory_bytes / 2**30:.1f} GiB of device memory")
    overrides = [v for v in (FLAGS.model, FLAGS.hardware, FLAGS.workload) if v]
    name = "_".join([FLAGS.config, *overrides])  # an override never overwrites a preset's
    out = FLAGS.out or os.path.join("experiments", "results", f"roofline_{name}.png")
    try:
        policy, pred = search_policy(model, hw, workload, device_memory_bytes=dev_bytes)
    except ValueError as e:
        fail(str(e))
    plot(model, hw, workload, policy, pred, out)
    print(f"{model.name} on {hw.name}, prompt {workload.prompt_len} gen {workload.gen_len}: "
          f"{policy}\n  {pred.tokens_per_s:.1f} tok/s end to end, "
          f"{pred.decode_tokens_per_s:.1f} decode, limit {pred.limit_tokens_per_s:.1f}; "
          f"wrote {out}")
    if FLAGS.table:
        print(comparison_table(model, hw, workload.prompt_len,
                               device_memory_bytes=dev_bytes))


if __name__ == "__main__":
    run(main)
