"""The static CGOPipe timeline, checked without running a model."""

from collections import Counter

import numpy as np
import pytest

from moejax.model_config import get_model
from moejax.model_config.hardware import get_hardware
from moejax.schedule.policy import Policy
from moejax.schedule.simulate import simulate
from moejax.schedule.timeline import StreamPlan, build_timeline, stage_seconds

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
    assert sum(sizes) == streamed and sizes[-1] == streamed % 40_000


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


@pytest.mark.parametrize("overlap", [True, False])
def test_at_most_two_device_buffer_slots_live(overlap):
    pol, tl = _timeline(n_ub=2, wg=0.0, steps=2, overlap=overlap)
    sim = simulate(tl, CFG, get_hardware("l4"), pol)
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
    assert plan.page_nbytes[0] == (100_000, 100_000, 94_912)


def test_first_page_of_a_pass_copies_the_resident_prefix():
    pol = Policy.from_micro_batches(4, 2, gpu_weight_fraction=0.5, page_bytes=100_000)
    plan = StreamPlan.uniform(CFG, pol)
    w = CFG.expert_bytes_per_layer()
    assert plan.resident_nbytes[0] == w - sum(plan.page_nbytes[0]) > 0
    tl = build_timeline(CFG, pol, prompt_len=4, decode_steps=1, plan=plan)
    pages = [e for e in tl if e.op == "page"]
    assert all(e.copy_bytes == (plan.resident_nbytes[e.layer] if e.page == 0 else 0)
               for e in pages)


def test_a_timeline_without_decode_steps_has_zero_decode_time():
    pol, tl = _timeline(steps=0)
    end = np.arange(1, len(tl) + 1, dtype=float)
    assert stage_seconds(tl, end, "decode") == 0.0
    assert stage_seconds(tl, end, "prefill") > 0
