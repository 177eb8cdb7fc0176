"""The static CGOPipe timeline, checked without running a model."""

from collections import Counter

import numpy as np
import pytest

from moejax.model_config import get_model
from moejax.model_config.hardware import get_hardware
from moejax.schedule.policy import Policy
from moejax.schedule.simulate import simulate
from moejax.schedule.timeline import StreamPlan, build_sweep, build_timeline, stage_seconds

CFG = get_model("tiny_mixtral")  # 2 layers, 4 experts; W_E = 4·3·64·96·4 B = 294912 B


def _timeline(n_ub=3, wg=0.25, page_bytes=40_000, steps=3, **kw):
    pol = Policy.from_micro_batches(4, n_ub, gpu_weight_fraction=wg, page_bytes=page_bytes,
                                    **kw)
    return pol, build_timeline(CFG, pol, prompt_len=8, decode_steps=steps)


def test_deps_point_backwards():
    _, tl = _timeline()
    assert all(d < e.id for e in tl for d in e.deps)
    assert [e.id for e in tl] == list(range(len(tl)))


def test_each_layer_and_micro_batch_computed_once():
    _, tl = _timeline(n_ub=3, steps=3)
    for op in ("pre_attn", "post_attn"):
        c = Counter((e.stage, e.step, e.layer, e.micro_batch) for e in tl if e.op == op)
        assert len(c) == (1 + 3) * CFG.num_layers * 3 and set(c.values()) == {1}
    attn = Counter((e.step, e.layer, e.micro_batch) for e in tl if e.op == "cpu_attn")
    assert len(attn) == 3 * CFG.num_layers * 3 and set(attn.values()) == {1}


def _ancestors(tl):
    """{id: bitmask of the entries that finish before it starts}: its deps, and the
    entries before it on its resource (each resource runs its entries in list order),
    transitively."""
    anc, last = [0] * len(tl), {}
    for e in tl:
        preds = set(e.deps) | ({last[e.resource]} if e.resource in last else set())
        for d in preds:
            anc[e.id] |= anc[d] | (1 << d)
        last[e.resource] = e.id
    return anc


def _needs(tl, pol):
    """(entry, [entries whose output it reads]) for every entry: CGOPipe's data flow."""
    at = {(e.op, e.stage, e.step, e.layer, e.micro_batch): e.id for e in tl}
    passes = sorted({(e.stage != "prefill", e.step, e.layer) for e in tl})
    pos = {p: i for i, p in enumerate(passes)}
    pages = {}
    for e in tl:
        if e.op == "page":
            pages.setdefault(pos[(e.stage != "prefill", e.step, e.layer)], []).append(e.id)
    last = CFG.num_layers - 1
    for e in tl:
        key = (e.stage, e.step, e.layer, e.micro_batch)
        p = pos.get((e.stage != "prefill", e.step, e.layer))
        prev_pass = passes[p - 1] if p else None
        if e.op == "embed":
            need = [at[("head", "prefill" if e.step == 1 else "decode", e.step - 1, last,
                        e.micro_batch)]] if e.step else []
        elif e.op == "pre_attn":
            need = [at[("embed", *key)] if e.layer == 0 else at[
                ("post_attn", e.stage, prev_pass[1], prev_pass[2], e.micro_batch)]]
        elif e.op in ("d2h_qkv", "attn", "d2h_kv"):
            need = [at[("pre_attn", *key)]]
        elif e.op == "cpu_attn":
            need = [at[("d2h_qkv", *key)]]
            if pol.kv_cache_device == "cpu":
                need.append(at[("d2h_kv", "prefill", 0, e.layer, e.micro_batch)])
        elif e.op == "h2d_attn":
            need = [at[("cpu_attn", *key)]]
        elif e.op == "post_attn":
            out = "h2d_attn" if ("h2d_attn", *key) in at else "attn"
            need = [at[(out, *key)]] + pages.get(p, [])
        elif e.op == "head":
            need = [at[("post_attn", *key)]]
        elif e.op == "page":
            first = pages[p][0] == e.id
            old = passes[p - 2] if p >= 2 else None  # the slot's previous user
            need = [i for i in (at.get(("post_attn", "decode" if old[0] else "prefill",
                                        old[1], old[2], k))
                                for k in range(pol.num_micro_batches))] if first and old \
                else []
        yield e, need


@pytest.mark.parametrize("kw", [dict(), dict(n_ub=1), dict(overlap=False),
                                dict(attention_device="gpu", kv_cache_device="gpu"),
                                dict(wg=0.0, page_bytes=20_000)],
                         ids=["cpu-attn", "one-micro-batch", "serial", "gpu-attn",
                              "more-pages"])
def test_every_op_starts_after_the_ops_whose_output_it_reads(kw):
    pol, tl = _timeline(**kw)
    anc = _ancestors(tl)
    checked = 0
    for e, need in _needs(tl, pol):
        for d in need:
            assert anc[e.id] >> d & 1, (e, tl[d])
            checked += 1
    assert checked > len(tl)  # the data flow was found, not skipped


