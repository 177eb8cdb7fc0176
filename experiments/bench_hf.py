"""moejax vs HF transformers `generate` on the same tiny Mixtral, CPU, float32.

    python -m experiments.bench_hf [--batch_size 64 --prompt_len 64 --gen_len 64]

Builds a random `MixtralForCausalLM` (4 layers, hidden 1024, 8 experts by default),
saves it with `save_pretrained`, loads it into moejax, and times greedy generation of
the same batch by both in this one process. The machine is shared, so the two are timed
in alternation (`--repeats` rounds of moejax then HF), medians are reported, and each
run records how many cores other processes kept busy meanwhile (from /proc/stat): a
ratio is only meaningful when that is ~0 for both (HF's OpenMP GEMMs slow down several
times more than XLA's when another process takes a core). With `--split`, each round
also times a one-token generation (prefill + first token) of each, splitting the time
into prefill and per-step decode. moejax is warmed up with one full run of the same job
first (XLA compiles once per shape, and the decode ffn's expert capacity takes a few
values over a run); that cold run's time is reported too. HF is warmed up with a short
run (torch has nothing to compile).
Prints generated tokens/s of each, their ratio and how many tokens agree; writes JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags

from experiments.cli import no_extra_args, output_flag, quiet_logs, require, run

flags.DEFINE_integer("batch_size", 64, "sequences in the batch", lower_bound=1)
flags.DEFINE_integer("prompt_len", 64, "prompt tokens per sequence", lower_bound=1)
flags.DEFINE_integer("gen_len", 64, "new tokens per sequence", lower_bound=1)
flags.DEFINE_integer("num_layers", 4, "decoder layers", lower_bound=1)
flags.DEFINE_integer("hidden_size", 1024, "hidden size (a multiple of 256: 64-wide "
                     "heads, hidden/256 KV heads)", lower_bound=256)
flags.DEFINE_integer("num_experts", 8, "experts per layer", lower_bound=2)
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default)",
                     lower_bound=0)
flags.DEFINE_integer("repeats", 2, "alternating timed rounds (median reported)",
                     lower_bound=1)
flags.DEFINE_bool("split", True, "also time 1-token runs: prefill vs per-step decode")
flags.DEFINE_string("output_json", "experiments/results/bench_hf_cpu.json",
                    "where to write the figures ('' to skip)")
FLAGS = flags.FLAGS
output_flag("output_json", ".json", allow_empty=True)
flags.register_validator("hidden_size", lambda v: v % 256 == 0,
                         message="must be a multiple of 256")
flags.register_multi_flags_validator(
    ["prompt_len", "gen_len"], lambda f: f["prompt_len"] + f["gen_len"] <= 4096,
    message="--prompt_len + --gen_len must be at most the model's 4096 positions")


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


def hf_runner(model, prompts):
    import torch

    ids = torch.tensor(prompts)

    def run(n, rows=None):
        x = ids if rows is None else ids[:rows]
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 pad_token_id=0, eos_token_id=None, max_new_tokens=n,
                                 min_new_tokens=n)
        return out[:, x.shape[1]:].tolist()
    return run


def _busy_cpu_seconds() -> float:
    """CPU-seconds all processes spent busy since boot (/proc/stat; 0 if unreadable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def timed(fn, *args):
    """(seconds, result, cores used by other processes meanwhile): the last is the
    machine's busy CPU time minus this process's, over the wall time — 0 on a quiet
    machine, 1 when another process kept one core busy throughout."""
    busy, mine = _busy_cpu_seconds(), sum(os.times()[:2])
    t = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t
    others = (_busy_cpu_seconds() - busy - (sum(os.times()[:2]) - mine)) / wall
    return wall, out, max(0.0, others)


def main(argv):
    no_extra_args(argv)
    require("torch", "transformers", extra="bench")
    quiet_logs()
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
    runners = {"moejax": lambda k: engine.generate(prompts, k, batching="static"),
               "HF": hf_runner(hf, prompts)}
    t_cold, _, _ = timed(runners["moejax"], n)  # warm-up: compiles every shape of the job
    runners["HF"](2, rows=2)
    times = {name: {"full": [], "one": []} for name in runners}
    others_log, outs = [], {}
    for _ in range(FLAGS.repeats):
        for name, runner in runners.items():
            if FLAGS.split:
                t, _, _ = timed(runner, 1)
                times[name]["one"].append(t)
            t, outs[name], others = timed(runner, n)
            times[name]["full"].append(t)
            others_log.append((name, others))
            print(f"  {name:8s}{t:8.2f} s   (other processes used {others:.2f} of "
                  f"{os.cpu_count()} cores meanwhile)", flush=True)
    med = {name: {k: float(np.median(v)) if v else None for k, v in d_.items()}
           for name, d_ in times.items()}
    t_ours, t_hf = med["moejax"]["full"], med["HF"]["full"]
    ours, theirs = outs["moejax"], outs["HF"]
    agree = float(np.mean(np.array(ours) == np.array(theirs)))
    first = float(np.mean([o[0] == t[0] for o, t in zip(ours, theirs)]))
    pair = [h / o for h, o in zip(times["HF"]["full"], times["moejax"]["full"])]
    res = dict(machine=f"{os.cpu_count()}-core CPU", batch_size=b, prompt_len=s,
               gen_len=n, num_layers=FLAGS.num_layers, hidden_size=FLAGS.hidden_size,
               num_experts=FLAGS.num_experts, torch_threads=torch.get_num_threads(),
               repeats=FLAGS.repeats, hf_seconds=t_hf, moejax_seconds=t_ours,
               moejax_cold_seconds=t_cold, hf_tokens_per_s=b * n / t_hf,
               moejax_tokens_per_s=b * n / t_ours, speedup=t_hf / t_ours,
               speedup_per_round=pair, other_processes_cores=others_log,
               tokens_agree=agree, first_tokens_agree=first)
    print(f"{'':10s}{'seconds':>10s}{'tokens/s':>12s}{'prefill s':>12s}{'step ms':>10s}")
    for name, t in (("HF", t_hf), ("moejax", t_ours)):
        one = med[name]["one"]
        split = (f"{one:12.2f}{(t - one) / max(n - 1, 1) * 1e3:10.1f}"
                 if one is not None and n > 1 else "")
        if one is not None and n > 1:
            res[f"{name.lower()}_prefill_seconds"] = one
            res[f"{name.lower()}_decode_step_ms"] = (t - one) / (n - 1) * 1e3
        print(f"{name:10s}{t:10.2f}{b * n / t:12.1f}{split}")
    print(f"moejax cold (first run, compiling): {t_cold:.2f} s")
    rounds = ", ".join(f"{p:.2f}" for p in pair)
    print(f"speedup {t_hf / t_ours:.2f}x (per round: {rounds}); "
          f"generated tokens equal to HF's: {agree:.1%} "
          f"(first token {first:.1%}; later ones diverge after near-ties)")
    if FLAGS.output_json:
        os.makedirs(os.path.dirname(FLAGS.output_json) or ".", exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    run(main)
