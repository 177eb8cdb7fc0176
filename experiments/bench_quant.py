"""Quantized expert streaming on the local testbed and the target presets (issue 22).

    python -m experiments.bench_quant [--rounds 3] [--batch 8] [--gen_len 8]
        [--output_json experiments/results/bench_quant_cpu.json]

Local: the same scaled Mixtral (random weights), placement (wg = --gpu_weight_fraction,
every other column streamed in --page_mib pages, host attention), batch and workload
with float32 (the CPU testbed's dtype), bfloat16 (the whole model: the testbed has no
bf16-experts-only format), int8 and int4 experts (group --group_size), run in
alternating rounds in one process: measured tokens/s (median and spread), predicted
(`predict` on the calibrated `local` spec with the engine's policy), streamed bytes per
layer, and the logits' mean relative error against float32. Targets: `search_policy`'s
predicted tokens/s for Mixtral on L4 and T4 and DBRX on 4×T4 with bf16 / int8 / int4
experts, next to the MoE-Lens limit, which moves with the smaller weights.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import flags

from experiments.cli import no_extra_args, output_flag, quiet_logs, run

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "alternating rounds", lower_bound=1)
flags.DEFINE_integer("batch", 8, "sequences per batch", lower_bound=1)
flags.DEFINE_integer("prompt_len", 16, "prompt tokens", lower_bound=1)
flags.DEFINE_integer("gen_len", 8, "generated tokens", lower_bound=2)
flags.DEFINE_integer("group_size", 64, "quantization group", lower_bound=2)
flags.DEFINE_float("gpu_weight_fraction", 0.0, "resident expert fraction", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("page_mib", 16, "page size (float32 layout), MiB", lower_bound=1)
flags.DEFINE_integer("local_hidden_size", 768, "scaled Mixtral hidden size", lower_bound=64)
flags.DEFINE_integer("local_num_layers", 4, "scaled Mixtral layers", lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/bench_quant_cpu.json",
                    "JSON out ('' to skip)")
output_flag("output_json", ".json", allow_empty=True)
VARIANTS = (("float32", None), ("bfloat16", None), ("int8", "int8"), ("int4", "int4"))
TARGETS = ("mixtral_l4", "mixtral_t4", "dbrx_t4x4")


def local_models(cfg):
    """{variant: MoEModel}: one float32 random model, the others derived from it."""
    import moejax
    from moejax.quant import quantize_model

    f32 = moejax.MoEModel.random(cfg, seed=0)
    bf16 = moejax.MoEModel(cfg.replace(dtype="bfloat16"), __import__("jax").tree.map(
        lambda a: a.astype("bfloat16"), f32.params))
    return {"float32": f32, "bfloat16": bf16,
            **{dt: quantize_model(f32, dt, FLAGS.group_size) for dt in ("int8", "int4")}}


def target_rows() -> list[dict]:
    """search_policy per target preset and expert dtype: tokens/s, limit, policy."""
    from moejax.model_config.setups import get_setup
    from moejax.quant import quantized_config
    from moejax.schedule.search import search_policy

    rows = []
    for name in TARGETS:
        s = get_setup(name)
        base = None
        for dt in (None, "int8", "int4"):
            cfg = quantized_config(s.model, dt, FLAGS.group_size)
            dev = None if s.device_memory_gib is None else s.device_memory_gib * 2**30
            pol, pred = search_policy(cfg, s.hardware, s.workload, dev)
            base = base or pred
            rows.append({"setup": name, "experts": dt or cfg.dtype,
                         "expert_bytes_per_layer": cfg.expert_bytes_per_layer(),
                         "predicted_tokens_per_s": pred.tokens_per_s,
                         "limit_tokens_per_s": pred.limit_tokens_per_s,
                         "speedup": pred.tokens_per_s / base.tokens_per_s,
                         "limit_moves": pred.limit_tokens_per_s / base.limit_tokens_per_s,
                         "kv_bound_tokens_per_s": pred.bound.kv_bound_tokens_per_s,
                         "gpu_bound_tokens_per_s": pred.bound.gpu_bound_tokens_per_s,
                         "policy": str(pol)})
    return rows


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    import moejax
    from experiments.local import local_config, local_hardware
    from experiments.quant_metrics import logit_errors
    from moejax.model_config.setups import get_setup
    from moejax.model_config.workload import Workload
    from moejax.schedule.policy import padded_len
    from moejax.schedule.predict import predict

    cfg, note = local_config(get_setup("mixtral_l4"), None, FLAGS.local_hidden_size,
                             FLAGS.local_num_layers)
    print(f"bench_quant: {note}", flush=True)
    models = local_models(cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, FLAGS.prompt_len).tolist()
               for _ in range(FLAGS.batch)]
    page = FLAGS.page_mib * 2**20
    engines, preds, rows = {}, {}, {}
    ref_logits = models["float32"].logits(np.array(prompts))
    for v, m in models.items():
        e = moejax.Engine(m, gpu_weight_fraction=FLAGS.gpu_weight_fraction,
                          page_bytes=page // 4 * m.config.bytes_per_param,
                          micro_batch_size=FLAGS.batch)
        wl = Workload(padded_len(FLAGS.prompt_len), FLAGS.gen_len)
        pol = e.policy_for(FLAGS.batch, wl.prompt_len, wl.gen_len)
        preds[v] = predict(m.config, local_hardware(m.config), wl, pol).tokens_per_s
        e.generate(prompts, FLAGS.gen_len, batching="static")  # compile the timed shapes; not timed
        err = logit_errors(np.asarray(ref_logits).reshape(-1, cfg.vocab_size),
                           np.asarray(m.logits(np.array(prompts)), np.float32)
                           .reshape(-1, cfg.vocab_size))["mean_rel_err"]
        engines[v] = e
        rows[v] = {"variant": v, "streamed_bytes_per_layer": e.store.plan.streamed_bytes,
                   "pages_per_layer": len(e.store.plan.pages), "mean_rel_err": err,
                   "predicted_tokens_per_s": preds[v], "measured": []}
    for r in range(FLAGS.rounds):
        for v, e in engines.items():
            t = time.perf_counter()
            e.generate(prompts, FLAGS.gen_len, batching="static")
            rows[v]["measured"].append(FLAGS.batch * FLAGS.gen_len / (time.perf_counter() - t))
            print(f"  round {r + 1} {v}: {rows[v]['measured'][-1]:.1f} tok/s", flush=True)
    base = statistics.median(rows["float32"]["measured"])
    print("| experts | streamed/layer | measured tok/s (median, spread) | × f32 | predicted "
          "| pred. err | logit err |\n|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        med = statistics.median(r["measured"])
        r.update(median_tokens_per_s=med, over_float32=med / base,
                 predicted_error=r["predicted_tokens_per_s"] / med - 1)
        print(f"| {v} | {r['streamed_bytes_per_layer'] / 2**20:.1f} MiB | {med:.1f} "
              f"({min(r['measured']):.1f}–{max(r['measured']):.1f}) | {med / base:.2f} | "
              f"{r['predicted_tokens_per_s']:.1f} | {r['predicted_error']:+.1%} | "
              f"{r['mean_rel_err']:.2%} |")
    targets = target_rows()
    print("\n| setup | experts | predicted tok/s | × bf16 | MoE-Lens limit | limit × bf16 |"
          " KV bound | GPU bound |\n|---|---|---|---|---|---|---|---|")
    for t in targets:
        print(f"| {t['setup']} | {t['experts']} | {t['predicted_tokens_per_s']:.1f} | "
              f"{t['speedup']:.2f} | {t['limit_tokens_per_s']:.1f} | {t['limit_moves']:.2f} | "
              f"{t['kv_bound_tokens_per_s']:.1f} | {t['gpu_bound_tokens_per_s']:.1f} |")
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"machine": f"{platform.machine()} CPU VM ({os.cpu_count()} cores)",
                       "model": note, "flags": {k: getattr(FLAGS, k) for k in (
                           "rounds", "batch", "prompt_len", "gen_len", "group_size",
                           "gpu_weight_fraction", "page_mib")},
                       "local": list(rows.values()), "targets": targets}, f, indent=1)


if __name__ == "__main__":
    run(main)
