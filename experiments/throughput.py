"""The throughput experiment: the policy and prediction for a target machine, and a
measured run of the same architecture here.

    python -m experiments.throughput --config mixtral_l4

`target`: the preset's full model on the preset's hardware (docs/design.md §4): the searched
policy, moejax's predicted end-to-end tokens/s, the MoE-Lens hardware limit and
MoE-Lightning's reproduced figure. `local`: what runs on this machine — the preset's
architecture scaled down when the full model cannot fit (said plainly in the output),
random weights unless --checkpoint is given, a device-memory budget that forces expert
streaming, a policy searched with the calibrated `local` hardware (flags override its
knobs), then a real run through the executor: measured vs predicted tokens/s.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import flags

from experiments.cli import fail, finite_flag, no_extra_args, output_flag, quiet_logs, run
from experiments.local import (GB, Progress, check_positions, default_budget, gantt,
                               local_config, local_hardware, local_model, policy_dict,
                               warm_up)
from moejax.model_config.setups import setup_names

FLAGS = flags.FLAGS
TRACES = ("mtbench", "rag", "longgen")
WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")
LOCAL_REQUESTS = 96  # a continuous local run of ~2-3 minutes at the preset's lengths
TARGET_SEQUENCES = 16384  # as experiments.batching_targets: ramp-up and drain stay small
flags.DEFINE_enum("config", "mixtral_l4", setup_names(), "model + hardware + workload preset")
flags.DEFINE_string("checkpoint", None, "HF or native checkpoint to run locally "
                    "(default: random weights of the scaled architecture)")
flags.DEFINE_integer("batch_size", None, "local batch (default: searched, at most "
                     "--max_local_batch)", lower_bound=1)
flags.DEFINE_integer("micro_batch_size", None, "local micro-batch size", lower_bound=1)
flags.DEFINE_float("gpu_weight_fraction", None, "local resident expert fraction",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("attention_device", None, ["cpu", "gpu"], "local decode attention")
flags.DEFINE_bool("overlap", True, "CGOPipe overlap (False: serial reference executor)")
flags.DEFINE_integer("prompt_len", None, "prompt tokens (default: the preset's)",
                     lower_bound=1)
flags.DEFINE_integer("gen_len", None, "generated tokens (default: the preset's)",
                     lower_bound=1)
flags.DEFINE_integer("local_hidden_size", 768, "hidden size of the scaled local model",
                     lower_bound=16)
flags.DEFINE_integer("local_num_layers", 8, "layers of the scaled local model",
                     lower_bound=1)
flags.DEFINE_float("device_memory_gb", None, "local emulated device memory, GB (default: "
                   "what keeps ~10 % of experts resident while the rest streams)")
flags.DEFINE_integer("max_local_batch", 64, "cap on the searched local batch",
                     lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/throughput_{config}.json",
                    "JSON path ({config} is replaced; '' to skip)")
flags.DEFINE_string("timeline_png", None, "Gantt chart of the measured vs predicted "
                    "timeline (prefill + first decode steps)")
flags.DEFINE_bool("skip_local", False, "only the target section")
flags.DEFINE_enum("batching", "continuous", ["continuous", "static"],
                  "continuous (MoE-Lens's scheduler, docs/design.md §7) or static batches "
                  "(the reference path)")
flags.DEFINE_enum("workload", None, list(TRACES), "a length trace of experiments/workloads/ "
                  "(default: the preset's fixed prompt and generation lengths)")
flags.DEFINE_integer("num_requests", None, "requests of the local continuous run (default: "
                     f"{LOCAL_REQUESTS}; the trace's first ones, cycled)", lower_bound=1)
flags.DEFINE_float("host_kv_gb", None, "local host KV cache budget, GB (default: the "
                   "engine's, a share of the host memory the weights leave)")
flags.DEFINE_integer("target_sequences", TARGET_SEQUENCES, "requests of the target job "
                     "(continuous: its ramp-up and drain are priced)", lower_bound=1)
finite_flag("device_memory_gb", positive=True)
finite_flag("host_kv_gb", positive=True)
finite_flag("gpu_weight_fraction")
output_flag("output_json", ".json", allow_empty=True)
output_flag("timeline_png", ".png")
flags.register_validator("checkpoint", lambda v: v is None or os.path.isdir(v),
                         message="is not a directory")
flags.register_multi_flags_validator(
    ["batch_size", "micro_batch_size"],
    lambda f: not (f["batch_size"] and f["micro_batch_size"])
    or f["batch_size"] % f["micro_batch_size"] == 0,
    message="--batch_size must be a multiple of --micro_batch_size (the batch runs as "
            "whole micro-batches)")
LOCAL_ONLY = ("checkpoint", "batch_size", "micro_batch_size", "gpu_weight_fraction",
              "attention_device", "device_memory_gb", "timeline_png", "overlap",
              "local_hidden_size", "local_num_layers", "max_local_batch", "num_requests",
              "host_kv_gb")
flags.register_multi_flags_validator(
    ["batching", "attention_device"],
    lambda f: f["batching"] == "static" or f["attention_device"] in (None, "cpu"),
    message="--batching=continuous runs decode attention on the cpu beside the host KV "
            "cache: drop --attention_device=gpu or add --batching=static")
flags.register_multi_flags_validator(
    ["batching", "timeline_png", "max_local_batch"],
    lambda f: f["batching"] == "static" or not (f["timeline_png"]
                                                or FLAGS["max_local_batch"].present),
    message="--timeline_png and --max_local_batch belong to the static path: add "
            "--batching=static (continuous takes its concurrency from the search)")
flags.register_multi_flags_validator(
    ["batching", "num_requests", "host_kv_gb"],
    lambda f: f["batching"] == "continuous" or not (f["num_requests"] or f["host_kv_gb"]),
    message="--num_requests and --host_kv_gb belong to continuous batching: drop them or "
            "--batching=static")
flags.register_multi_flags_validator(
    ["workload", "batching"], lambda f: not f["workload"] or f["batching"] == "continuous",
    message="--workload runs ragged requests through continuous batching: drop "
            "--batching=static (the static path runs the preset's fixed lengths)")
flags.register_multi_flags_validator(
    ["workload", "prompt_len", "gen_len"],
    lambda f: not f["workload"] or not (f["prompt_len"] or f["gen_len"]),
    message="--workload gives the lengths: drop --prompt_len and --gen_len")
flags.register_multi_flags_validator(
    ["checkpoint", "local_hidden_size", "local_num_layers"],
    lambda f: not f["checkpoint"] or not (FLAGS["local_hidden_size"].present
                                          or FLAGS["local_num_layers"].present),
    message="--checkpoint fixes the local model's sizes: drop --local_hidden_size and "
            "--local_num_layers")


# --------------------------------------------------------------------- target
def target_section(setup, workload) -> dict:
    from moejax.schedule import search_policy

    m, hw = setup.model, setup.hardware
    gib = setup.device_memory_gib  # the preset's emulated device, if it has one
    try:
        policy, pred = search_policy(m, hw, workload, device_memory_bytes=None if gib is None
                                     else gib * 2**30)
    except ValueError as e:
        return {"model": m.name, "hardware": hw.name, "infeasible": str(e)}
    out = {"model": m.name, "hardware": hw.name, "hardware_source": hw.source,
           "prompt_len": workload.prompt_len, "gen_len": workload.gen_len,
           "policy": policy_dict(policy), "predicted_tokens_per_s": pred.tokens_per_s,
           "predicted_decode_tokens_per_s": pred.decode_tokens_per_s,
           "limit_tokens_per_s": pred.limit_tokens_per_s, "bottleneck": pred.bottleneck,
           "peak_device_gb": pred.peak_device_bytes / GB,
           "peak_host_gb": pred.peak_host_bytes / GB}
    return {**out, "moe_lightning": moe_lightning_figure(m, hw, workload)}


def target_continuous(setup, workload) -> dict:
    """The target job under continuous batching: `search_continuous`'s policy and its
    end-to-end prediction (ramp-up and drain of --target_sequences requests included)."""
    from moejax.schedule.continuous import search_continuous

    m, hw = setup.model, setup.hardware
    gib = setup.device_memory_gib
    wl = workload.replace(num_sequences=FLAGS.target_sequences)
    try:
        policy, pred = search_continuous(m, hw, wl, device_memory_bytes=None if gib is None
                                         else gib * 2**30)
    except ValueError as e:
        return {"model": m.name, "hardware": hw.name, "infeasible": str(e)}
    out = {"model": m.name, "hardware": hw.name, "hardware_source": hw.source,
           "batching": "continuous", "workload": wl.name, "requests": wl.num_sequences,
           "prompt_len": wl.prompt_len, "gen_len": wl.gen_len,
           "policy": continuous_policy_dict(policy),
           "predicted_tokens_per_s": pred.tokens_per_s,
           "predicted_steady_tokens_per_s": pred.steady_tokens_per_s,
           "limit_tokens_per_s": pred.limit_tokens_per_s,
           "fraction_of_limit": pred.fraction_of_limit,
           "mean_concurrency": pred.mean_concurrency,
           "kv_capacity_tokens": pred.kv_capacity_tokens, "sweeps": pred.sweeps,
           "peak_device_gb": pred.peak_device_bytes / GB}
    return {**out, "moe_lightning": moe_lightning_figure(m, hw, wl)}


def moe_lightning_figure(m, hw, wl) -> dict:
    """MoE-Lightning's reproduced policy and decode tok/s at the workload's lengths, or
    why it is infeasible."""
    from moejax.schedule import moe_lightning_search

    try:
        ml = moe_lightning_search(m, hw, wl.prompt_len, wl.gen_len)
    except ValueError as e:
        return {"infeasible": str(e)}
    return {"policy": policy_dict(ml.policy), "decode_tokens_per_s": ml.decode_tokens_per_s}


def continuous_policy_dict(p) -> dict:
    return {**policy_dict(p), "max_concurrency": p.concurrency,
            "prefill_tokens_per_sweep": p.prefill_tokens_per_sweep,
            "prefill_micro_batch_tokens": p.prefill_micro_batch_tokens,
            "kv_reservation": p.kv_reservation}


# ---------------------------------------------------------------------- local
def budget_name(budget: float) -> str:
    """How an error names the device budget: the flag, or that it is the default."""
    if FLAGS.device_memory_gb:
        return f"--device_memory_gb={FLAGS.device_memory_gb:g}"
    return (f"the default device budget ({budget / GB:.3g} GB = {budget / 2**30:.3g} GiB; "
            "set --device_memory_gb)")


def check_weights_fit(cfg, page: int, budget: float) -> None:
    """The store's own rule (`make_plan`: resident weights + two stream buffers), checked
    before calibrating so a budget nothing fits fails at once."""
    from moejax.host_offload import make_plan

    try:
        make_plan(cfg, page, device_memory_bytes=max(1, int(budget)))
    except ValueError as e:
        fail(f"{budget_name(budget)}: {e}")


def local_policy(cfg, hw, workload, budget):
    """The searched policy for this machine, with the flags' overrides applied."""
    from moejax.schedule import Policy, search_policy

    try:
        policy, _ = search_policy(cfg, hw, workload, device_memory_bytes=budget)
    except ValueError as e:
        fail(f"{budget_name(budget)}: {e}")
    over = {}
    if FLAGS.batch_size or FLAGS.micro_batch_size:
        b = FLAGS.batch_size or policy.batch_size
        ubs = FLAGS.micro_batch_size or policy.micro_batch_size
        if ubs > b:
            fail(f"--micro_batch_size={ubs} exceeds the batch of {b}"
                 + ("" if FLAGS.batch_size else " (the searched one; set --batch_size)"))
        if b % ubs:
            print(f"local: the batch of {b} runs as {math.ceil(b / ubs)} micro-batches of "
                  f"{ubs}: {ubs * math.ceil(b / ubs)} sequences", flush=True)
        over.update(batch_size=ubs * math.ceil(b / ubs), micro_batch_size=ubs,
                    num_micro_batches=math.ceil(b / ubs))
    if FLAGS.gpu_weight_fraction is not None:
        over["gpu_weight_fraction"] = FLAGS.gpu_weight_fraction
    if FLAGS.attention_device:
        over.update(attention_device=FLAGS.attention_device,
                    kv_cache_device=FLAGS.attention_device)
    over["overlap"] = FLAGS.overlap
    policy = policy.replace(**over)
    try:
        Policy(**policy_dict(policy))  # re-validate the combination
    except ValueError as e:
        fail(str(e))
    return policy


