"""Ablations on this machine: each row measured and predicted, as a table and a PNG.

    python -m experiments.ablations [--config mixtral_l4 --prompt_len 32 --gen_len 8]

Rows, all under a device budget that forces expert streaming: CGOPipe overlap on/off,
decode attention on the CPU vs the device, paged vs whole-layer weight transfers, and a
sweep of batch size, micro-batch size and gpu_weight_fraction. Every row runs the same
scaled model through `moejax.Engine(model, policy=…)`; the prediction is `predict()` for
the same policy on the `local` hardware, calibrated again first (`--recalibrate`), and
`simulate()` of the row's timeline is reported beside it. The rows are timed in
`--repeats` rounds of one run each (medians reported), so that the speed of this shared
machine, which drifts by ~10 % within minutes, weighs on every row alike. After every
round the calibration's in-situ probes run again (`--reprobe`, `Reprobe`): the rows are
priced with the link rates and copy core demand those probes measured beside them, and
the prediction with the calibration's own figures is kept beside it in the JSON.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments.cli import (fail, finite_flag, no_extra_args, output_flag, quiet_logs,
                             run)
from experiments.local import (GB, check_positions, default_budget, local_config,
                               local_hardware, local_model, measure, policy_dict)
from moejax.model_config.setups import setup_names

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "mixtral_l4", setup_names(), "whose architecture to scale")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens", lower_bound=1)
flags.DEFINE_integer("gen_len", 8, "generated tokens", lower_bound=2)
flags.DEFINE_integer("local_hidden_size", 768, "hidden size of the scaled local model",
                     lower_bound=16)
flags.DEFINE_integer("local_num_layers", 8, "layers of the scaled local model",
                     lower_bound=1)
flags.DEFINE_float("device_memory_gb", None, "emulated device memory, GB (default: "
                   "~10 % of experts resident)", lower_bound=0.01)
finite_flag("device_memory_gb")
flags.DEFINE_string("output_json", "experiments/results/ablations_cpu.json", "JSON path")
flags.DEFINE_string("output_png", "experiments/results/ablations_cpu.png", "PNG path")
flags.DEFINE_bool("quick", False, "only the overlap and attention rows")
flags.DEFINE_integer("repeats", 5, "timed runs per row (median reported): one run of a "
                     "row varies by ~10 % on a shared 2-core machine", lower_bound=1)
flags.DEFINE_bool("reprobe", True, "run the calibration's in-situ probes (link page "
                  "rate, copy core demand) again after every round of rows and price the "
                  "rows with their medians: one calibration's figures swing by 15-100 %")
flags.DEFINE_bool("recalibrate", True, "calibrate this machine again first (its speed "
                  "drifts by ~10 % over an hour; `throughput` reuses the cached figures)")
output_flag("output_json", ".json")
output_flag("output_png", ".png")


def rows(base, page_layer: int):
    """(name, policy) of every ablation row, derived from the searched base policy."""
    b = base.batch_size
    out = [("base: searched policy", base),
           ("overlap off (serial executor)", base.replace(overlap=False)),
           ("attention on the device", base.replace(attention_device="gpu",
                                                    kv_cache_device="gpu")),
           ("attention on the CPU", base.replace(attention_device="cpu",
                                                 kv_cache_device="cpu"))]
    if FLAGS.quick:
        return out
    out += [("whole-layer transfers", base.replace(page_bytes=page_layer)),
            ("wg = 0 (stream everything)", base.replace(gpu_weight_fraction=0.0))]
    for n in (1, 2, 4):
        ubs = -(-b // n)
        out.append((f"micro-batches {ubs}×{n}", base.replace(
            batch_size=ubs * n, micro_batch_size=ubs, num_micro_batches=n)))
    for bs in sorted({max(1, b // 4), max(1, b // 2)}):
        out.append((f"batch {bs}", base.replace(batch_size=bs, micro_batch_size=bs,
                                                num_micro_batches=1)))
    return out


def fitted(name: str, pol, fitting_wg):
    """(name, policy) with the policy's wg lowered to the largest that fits the budget
    (`fitting_wg(policy)`, None when none does), said in the name when it moved: a row
    that changes the placement (attention and KV cache on the device) needs device
    memory the searched base spent on resident experts."""
    wg = fitting_wg(pol)
    if wg is None or wg >= pol.gpu_weight_fraction:
        return name, pol
    return f"{name} (wg {wg:.2f} fits)", pol.replace(gpu_weight_fraction=wg)


def measure_rows(model, named_policies, budget: float, after_round) -> dict:
    """{name: (policy, engine, wall seconds of each timed run)}, the rows timed in
    `--repeats` rounds of one run per row (after one warm-up run each), so that every
    row's median samples the same stretch of this shared machine's drifting speed;
    `after_round(policies)` runs after every round."""
    import numpy as np

    import moejax

    rng = np.random.default_rng(0)
    out, prompts = {}, {}
    for name, pol in named_policies:
        try:
            engine = moejax.Engine(model, policy=pol, device_memory_bytes=int(budget))
            engine.check_memory(pol.batch_size, FLAGS.prompt_len, FLAGS.gen_len)
        except ValueError as e:
            print(f"{name:40s} skipped: {e}")
            continue
        prompts[name] = rng.integers(1, model.config.vocab_size,
                                     (pol.batch_size, FLAGS.prompt_len)).tolist()
        out[name] = (pol, engine, [])
    for k in range(FLAGS.repeats):
        for name, (_, engine, walls) in out.items():
            walls.append(measure(engine, prompts[name], FLAGS.gen_len, warm=k == 0))
        after_round([pol for pol, _, _ in out.values()])
        print(f"round {k + 1}/{FLAGS.repeats} of {len(out)} rows timed", flush=True)
    return out


LINK_RUNS_PER_ROUND = 2


class Reprobe:
    """The calibration's in-situ probes, run again after every round of rows (on the
    2-layer probe model): the link's page rate at each page size the rows stream
    (`calibrate.page_rates`) and one overlapped run for `copy_core_demand`. `spec(hw)`
    is `hw` with those figures replaced by the medians of the rounds — on this shared
    machine one calibration's page rate swung from 4.6 to 7.4 GB/s and its fitted
    demand from 1.0 to 2.3 between runs minutes apart."""

    def __init__(self, cfg, latency_s: float):
        from moejax.calibration.in_situ import probe_model

        self.cfg, self.latency_s = cfg, latency_s
        self.model = probe_model(cfg)
        self.rates: dict[int, list] = {}
        self.runs: list = []

    def __call__(self, policies):
        from moejax.calibration.in_situ import overlapped_runs, page_rates

        for size in sorted({p.page_bytes for p in policies if p.gpu_weight_fraction < 1}):
            self.rates.setdefault(size, []).extend(
                page_rates(self.model, size, LINK_RUNS_PER_ROUND, self.latency_s))
        self.runs += overlapped_runs(self.model, 1)

    def spec(self, hw):
        import numpy as np

        from moejax.schedule import costs
        from moejax.calibration.in_situ import fit_copy_core_demand
        from moejax.schedule.policy import DEFAULT_PAGE_BYTES

        curve = dict(hw.h2d_curve or ())
        curve.update({float(s): float(np.median(r)) for s, r in self.rates.items()})
        hw = hw.replace(h2d_curve=tuple(sorted(curve.items())))
        hw = hw.replace(h2d_bytes_per_s=float(costs.h2d_rate(hw, DEFAULT_PAGE_BYTES)))
        if hw.device_is_host and self.runs:
            hw = hw.replace(copy_core_demand=fit_copy_core_demand(self.cfg, hw, self.runs))
        return hw

    def summary(self, calibrated) -> dict:
        from moejax.schedule import costs

        link = {s: dict(calibrated=float(costs.h2d_rate(calibrated, s)), rounds=r)
                for s, r in self.rates.items()}
        return dict(link_bytes_per_s=link, overlapped_runs=len(self.runs),
                    copy_core_demand_calibrated=calibrated.copy_core_demand)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in results]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    ax.barh(y - 0.2, [r["measured_tokens_per_s"] for r in results], 0.4, label="measured")
    ax.barh(y + 0.2, [r["predicted_tokens_per_s"] for r in results], 0.4, label="predicted")
    for i, r in enumerate(results):
        ax.text(max(r["measured_tokens_per_s"], r["predicted_tokens_per_s"]) * 1.01, i,
                f"{100 * r['error']:+.0f} %", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens/s (end to end)")
    ax.set_title("moejax ablations on this machine: measured vs predicted")
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    import numpy as np

    from moejax.model_config.setups import get_setup
    from moejax.model_config.workload import Workload
    from moejax.schedule import costs, predict, search_policy
    from moejax.schedule.search import fitting_weight_fraction
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES, padded_len
    from moejax.schedule.predict import DEVICE_MEMORY_USABLE
    from moejax.schedule.simulate import simulate

    cfg, note = local_config(get_setup(FLAGS.config), None, FLAGS.local_hidden_size,
                             FLAGS.local_num_layers)
    print(note, flush=True)
    check_positions(cfg, FLAGS.prompt_len, FLAGS.gen_len)
    hw = local_hardware(cfg, fresh=FLAGS.recalibrate)
    page = DEFAULT_PAGE_BYTES
    budget = FLAGS.device_memory_gb * GB if FLAGS.device_memory_gb else default_budget(
        cfg, page)
    hw = hw.replace(gpu_memory_bytes=budget / DEVICE_MEMORY_USABLE)
    t = padded_len(FLAGS.prompt_len)
    wl = Workload(t, FLAGS.gen_len, num_sequences=32)
    try:
        base, _ = search_policy(cfg, hw, wl, device_memory_bytes=budget)
    except ValueError as e:
        fail(f"device budget {budget / GB:.3g} GB: {e}")
    base = base.replace(page_bytes=page)
    reprobe = Reprobe(cfg, hw.link_latency_s) if FLAGS.reprobe else None
    named = [fitted(name, pol, lambda p: fitting_weight_fraction(cfg, hw, wl, p, budget))
             for name, pol in rows(base, cfg.expert_bytes_per_layer())]
    runs = measure_rows(local_model(cfg), named, budget, reprobe or (lambda _: None))
    hw_calibrated = hw
    if reprobe:
        hw = reprobe.spec(hw)
        for size, rates in reprobe.rates.items():
            print(f"link beside the rows at {size / 2**20:.0f} MiB pages: "
                  f"{np.median(rates) / 1e9:.2f} GB/s (median of {len(rates)} runs, "
                  f"{min(rates) / 1e9:.2f}-{max(rates) / 1e9:.2f}); calibration "
                  f"{costs.h2d_rate(hw_calibrated, size) / 1e9:.2f}")
        print(f"copy core demand beside the rows: {hw.copy_core_demand:.2f} "
              f"(calibration {hw_calibrated.copy_core_demand:.2f})")
    results = []
    print(f"{'row':40s}{'measured':>10s}{'predicted':>11s}{'error':>8s}  tok/s")
    for name, (pol, engine, walls) in runs.items():
        measured = pol.batch_size * FLAGS.gen_len / float(np.median(walls))
        run = engine.last_run
        if not results:  # the routing of these prompts, measured once on the base run
            wl = run.with_routing(wl)
            print(f"router imbalance measured on the base run: prefill "
                  f"{wl.imbalance['prefill']:.2f}, decode {wl.imbalance['decode']:.2f}")
        pol = pol.replace(gpu_weight_fraction=engine.store.gpu_weight_fraction)
        pred = predict(cfg, hw, wl, pol)  # wg as the store rounded it to whole pages
        at_calibration = predict(cfg, hw_calibrated, wl, pol).tokens_per_s
        sim = simulate(run.entries, cfg, hw, pol, imbalance=wl.imbalance)
        sim_tps = pol.batch_size * FLAGS.gen_len / sim.makespan_s
        err = (pred.tokens_per_s - measured) / measured
        results.append(dict(name=name, policy=policy_dict(pol), measured_tokens_per_s=measured,
                            measured_runs_tokens_per_s=[pol.batch_size * FLAGS.gen_len / w
                                                        for w in walls],
                            predicted_tokens_per_s=pred.tokens_per_s, error=err,
                            predicted_with_calibration_tokens_per_s=at_calibration,
                            limit_tokens_per_s=pred.limit_tokens_per_s,
                            prefill_s=run.prefill_s, decode_s=run.decode_s,
                            predicted_prefill_s=pred.prefill_s,
                            predicted_decode_s=pred.decode_s,
                            simulated_tokens_per_s=sim_tps,
                            simulated_prefill_s=sim.stage_s(run.entries, "prefill"),
                            simulated_decode_s=sim.stage_s(run.entries, "decode")))
        print(f"{name:40s}{measured:10.1f}{pred.tokens_per_s:11.1f}{100 * err:+7.1f}%"
              f"  sim {sim_tps:6.1f} {100 * (sim_tps - measured) / measured:+5.1f}%",
              flush=True)
    del runs
    if not results:
        fail("no row fits the device budget: set a larger --device_memory_gb")
    errs = [abs(r["error"]) for r in results]
    print(f"mean |error| {100 * np.mean(errs):.1f} %, max {100 * np.max(errs):.1f} %")
    by = {r["name"]: r for r in results}
    on, off = by.get("base: searched policy"), by.get("overlap off (serial executor)")
    if on and off:
        print(f"overlap speedup: measured {on['measured_tokens_per_s'] / off['measured_tokens_per_s']:.2f}x, "
              f"predicted {on['predicted_tokens_per_s'] / off['predicted_tokens_per_s']:.2f}x")
    searched, _ = search_policy(cfg, hw, wl, device_memory_bytes=budget)
    print(f"search with the measured imbalance picks {searched.micro_batch_size}×"
          f"{searched.num_micro_batches}, wg={searched.gpu_weight_fraction:.2f}, attention "
          f"on the {searched.attention_device}")
    out = dict(config=FLAGS.config, model=cfg.name, note=note, device_memory_gb=budget / GB,
               expert_imbalance=wl.expert_imbalance,
               decode_expert_imbalance=wl.imbalance["decode"],
               searched_after=policy_dict(searched),
               prompt_len=FLAGS.prompt_len, gen_len=FLAGS.gen_len, hardware=hw.source,
               reprobed=reprobe.summary(hw_calibrated) if reprobe else None,
               copy_core_demand=hw.copy_core_demand,
               rows=results)
    os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
    with open(FLAGS.output_json, "w") as f:
        json.dump(out, f, indent=1)
    plot(results, FLAGS.output_png)
    print(f"wrote {FLAGS.output_json}, {FLAGS.output_png}")
    return 0


if __name__ == "__main__":
    run(main)
