"""The model runtime: the handler of every timeline op (docs/design.md §2-§3).

`BatchRun(...).handlers()` maps each op of `schedule.timeline` to the code that runs it
through the data plane — jitted device pieces (`ops`), the weight store's pages, the host
KV cache and CPU attention — for one padded batch; `schedule.executor.execute` calls them.
`DeviceWeights` is the weight interface with everything resident (the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax import ops
from moejax.layers.attention import causal_mask
from moejax.schedule.policy import padded_rows, prefill_device_rows
from moejax.schedule.executor import StopTimeline
from moejax.schedule.policy import padded_len
from moejax.schedule.routing import fit_imbalance


class DeviceWeights:
    """All parameters already on the device (the all-on-device reference): the weight
    interface of `HostWeightStore` with nothing to stream."""

    def __init__(self, cfg, params: dict):
        self.cfg, self.params = cfg, params

    def device_params(self, layer: int) -> dict:
        return self.params[f"layers_{layer}"]

    def global_params(self) -> dict:
        return {k: self.params[k] for k in ("embed", "final_norm", "lm_head")
                if k in self.params}

    def num_pages(self, layer: int) -> int:
        return 0

    def wait(self, layer: int, step: int = 0) -> list[tuple]:
        ex = self.params[f"layers_{layer}"]["experts"]
        return [(ex["w1"], ex["w3"], ex["w2"])]  # one FFN part: every column

    def release(self, layer: int, step: int = 0, fence=None) -> None:
        pass

    def release_all(self) -> None:
        pass


class BatchRun:
    """One padded batch through a timeline: the handler of every op (docs/design.md §2).

    weights   HostWeightStore or DeviceWeights (device_params, wait, prefetch_page, …)
    kv        HostKVCache (attention on the host) or None (device KV cache)
    rows      micro-batch k owns rows [k·ubs, (k+1)·ubs) of the batch
    Values flow between entries through dicts keyed by (step, layer, micro-batch); a
    consumer pops what no later entry reads, so at most a pass or two stays alive.
    """

    def __init__(self, cfg, weights, kv, policy, tokens: np.ndarray, lengths: np.ndarray,
                 cache_len: int, steps: int, eos_token_id=None, on_step=None,
                 full_logits: bool = False, sampling=None, request_index=None):
        self.cfg, self.w, self.kv, self.policy = cfg, weights, kv, policy
        ubs, n = policy.micro_batch_size, policy.num_micro_batches
        self.rows = [slice(k * ubs, (k + 1) * ubs) for k in range(n)]
        self.last_mb = n - 1  # its post-attention releases the layer's pages
        self.lengths = lengths
        self.tokens = [jnp.asarray(tokens[r]) for r in self.rows]
        t = tokens.shape[1]
        am = np.arange(t)[None, :] < lengths[:, None]
        self.masks = [causal_mask(jnp.asarray(am[r], jnp.int32)) for r in self.rows]
        self.positions = jnp.broadcast_to(jnp.arange(t), (ubs, t))
        self.last = [jnp.asarray(lengths[r] - 1) for r in self.rows]
        g = weights.global_params()
        self.embed_params = {"embed": g["embed"]}
        self.head_params = g
        self.eos = None if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
        self.on_step, self.full_logits = on_step, full_logits
        # each op blocks on its result where ops are timed on the host's own cores (the
        # CPU testbed: traces price the model); on an accelerator only a consumer blocks
        self.block_ops = not getattr(weights, "accelerator_path", False)
        # sampling (a moejax.Sampling, temperature > 0): row r draws with the key of
        # request request_index[r]; None: greedy (ops.next_tokens)
        self.sampling = None
        if sampling is not None and not sampling.greedy:
            idx = np.asarray(request_index, np.int32)
            self.sampling = (jnp.asarray(sampling.base_key()), sampling.args(),
                             [jnp.asarray(idx[r]) for r in self.rows])
        self.out = np.zeros((steps + 1, len(lengths)), np.int64)
        self.logits: list = [None] * n
        self.done = np.zeros(len(lengths), bool)
        self.steps_run = 0
        self.x, self.qkv, self.host, self.o, self.nxt = {}, {}, {}, {}, {}
        self.new_kv = {}  # prefill k, v awaiting their copy to the host cache
        self.router_counts: dict[str, list] = {}  # stage -> [E] counts per MoE call
        self.dev_cache = None
        if kv is None:
            shape = (ubs, cache_len, cfg.num_kv_heads, cfg.head_dim)
            z = lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype))
            self.dev_cache = {(i, k): [z(), z()] for i in range(cfg.num_layers)
                              for k in range(n)}

    def _ready(self, x):
        return jax.block_until_ready(x) if self.block_ops else x

    def handlers(self) -> dict:
        return {op: getattr(self, f"_{op}") for op in
                ("page", "embed", "pre_attn", "attn", "d2h_qkv", "cpu_attn", "h2d_attn",
                 "d2h_kv", "post_attn", "head")}

    def _prefill_pos(self, e):
        return self.positions

    def _pos(self, e):
        """Decode: slot of the new token = prompt length + step − 1."""
        return jnp.asarray(self.lengths[self.rows[e.micro_batch]] + e.step - 1)

    # --------------------------------------------------------------- transfers
    def _page(self, e):
        page = self.w.prefetch_page(e.layer, e.page, e.step)
        if page is not None:  # the link lane waits for its own copies only
            jax.block_until_ready(page)

    def _d2h_kv(self, e):
        kh, vh = self.kv.to_host(*self.new_kv.pop((e.step, e.layer, e.micro_batch)))
        r = self.rows[e.micro_batch]
        self.kv.write_prefill(e.layer, r, kh, vh, self.lengths[r])

    def _d2h_qkv(self, e):
        """The attention hand-off: q, k, v as one packed transfer (started by pre_attn)."""
        key = (e.step, e.layer, e.micro_batch)
        packed = self.kv.to_host(self.qkv.pop(key))[0]  # [b, 1, Hq + 2·Hkv, d]
        hq, hkv = self.cfg.num_heads, self.cfg.num_kv_heads
        self.host[key] = (packed[:, :, :hq], packed[:, :, hq:hq + hkv],
                          packed[:, :, hq + hkv:])

    def _h2d_attn(self, e):
        key = (e.step, e.layer, e.micro_batch)
        self.o[key] = self._ready(self.kv.to_device(
            self.host.pop(key), getattr(self.w, "activation_sharding", None)))

    # ------------------------------------------------------------------ compute
    def _embed(self, e):
        k = e.micro_batch
        tok = self.tokens[k] if e.stage == "prefill" else self.nxt[k][:, None]
        self.x[k] = self._ready(ops.embed(self.cfg, self.embed_params, tok))

    def _pre_attn(self, e):
        pos = self._prefill_pos(e) if e.stage == "prefill" else self._pos(e)[:, None]
        moe, key = self.cfg.is_moe_layer(e.layer), (e.step, e.layer, e.micro_batch)
        args = (self.cfg, moe, self.w.device_params(e.layer), self.x[e.micro_batch], pos)
        if e.stage == "decode" and self.kv is not None:  # to the host as one transfer
            packed = ops.pre_attention_packed(*args)
            packed.copy_to_host_async()
            self.qkv[key] = self._ready(packed)
            return
        qkv = ops.pre_attention(*args)
        self.qkv[key] = self._ready(qkv)
        if e.stage == "prefill" and self.kv is not None:
            self.new_kv[key] = qkv[1:]

    def _attn(self, e):
        key, k = (e.step, e.layer, e.micro_batch), e.micro_batch
        q, kk, v = self.qkv.pop(key)
        cache = self.dev_cache[(e.layer, k)] if self.dev_cache is not None else None
        if e.stage == "prefill":
            if cache is not None:
                cache[0], cache[1] = ops.write_prefill(cache[0], cache[1], kk, v)
            o = ops.attend(q, kk, v, self.masks[k])
        else:
            o, cache[0], cache[1] = ops.decode_attention(cache[0], cache[1], q, kk, v,
                                                         self._pos(e))
        self.o[key] = self._ready(o)

    def _cpu_attn(self, e):
        key = (e.step, e.layer, e.micro_batch)
        q, k, v = self.host.pop(key)
        r = self.rows[e.micro_batch]
        self.host[key] = self.kv.decode_host(e.layer, r, q, k, v,
                                             self.lengths[r] + e.step - 1)

    def _post_attn(self, e):
        cfg, i, k = self.cfg, e.layer, e.micro_batch
        moe = cfg.is_moe_layer(i)
        lp = self.w.device_params(i)
        if moe:
            lp = {**lp, "experts": self.w.wait(i, e.step)}
        o = self.o.pop((e.step, i, k))
        h, normed, w, ids, counts = ops.post_attention(cfg, moe, lp, self.x[k], o)
        if moe:  # read after the run: no sync here
            self.router_counts.setdefault(e.stage, []).append(counts)
        # the capacity bucket is picked on the device: no host read of the counts
        self.x[k] = y = self._ready(ops.ffn(cfg, moe, lp, h, normed, w, ids,
                                            mesh=getattr(self.w, "mesh", None)))
        if moe and k == self.last_mb:
            self.w.release(i, e.step, fence=y)  # its pages' next user waits for y

    def _head(self, e):
        k, r = e.micro_batch, self.rows[e.micro_batch]
        x = self.x.pop(k)
        if e.stage == "prefill":
            if self.full_logits:
                self.logits[k] = np.asarray(ops.head(self.cfg, self.head_params, x))
            x = x[jnp.arange(x.shape[0]), self.last[k]][:, None]
        if self.sampling is None:
            nxt = ops.next_tokens(self.cfg, self.head_params, x)
        else:
            key, args, idx = self.sampling
            nxt = ops.sampled_tokens(self.cfg, self.head_params, x, key, idx[k],
                                     jnp.int32(e.step), *args)
        self.nxt[k] = nxt
        self.out[e.step, r] = np.asarray(nxt)
        if k == self.policy.num_micro_batches - 1:
            self._step_done(e.step)

    def _step_done(self, step: int):
        self.steps_run = step + 1
        if self.eos is not None:
            self.done |= np.isin(self.out[step], self.eos)
        if self.on_step is not None:
            self.on_step(step)
        if self.eos is not None and self.done.all():
            raise StopTimeline()

    def expert_imbalance(self, stage: str | None = None) -> float:
        """The `Workload.expert_imbalance` this run's routing shows in `stage` (None:
        both): `schedule.routing.fit_imbalance` of its router calls, the figure under
        which their expected max counts add up to theirs; 1 where there were none."""
        calls = [np.asarray(c) for st, cs in self.router_counts.items()
                 if stage in (None, st) for c in cs]
        return fit_imbalance(calls, self.cfg.top_k)

    def tokens_out(self, n_rows: int) -> list[list[int]]:
        """New tokens of the first n_rows rows, cut after their first EOS."""
        out = []
        for r in range(n_rows):
            row = [int(t) for t in self.out[:self.steps_run, r]]
            ends = [j for j, t in enumerate(row) if t in (self.eos or ())]
            if ends:
                row = row[:ends[0] + 1]
            out.append(row)
        return out




class SweepRun(BatchRun):
    """One continuous-batching sweep (`timeline.build_sweep`, docs/design.md §7) over a
    `PagedKVCache`: the handlers of BatchRun with per-micro-batch rows of sequences.

    decode   per micro-batch (seqs, tokens, positions, request_index, steps): each row's
             last token, its position (context − 1), its stream and tokens so far
    prefill  per micro-batch (seqs, prompts, request_index)
    Micro-batch ids: decode 0..n_d−1, prefill n_d..; a decode micro-batch is padded to
    `padded_rows(rows, ubs)` rows, a prefill one to `prefill_device_rows` × `padded_len` of
    its longest prompt (the timeline's sizes), so shapes repeat across sweeps;
    CPU attention and the KV cache see only the real rows. `results[k]`: the next token of
    micro-batch k's real rows.
    """

    def __init__(self, cfg, weights, kv, policy, ubs: int, decode, prefill,
                 sampling=None):
        self.cfg, self.w, self.kv, self.policy = cfg, weights, kv, policy
        n_d, mbs = len(decode), list(decode) + list(prefill)
        self.last_mb = n_d - 1 if n_d else len(mbs) - 1  # build_sweep's order
        self.seqs = [list(m[0]) for m in mbs]
        self.n_real = [len(s) for s in self.seqs]

        def pad(a, fill, rows):
            a = np.asarray(a)
            return np.concatenate([a, np.full(rows - len(a), fill, a.dtype)])

        self.tokens, self.masks, self.prefill_positions, self.last = {}, {}, {}, {}
        self.decode_pos, self.prompt_lens = {}, {}
        self.nxt, idx, steps = {}, [], []
        for k, (seqs, tok, pos, req, st) in enumerate(decode):
            rows = padded_rows(len(seqs), ubs)
            self.nxt[k] = jnp.asarray(pad(np.asarray(tok, np.int32), 0, rows))
            self.decode_pos[k] = np.asarray(pos, np.int64)
            self.decode_pos[(k, "dev")] = jnp.asarray(pad(np.asarray(pos, np.int32), 0, rows))
            idx.append(pad(np.asarray(req, np.int32), 0, rows))
            steps.append(pad(np.asarray(st, np.int32), 0, rows))
        for j, (seqs, prompts, req) in enumerate(prefill):
            k = n_d + j
            lens = np.array([len(p) for p in prompts], np.int64)
            t = padded_len(int(lens.max()))
            rows = prefill_device_rows(lens, ubs, policy.prefill_micro_batch_tokens)
            tok = np.zeros((rows, t), np.int32)
            for r in range(rows):  # padding rows repeat the first prompt
                p = prompts[r] if r < len(prompts) else prompts[0]
                tok[r, :len(p)] = p
            lens = pad(lens, lens[0], rows)
            self.prompt_lens[k] = lens[:len(prompts)]
            self.tokens[k] = jnp.asarray(tok)
            am = np.arange(t)[None, :] < lens[:, None]
            self.masks[k] = causal_mask(jnp.asarray(am, jnp.int32))
            self.prefill_positions[k] = jnp.broadcast_to(jnp.arange(t), (rows, t))
            self.last[k] = jnp.asarray(lens - 1)
            idx.append(pad(np.asarray(req, np.int32), 0, rows))
            steps.append(np.zeros(rows, np.int32))
        self.device_rows = tuple(len(i) for i in idx)
        g = weights.global_params()
        self.embed_params, self.head_params = {"embed": g["embed"]}, g
        self.block_ops = not getattr(weights, "accelerator_path", False)
        self.sampling = None
        if sampling is not None and not sampling.greedy:
            self.sampling = (jnp.asarray(sampling.base_key()), sampling.args(),
                             [jnp.asarray(i) for i in idx], [jnp.asarray(s) for s in steps])
        self.results: dict[int, np.ndarray] = {}
        self.x, self.qkv, self.host, self.o = {}, {}, {}, {}
        self.new_kv, self.router_counts, self.dev_cache = {}, {}, None
        self.full_logits, self.on_step, self.eos = False, None, None

    def _prefill_pos(self, e):
        return self.prefill_positions[e.micro_batch]

    def _pos(self, e):
        return self.decode_pos[(e.micro_batch, "dev")]

    def _d2h_kv(self, e):
        k = e.micro_batch
        kh, vh = self.kv.to_host(*self.new_kv.pop((e.step, e.layer, k)))
        n = self.n_real[k]
        self.kv.write_prefill(e.layer, self.seqs[k], kh[:n], vh[:n], self.prompt_lens[k])

    def _cpu_attn(self, e):
        key, k = (e.step, e.layer, e.micro_batch), e.micro_batch
        q, kk, v = self.host.pop(key)
        n = self.n_real[k]
        o = self.kv.decode_host(e.layer, self.seqs[k], q[:n], kk[:n], v[:n],
                                self.decode_pos[k])
        if n < q.shape[0]:  # padding rows: zeros (their output is dropped)
            o = np.concatenate([o, np.zeros((q.shape[0] - n,) + o.shape[1:], o.dtype)])
        self.host[key] = o

    def _head(self, e):
        k = e.micro_batch
        x = self.x.pop(k)
        if e.stage == "prefill":
            x = x[jnp.arange(x.shape[0]), self.last[k]][:, None]
        if self.sampling is None:
            nxt = ops.next_tokens(self.cfg, self.head_params, x)
        else:
            key, args, idx, steps = self.sampling
            nxt = ops.sampled_tokens(self.cfg, self.head_params, x, key, idx[k], steps[k],
                                     *args)
        self.results[k] = np.asarray(nxt)[:self.n_real[k]]
