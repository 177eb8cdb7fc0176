"""Per-op timing of the jitted engine pieces (`moejax.ops`) at the bench_hf shapes, with
the previous formulations of the ops that changed and (optionally) HF's Mixtral pieces
in torch, all in one process.

    python -m experiments.profile_ops [--batch_size 64 --prompt_len 64 --rounds 5]

One random layer of the bench_hf model (hidden 1024, 8 experts, f32). For prefill (B·T
tokens per layer) and one decode step (B tokens, cache of bucket(T + gen_len) slots),
every op is timed in interleaved rounds — each round runs every op once, inputs ready,
output blocked on — and the median is reported, so machine contention that drifts
over the run hits all ops alike. Lines starting with `  ~` are alternatives for
comparison (the formulation an op replaced, raw GEMMs, HF), not part of the engine's
path; `per pass` sums the engine ops × num_layers (+ head).
"""

from __future__ import annotations

import os
import statistics
import time

from absl import flags

from experiments.cli import no_extra_args, quiet_logs, require, run

flags.DEFINE_integer("batch_size", 64, "sequences", lower_bound=1)
flags.DEFINE_integer("prompt_len", 64, "prompt tokens per sequence", lower_bound=1)
flags.DEFINE_integer("gen_len", 64, "new tokens (sets the decode cache length)",
                     lower_bound=1)
flags.DEFINE_integer("num_layers", 4, "layers of the modelled pass (for the totals)",
                     lower_bound=1)
flags.DEFINE_integer("hidden_size", 1024, "hidden size", lower_bound=64)
flags.DEFINE_integer("num_experts", 8, "experts", lower_bound=2)
flags.DEFINE_integer("rounds", 5, "interleaved timed rounds (median reported)",
                     lower_bound=1)
flags.DEFINE_bool("hf", True, "also time HF's torch modules")
flags.DEFINE_bool("alternatives", True, "also time previous formulations / raw GEMMs")
FLAGS = flags.FLAGS
flags.register_validator("hidden_size", lambda v: v % 256 == 0,
                         message="must be a multiple of 256 (64-wide heads, hidden/256 "
                                 "KV heads)")


def run_rounds(cases, rounds):
    """cases: [(name, fn, flops, in_pass)]; fn() blocks on its result. One untimed call
    each, then `rounds` interleaved rounds. Returns {name: median seconds}."""
    for _, fn, _, _ in cases:
        fn()
    ts = {c[0]: [] for c in cases}
    for _ in range(rounds):
        for name, fn, _, _ in cases:
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def report(stage, cases, med, layers, extra=0.0):
    total = extra
    for name, _, flops, in_pass in cases:
        sec = med[name]
        gf = f"{flops / sec / 1e9:7.1f} GFLOP/s" if flops else ""
        mark = "" if in_pass else "  ~"
        print(f"{stage:8s}{mark + name:46s}{sec * 1e3:10.2f} ms {gf}", flush=True)
        if in_pass == "layer":
            total += layers * sec
        elif in_pass == "once":
            total += sec
    if any(c[3] for c in cases):
        print(f"{stage:8s}{'per pass (layer ops x %d + once)' % layers:46s}"
              f"{total * 1e3:10.2f} ms", flush=True)
    return total