def test_post_attention_follows_every_page_of_its_layer():
    _, tl = _timeline()
    pages = {}
    for e in tl:
        if e.op == "page":
            pages.setdefault((e.stage, e.step, e.layer), set()).add(e.id)
    assert pages  # wg < 1: something streams
    for e in tl:
        if e.op == "post_attn":
            assert pages[(e.stage, e.step, e.layer)] <= set(e.deps)


def test_pages_cover_streamed_bytes_with_uneven_last_page():
    pol, tl = _timeline(wg=0.25, page_bytes=40_000)
    streamed = round(0.75 * CFG.expert_bytes_per_layer())
    sizes = [e.nbytes for e in tl if e.op == "page" and e.stage == "prefill" and e.layer == 0]
    page = CFG.page_nbytes(40_000)  # whole FFN columns: 13 of 3072 B
    assert sum(sizes) == streamed and sizes[-1] == streamed % page and page <= 40_000


def test_fully_resident_weights_stream_nothing():
    _, tl = _timeline(wg=1.0)
    assert not [e for e in tl if e.op == "page"]


def test_gpu_order_is_cgopipe():
    _, tl = _timeline(n_ub=3, steps=1)
    gpu = [(e.op, e.micro_batch) for e in tl if e.resource == "gpu" and e.stage == "decode"
           and e.layer == 1 and e.op in ("pre_attn", "post_attn")]
    assert gpu == [("pre_attn", 0), ("pre_attn", 1), ("post_attn", 0), ("pre_attn", 2),
                   ("post_attn", 1), ("post_attn", 2)]


def test_activations_interleave_with_next_layer_pages():
    _, tl = _timeline(n_ub=3, steps=1)
    h2d = [e for e in tl if e.resource == "h2d" and e.stage == "decode"]
    outs = [i for i, e in enumerate(h2d) if e.op == "h2d_attn" and e.layer == 0]
    nxt = [i for i, e in enumerate(h2d) if e.op == "page" and e.layer == 1]
    assert len(outs) == 3 and nxt
    assert nxt[0] < outs[0]  # the next layer's pages go first…
    assert any(outs[0] < i < outs[1] for i in nxt)  # …and between the outputs
    assert outs[-1] < nxt[-1]  # …the last output before the last chunk
    assert all(e.layer == 1 for e in h2d[outs[-1] + 1:nxt[-1] + 1])  # within this layer


def test_single_micro_batch_output_goes_before_the_next_layers_pages():
    _, tl = _timeline(n_ub=1, steps=1)
    h2d = [(e.op, e.layer) for e in tl if e.resource == "h2d" and e.stage == "decode"]
    out = h2d.index(("h2d_attn", 0))
    assert ("page", 1) in h2d and h2d.index(("page", 1)) > out


L4 = get_hardware("l4")
# compute-bound: pages arrive long before the device frees their slot, so only the
# slot-free edge keeps a third layer's pages from landing
COMPUTE_BOUND = L4.replace(gpu_memory_bytes_per_s=L4.gpu_memory_bytes_per_s / 1000,
                           device_op_overhead_s=1e-3)


@pytest.mark.parametrize("hw", [L4, COMPUTE_BOUND], ids=["l4", "compute-bound"])
@pytest.mark.parametrize("overlap", [True, False])
def test_at_most_two_device_buffer_slots_live(overlap, hw):
    pol, tl = _timeline(n_ub=2, wg=0.0, steps=2, overlap=overlap)
    sim = simulate(tl, CFG, hw, pol)
    live = {}
    for e in tl:
        key = (e.stage, e.step, e.layer)
        if e.op in ("page", "post_attn"):
            lo, hi = live.get(key, (float("inf"), 0.0))
            live[key] = (min(lo, sim.start_s[e.id]), max(hi, sim.end_s[e.id]))
    points = sorted(t for lo, hi in live.values() for t in (lo, hi))
    for t in points:
        assert sum(lo <= t < hi for lo, hi in live.values()) <= 2


def test_gpu_decode_attention_needs_device_kv_cache():
    with pytest.raises(ValueError, match="kv_cache_device='gpu'"):
        _timeline(attention_device="gpu", kv_cache_device="cpu")


def test_stream_plan_uniform_pages():
    pol = Policy.from_micro_batches(1, 1, gpu_weight_fraction=0.0, page_bytes=100_000)
    plan = StreamPlan.uniform(CFG, pol)
    assert plan.page_nbytes[0] == (98_304, 98_304, 98_304)  # 32 columns of 3·4·64·4 B


def test_a_pass_streams_exactly_its_non_resident_bytes():
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.5, page_bytes=100_000)
    plan = StreamPlan.uniform(CFG, pol)
    w = CFG.expert_bytes_per_layer()
    assert sum(plan.page_nbytes[0]) == round(0.5 * w)
    tl = build_timeline(CFG, pol, prompt_len=4, decode_steps=1, plan=plan)
    pages = [e for e in tl if e.op == "page" and e.stage == "decode" and e.layer == 0]
    assert sum(e.nbytes for e in pages) == sum(plan.page_nbytes[0])


