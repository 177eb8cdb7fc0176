"""CGOPipe's static timeline (docs/design.md §3; MoE-Lightning §4): a Policy as a list of
`Entry`s, list order = execution order per resource, deps only backwards. `simulate`
prices it and `executor` runs it, so prediction and execution share one schedule. Pass
p = step·L + layer; pass p's pages land in slot p mod 2 and wait for pass p−1's end.
Order of pass p, micro-batches k = 0..n−1, attention on the CPU:
  gpu: pre(p,0), pre(p,1), post(p,0), pre(p,2), post(p,1), …, post(p,n−1)
  d2h: qkv(p,k)…   cpu: attn(p,k)…   h2d: pages(p+1, chunk k), out(p,k), …
except that out(p,n−1) goes before its chunk: the last post-attention frees the slot
pass p+2 waits for, so it must not queue behind pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from moejax.model_config.model import ModelConfig
from moejax.schedule.policy import (PAD_MULTIPLE, Policy, padded_len, padded_rows,
                                    prefill_device_rows)

RESOURCES = ("gpu", "cpu", "h2d", "d2h")
# op → resource. "attn" runs on the gpu (prefill, or decode with attention_device="gpu").
OPS = {"page": "h2d", "embed": "gpu", "pre_attn": "gpu", "attn": "gpu", "d2h_qkv": "d2h",
       "cpu_attn": "cpu", "h2d_attn": "h2d", "d2h_kv": "d2h", "post_attn": "gpu",
       "head": "gpu"}


@dataclass(frozen=True)
class Entry:
    """One op: `tokens` activation rows, `context` keys per query, a page's `nbytes`."""

    id: int
    resource: str
    op: str
    stage: str  # "prefill" | "decode"
    step: int  # 0 for prefill, 1.. for decode steps
    layer: int
    micro_batch: int = -1
    page: int = -1
    deps: tuple[int, ...] = ()
    tokens: int = 0
    context: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class StreamPlan:
    """Per layer: `page_nbytes` of its streamed expert pages (empty: none streams). The
    FFN reads each page where it lands, so a page is one transfer and nothing more."""

    page_nbytes: tuple[tuple[int, ...], ...]

    @classmethod
    def uniform(cls, cfg: ModelConfig, policy: Policy) -> "StreamPlan":
        """Full pages (`cfg.page_nbytes(policy.page_bytes)`) over (1 − wg)·W_E bytes, the
        last one partial."""
        page, layers = cfg.page_nbytes(policy.page_bytes), []
        for i in range(cfg.num_layers):
            w = cfg.expert_bytes_per_layer() if cfg.is_moe_layer(i) else 0
            full, rest = divmod(round((1 - policy.gpu_weight_fraction) * w), page)
            layers.append((page,) * full + ((rest,) if rest else ()))
        return cls(tuple(layers))


