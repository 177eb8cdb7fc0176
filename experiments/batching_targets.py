"""Target predictions, static vs continuous batching (docs/design.md §6, §7).

    python -m experiments.batching_targets [--presets mixtral_l4,...] [--num_sequences N]

For each preset and workload (MTBench at g = 32/64/128/256 with fixed lengths, and the
shipped traces mtbench / rag / longgen, each a job of --num_sequences requests, the trace
cycled): the static prediction of `search_policy` (a trace's static batch runs to its
longest output: priced at max g, credited the mean), the continuous one of
`search_continuous` with KV reserved as prompt + max new tokens ("max") and as it grows
("lookahead"), the MoE-Lens limit at the workload's mean lengths, continuous / limit, and
MoE-Lightning's measured end-to-end figures where published. Prints a markdown table and
writes --output_json. (Eventually `python -m experiments.bench_batching --predict_only`.)
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments.cli import check_presets, no_extra_args, output_flag, quiet_logs, run

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = ("mixtral_l4", "mixtral_t4", "dbrx_t4x4")
GENS = (32, 64, 128, 256)
TRACES = ("mtbench", "rag", "longgen")
# MoE-Lightning's measured end-to-end tok/s on MTBench at g = 32/64/128/256 (§6)
MOE_LIGHTNING = {"mixtral_l4": (203, 295, 218, 168), "mixtral_t4": (63, 101, 98, 97),
                 "dbrx_t4x4": (72, 84, 83, 59)}

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", list(PRESETS), "setups (model_config/setups.py)")
flags.DEFINE_integer("num_sequences", 16384, "requests per job", lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/batching_targets.json",
                    "JSON path ('' to skip)")
output_flag("output_json", ".json", allow_empty=True)


def workloads(num_sequences: int):
    """[(name, Workload)]: MTBench fixed lengths, then the shipped traces."""
    from moejax.model_config.workload import Workload, load_trace

    out = [(f"mtbench_g{g}", Workload(77, g, num_sequences=num_sequences,
                                      name=f"mtbench_g{g}")) for g in GENS]
    out += [(t, load_trace(os.path.join(HERE, "workloads", f"{t}.json"),
                           num_sequences=num_sequences)) for t in TRACES]
    return out


def _policy_str(p) -> str:
    s = f"{p.micro_batch_size}x{p.num_micro_batches} wg={p.gpu_weight_fraction:.3f}"
    if p.prefill_tokens_per_sweep:
        s += f" B={p.prefill_tokens_per_sweep}"
        if p.prefill_micro_batch_tokens:
            s += f"/{p.prefill_micro_batch_tokens}"
    return s


def _static(m, hw, wl, search_policy):
    """(policy, tok/s) of static batching: `search_policy`; a trace's batch runs until its
    longest output, so it is priced at g = max g_i and credited mean(g)/max(g) of it."""
    if not wl.gen_lens:
        pol, pred = search_policy(m, hw, wl)
        return pol, pred.tokens_per_s
    g_max = max(wl.gen_lens)
    pol, pred = search_policy(m, hw, wl.__class__(wl.prompt_len, g_max,
                                                  num_sequences=wl.num_sequences))
    return pol, pred.tokens_per_s * sum(wl.gen_lens) / len(wl.gen_lens) / g_max


def target_row(preset: str, name: str, wl) -> dict:
    """One preset × workload: static, continuous (both reservations), limit, measured."""
    from moejax.model_config.setups import get_setup
    from moejax.schedule import search_policy
    from moejax.schedule.continuous import search_continuous

    setup = get_setup(preset)
    m, hw = setup.model, setup.hardware
    row = {"preset": preset, "workload": name, "prompt_mean": wl.prompt_len,
           "gen_mean": wl.gen_len, "num_sequences": wl.num_sequences}
    pol, static = _static(m, hw, wl, search_policy)
    row.update(static_tokens_per_s=static, static_policy=_policy_str(pol))
    for res in ("max", "lookahead"):
        cpol, c = search_continuous(m, hw, wl, kv_reservation=res)
        row.update({f"continuous_{res}_tokens_per_s": c.tokens_per_s,
                    f"continuous_{res}_steady_tokens_per_s": c.steady_tokens_per_s,
                    f"continuous_{res}_policy": _policy_str(cpol),
                    f"continuous_{res}_sweep_s": c.sweep_s,
                    f"continuous_{res}_steady_concurrency": c.steady_concurrency,
                    f"continuous_{res}_kv_capacity_tokens": c.kv_capacity_tokens})
        row["limit_tokens_per_s"] = c.limit_tokens_per_s
        row[f"continuous_{res}_fraction_of_limit"] = c.tokens_per_s / c.limit_tokens_per_s
        row[f"continuous_{res}_steady_fraction_of_limit"] = (c.steady_tokens_per_s
                                                            / c.limit_tokens_per_s)
    if name.startswith("mtbench_g") and preset in MOE_LIGHTNING:
        row["moe_lightning_measured_tokens_per_s"] = MOE_LIGHTNING[preset][
            GENS.index(wl.gen_len)]
    return row


def targets_table(presets=PRESETS, num_sequences: int = 16384) -> list[dict]:
    """Rows of `target_row` for every preset and workload."""
    return [target_row(p, name, wl) for p in presets for name, wl in workloads(num_sequences)]


def markdown(rows) -> str:
    head = ("| preset | workload | p / g | static | continuous max (steady) | "
            "continuous lookahead (steady) | limit | max / limit | lookahead / limit | "
            "MoE-Lightning measured |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ml = r.get("moe_lightning_measured_tokens_per_s")
        lines.append(
            f"| {r['preset']} | {r['workload']} | {r['prompt_mean']} / {r['gen_mean']} | "
            f"{r['static_tokens_per_s']:.0f} | {r['continuous_max_tokens_per_s']:.0f} "
            f"({r['continuous_max_steady_tokens_per_s']:.0f}) | "
            f"{r['continuous_lookahead_tokens_per_s']:.0f} "
            f"({r['continuous_lookahead_steady_tokens_per_s']:.0f}) | "
            f"{r['limit_tokens_per_s']:.0f} | "
            f"{100 * r['continuous_max_fraction_of_limit']:.0f} % | "
            f"{100 * r['continuous_lookahead_fraction_of_limit']:.0f} % | "
            f"{ml if ml else '—'} |")
    return "\n".join(lines)


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    check_presets(FLAGS.presets)
    rows = targets_table(FLAGS.presets, FLAGS.num_sequences)
    print(markdown(rows))
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump({"num_sequences": FLAGS.num_sequences, "rows": rows}, f, indent=1)
        print(f"wrote {FLAGS.output_json}")
    return 0


if __name__ == "__main__":
    run(main)
