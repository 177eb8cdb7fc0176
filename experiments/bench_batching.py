"""Static vs continuous batching on the local testbed (docs/design.md §7).

    python -m experiments.bench_batching --workload mtbench --num_requests 48

The same scaled Mixtral, device budget and requests (prompt and output lengths from a
trace in experiments/workloads/, outputs clipped to --max_gen so a round fits minutes;
random prompt tokens, each request stopping at its output length) run static and
continuous in alternating rounds in one process; measured generated tokens/s (median of
the rounds, and the spread) beside the model's predictions (`predict` of the static
batches, `predict_continuous` of the same requests) and the MoE-Lens limit. Table + JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import flags

from experiments.cli import fail, no_extra_args, quiet_logs, run
from experiments.local import default_budget, local_config, local_hardware

FLAGS = flags.FLAGS
flags.DEFINE_enum("workload", "mtbench", ["mtbench", "rag", "longgen"], "length trace")
flags.DEFINE_integer("num_requests", 48, "requests per round (the trace's first ones)",
                     lower_bound=1)
flags.DEFINE_integer("max_gen", 48, "outputs clipped to this many tokens", lower_bound=2)
flags.DEFINE_integer("rounds", 2, "alternating rounds of each mode", lower_bound=1)
flags.DEFINE_integer("concurrency", 32, "sequences in flight (both modes)", lower_bound=1)
flags.DEFINE_float("gpu_weight_fraction", 0.15, "resident expert fraction (both modes)",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_string("batching_json", "experiments/results/bench_batching_cpu.json",
                    "where the JSON goes")
WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")


def requests(trace):
    """[(prompt_len, gen_len)] of the round: the trace's first --num_requests, outputs
    clipped to --max_gen."""
    pairs = trace.requests(FLAGS.num_requests)
    return [(p, min(g, FLAGS.max_gen)) for p, g in pairs]


def timed(engine, prompts, gens, batching: str) -> float:
    t = time.perf_counter()
    out = engine.generate(prompts, gens, batching=batching)
    wall = time.perf_counter() - t
    assert [len(o) for o in out] == gens  # no EOS: each stops at its length
    return sum(gens) / wall


def predictions(cfg, hw, engine, reqs) -> dict:
    """Static: `predict` of each batch the engine runs (its policy, padded prompt, longest
    output); continuous: `predict_continuous` of the same requests."""
    from moejax.model_config.workload import Workload
    from moejax.schedule.continuous import predict_continuous
    from moejax.schedule.policy import padded_len
    from moejax.schedule.predict import predict

    n, total, gen = engine.policy.batch_size, 0.0, sum(g for _, g in reqs)
    for i in range(0, len(reqs), n):
        chunk = reqs[i:i + n]
        wl = Workload(padded_len(max(p for p, _ in chunk)), max(g for _, g in chunk))
        pol = engine.policy_for(len(chunk), wl.prompt_len, wl.gen_len)
        total += predict(cfg, hw, wl, pol).total_s
    wl = Workload.from_lengths([p for p, _ in reqs], [g for _, g in reqs])
    cont = predict_continuous(cfg, hw, wl, engine.policy, requests=reqs)
    return {"static": gen / total, "continuous": cont.tokens_per_s,
            "limit": cont.limit_tokens_per_s}


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    import moejax
    from moejax.model_config.setups import get_setup
    from moejax.model_config.workload import Workload, load_trace
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES, padded_len

    trace = load_trace(os.path.join(WORKLOADS, f"{FLAGS.workload}.json"))
    cfg, note = local_config(get_setup("mixtral_l4"))
    print(f"bench_batching: {note}", flush=True)
    hw = local_hardware(cfg)
    reqs = requests(trace)
    # room for the activations of --concurrency sequences at the longest prompt, so the
    # micro-batching is the model's choice, not the budget's
    budget = default_budget(cfg, DEFAULT_PAGE_BYTES, Workload(
        padded_len(max(p for p, _ in reqs)), FLAGS.max_gen), FLAGS.concurrency)
    model = moejax.MoEModel.random(cfg, seed=0)
    probe = moejax.Engine(model, device_memory_bytes=int(budget),
                          gpu_weight_fraction=FLAGS.gpu_weight_fraction)
    policy = probe.policy_for(FLAGS.concurrency, max(p for p, _ in reqs), FLAGS.max_gen)
    del probe
    try:
        engine = moejax.Engine(model, policy=policy, device_memory_bytes=int(budget))
    except ValueError as e:
        fail(str(e))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, p).tolist() for p, _ in reqs]
    gens = [g for _, g in reqs]
    print(f"bench_batching: {len(reqs)} {FLAGS.workload} requests (outputs ≤ "
          f"{FLAGS.max_gen}), {policy.micro_batch_size}×{policy.num_micro_batches}, wg "
          f"{engine.store.gpu_weight_fraction:.3f}", flush=True)
    for batching in ("static", "continuous"):  # compile both; not timed
        engine.generate(prompts[:4], [2] * 4, batching=batching)
    rates = {"static": [], "continuous": []}
    for r in range(FLAGS.rounds):
        for batching in ("static", "continuous"):
            rates[batching].append(timed(engine, prompts, gens, batching))
            print(f"  round {r + 1} {batching}: {rates[batching][-1]:.1f} tok/s", flush=True)
    pred = predictions(cfg, hw, engine, reqs)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"workload": FLAGS.workload, "requests": reqs, "policy": str(policy),
           "measured_tokens_per_s": rates, "median_tokens_per_s": med,
           "predicted_tokens_per_s": {k: pred[k] for k in ("static", "continuous")},
           "limit_tokens_per_s": pred["limit"],
           "continuous_over_static": med["continuous"] / med["static"]}
    print("| mode | measured tok/s (median; rounds) | predicted | error |\n|---|---|---|---|")
    for k in ("static", "continuous"):
        err = (pred[k] - med[k]) / med[k]
        print(f"| {k} | {med[k]:.1f} ({', '.join(f'{x:.1f}' for x in rates[k])}) | "
              f"{pred[k]:.1f} | {100 * err:+.1f} % |")
    print(f"continuous / static measured: {out['continuous_over_static']:.2f}×; "
          f"MoE-Lens limit {pred['limit']:.1f} tok/s")
    os.makedirs(os.path.dirname(FLAGS.batching_json) or ".", exist_ok=True)
    with open(FLAGS.batching_json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {FLAGS.batching_json}")
    return 0


if __name__ == "__main__":
    run(main)
