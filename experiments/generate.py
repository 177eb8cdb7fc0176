"""Generate completions for a JSONL file of prompts: the batch job, resumable.

    python -m experiments.generate --checkpoint DIR --prompts IN.jsonl --output OUT.jsonl
        [--max_new_tokens 64] [--temperature 0 --top_k 0 --top_p 1 --seed 0] [--chat]
        [--device_memory_gb G] [--host_kv_gb K] [--dtype bfloat16] [--batch_size 64]
        [--ray_address HOST:PORT|local --ray_workers 2]

Input lines: {"id": str|int, "prompt": str} or {"id", "messages": [{"role", "content"}]}
(rendered with the checkpoint's chat template; --chat renders "prompt" lines as one
user message too), optional "max_new_tokens"; a missing id is the line number. Output:
one line per request, appended when its batch finishes: {"id", "completion",
"token_ids", "finish_reason": "eos"|"length", "prompt_tokens", "completion_tokens"}.
Generation stops at the checkpoint's EOS id(s) (generation_config.json).

Every problem with the input — malformed JSON, a line without prompt or messages, an
empty or too long prompt, a duplicate id — is refused in one line before anything
runs (--on_bad_request=skip drops bad requests instead, saying which). Rerunning the
same command resumes: ids already in OUT are skipped, a torn last line is redone, OUT is
never rewritten. Ctrl-C stops after flushing what finished. OUT.stats.json gets the
throughput, the policy, predicted vs measured tokens/s and the MoE-Lens limit
(measured: generated tokens / generation wall time, XLA compilation of each new batch
shape included; predicted: steady state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from absl import flags

from experiments.cli import fail, finite_flag, no_extra_args, quiet_logs, run, writable
from experiments.jsonl_job import JobError, Writer, read_requests, resume

GB = 1e9
FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "HF or native checkpoint directory (with "
                    "tokenizer.json)", required=True)
flags.DEFINE_string("prompts", None, "input JSONL", required=True)
flags.DEFINE_string("output", None, "output JSONL (appended to; resumed)", required=True)
flags.DEFINE_integer("max_new_tokens", 64, "new tokens per request (a line's "
                     "\"max_new_tokens\" wins)", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: off)")
flags.DEFINE_float("top_p", 1.0, "nucleus: keep the smallest set of mass >= p (1: off)")
flags.DEFINE_integer("seed", 0, "sampling seed: a request's tokens depend only on it, "
                     "the request's line and the step")
flags.DEFINE_bool("chat", False, "render \"prompt\" lines with the chat template too")
flags.DEFINE_float("device_memory_gb", None, "offload: device memory budget in GB "
                   "(experts stream from host memory, attention on the CPU)")
flags.DEFINE_float("host_kv_gb", None, "memory for the KV cache in GB: caps the batch")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "weights' dtype "
                  "(default: the checkpoint's)")
flags.DEFINE_integer("batch_size", 64, "requests per batch (each batch's lines are "
                     "written when it finishes)", lower_bound=1)
flags.DEFINE_enum("on_bad_request", "refuse", ["refuse", "skip"], "a bad request line: "
                  "refuse the job before it starts, or skip that line")
flags.DEFINE_bool("predict", True, "price the run with the performance model (calibrates "
                  "this machine once, 1-3 minutes; --nopredict skips it)")
flags.DEFINE_string("ray_address", None, "spread the batches over a Ray cluster "
                    "(HOST:PORT, ray://HOST:PORT, auto, or local: a cluster on this "
                    "machine), one engine per worker (moejax.integrations.ray; the ray "
                    "extra)")
flags.DEFINE_integer("ray_workers", 2, "Ray workers (one engine each)", lower_bound=1)
finite_flag("temperature")
finite_flag("top_p")
finite_flag("device_memory_gb", positive=True)
finite_flag("host_kv_gb", positive=True)


def check_paths() -> None:
    """One line before anything runs: the input exists, the output is not the input,
    sits in an existing directory and is writable."""
    p, o = FLAGS.prompts, FLAGS.output
    if not os.path.isfile(p):
        fail(f"--prompts={p}: no such file")
    if os.path.realpath(o) == os.path.realpath(p) or (
            os.path.exists(o) and os.path.samefile(o, p)):
        fail(f"--output={o} is the --prompts file: the output must be another file")
    parent = os.path.dirname(os.path.abspath(o))
    if not os.path.isdir(parent):
        fail(f"--output={o}: directory {parent} does not exist")
    if os.path.isdir(o) or not writable(o):
        fail(f"--output={o}: not a writable file")


def sampling():
    """The flags' moejax.Sampling, or None (greedy)."""
    from moejax import Sampling

    knobs = [f"--{k}" for k in ("top_k", "top_p", "seed") if FLAGS[k].present]
    if FLAGS.temperature == 0:
        if knobs:
            fail(f"{', '.join(knobs)} need --temperature > 0 (temperature 0 is greedy)")
        return None
    try:
        return Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    except ValueError as e:
        fail(str(e).replace("Sampling: ", "--"))