def local_section(setup, workload) -> tuple[dict, object, object]:
    import numpy as np

    import moejax
    from moejax.model_config.workload import Workload
    from moejax.model_config.hardware import fmt_bytes
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES, padded_len
    from moejax.schedule.predict import DEVICE_MEMORY_USABLE

    cfg, note = local_config(setup, FLAGS.checkpoint, FLAGS.local_hidden_size,
                             FLAGS.local_num_layers)
    print(f"local: {note}", flush=True)
    check_positions(cfg, workload.prompt_len, workload.gen_len)
    page = DEFAULT_PAGE_BYTES
    budget = FLAGS.device_memory_gb * GB if FLAGS.device_memory_gb else default_budget(
        cfg, page, Workload(padded_len(workload.prompt_len), workload.gen_len))
    check_weights_fit(cfg, page, budget)
    hw = local_hardware(cfg)
    hw = hw.replace(gpu_memory_bytes=budget / DEVICE_MEMORY_USABLE)
    t = padded_len(workload.prompt_len)  # the prompt length the engine runs
    wl = Workload(t, workload.gen_len, num_sequences=FLAGS.batch_size or
                  FLAGS.max_local_batch)
    policy = local_policy(cfg, hw, wl, budget)
    policy = policy.replace(page_bytes=page)
    try:
        engine = moejax.Engine(local_model(cfg, FLAGS.checkpoint), policy=policy,
                               device_memory_bytes=int(budget))
        engine.check_memory(policy.batch_size, workload.prompt_len, workload.gen_len)
    except ValueError as e:
        fail(f"{budget_name(budget)}: {e}")
    wg = engine.store.gpu_weight_fraction  # whole pages: at most the policy's
    if FLAGS.gpu_weight_fraction is not None and wg != FLAGS.gpu_weight_fraction:
        print(f"local: --gpu_weight_fraction={FLAGS.gpu_weight_fraction:g} runs as "
              f"{wg:.4g} (experts stay resident in whole {fmt_bytes(page)} pages)", flush=True)
    policy = policy.replace(gpu_weight_fraction=wg)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (policy.batch_size, workload.prompt_len))
    prompts = prompts.tolist()
    print(f"local: {policy}", flush=True)
    try:
        engine.generate(prompts[:policy.micro_batch_size], 2, batching="static")  # compile
        # the prompts' routing, seen by that warm-up, prices the expert GEMMs
        wl = engine.last_run.with_routing(wl)
        t0 = time.perf_counter()
        engine.generate(prompts, workload.gen_len, progress=Progress("local run"),
                        batching="static")
        wall = time.perf_counter() - t0
    except ValueError as e:
        fail(str(e))
    run = engine.last_run
    from moejax.schedule.predict import predict
    pred = predict(cfg, hw, wl, policy)  # with wg as the store rounded it to pages
    measured = policy.batch_size * workload.gen_len / wall
    out = {"model": cfg.name, "note": note, "hardware": hw.name, "hardware_source": hw.source,
           "device_memory_gb": budget / GB, "prompt_len": workload.prompt_len,
           "padded_prompt_len": t, "gen_len": workload.gen_len,
           "policy": policy_dict(policy),
           "store_gpu_weight_fraction": engine.store.gpu_weight_fraction,
           "expert_imbalance": wl.expert_imbalance,
           "decode_expert_imbalance": wl.imbalance["decode"],
           "predicted_tokens_per_s": pred.tokens_per_s,
           "measured_tokens_per_s": measured, "limit_tokens_per_s": pred.limit_tokens_per_s,
           "prediction_error": (pred.tokens_per_s - measured) / measured,
           "prefill_s": run.prefill_s, "decode_s": run.decode_s, "wall_s": wall,
           "predicted_prefill_s": pred.prefill_s, "predicted_decode_s": pred.decode_s,
           "measured_fraction_of_limit": measured / pred.limit_tokens_per_s,
           "peak_device_bytes_predicted": pred.peak_device_bytes,
           "peak_device_bytes_measured": run.peak_device_bytes_measured,
           "device_budget_bytes": budget}
    return out, engine, hw


