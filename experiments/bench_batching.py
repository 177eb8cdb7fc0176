"""Static vs continuous batching on the local testbed (docs/design.md §7).

    python -m experiments.bench_batching --workload mtbench --num_requests 64

The same scaled Mixtral, device budget, host KV budget and requests (prompt and output
lengths from a trace in experiments/workloads/, outputs scaled by --gen_scale so a round
fits minutes while keeping the trace's spread; random prompt tokens, each request
stopping at its output length) run static and continuous in alternating rounds in one
process. Continuous batching takes `search_continuous`'s policy on the calibrated local
hardware (concurrency bounded by the host KV budget); static runs the requests in batches
of as many as that KV budget holds at full length, each with its own searched
micro-batching (the engine's static path). Untimed first: the continuous job itself and
a short static run, so the timed rounds compile nothing (`local.warm_up`).
Measured generated tokens/s (median of the rounds, and the spread) beside the model's
predictions (`predict` of the static batches, `predict_continuous` of the same requests)
and the MoE-Lens limit. Then the target presets' predictions, static and continuous, next
to MoE-Lightning's measured figures (`experiments.batching_targets`). Table + JSON + PNG.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import flags

from experiments.cli import fail, no_extra_args, output_flag, quiet_logs, run
from experiments.local import default_budget, local_config, local_hardware, warm_up

FLAGS = flags.FLAGS
flags.DEFINE_enum("workload", "mtbench", ["mtbench", "rag", "longgen"], "length trace")
flags.DEFINE_integer("num_requests", 64, "requests per round (the trace's first ones)",
                     lower_bound=1)
flags.DEFINE_float("gen_scale", 0.25, "output lengths scaled by this (at least 2 tokens)",
                   lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_integer("rounds", 2, "alternating rounds of each mode", lower_bound=1)
flags.DEFINE_integer("max_concurrency", 64, "cap on the searched concurrency",
                     lower_bound=1)
flags.DEFINE_float("host_kv_gb", None, "host KV cache budget, GB (default: the engine's)")
flags.DEFINE_float("gpu_weight_fraction", 0.15, "resident expert fraction (both modes)",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_list("target_presets", ["mixtral_l4", "mixtral_t4", "dbrx_t4x4"],
                  "target presets of the prediction table ('' to skip it)")
flags.DEFINE_integer("target_sequences", 16384, "requests of each target job",
                     lower_bound=1)
flags.DEFINE_string("batching_json", "experiments/results/bench_batching_cpu.json",
                    "where the JSON goes")
flags.DEFINE_string("batching_png", "experiments/results/bench_batching_cpu.png",
                    "where the picture goes ('' to skip)")
output_flag("batching_json", ".json")
output_flag("batching_png", ".png", allow_empty=True)
WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")


def requests(trace):
    """[(prompt_len, gen_len)] of the round: the trace's first --num_requests, outputs
    scaled by --gen_scale (rounded, ≥ 2)."""
    pairs = trace.requests(FLAGS.num_requests)
    return [(p, max(2, round(g * FLAGS.gen_scale))) for p, g in pairs]


def timed(engine, prompts, gens, batching: str) -> float:
    t = time.perf_counter()
    out = engine.generate(prompts, gens, batching=batching)
    wall = time.perf_counter() - t
    assert [len(o) for o in out] == gens  # no EOS: each stops at its length
    return sum(gens) / wall


def predictions(cfg, hw, engines, reqs, kv_bytes) -> dict:
    """Static: `predict` of each batch the engine runs (its policy, padded prompt, longest
    output); continuous: `predict_continuous` of the same requests."""
    from moejax.model_config.workload import Workload
    from moejax.schedule.continuous import predict_continuous
    from moejax.schedule.policy import padded_len
    from moejax.schedule.predict import predict

    st, n = engines["static"], static_batch(engines["static"], reqs)
    total, gen = 0.0, sum(g for _, g in reqs)
    for i in range(0, len(reqs), n):
        chunk = reqs[i:i + n]
        wl = Workload(padded_len(max(p for p, _ in chunk)), max(g for _, g in chunk))
        pol = st.policy_for(len(chunk), wl.prompt_len, wl.gen_len)
        total += predict(cfg, hw, wl, pol).total_s
    wl = Workload.from_lengths([p for p, _ in reqs], [g for _, g in reqs])
    cont = predict_continuous(cfg, hw, wl, engines["continuous"].policy, kv_bytes,
                              requests=reqs)
    return {"static": gen / total, "continuous": cont.tokens_per_s,
            "limit": cont.limit_tokens_per_s}


def static_batch(engine, reqs) -> int:
    """Rows of the static engine's batches: all the requests, as the KV budget allows."""
    prompts = [[1] * p for p, _ in reqs]
    return min(len(reqs), engine._static_kv_rows(prompts, [g for _, g in reqs]))


