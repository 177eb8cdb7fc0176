"""moejax vs HF transformers `generate` on the same tiny Mixtral, CPU, float32.

    python -m experiments.bench_hf [--batch_size 64 --prompt_len 64 --gen_len 64]

Builds a random `MixtralForCausalLM` (4 layers, hidden 1024, 8 experts by default),
saves it with `save_pretrained`, loads it into moejax, and times greedy generation of
the same batch by both in this one process (side by side, after a warm-up of each).
Prints generated tokens/s of each, their ratio and how many tokens agree; writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("batch_size", 64, "sequences in the batch", lower_bound=1)
flags.DEFINE_integer("prompt_len", 64, "prompt tokens per sequence", lower_bound=1)
flags.DEFINE_integer("gen_len", 64, "new tokens per sequence", lower_bound=1)
flags.DEFINE_integer("num_layers", 4, "decoder layers", lower_bound=1)
flags.DEFINE_integer("hidden_size", 1024, "hidden size", lower_bound=16)
flags.DEFINE_integer("num_experts", 8, "experts per layer", lower_bound=2)
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default)",
                     lower_bound=0)
flags.DEFINE_string("output_json", "experiments/results/bench_hf_cpu.json",
                    "where to write the figures ('' to skip)")
FLAGS = flags.FLAGS


def build_hf(directory: str):
    import torch
    import transformers

    h = FLAGS.hidden_size
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=h, intermediate_size=h * 7 // 2,
        num_hidden_layers=FLAGS.num_layers, num_attention_heads=h // 64,
        num_key_value_heads=h // 256 or 1, num_local_experts=FLAGS.num_experts,
        num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    model.save_pretrained(directory)
    return model


def time_hf(model, prompts, gen_len):
    import torch

    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=gen_len,
              min_new_tokens=gen_len)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]),
                       **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def time_moejax(engine, prompts, gen_len):
    engine.generate(prompts[:2], 2)  # compile the shapes that do not depend on the batch
    engine.generate(prompts, 2)  # …and those that do
    t = time.perf_counter()
    out = engine.generate(prompts, gen_len)
    return time.perf_counter() - t, out


def main(argv):
    del argv
    import numpy as np
    import torch

    import moejax

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    rng = np.random.default_rng(0)
    b, s, n = FLAGS.batch_size, FLAGS.prompt_len, FLAGS.gen_len
    prompts = rng.integers(1, 32000, (b, s)).tolist()
    with tempfile.TemporaryDirectory() as d:
        hf = build_hf(d)
        engine = moejax.Engine(moejax.load_pretrained(d, dtype="float32"))
    t_ours, ours = time_moejax(engine, prompts, n)
    t_hf, theirs = time_hf(hf, prompts, n)
    agree = float(np.mean(np.array(ours) == np.array(theirs)))
    first = float(np.mean([o[0] == t[0] for o, t in zip(ours, theirs)]))
    res = dict(machine=f"{os.cpu_count()}-core CPU", batch_size=b, prompt_len=s,
               gen_len=n, num_layers=FLAGS.num_layers, hidden_size=FLAGS.hidden_size,
               num_experts=FLAGS.num_experts, torch_threads=torch.get_num_threads(),
               hf_seconds=t_hf, moejax_seconds=t_ours, hf_tokens_per_s=b * n / t_hf,
               moejax_tokens_per_s=b * n / t_ours, speedup=t_hf / t_ours,
               tokens_agree=agree, first_tokens_agree=first)
    print(f"{'':10s}{'seconds':>10s}{'tokens/s':>12s}")
    print(f"{'HF':10s}{t_hf:10.2f}{b * n / t_hf:12.1f}")
    print(f"{'moejax':10s}{t_ours:10.2f}{b * n / t_ours:12.1f}")
    print(f"speedup {t_hf / t_ours:.2f}x; generated tokens equal to HF's: {agree:.1%} "
          f"(first token {first:.1%}; later ones diverge after near-ties)")
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