class _Builder:
    def __init__(self, cfg: ModelConfig, policy: Policy, plan: StreamPlan):
        self.cfg, self.policy, self.plan = cfg, policy, plan
        self.entries: list[Entry] = []
        self.pages: dict[int, list[int]] = {}  # pass → ids of its page loads
        self.slot_free: dict[int, int] = {}  # pass → id after which its slot is free
        self.kv_written: dict[tuple[int, int], int] = {}  # (layer, mb) → prefill d2h_kv

    def add(self, op, stage, step, layer, mb=-1, page=-1, deps=(), **sizes) -> int:
        i = len(self.entries)
        self.entries.append(Entry(i, OPS[op], op, stage, step, layer, mb, page,
                                  tuple(d for d in deps if d is not None), **sizes))
        return i

    def page_chunks(self, p: int, stage: str, step: int, layer: int, n: int):
        """Issue-ready page loads of pass p split into n chunks (lists of thunks)."""
        sizes = self.plan.page_nbytes[layer]
        chunks = [[] for _ in range(n)]
        for j, nbytes in enumerate(sizes):
            chunks[j * n // max(len(sizes), 1)].append((j, nbytes))
        self.pages[p] = []

        def emit(chunk):
            for j, nbytes in chunk:
                dep = self.slot_free.get(p - 2) if not self.pages[p] else None
                self.pages[p].append(self.add("page", stage, step, layer, page=j,
                                              deps=(dep,), nbytes=nbytes))
        return [lambda c=c: emit(c) for c in chunks]


def _pass_schedule(b: _Builder, p, step, layer, nxt, prev_out, mbs, cpu_attention: bool,
                   order=None):
    """Entries of one pass over micro-batches `mbs` = [(stage, tokens, context, host
    tokens)] by id (host tokens: the rows its CPU attention reads, tokens the device's),
    taken in `order` (default: by id); returns each micro-batch's last op (post_attn), by
    id. A decode micro-batch with CPU attention interleaves its output with a chunk of
    the next pass's pages; in a pass with none, every chunk precedes the first post."""
    n = len(mbs)
    order = list(range(n)) if order is None else list(order)
    chunks = b.page_chunks(p + 1, *nxt, n) if nxt else [lambda: None] * n
    via_host = [st == "decode" and cpu_attention for st, *_ in mbs]
    pre, out, post = [None] * n, [None] * n, [None] * n
    pages = lambda: tuple(b.pages.get(p, ()))

    def pre_attn(k):
        stage, tokens, context, host = mbs[k]
        sizes = dict(tokens=tokens, context=context)
        pre[k] = b.add("pre_attn", stage, step, layer, k, deps=(prev_out[k],), **sizes)
        if not via_host[k]:
            # the host KV cache receives the new k, v (prefill: the whole prompt)
            if stage == "prefill" and b.policy.kv_cache_device == "cpu":
                b.kv_written[(layer, k)] = b.add("d2h_kv", stage, step, layer, k,
                                                 deps=(pre[k],), **sizes)
            out[k] = b.add("attn", stage, step, layer, k, deps=(pre[k],), **sizes)
        else:  # the first decode attention reads the prompt's k, v from the host cache
            q = b.add("d2h_qkv", stage, step, layer, k, deps=(pre[k],), **sizes)
            out[k] = b.add("cpu_attn", stage, step, layer, k,
                           deps=(q, b.kv_written.get((layer, k))), tokens=host,
                           context=context)

    def post_attn(i):  # i: position in `order`
        k = order[i]
        stage, tokens, context, _ = mbs[k]
        if via_host[k]:
            # the last output goes before its chunk (module docstring)
            emit_out = lambda: b.add("h2d_attn", stage, step, layer, k, deps=(out[k],),
                                     tokens=tokens, context=context)
            if i == n - 1:
                out[k] = emit_out()
                chunks[i]()
            else:
                chunks[i]()
                out[k] = emit_out()
        elif any(via_host):
            chunks[i]()
        elif i == 0:
            for c in chunks:
                c()
        post[k] = b.add("post_attn", stage, step, layer, k, deps=(out[k],) + pages(),
                        tokens=tokens, context=context)

    pre_attn(order[0])
    for i in range(n):
        if i + 1 < n:
            pre_attn(order[i + 1])
        post_attn(i)
    b.slot_free[p] = post[order[-1]]
    return post


def build_timeline(cfg: ModelConfig, policy: Policy, prompt_len: int, decode_steps: int,
                   plan: StreamPlan | None = None) -> list[Entry]:
    """Prefill of `policy.batch_size` prompts of `prompt_len` tokens, then
    `decode_steps` decode steps (each one new token per sequence), as one timeline."""
    if prompt_len < 1 or decode_steps < 0:
        raise ValueError(f"prompt_len={prompt_len} must be >= 1 and decode_steps="
                         f"{decode_steps} >= 0")
    if decode_steps and policy.attention_device == "gpu" and policy.kv_cache_device == "cpu":
        raise ValueError("decode attention on the gpu needs kv_cache_device='gpu' "
                         "(streaming a host KV cache to the device is not scheduled)")
    b = _Builder(cfg, policy, plan or StreamPlan.uniform(cfg, policy))
    n, ubs, L = policy.num_micro_batches, policy.micro_batch_size, cfg.num_layers
    cpu_attention = policy.attention_device == "cpu"
    passes = [("prefill", 0, j) for j in range(L)] + [
        ("decode", s, j) for s in range(1, decode_steps + 1) for j in range(L)]
    b.page_chunks(0, "prefill", 0, 0, 1)[0]()  # the very first layer's pages
    prev = [None] * n
    for p, (stage, step, layer) in enumerate(passes):
        tokens = ubs * (prompt_len if stage == "prefill" else 1)
        context = prompt_len + step  # keys each query sees (decode: incl. the new one)
        if layer == 0:
            prev = [b.add("embed", stage, step, 0, k, deps=(prev[k],), tokens=tokens)
                    for k in range(n)]
        nxt = passes[p + 1] if p + 1 < len(passes) else None
        prev = _pass_schedule(b, p, step, layer, nxt, prev,
                              [(stage, tokens, context, tokens)] * n, cpu_attention)
        if layer == L - 1:
            prev = [b.add("head", stage, step, layer, k, deps=(prev[k],), tokens=ubs)
                    for k in range(n)]
    return b.entries


def sweep_micro_batches(decode, prefill, policy: Policy, multiple: int = PAD_MULTIPLE):
    """[(stage, tokens, context, host tokens)] of a sweep's micro-batches, decode first,
    with the runtime's padding (`padded_rows`, `prefill_device_rows`). A decode
    micro-batch of contexts c_i: tokens = its device rows, host tokens = its rows and
    context = ⌈Σ c_i / rows⌉ (host tokens × context ≥ Σ c_i, the keys its CPU attention
    reads). A prefill micro-batch of prompts s_i: context = padded_len(max s_i), tokens =
    device rows × context."""
    out, ubs, cap = [], policy.micro_batch_size, policy.prefill_micro_batch_tokens
    for stage, groups in (("decode", decode), ("prefill", prefill)):
        for g in groups:
            lens = [int(x) for x in g]
            if not lens or min(lens) < 1:
                raise ValueError(f"build_sweep: a {stage} micro-batch {list(g)!r} must "
                                 "be a non-empty list of positive lengths")
            if stage == "decode":
                out.append((stage, padded_rows(len(lens), ubs),
                            -(-sum(lens) // len(lens)), len(lens)))
            else:
                s = padded_len(max(lens), multiple)
                t = prefill_device_rows(lens, ubs, cap) * s
                out.append((stage, t, s, t))
    return out


def build_sweep(cfg: ModelConfig, policy: Policy, decode, prefill,
                plan: StreamPlan | None = None, *, step: int = 0, first_pages: bool = True,
                next_pages: bool = True) -> list[Entry]:
    """One continuous-batching sweep (docs/design.md §7): one forward over every layer =
    one pass over the streamed experts, serving decode micro-batches `decode` (per
    micro-batch its rows' contexts: keys each new token attends to, itself included;
    ids 0..n_d−1, CPU attention) and prefill micro-batches `prefill` (per micro-batch its
    prompt lengths; ids n_d..n_d+n_p−1, device attention, k/v to the host by d2h_kv).
    Every entry has `step=step`; pass p = step·L + layer, so slots alternate across
    sweeps. `first_pages`: layer 0's pages open the sweep (False: the previous sweep
    streamed them); `next_pages`: the next sweep's layer-0 pages (stage "decode", step+1)
    stream during the last layer. Deps into other sweeps are dropped (sweeps run one
    after another). Each micro-batch opens with embed and closes with head (tokens = rows).
    Within a layer the last decode micro-batch goes last (after the prefill ones): its
    output precedes its chunk of pages, so the slot frees one post-attention after it."""
    if policy.attention_device != "cpu" or policy.kv_cache_device != "cpu":
        raise ValueError("build_sweep: continuous batching runs decode attention on the "
                         "cpu next to the host KV cache (attention_device='cpu', "
                         "kv_cache_device='cpu')")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"build_sweep: step={step!r} must be an integer >= 0")
    mbs = sweep_micro_batches(decode, prefill, policy)
    if not mbs:
        raise ValueError("build_sweep: a sweep needs at least one micro-batch")
    b = _Builder(cfg, policy, plan or StreamPlan.uniform(cfg, policy))
    L, p0, first_stage = cfg.num_layers, step * cfg.num_layers, mbs[0][0]
    if first_pages:
        b.page_chunks(p0, first_stage, step, 0, 1)[0]()
    prev = [b.add("embed", st, step, 0, k, tokens=t) for k, (st, t, *_) in enumerate(mbs)]
    n_d = len(decode)
    order = list(range(n_d - 1)) + list(range(n_d, len(mbs))) + [n_d - 1] if n_d else None
    for layer in range(L):
        nxt = ((first_stage, step, layer + 1) if layer + 1 < L
               else ("decode", step + 1, 0) if next_pages else None)
        prev = _pass_schedule(b, p0 + layer, step, layer, nxt, prev, mbs, True, order)
    for k, (st, t, c, _) in enumerate(mbs):
        b.add("head", st, step, L - 1, k, deps=(prev[k],),
              tokens=t if st == "decode" else t // c)
    return b.entries


def stage_seconds(entries: list[Entry], end_s, stage: str) -> float:
    """Wall time [s] of `stage` from the previous stage's last non-page end (0 for
    prefill) to its own last end; 0 if it has no entries. Shared by simulator and trace."""
    end_of = lambda st: max((end_s[e.id] for e in entries
                             if e.stage == st and e.op != "page"), default=0.0)
    if not any(e.stage == stage for e in entries):
        return 0.0
    return float(end_of(stage) - (end_of("prefill") if stage == "decode" else 0.0))


def sweep_seconds(entries: list[Entry], end_s) -> float:
    """Wall time [s] of a sweep (`build_sweep`): its last end, the next sweep's pages
    included, since the next sweep starts after it (0 if empty)."""
    return float(max((end_s[e.id] for e in entries), default=0.0))