def continuous_policy(cfg, hw, wl, budget, kv_bytes):
    """`search_continuous` on this machine (concurrency up to the job's requests, bounded
    by the host KV budget and the device budget), with the flags' overrides applied."""
    from moejax.schedule.continuous import search_continuous

    try:
        policy, _ = search_continuous(cfg, hw, wl, device_memory_bytes=budget,
                                      host_kv_bytes=kv_bytes)
    except ValueError as e:
        fail(f"{budget_name(budget)}: {e}")
    over = {"overlap": FLAGS.overlap}
    if FLAGS.batch_size or FLAGS.micro_batch_size:
        ubs = FLAGS.micro_batch_size or min(policy.micro_batch_size, FLAGS.batch_size)
        b = FLAGS.batch_size or policy.batch_size
        over.update(batch_size=ubs * math.ceil(b / ubs), micro_batch_size=ubs,
                    num_micro_batches=math.ceil(b / ubs), max_concurrency=None)
    if FLAGS.gpu_weight_fraction is not None:
        over["gpu_weight_fraction"] = FLAGS.gpu_weight_fraction
    try:
        return policy.replace(**over)
    except ValueError as e:
        fail(str(e))


def local_continuous(setup, workload) -> dict:
    """The local continuous run: --num_requests requests of the workload's lengths
    (random prompt tokens; each stops at its output length, where the trace's EOS is),
    measured generated tokens/s against `predict_continuous` of the same requests."""
    import numpy as np

    import moejax
    from moejax.engine import HOST_KV_SHARE
    from moejax.host_offload.memory import available_host_bytes
    from moejax.model_config.workload import Workload
    from moejax.schedule.continuous import predict_continuous
    from moejax.schedule.policy import DEFAULT_PAGE_BYTES, padded_len
    from moejax.schedule.predict import DEVICE_MEMORY_USABLE

    cfg, note = local_config(setup, FLAGS.checkpoint, FLAGS.local_hidden_size,
                             FLAGS.local_num_layers)
    print(f"local: {note}", flush=True)
    reqs = workload.requests(FLAGS.num_requests or LOCAL_REQUESTS)
    p_max, g_max = max(p for p, _ in reqs), max(g for _, g in reqs)
    check_positions(cfg, p_max, g_max)
    page = DEFAULT_PAGE_BYTES
    budget = FLAGS.device_memory_gb * GB if FLAGS.device_memory_gb else default_budget(
        cfg, page, Workload(padded_len(p_max), g_max))
    check_weights_fit(cfg, page, budget)
    hw = local_hardware(cfg)
    hw = hw.replace(gpu_memory_bytes=budget / DEVICE_MEMORY_USABLE)
    wl = Workload.from_lengths([p for p, _ in reqs], [g for _, g in reqs],
                               num_sequences=len(reqs), name=workload.name)
    model = local_model(cfg, FLAGS.checkpoint)
    free = available_host_bytes()
    kv_bytes = int(FLAGS.host_kv_gb * GB) if FLAGS.host_kv_gb else int(
        HOST_KV_SHARE * free) if free is not None else 2**30
    policy = continuous_policy(cfg, hw, wl, budget, kv_bytes).replace(page_bytes=page)
    try:
        engine = moejax.Engine(model, policy=policy, device_memory_bytes=int(budget),
                               host_kv_bytes=kv_bytes)
    except ValueError as e:
        fail(f"{budget_name(budget)}: {e}")
    policy = policy.replace(gpu_weight_fraction=engine.store.gpu_weight_fraction)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, p).tolist() for p, _ in reqs]
    gens = [g for _, g in reqs]
    print(f"local: {len(reqs)} requests (prompt {wl.prompt_len}, output {wl.gen_len} mean), "
          f"{policy}", flush=True)
    try:
        warm_up(engine, prompts, "continuous", gens)
        t0 = time.perf_counter()
        engine.generate(prompts, gens, progress=Progress("local run", "tokens"))
        wall = time.perf_counter() - t0
    except ValueError as e:
        fail(str(e))
    pred = predict_continuous(cfg, hw, wl, policy, kv_bytes, requests=reqs)
    measured = sum(gens) / wall
    sweeps = engine.last_sweeps
    return {"batching": "continuous", "model": cfg.name, "note": note, "hardware": hw.name,
            "hardware_source": hw.source, "device_memory_gb": budget / GB,
            "host_kv_bytes": kv_bytes, "workload": wl.name, "requests": len(reqs),
            "prompt_len": wl.prompt_len, "gen_len": wl.gen_len,
            "policy": continuous_policy_dict(policy),
            "store_gpu_weight_fraction": engine.store.gpu_weight_fraction,
            "predicted_tokens_per_s": pred.tokens_per_s,
            "measured_tokens_per_s": measured, "limit_tokens_per_s": pred.limit_tokens_per_s,
            "prediction_error": (pred.tokens_per_s - measured) / measured,
            "wall_s": wall, "predicted_s": pred.total_s, "sweeps": len(sweeps),
            "predicted_sweeps": pred.sweeps,
            "mean_running": float(np.mean([sum(r.decode_rows) + sum(r.prefill_rows) for r in sweeps])),
            "predicted_mean_concurrency": pred.mean_concurrency,
            "kv_capacity_tokens": engine.kv_pool.capacity_tokens,
            "measured_fraction_of_limit": measured / pred.limit_tokens_per_s,
            "peak_device_bytes_predicted": pred.peak_device_bytes,
            "device_budget_bytes": budget}


