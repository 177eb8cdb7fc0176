"""Accuracy of quantized experts against the float model (issue 22, point 4).

    python -m experiments.quant_accuracy [--groups 32,64] [--new_tokens 64]
        [--output_json experiments/results/quant_accuracy_cpu.json]

For tiny random HF models of each family (tests/oracle.py's configs, float32) and the
scaled local Mixtral (random weights, experiments/local.py): logits' relative error of
int8 / int4 experts at each group size against the float model, per position
‖Δ‖₂ / ‖logits‖₂ over the vocabulary (mean and max over prompt positions), and greedy
agreement over --new_tokens generated tokens (the fraction of positions equal, and the
mean length of the common prefix). Table on stdout, JSON to --output_json.
"""

from __future__ import annotations

import json
import platform
import tempfile

import numpy as np
from absl import flags

from experiments.cli import no_extra_args, output_flag, quiet_logs, run
from experiments.quant_metrics import _prompts, greedy_agreement, logit_errors  # noqa: F401

FLAGS = flags.FLAGS
flags.DEFINE_list("groups", ["32", "64"], "group sizes along the reduction axis")
flags.DEFINE_integer("new_tokens", 64, "greedy tokens compared", lower_bound=1)
flags.DEFINE_list("families", ["mixtral", "dbrx", "qwen3_moe"], "tiny HF families")
flags.DEFINE_bool("local", True, "also the scaled local Mixtral")
flags.DEFINE_integer("local_hidden_size", 768, "scaled local Mixtral: hidden size",
                     lower_bound=64)
flags.DEFINE_integer("local_num_layers", 4, "scaled local Mixtral: layers", lower_bound=1)
flags.DEFINE_string("output_json", "experiments/results/quant_accuracy_cpu.json",
                    "JSON out ('' to skip)")
output_flag("output_json", ".json", allow_empty=True)


def accuracy_rows(model, prompts, new_tokens: int, variants) -> list[dict]:
    """One row per (expert_dtype, group) of `variants` against the float `model`."""
    import moejax
    from moejax.quant import quantize_model

    ref = moejax.Engine(model)
    ref_logits, ref_tokens = ref.prompt_logits(prompts), ref.generate(prompts, new_tokens)
    lens = np.array([len(p) for p in prompts])
    real = np.arange(ref_logits.shape[1])[None] < lens[:, None]
    rows = []
    for dt, g in variants:
        q = moejax.Engine(quantize_model(model, dt, g))
        rows.append({"expert_dtype": dt, "group_size": g,
                     "expert_bytes_ratio": q.cfg.expert_bytes() / model.config.expert_bytes(),
                     **logit_errors(ref_logits[real], q.prompt_logits(prompts)[real]),
                     **greedy_agreement(ref_tokens, q.generate(prompts, new_tokens))})
    return rows


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    import moejax
    from tests.oracle import hf_model

    variants = [(dt, int(g)) for dt in ("int8", "int4") for g in FLAGS.groups]
    models = {}
    for fam in FLAGS.families:
        d = tempfile.mkdtemp(prefix=f"qacc_{fam}_")
        hf_model(fam, d)
        models[f"tiny HF {fam}"] = moejax.load_pretrained(d)
    if FLAGS.local:
        from experiments.local import local_config
        from moejax.model import MoEModel
        from moejax.model_config.setups import get_setup

        cfg, _ = local_config(get_setup("mixtral_l4"), None, FLAGS.local_hidden_size,
                              FLAGS.local_num_layers)
        models[f"local {cfg.name}"] = MoEModel.random(cfg)
    out = []
    print(f"{'model':32s} {'experts':>8s} {'G':>4s} {'bytes':>6s} {'mean rel':>9s} "
          f"{'max rel':>9s} {'greedy=':>8s} {'prefix':>7s}")
    for name, m in models.items():
        for r in accuracy_rows(m, _prompts(m.config.vocab_size), FLAGS.new_tokens, variants):
            r = {"model": name, **r}
            out.append(r)
            print(f"{name:32s} {r['expert_dtype']:>8s} {r['group_size']:4d} "
                  f"{r['expert_bytes_ratio']:6.3f} {r['mean_rel_err']:9.4%} "
                  f"{r['max_rel_err']:9.4%} {r['greedy_match']:8.3f} {r['greedy_prefix']:7.1f}",
                  flush=True)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"machine": f"{platform.machine()} CPU VM ({__import__('os').cpu_count()} "
                       "cores)", "new_tokens": FLAGS.new_tokens,
                       "metric": "per position ||q - f||_2 / ||f||_2 over the vocab; float "
                       "model = float32 reference", "rows": out}, f, indent=1)


if __name__ == "__main__":
    run(main)
