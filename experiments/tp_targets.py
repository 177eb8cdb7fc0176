"""Predicted tokens/s of k-device tensor parallel (docs/design.md §10) beside MoE-Lightning's
measured figures and the MoE-Lens limit.

    python -m experiments.tp_targets [--presets mixtral_8x22b_t4x2,...] [--num_sequences N]

For each k-device setup (model_config/setups.py: per-device T4 memory, compute and link,
an all-reduce after o_proj and after w2 over PCIe) and MTBench at g = 32/64/128/256:
`search_policy`'s best static policy and its prediction with independent links, the same
with the k links sharing one x16 root port (16 GiB/s together), the busiest resource, the
MoE-Lens limit, and MoE-Lightning's measured end-to-end figure (issue 23). Prints a
markdown table and writes --output_json.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments.cli import check_presets, no_extra_args, output_flag, quiet_logs, run

PRESETS = ("mixtral_8x22b_t4x2", "mixtral_8x22b_t4x4", "dbrx_t4x2", "dbrx_t4x4")
GENS = (32, 64, 128, 256)
SHARED_LINK_GIB_S = 16.0  # one PCIe 3.0 x16 root port shared by every T4
# MoE-Lightning's measured end-to-end tok/s, MTBench g = 32/64/128/256 (issue 23)
MOE_LIGHTNING = {"mixtral_8x22b_t4x4": (15, 22, 26, 26), "dbrx_t4x2": (34, 36, 30, 26),
                 "dbrx_t4x4": (72, 84, 83, 59)}

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", list(PRESETS), "k-device setups (model_config/setups.py)")
flags.DEFINE_integer("num_sequences", 16384, "requests per job (caps the batch)",
                     lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/tp_targets.json",
                    "JSON path ('' to skip)")
output_flag("output_json", ".json", allow_empty=True)


def target_row(preset: str, gen: int, num_sequences: int) -> dict:
    """One setup × g: the searched policy and prediction, independent and shared links."""
    from moejax.model_config.setups import get_setup
    from moejax.model_config.workload import Workload
    from moejax.schedule import search_policy

    setup = get_setup(preset)
    m, hw = setup.model, setup.hardware
    wl = Workload(77, gen, num_sequences=num_sequences, name=f"mtbench_g{gen}")
    pol, pred = search_policy(m, hw, wl)
    shared = hw.replace(host_link_bytes_per_s=SHARED_LINK_GIB_S * 2**30)
    spol, spred = search_policy(m, shared, wl)
    row = {"preset": preset, "model": m.name, "devices": hw.num_devices, "gen_len": gen,
           "prompt_len": 77, "policy": f"{pol.micro_batch_size}x{pol.num_micro_batches} "
           f"wg={pol.gpu_weight_fraction:.3f} attn={pol.attention_device}",
           "tokens_per_s": pred.tokens_per_s, "bottleneck": pred.bottleneck,
           "peak_device_bytes_per_device": pred.peak_device_bytes,
           "shared_link_tokens_per_s": spred.tokens_per_s,
           "shared_link_policy": f"{spol.micro_batch_size}x{spol.num_micro_batches} "
           f"wg={spol.gpu_weight_fraction:.3f}",
           "limit_tokens_per_s": pred.limit_tokens_per_s,
           "fraction_of_limit": pred.tokens_per_s / pred.limit_tokens_per_s,
           "hardware": hw.to_json()}
    if preset in MOE_LIGHTNING:
        row["moe_lightning_measured_tokens_per_s"] = MOE_LIGHTNING[preset][GENS.index(gen)]
    return row


def markdown(rows) -> str:
    lines = ["| setup | g | policy (ubs×n, wg) | predicted tok/s | bottleneck | shared "
             "16 GiB/s links | MoE-Lens limit | / limit | MoE-Lightning measured |",
             "|" + "---|" * 9]
    for r in rows:
        ml = r.get("moe_lightning_measured_tokens_per_s")
        lines.append(
            f"| {r['preset']} | {r['gen_len']} | {r['policy']} | {r['tokens_per_s']:.1f} | "
            f"{r['bottleneck']} | {r['shared_link_tokens_per_s']:.1f} | "
            f"{r['limit_tokens_per_s']:.1f} | {100 * r['fraction_of_limit']:.0f} % | "
            f"{ml if ml else '—'} |")
    return "\n".join(lines)


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    check_presets(FLAGS.presets)
    rows = [target_row(p, g, FLAGS.num_sequences) for p in FLAGS.presets for g in GENS]
    print(markdown(rows))
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump({"num_sequences": FLAGS.num_sequences,
                       "shared_link_gib_s": SHARED_LINK_GIB_S, "rows": rows}, f, indent=1)
        print(f"wrote {FLAGS.output_json}")
    return 0


if __name__ == "__main__":
    run(main)