def main(argv):
    no_extra_args(argv)
    given = [f"--{k}" for k in LOCAL_ONLY if FLAGS[k].present]
    if FLAGS.skip_local and given:
        fail(f"--skip_local runs nothing here, so {', '.join(given)} would be ignored: "
             "drop one or the other")
    quiet_logs()
    from moejax.model_config.setups import get_setup

    setup = get_setup(FLAGS.config)
    wl = setup.workload
    if FLAGS.workload:
        from moejax.model_config.workload import load_trace
        wl = load_trace(os.path.join(WORKLOADS, f"{FLAGS.workload}.json"))
    wl = wl.replace(prompt_len=FLAGS.prompt_len or wl.prompt_len,
                    gen_len=FLAGS.gen_len or wl.gen_len)
    longest = max(p + g for p, g in wl.requests())
    if longest > setup.model.max_positions:
        check_positions(setup.model, wl.prompt_len, wl.gen_len)
        fail(f"--workload={FLAGS.workload}: a request of {longest} tokens exceeds "
             f"{setup.model.name}'s {setup.model.max_positions} positions")
    cont = FLAGS.batching == "continuous"
    result = {"config": FLAGS.config, "batching": FLAGS.batching,
              "target": target_continuous(setup, wl) if cont else target_section(setup, wl)}
    t = result["target"]
    if "infeasible" in t:
        fail(f"--config={FLAGS.config}: {t['infeasible']}")
    ml = t["moe_lightning"].get("decode_tokens_per_s")
    print(f"target ({t['model']} on {t['hardware']}, prompt {wl.prompt_len}, gen "
          f"{wl.gen_len}): policy {t['policy']['micro_batch_size']}×"
          f"{t['policy']['num_micro_batches']} wg={t['policy']['gpu_weight_fraction']:.3f}"
          + (f", {t['batching']} (mean concurrency {t['mean_concurrency']:.0f}, "
             f"{100 * t['fraction_of_limit']:.0f} % of the limit)" if cont else "")
          + f"; predicted {t['predicted_tokens_per_s']:.1f} tok/s end to end "
          f"(limit {t['limit_tokens_per_s']:.1f}); MoE-Lightning reproduced "
          + (f"{ml:.1f} decode tok/s" if ml else "infeasible"))
    if not FLAGS.skip_local and cont:
        loc = result["local"] = local_continuous(setup, wl)
        print(f"local continuous ({loc['model']}, {loc['requests']} requests, "
              f"{loc['device_memory_gb']:.3g} GB device budget, concurrency ≤ "
              f"{loc['policy']['max_concurrency']}): measured "
              f"{loc['measured_tokens_per_s']:.1f} tok/s, predicted "
              f"{loc['predicted_tokens_per_s']:.1f} ({100 * loc['prediction_error']:+.1f} %)"
              f", limit {loc['limit_tokens_per_s']:.1f}; {loc['sweeps']} sweeps in "
              f"{loc['wall_s']:.1f} s (predicted {loc['predicted_sweeps']} in "
              f"{loc['predicted_s']:.1f} s)")
    elif not FLAGS.skip_local:
        loc, engine, hw = local_section(setup, wl)
        result["local"] = loc
        loc["batching"] = "static"
        print(f"local ({loc['model']}, {loc['device_memory_gb']:.3g} GB device budget): "
              f"measured {loc['measured_tokens_per_s']:.1f} tok/s, predicted "
              f"{loc['predicted_tokens_per_s']:.1f} ({100 * loc['prediction_error']:+.1f} %)"
              f", limit {loc['limit_tokens_per_s']:.1f} (measured = "
              f"{100 * loc['measured_fraction_of_limit']:.0f} % of it); prefill "
              f"{loc['prefill_s']:.1f} s (predicted {loc['predicted_prefill_s']:.1f}), "
              f"decode {loc['decode_s']:.1f} s (predicted {loc['predicted_decode_s']:.1f})")
        if FLAGS.timeline_png:
            gantt(engine.last_run, engine.cfg, hw, FLAGS.timeline_png)
            print(f"wrote {FLAGS.timeline_png}")
    if FLAGS.output_json:
        path = FLAGS.output_json.replace("{config}", FLAGS.config)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run(main)