def test_a_timeline_without_decode_steps_has_zero_decode_time():
    pol, tl = _timeline(steps=0)
    end = np.arange(1, len(tl) + 1, dtype=float)
    assert stage_seconds(tl, end, "decode") == 0.0
    assert stage_seconds(tl, end, "prefill") > 0


# ------------------------------------------------------------------ sweeps
def _sweep(decode=([9, 10, 12], [20]), prefill=([5, 17],), **kw):
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.25, page_bytes=40_000)
    return pol, build_sweep(CFG, pol, list(decode), list(prefill), step=3, **kw)


def test_sweep_micro_batches_stages_and_sizes():
    _, tl = _sweep()
    assert all(d < e.id for e in tl for d in e.deps) and {e.step for e in tl
                                                            if e.op != "page"} == {3}
    sizes = {(e.micro_batch, e.stage, e.tokens, e.context) for e in tl
             if e.op == "pre_attn"}
    # decode: device rows padded to a power of two (3 -> 4), context = ⌈Σ contexts /
    # rows⌉, CPU attention over the real rows; prefill: 2 rows padded to 32 positions
    assert sizes == {(0, "decode", 4, 11), (1, "decode", 1, 20), (2, "prefill", 64, 32)}
    assert {(e.micro_batch, e.tokens, e.context) for e in tl if e.op == "cpu_attn"} == {
        (0, 3, 11), (1, 1, 20)}
    ops = Counter((e.op, e.micro_batch) for e in tl if e.op != "page")
    L = CFG.num_layers
    for k in (0, 1):
        assert ops[("cpu_attn", k)] == ops[("h2d_attn", k)] == L and ops[("attn", k)] == 0
    assert ops[("attn", 2)] == ops[("d2h_kv", 2)] == L and ops[("cpu_attn", 2)] == 0
    heads = {e.micro_batch: e.tokens for e in tl if e.op == "head"}
    assert heads == {0: 4, 1: 1, 2: 2}  # one token per device row
    for k in range(3):  # embed opens, head closes every micro-batch
        own = [e for e in tl if e.micro_batch == k]
        assert own[0].op == "embed" and own[-1].op == "head"


@pytest.mark.parametrize("first, nxt", [(True, True), (False, True), (True, False)])
def test_sweep_pages(first, nxt):
    _, tl = _sweep(first_pages=first, next_pages=nxt)
    pages = Counter((e.step, e.layer) for e in tl if e.op == "page")
    per_layer = len(StreamPlan.uniform(CFG, _sweep()[0]).page_nbytes[0])
    want = {(3, 0): per_layer * first, (3, 1): per_layer, (4, 0): per_layer * nxt}
    assert pages == {k: v for k, v in want.items() if v}
    posts = [e for e in tl if e.op == "post_attn"]
    ids = {e.id for e in tl}
    for e in posts:  # every post-attention waits for all its layer's pages of this sweep
        own = {p.id for p in tl if p.op == "page" and (p.step, p.layer) == (3, e.layer)}
        assert own <= set(e.deps) and set(e.deps) <= ids


def test_sweep_data_flow():
    _, tl = _sweep()
    anc = _ancestors(tl)
    at = {(e.op, e.layer, e.micro_batch): e.id for e in tl if e.op != "page"}
    last = CFG.num_layers - 1
    for (op, layer, k), i in at.items():
        need = {"pre_attn": [("embed", 0, k) if layer == 0 else ("post_attn", layer - 1, k)],
                "head": [("post_attn", last, k)],
                "cpu_attn": [("d2h_qkv", layer, k)], "h2d_attn": [("cpu_attn", layer, k)],
                "attn": [("pre_attn", layer, k)], "d2h_kv": [("pre_attn", layer, k)],
                "post_attn": [("h2d_attn" if ("h2d_attn", layer, k) in at else "attn",
                               layer, k)]}.get(op, [])
        for key in need:
            assert anc[i] >> at[key] & 1, (op, layer, k, key)


def test_sweep_decode_only_and_prefill_only_and_errors():
    _, dec = _sweep(prefill=())
    _, pre = _sweep(decode=())
    assert {e.stage for e in dec} == {"decode"}
    assert {e.stage for e in pre if e.op != "page"} == {"prefill"}
    assert {e.micro_batch for e in pre if e.op == "embed"} == {0}
    pol = Policy.from_micro_batches(4, 2, attention_device="gpu", kv_cache_device="gpu")
    with pytest.raises(ValueError, match="attention_device='cpu'"):
        build_sweep(CFG, pol, [[3]], [])
    with pytest.raises(ValueError, match="non-empty"):
        build_sweep(CFG, _sweep()[0], [[]], [])
    with pytest.raises(ValueError, match="at least one"):
        build_sweep(CFG, _sweep()[0], [], [])
