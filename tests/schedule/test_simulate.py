"""The simulator prices the timeline with the same op costs as predict()."""

import pytest

from moejax.model_config import get_model
from moejax.model_config.hardware import get_hardware
from moejax.model_config.workload import Workload
from moejax.schedule.policy import Policy
from moejax.schedule.predict import predict
from moejax.schedule.simulate import price, simulate
from moejax.schedule.timeline import build_timeline

M, HW = get_model("mixtral_8x7b"), get_hardware("l4")


@pytest.mark.parametrize("ubs,n_ub,wg,prompt", [
    (64, 4, 0.0, 77), (128, 8, 0.2, 77), (324, 14, 0.056, 77), (32, 1, 0.0, 77),
    (64, 4, 0.9, 77),  # the first output waits behind the resident copy
    (256, 1, 1.0, 512),  # one micro-batch: nothing overlaps within a layer
])
@pytest.mark.parametrize("overlap", [True, False])
def test_simulated_stage_times_agree_with_predict(ubs, n_ub, wg, prompt, overlap):
    pol = Policy.from_micro_batches(ubs, n_ub, gpu_weight_fraction=wg, overlap=overlap)
    tl = build_timeline(M, pol, prompt_len=prompt, decode_steps=4)
    sim = simulate(tl, M, HW, pol)
    pred = predict(M, HW, Workload(prompt, 5), pol)
    assert sim.stage_s(tl, "prefill") == pytest.approx(pred.prefill_s, rel=0.03)
    # serial: the same sums; overlapped: list scheduling sees bubbles the closed form
    # (`predict._layer_stalls`) approximates
    tol = 0.03 if not overlap else 0.10
    assert sim.stage_s(tl, "decode") == pytest.approx(pred.decode_s, rel=tol)


def test_overlap_is_faster_than_serial():
    times = []
    for overlap in (True, False):
        pol = Policy.from_micro_batches(64, 4, overlap=overlap)
        tl = build_timeline(M, pol, prompt_len=77, decode_steps=2)
        times.append(simulate(tl, M, HW, pol).makespan_s)
    assert times[0] < 0.8 * times[1]


def test_serial_makespan_is_sum_of_prices():
    pol = Policy.from_micro_batches(8, 2, overlap=False)
    tl = build_timeline(get_model("tiny_mixtral"), pol, prompt_len=4, decode_steps=2)
    sim = simulate(tl, get_model("tiny_mixtral"), HW, pol)
    total = sum(price(e, get_model("tiny_mixtral"), HW, pol) for e in tl)
    assert sim.makespan_s == pytest.approx(total)
    assert sum(sim.busy_s.values()) == pytest.approx(total)


@pytest.mark.parametrize("ubs,n_ub", [(64, 4), (16, 1)])
def test_shared_cores_steady_state_agrees_with_predict(ubs, n_ub):
    hw = HW.replace(device_is_host=True, cpu_cores=2, h2d_bytes_per_s=HW.h2d_bytes_per_s / 4)
    pol = Policy.from_micro_batches(ubs, n_ub, gpu_weight_fraction=0.5)
    tl = build_timeline(M, pol, prompt_len=77, decode_steps=4)
    sim = simulate(tl, M, hw, pol)
    pred = predict(M, hw, Workload(77, 5), pol)
    assert sim.stage_s(tl, "decode") == pytest.approx(pred.decode_s, rel=0.15)


def test_shared_cores_slow_concurrent_compute_and_copies():
    """Two cores, a copy (1 core) next to compute (2 cores): each runs at 2/3 speed."""
    pol = Policy.from_micro_batches(64, 1, gpu_weight_fraction=0.0, attention_device="gpu",
                                    kv_cache_device="gpu")
    tl = build_timeline(M, pol, prompt_len=77, decode_steps=1)
    alone = simulate(tl, M, HW.replace(cpu_cores=2), pol)
    shared = simulate(tl, M, HW.replace(cpu_cores=2, device_is_host=True), pol)
    assert shared.makespan_s > alone.makespan_s
    assert shared.busy_s == pytest.approx(alone.busy_s)


def test_copies_that_take_more_cores_slow_the_timeline():
    pol = Policy.from_micro_batches(64, 2, gpu_weight_fraction=0.0)
    tl = build_timeline(M, pol, prompt_len=77, decode_steps=1)
    hw = HW.replace(cpu_cores=2, device_is_host=True)
    light, heavy = (simulate(tl, M, hw.replace(copy_core_demand=d), pol) for d in (1.0, 3.0))
    assert heavy.makespan_s > light.makespan_s


def test_prices_count_pages_as_transfers_and_host_contention():
    """Hand model: a page is one transfer (the FFN reads it where it lands); CPU
    attention beside the link reads host memory with its 288 streamed bytes and 3
    micro-batches' q/k/v and outputs (MoE-Lens contention)."""
    from moejax.schedule import costs
    from tests.schedule.hand import HW as H, M as HM

    hw = H.replace(cpu_flops_per_s=1e6)  # attention memory-bound: contention visible
    pol = Policy.from_micro_batches(2, 3, gpu_weight_fraction=0.25, page_bytes=100)
    tl = build_timeline(HM, pol, prompt_len=3, decode_steps=1)
    first = next(e for e in tl if e.op == "page" and e.page == 0)
    assert first.nbytes == 96 and price(first, HM, hw, pol) == pytest.approx(
        costs.h2d_s(hw, first.nbytes))
    attn = next(e for e in tl if e.op == "cpu_attn")
    io = 288 + 3 * (costs.qkv_bytes(HM, 2) + costs.attn_out_bytes(HM, 2))
    assert price(attn, HM, hw, pol) == pytest.approx(
        costs.cpu_attention_s(HM, hw, 2, 4, concurrent_host_bytes=io / 3))
    serial = pol.replace(overlap=False)  # nothing beside it: no contention
    assert price(attn, HM, hw, serial) < price(attn, HM, hw, pol)