def static_occupancy(reqs, batch: int) -> list[int]:
    """Rows still generating at each static decode step, batch after batch."""
    out = []
    for i in range(0, len(reqs), batch):
        g = np.array([g for _, g in reqs[i:i + batch]])
        out += [int((g > s).sum()) for s in range(int(g.max()))]
    return out


def picture(path, rates, pred, reqs, batch, sweeps):
    """Left: measured (median, min–max) and predicted tok/s of both modes. Right: rows
    that produce a token per weight pass (static decode step / continuous sweep)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    modes = ("static", "continuous")
    med = [statistics.median(rates[k]) for k in modes]
    err = [[m - min(rates[k]) for m, k in zip(med, modes)],
           [max(rates[k]) - m for m, k in zip(med, modes)]]
    x = np.arange(2)
    a.bar(x - 0.2, med, 0.4, yerr=err, capsize=4, label="measured (median, min–max)")
    a.bar(x + 0.2, [pred[k] for k in modes], 0.4, label="predicted")
    a.set_xticks(x, modes)
    a.set_ylabel("generated tokens/s")
    a.legend(fontsize=8)
    a.set_title(f"{FLAGS.workload}: {len(reqs)} requests, concurrency {batch}")
    b.plot(static_occupancy(reqs, batch), label="static (per decode step)")
    b.plot([sum(s.decode_rows) + sum(s.prefill_rows) for s in sweeps], label="continuous (per sweep)")
    b.axhline(batch, color="gray", ls=":", lw=1)
    b.set_xlabel("weight pass")
    b.set_ylabel("rows producing a token")
    b.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def local_policy(cfg, hw, reqs, budget, kv_bytes):
    """`search_continuous` for these requests (concurrency ≤ --max_concurrency)."""
    from moejax.model_config.workload import Workload
    from moejax.schedule.continuous import search_continuous

    wl = Workload.from_lengths([p for p, _ in reqs], [g for _, g in reqs],
                               num_sequences=min(len(reqs), FLAGS.max_concurrency))
    try:
        policy, _ = search_continuous(cfg, hw, wl, device_memory_bytes=budget,
                                      host_kv_bytes=kv_bytes)
    except ValueError as e:
        fail(str(e))
    return policy.replace(gpu_weight_fraction=FLAGS.gpu_weight_fraction)


def targets(out) -> None:
    """The target presets' predictions (`batching_targets`), printed and stored."""
    from experiments.batching_targets import markdown, targets_table  # defines its flags

    presets = [p for p in FLAGS.target_presets if p]
    if not presets:
        return
    rows = targets_table(presets, FLAGS.target_sequences)
    print(f"\ntarget presets ({FLAGS.target_sequences} requests a job, predicted tok/s):")
    print(markdown(rows))
    out["targets"] = {"num_sequences": FLAGS.target_sequences, "rows": rows}


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    import moejax
    from moejax.engine import HOST_KV_SHARE
    from moejax.host_offload.memory import available_host_bytes
    from moejax.model_config.setups import get_setup
    from moejax.model_config.workload import Workload, load_trace
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES, padded_len
    from moejax.schedule.predict import DEVICE_MEMORY_USABLE

    trace = load_trace(os.path.join(WORKLOADS, f"{FLAGS.workload}.json"))
    cfg, note = local_config(get_setup("mixtral_l4"))
    print(f"bench_batching: {note}", flush=True)
    reqs = requests(trace)
    p_max, g_max = max(p for p, _ in reqs), max(g for _, g in reqs)
    # room for the activations of up to --max_concurrency sequences at the longest prompt
    budget = default_budget(cfg, DEFAULT_PAGE_BYTES, Workload(padded_len(p_max), g_max),
                            min(FLAGS.max_concurrency, len(reqs)))
    hw = local_hardware(cfg).replace(gpu_memory_bytes=budget / DEVICE_MEMORY_USABLE)
    model = moejax.MoEModel.random(cfg, seed=0)
    free = available_host_bytes()
    kv_bytes = int(FLAGS.host_kv_gb * 1e9) if FLAGS.host_kv_gb else (
        int(HOST_KV_SHARE * free) if free is not None else 2**30)
    policy = local_policy(cfg, hw, reqs, budget, kv_bytes)
    try:  # continuous: the searched policy; static: its own micro-batching per batch
        engines = {"static": moejax.Engine(
            model, device_memory_bytes=int(budget), host_kv_bytes=kv_bytes,
            gpu_weight_fraction=policy.gpu_weight_fraction, page_bytes=policy.page_bytes),
            "continuous": moejax.Engine(model, policy=policy,
                                        device_memory_bytes=int(budget),
                                        host_kv_bytes=kv_bytes)}
    except ValueError as e:
        fail(str(e))
    engine = engines["continuous"]
    policy = engine.policy = policy.replace(
        gpu_weight_fraction=engine.store.gpu_weight_fraction)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, p).tolist() for p, _ in reqs]
    gens = [g for _, g in reqs]
    print(f"bench_batching: {len(reqs)} {FLAGS.workload} requests (outputs ×"
          f"{FLAGS.gen_scale:g}: {min(gens)}–{max(gens)}), concurrency {policy.concurrency}"
          f" ({policy.micro_batch_size}×{policy.num_micro_batches}), wg "
          f"{policy.gpu_weight_fraction:.3f}", flush=True)
    warm_up(engine, prompts, "continuous", gens)  # compile; not timed
    engines["static"].generate(prompts, 2, batching="static")
    rates = {"static": [], "continuous": []}
    sweeps = []
    for r in range(FLAGS.rounds):
        for batching in ("static", "continuous"):
            rates[batching].append(timed(engines[batching], prompts, gens, batching))
            if batching == "continuous":
                sweeps = list(engine.last_sweeps)
            print(f"  round {r + 1} {batching}: {rates[batching][-1]:.1f} tok/s", flush=True)
    pred = predictions(cfg, hw, engines, reqs, kv_bytes)
    batch = static_batch(engines["static"], reqs)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"workload": FLAGS.workload, "gen_scale": FLAGS.gen_scale, "requests": reqs,
           "policy": str(policy), "concurrency": policy.concurrency,
           "static_batch": batch,
           "host_kv_bytes": kv_bytes, "measured_tokens_per_s": rates,
           "median_tokens_per_s": med,
           "predicted_tokens_per_s": {k: pred[k] for k in ("static", "continuous")},
           "prediction_error": {k: (pred[k] - med[k]) / med[k] for k in med},
           "limit_tokens_per_s": pred["limit"], "continuous_sweeps": len(sweeps),
           "continuous_over_static": med["continuous"] / med["static"]}
    print("| mode | measured tok/s (median; rounds) | predicted | error |\n|---|---|---|---|")
    for k in ("static", "continuous"):
        print(f"| {k} | {med[k]:.1f} ({', '.join(f'{x:.1f}' for x in rates[k])}) | "
              f"{pred[k]:.1f} | {100 * out['prediction_error'][k]:+.1f} % |")
    print(f"continuous / static measured: {out['continuous_over_static']:.2f}×; "
          f"MoE-Lens limit {pred['limit']:.1f} tok/s")
    if FLAGS.batching_png:
        picture(FLAGS.batching_png, rates, pred, reqs, batch, sweeps)
        print(f"wrote {FLAGS.batching_png}")
    targets(out)
    os.makedirs(os.path.dirname(FLAGS.batching_json) or ".", exist_ok=True)
    with open(FLAGS.batching_json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {FLAGS.batching_json}")
    return 0


if __name__ == "__main__":
    run(main)