def attend_before(q, k, v, mask):
    """gqa_attention as it was before the CPU tuning (dots batched over row and kv head,
    g and T separate axes), kept here as the comparison line."""
    import jax
    import jax.numpy as jnp
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * (1.0 / jnp.sqrt(jnp.float32(d)))
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def main(argv):
    no_extra_args(argv)
    if FLAGS.hf:  # the HF comparison
        require("torch", "transformers", extra="bench")
    quiet_logs()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax import ops
    from moejax.schedule.policy import padded_len as bucket
    from moejax.layers.attention import causal_mask
    from moejax.layers.experts import swiglu
    from moejax.model import MoEModel
    from moejax.model_config.model import ModelConfig

    h, e = FLAGS.hidden_size, FLAGS.num_experts
    cfg = ModelConfig(name="bench", family="mixtral", vocab_size=32000, hidden_size=h,
                      expert_ffn_size=h * 7 // 2, num_layers=1, num_heads=h // 64,
                      num_kv_heads=h // 256 or 1, head_dim=64, num_experts=e, top_k=2,
                      rope_theta=1e6, dtype="float32")
    f, L, r = cfg.expert_ffn_size, FLAGS.num_layers, FLAGS.rounds
    p = MoEModel.random(cfg, seed=0).params
    lp = p["layers_0"]
    gp = {"embed": p["embed"]}
    hp = {k: p[k] for k in ("embed", "final_norm", "lm_head") if k in p}
    b, t = FLAGS.batch_size, FLAGS.prompt_len
    s_cache = bucket(t + FLAGS.gen_len)
    rng = np.random.default_rng(0)
    block = jax.block_until_ready
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"B={b} T={t} cache {s_cache}", flush=True)

    for stage, tt in (("prefill", t), ("decode", 1)):
        n = b * tt
        tokens = jnp.asarray(rng.integers(1, 32000, (b, tt)), jnp.int32)
        x = block(ops.embed(cfg, gp, tokens))
        pos = (jnp.broadcast_to(jnp.arange(tt), (b, tt)) if tt > 1
               else jnp.full((b, 1), t, jnp.int32))
        q, k, v = block(ops.pre_attention(cfg, True, lp, x, pos))
        cases = [("embed", lambda: block(ops.embed(cfg, gp, tokens)), 0, "once"),
                 ("pre_attention", lambda: block(ops.pre_attention(cfg, True, lp, x, pos)),
                  2 * n * h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                  "layer")]
        attn_flops = 4 * b * tt * (t if tt > 1 else s_cache) * cfg.num_heads * cfg.head_dim
        if stage == "prefill":
            mask = causal_mask(jnp.ones((b, t), jnp.int32))
            o = block(ops.attend(q, k, v, mask))
            cache = [jnp.zeros((b, s_cache, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
                     for _ in range(2)]

            def wp():
                cache[0], cache[1] = block(ops.write_prefill(cache[0], cache[1], k, v))
            cases += [("attend", lambda: block(ops.attend(q, k, v, mask)), attn_flops,
                       "layer"),
                      ("write_prefill", wp, 0, "layer")]
            if FLAGS.alternatives:
                before = jax.jit(attend_before)
                cases.append(("attend (before)", lambda: block(before(q, k, v, mask)),
                              attn_flops, None))
        else:
            shape = (b, s_cache, cfg.num_kv_heads, cfg.head_dim)
            cache = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)]
            at = jnp.full((b,), t, jnp.int32)
            mask = (jnp.arange(s_cache)[None, :] <= at[:, None])[:, None, :]

            def da():
                o_, cache[0], cache[1] = block(ops.decode_attention(cache[0], cache[1], q,
                                                                    k, v, at))
                return o_
            o = da()
            cases.append(("decode_attention (write + attend)", da, attn_flops, "layer"))
            if FLAGS.alternatives:
                before = jax.jit(attend_before)
                cases.append(("attend alone, as dots (before)",
                              lambda: block(before(q, cache[0], cache[1], mask)),
                              attn_flops, None))
        hh, normed, w, ids, counts = block(ops.post_attention(cfg, True, lp, x, o))
        cap = ops.capacity_bucket(int(jnp.max(counts)), n)
        useful = 2 * n * cfg.top_k * 3 * h * f
        cases += [("post_attention", lambda: block(ops.post_attention(cfg, True, lp, x, o)),
                   2 * n * h * (cfg.num_heads * cfg.head_dim + e), "layer"),
                  ("int(max(counts)) host sync", lambda: int(jnp.max(counts)), 0,
                   "layer" if ops.needs_capacity(cfg, True, n) else None)]
        path = "capacity C=%d" % cap if ops.needs_capacity(cfg, True, n) else "sorted"
        cases.append((f"ffn ({path})", lambda: block(ops.ffn(cfg, True, lp, hh, normed, w,
                                                             ids, cap)), useful, "layer"))
        pad = e * cap / (n * cfg.top_k)
        if FLAGS.alternatives and not ops.needs_capacity(cfg, True, n):
            cases.append((f"ffn capacity C={cap}, {pad:.2f}x rows (before)",
                          lambda: block(ops._ffn(cfg, True, lp, hh, normed, w, ids, cap)),
                          useful, None))
        last = hh if tt == 1 else hh[:, -1:]
        cases.append(("head (last token)", lambda: block(ops.head(cfg, hp, last)),
                      2 * b * h * cfg.vocab_size, "once"))
        if FLAGS.alternatives:
            ex = lp["experts"]
            xb = jnp.asarray(rng.standard_normal((e, cap, h)), jnp.float32)
            sw = jax.jit(swiglu)
            cases.append((f"swiglu GEMMs alone [E={e},C={cap}]",
                          lambda: block(sw(xb, ex["w1"], ex["w3"], ex["w2"])),
                          2 * 3 * e * cap * h * f, None))
        med = run_rounds(cases, r)
        report(stage, cases, med, L)

    if FLAGS.hf:
        import torch
        import transformers

        hcfg = transformers.MixtralConfig(
            vocab_size=32000, hidden_size=h, intermediate_size=f, num_hidden_layers=1,
            num_attention_heads=h // 64, num_key_value_heads=h // 256 or 1,
            num_local_experts=e, num_experts_per_tok=2, max_position_embeddings=4096,
            rope_theta=1e6)
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(hcfg).float().eval()
        moe = model.model.layers[0].mlp
        print(f"HF: torch threads {torch.get_num_threads()}, experts "
              f"{getattr(hcfg, '_experts_implementation', None)}, attention "
              f"{hcfg._attn_implementation}", flush=True)
        ids = torch.randint(1, 32000, (b, t + 1))
        with torch.no_grad():
            xs = {tt: torch.randn(b, tt, h) for tt in (t, 1)}
            pkv = model(ids[:, :t], use_cache=True).past_key_values

            def step():
                out = model(ids[:, t:], past_key_values=pkv, use_cache=True)
                pkv.crop(-1)  # back to the prompt
                return out
            cases = [("moe block, prefill tokens", lambda: moe(xs[t]),
                      2 * b * t * 2 * 3 * h * f, None),
                     ("1-layer model, prefill (last logits)",
                      lambda: model(ids[:, :t], logits_to_keep=1), 0, None),
                     ("moe block, decode tokens", lambda: moe(xs[1]),
                      2 * b * 2 * 3 * h * f, None),
                     ("1-layer model, decode step", step, 0, None)]
            med = run_rounds(cases, r)
        report("hf", cases, med, L)
    return 0


if __name__ == "__main__":
    run(main)