def load_job():
    """(tokenizer, config, requests) — all checked; fails in one line."""
    import moejax
    from moejax.checkpoints import checkpoint_config

    try:
        cfg = checkpoint_config(FLAGS.checkpoint)
        tok = moejax.load_tokenizer(FLAGS.checkpoint)
        skip = None if FLAGS.on_bad_request == "refuse" else (
            lambda m: print(f"{os.path.basename(sys.argv[0])}: skipping {m}",
                            file=sys.stderr))
        reqs = read_requests(FLAGS.prompts, tok, FLAGS.chat, FLAGS.max_new_tokens,
                             cfg.max_positions, skip)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        fail(f"--prompts={FLAGS.prompts}: {e}" if isinstance(e, JobError) else str(e))
    if FLAGS.dtype:
        cfg = cfg.replace(dtype=FLAGS.dtype)
    return tok, cfg, reqs


def batch_cap(cfg, reqs) -> int:
    """--batch_size, lowered so a batch's KV cache fits --host_kv_gb."""
    from moejax.schedule.policy import padded_len as bucket

    if FLAGS.host_kv_gb is None:
        return FLAGS.batch_size
    per_row = cfg.kv_bytes_per_token(None) * max(
        bucket(len(r.ids)) + r.max_new_tokens for r in reqs)
    rows = int(FLAGS.host_kv_gb * GB // per_row)
    if rows < 1:
        fail(f"--host_kv_gb={FLAGS.host_kv_gb:g}: one request's KV cache needs "
             f"{per_row / GB:.3g} GB")
    return min(rows, FLAGS.batch_size)


def make_engine(cfg, reqs, batch: int):
    import moejax

    try:
        if FLAGS.device_memory_gb is None:
            eng = moejax.Engine(moejax.load_pretrained(FLAGS.checkpoint, FLAGS.dtype))
        else:
            model = moejax.load_pretrained(FLAGS.checkpoint, FLAGS.dtype, experts="host")
            eng = moejax.Engine(model, device_memory_bytes=int(FLAGS.device_memory_gb * GB))
        eng.check_memory(min(batch, len(reqs)), max(len(r.ids) for r in reqs),
                         max(r.max_new_tokens for r in reqs))
    except ValueError as e:
        fail(str(e))
    return eng


def batches(reqs, size: int):
    """Requests grouped by max_new_tokens (so each row is exactly as long as alone),
    in input order within a group, `size` at a time."""
    groups: dict[int, list] = {}
    for r in reqs:
        groups.setdefault(r.max_new_tokens, []).append(r)
    for g in groups.values():
        for i in range(0, len(g), size):
            yield g[i:i + size]


def record(r, toks, tok, eos: set) -> dict:
    ended = bool(toks) and toks[-1] in eos
    return {"id": r.id, "completion": tok.decode(toks[:-1] if ended else toks),
            "token_ids": toks, "finish_reason": "eos" if ended else "length",
            "prompt_tokens": len(r.ids), "completion_tokens": len(toks)}


def stop_on_ctrl_c() -> list:
    """A list that a first Ctrl-C appends to (the loop stops after the running batch:
    interrupting JAX mid-op is not safe); a second one interrupts at once."""
    stop: list = []

    def handler(sig, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(sig)
        print("\ngenerate: stopping after the running batch (Ctrl-C again: now)",
              file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, handler)
    return stop


def generate_all(eng, tok, todo, size, samp, writer) -> dict:
    """Run every batch, writing its lines as it finishes; counts, wall time and
    whether Ctrl-C stopped it."""
    from tqdm import tqdm

    eos = set(tok.eos_token_ids)
    n = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "wall_s": 0.0}
    bar = tqdm(total=len(todo), unit="req", desc="generate", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    t0, stop = time.perf_counter(), stop_on_ctrl_c()
    try:
        for chunk in batches(todo, size):
            if stop:
                break
            outs = eng.generate([r.ids for r in chunk], chunk[0].max_new_tokens,
                                eos_token_id=sorted(eos) or None, sampling=samp,
                                request_indices=[r.index for r in chunk], batching="static")
            for r, toks in zip(chunk, outs):
                writer.write(record(r, toks, tok, eos))
                n["requests"] += 1
                n["prompt_tokens"] += len(r.ids)
                n["completion_tokens"] += len(toks)
            n["wall_s"] = time.perf_counter() - t0
            n.setdefault("policy", eng.last_run.policy)  # the first (fullest) batch's
            bar.update(len(chunk))
            bar.set_postfix_str(f"{n['completion_tokens'] / n['wall_s']:.1f} tok/s")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        bar.close()
        n["wall_s"] = time.perf_counter() - t0
        writer.close()
    n["interrupted"] = bool(stop)
    return n


def check_ray() -> None:
    """--ray_address: Ray importable and the cluster reachable, in one line, before any
    weights load."""
    if not FLAGS.ray_address:
        return
    try:
        from moejax.integrations.ray import _ray, check_address

        _ray()
        check_address(FLAGS.ray_address)
    except ValueError as e:
        fail(f"--ray_address: {e}")


def generate_ray(tok, todo, size, samp, writer) -> dict:
    """generate_all over a Ray cluster: each finished batch's records written once."""
    from moejax.integrations.ray import connect, run_requests

    kw = {} if FLAGS.device_memory_gb is None else {
        "device_memory_bytes": int(FLAGS.device_memory_gb * GB)}
    n = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    t0, done = time.perf_counter(), set()
    connect(FLAGS.ray_address, num_cpus=FLAGS.ray_workers)
    reqs = [{"id": r.id, "index": r.index, "ids": r.ids,
             "max_new_tokens": r.max_new_tokens} for r in todo]
    try:
        for recs in run_requests(FLAGS.checkpoint, reqs, FLAGS.ray_workers,
                                 batch_size=size, engine_kwargs=kw, dtype=FLAGS.dtype,
                                 sampling=samp):
            for rec in recs:
                key = json.dumps(rec["id"])
                if key in done:
                    continue
                done.add(key)
                writer.write(rec)
                n["requests"] += 1
                n["prompt_tokens"] += rec["prompt_tokens"]
                n["completion_tokens"] += rec["completion_tokens"]
    except RuntimeError as e:
        writer.close()
        fail(f"ray: {e}; every finished request is written, rerun to resume")
    writer.close()
    n["wall_s"], n["interrupted"] = time.perf_counter() - t0, False
    return n


def prediction(eng, cfg, reqs, policy) -> dict:
    """Predicted tok/s and the MoE-Lens limit for the first batch's policy on the
    calibrated local hardware (null, with the reason, under --nopredict)."""
    if not FLAGS.predict:
        return {"predicted_tokens_per_s": None, "limit_tokens_per_s": None,
                "prediction_skipped": "--nopredict: no calibration"}
    from experiments.local import local_hardware
    from moejax.schedule.policy import padded_len as bucket
    from moejax.model_config.workload import Workload
    from moejax.schedule.predict import DEVICE_MEMORY_USABLE, predict

    hw = local_hardware(cfg)
    if eng.store is not None and eng.store.budget is not None:
        hw = hw.replace(gpu_memory_bytes=eng.store.budget / DEVICE_MEMORY_USABLE)
    wl = Workload(bucket(max(len(r.ids) for r in reqs)),
                  max(r.max_new_tokens for r in reqs), num_sequences=len(reqs))
    wl = eng.last_run.with_routing(wl)
    try:
        pred = predict(cfg, hw, wl, policy)
    except ValueError as e:
        return {"predicted_tokens_per_s": None, "limit_tokens_per_s": None,
                "prediction_skipped": str(e)}
    return {"predicted_tokens_per_s": pred.tokens_per_s,
            "limit_tokens_per_s": pred.limit_tokens_per_s,
            "hardware": hw.name, "hardware_source": hw.source,
            "predicted_workload": {"padded_prompt_len": wl.prompt_len,
                                   "gen_len": wl.gen_len}}


def write_stats(path: str, stats: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, path)


def summary(n: dict, skipped: int, stats: dict) -> str:
    pred, lim = stats["predicted_tokens_per_s"], stats["limit_tokens_per_s"]
    return (f"generate: {n['requests']} requests ({skipped} already done), "
            f"{n['completion_tokens']} tokens in {n['wall_s']:.1f} s: "
            f"{stats['measured_tokens_per_s']:.1f} tok/s"
            + (f" (predicted {pred:.1f}, MoE-Lens limit {lim:.1f})" if pred else "")
            + f"; wrote {FLAGS.output}")


def main(argv):
    no_extra_args(argv)
    quiet_logs()
    check_paths()
    check_ray()
    samp = sampling()
    tok, cfg, reqs = load_job()
    try:
        done = resume(FLAGS.output)
    except (JobError, OSError) as e:
        fail(str(e))
    todo = [r for r in reqs if r.key not in done]
    size = batch_cap(cfg, reqs)
    ray = bool(FLAGS.ray_address)
    eng = make_engine(cfg, reqs, size) if todo and not ray else None
    writer = Writer(FLAGS.output)
    try:
        n = generate_ray(tok, todo, size, samp, writer) if ray and todo else \
            generate_all(eng, tok, todo, size, samp, writer)
    except KeyboardInterrupt:
        n = {"interrupted": True}
    if n.pop("interrupted"):
        fail("interrupted: every finished request is written; rerun the same command "
             "to resume")
    from experiments.local import policy_dict

    policy = n.pop("policy", None)
    stats = {"checkpoint": FLAGS.checkpoint, "requests_already_done": len(reqs) - len(todo),
             **n, "measured_tokens_per_s": n["completion_tokens"] / max(n["wall_s"], 1e-9),
             "sampling": None if samp is None else dataclasses.asdict(samp),
             "policy": policy_dict(policy) if policy else None}
    stats.update(prediction(eng, cfg, todo, policy) if todo and not ray else {
        "predicted_tokens_per_s": None, "limit_tokens_per_s": None,
        "prediction_skipped": "ray: one engine per worker" if ray else "nothing ran"})
    write_stats(FLAGS.output + ".stats.json", stats)
    print(summary(n, len(reqs) - len(todo), stats))


if __name__ == "__main__":
    run(main)
