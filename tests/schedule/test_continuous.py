"""Continuous batching in the performance model: the closed-form sweep time against the
simulated `build_sweep` timeline, the admission process, the steady state by hand."""

import numpy as np
import pytest

from moejax.model_config import get_model
from moejax.model_config.hardware import get_hardware
from moejax.model_config.setups import get_setup
from moejax.model_config.workload import Workload
from moejax.schedule.continuous import (KVPlan, SweepShape, admission, admit, pack_prefill,
                                        predict_continuous, search_continuous,
                                        steady_state, sweep_s)
from moejax.schedule.policy import Policy
from moejax.schedule.simulate import simulate
from moejax.schedule.timeline import build_sweep
from tests.schedule import hand

MIXTRAL = get_model("mixtral_8x7b")
WL = Workload(77, 32)


def _sim_and_closed_form(m, hw, pol, decode, prefill):
    tl = build_sweep(m, pol, decode, prefill, first_pages=False, next_pages=True)
    sim = simulate(tl, m, hw, pol).sweep_s(tl)
    return sim, float(sweep_s(m, hw, WL, pol, SweepShape.of(decode, prefill, pol)))


@pytest.mark.parametrize("hw_name", ["l4", "l4_moe_lightning"])
@pytest.mark.parametrize("ubs, n, wg, decode, prefill", [
    (324, 14, 0.05, [[100] * 324] * 14, [[77] * 64]),
    (128, 8, 0.0, [[150] * 128] * 8, []),
    (256, 4, 0.1, [[90] * 256] * 4, [[77] * 16, [80] * 16]),
    (512, 4, 0.0, [[300] * 512] * 4, [[900] * 8]),  # long prompts: a heavy prefill
    (64, 2, 0.5, [[100] * 64] * 2, [[77] * 200]),
    (64, 1, 0.0, [], [[77] * 100]),  # prefill only
    (300, 10, 0.02, [list(range(100, 400))] * 10, [[60, 77, 90] * 10]),  # ragged
])
def test_sweep_time_agrees_with_simulated_sweep_on_l4(hw_name, ubs, n, wg, decode, prefill):
    pol = Policy.from_micro_batches(ubs, n, gpu_weight_fraction=wg)
    sim, cf = _sim_and_closed_form(MIXTRAL, get_hardware(hw_name), pol, decode, prefill)
    assert cf == pytest.approx(sim, rel=0.10)


@pytest.mark.parametrize("n, wg, decode, prefill", [
    (2, 0.0, [[5, 6]], [[3]]), (2, 0.5, [[5, 6], [7]], [[3, 4]]), (1, 0.0, [[9, 9, 9]], []),
    (1, 0.0, [], [[4, 4]]), (3, 0.25, [[5, 6, 7]] * 3, [[10]])])
def test_sweep_time_agrees_with_simulated_sweep_on_the_hand_model(n, wg, decode, prefill):
    pol = Policy.from_micro_batches(4, n, gpu_weight_fraction=wg, page_bytes=64)
    sim, cf = _sim_and_closed_form(hand.M, hand.HW, pol, decode, prefill)
    assert cf == pytest.approx(sim, rel=0.10)


def test_serial_sweep_is_the_sum_of_its_prices():
    pol = Policy.from_micro_batches(4, 2, page_bytes=64, overlap=False)
    decode, prefill = [[5, 6], [7, 8]], [[3, 4]]  # uniform groups: SweepShape is exact
    tl = build_sweep(hand.M, pol, decode, prefill, first_pages=False)
    sim = simulate(tl, hand.M, hand.HW, pol)
    assert sim.makespan_s == pytest.approx(sum(sim.busy_s.values()))
    cf = float(sweep_s(hand.M, hand.HW, WL, pol, SweepShape.of(decode, prefill, pol)))
    assert cf == pytest.approx(sim.sweep_s(tl), rel=1e-9)


def test_admission_by_hand():
    # KV 30 tokens, prefill budget 32 padded tokens (prompts pad to 16, 32)
    pol = Policy.from_micro_batches(2, 2, prefill_tokens_per_sweep=32)
    a = admission([(5, 3), (5, 2), (20, 1), (5, 4)], 30, pol)
    # sweep 0 admits two (8 + 7 = 15 reserved; the 21-token request waits for KV); sweep 1
    # decodes both; sweep 2 admits (20, 1) as (5, 2) has freed 7; then (5, 4) alone
    assert a.tokens.tolist() == [2, 2, 2, 1, 1, 1, 1]
    assert a.reserved_tokens.tolist() == [15, 15, 29, 9, 9, 9, 9]
    assert a.shape.n_p.tolist() == [1, 0, 1, 1, 0, 0, 0]
    assert a.shape.len_p.tolist() == [16, 0, 32, 16, 0, 0, 0]
    assert a.shape.ctx_d.tolist() == [0, 6, 7, 0, 6, 7, 8]  # keys = prompt + generated
    grow = admission([(5, 3), (5, 2), (20, 1), (5, 4)], 30,
                     pol.replace(kv_reservation="lookahead"))
    assert grow.reserved_tokens.tolist() == [12, 14, 29, 6, 7, 8, 9]  # p + tokens so far
    with pytest.raises(ValueError, match="exceeds the KV capacity"):
        admission([(40, 1)], 30, pol)


def test_kv_plan_in_blocks_frees_an_early_finisher():
    # blocks of 4, capacity 5 blocks; lookahead: a (p 5, g 4) holds ⌈(5+1+j)/4⌉ = 2,2,2,3
    plan = KVPlan(5, 8, unit=4, kv_reservation="lookahead")
    assert plan.try_reserve(5, 4, seq="a") and plan.now == 2
    assert plan.try_reserve(3, 2, seq="b")        # ⌈4/4⌉, ⌈5/4⌉ = 1, 2
    assert not plan.try_reserve(5, 4)             # sweep 1: 2 + 2 + 2 > 5
    plan.finish("b")                              # ended at sweep 0: its sweep 1 is free
    assert plan.try_reserve(3, 3, seq="c")        # 1, 2, 2: sweeps 4, 4, 4, 3 planned
    assert plan.now == 4 and not plan.try_reserve(5, 1)  # ⌈6/4⌉ = 2 > 1 left
    plan.advance()
    assert plan.now == 4 and plan.sweep == 1
    assert plan.try_reserve(1, 2) and not plan.try_reserve(1, 1)  # sweeps 1, 2 now full
    maxp = KVPlan(5, 8, unit=4)                   # "max": ⌈(p + g)/4⌉ from admission
    assert maxp.try_reserve(5, 4, seq="a") and maxp.now == 3 and maxp.tokens(5, 4, 2) == 9
    assert not maxp.try_reserve(5, 4)


def test_steady_state_by_hand():
    # p = 4, g = 3, M = 70 KV tokens, no concurrency or prefill cap
    wl = Workload(4, 3)
    lam, conc, sh = steady_state(wl, 70.0, ubs=4, concurrency=1000)
    # "max": each holds p + g = 7 tokens for g = 3 sweeps: λ = 70 / 21, C = λ·g = 10
    assert (float(lam), float(conc)) == pytest.approx((70 / 21, 10.0))
    # decode rows λ·(g − 1) = 6.67 in ⌈6.67/4⌉ = 2 micro-batches; keys p + 1.5 = 5.5
    assert (float(sh.n_d), float(sh.rows_d), float(sh.ctx_d)) == pytest.approx(
        (2, 20 / 6, 5.5))
    assert (float(sh.n_p), float(sh.rows_p), float(sh.len_p)) == pytest.approx(
        (1, 70 / 21, 16))
    lam, conc, _ = steady_state(wl, 70.0, 4, 1000, kv_reservation="lookahead")
    assert float(conc) == pytest.approx(3 * 70 / (3 * (4 + 2)))  # holds p + (g+1)/2 = 6
    # the admission process over a long job of them averages the same: waves of 10
    pol = Policy.from_micro_batches(4, 250)
    a = admission([(4, 3)] * 300, 70.0, pol)
    assert a.tokens.mean() == pytest.approx(10.0)
    assert (a.running - a.shape.n_p * a.shape.rows_p).mean() == pytest.approx(20 / 3)
    # steady throughput = C / sweep time of that shape (hand model, one sweep's prices)
    pred = predict_continuous(hand.M, hand.HW, wl.replace(num_sequences=300), pol,
                              host_kv_bytes=70 * hand.M.kv_bytes_per_token())
    assert pred.kv_capacity_tokens == pytest.approx(70)
    assert pred.steady_tokens_per_s == pytest.approx(
        10.0 / float(sweep_s(hand.M, hand.HW, wl, pol, steady_state(wl, 70.0, 4, 1000)[2])))
    assert pred.sweeps == a.tokens.size and pred.tokens_per_s * pred.total_s == \
        pytest.approx(900)


def test_predict_continuous_mixtral_l4_mtbench():
    setup = get_setup("mixtral_l4")
    wl = Workload.from_lengths([60, 77, 94], [32, 64, 128], num_sequences=3000)
    pol = Policy.from_micro_batches(256, 8, gpu_weight_fraction=0.1,
                                    prefill_tokens_per_sweep=4096)
    r = predict_continuous(setup.model, setup.hardware, wl, pol)
    assert r.tokens_per_s * r.total_s == pytest.approx(1000 * (32 + 64 + 128))
    assert 0 < r.tokens_per_s < r.steady_tokens_per_s < r.limit_tokens_per_s
    assert r.mean_concurrency <= pol.batch_size and r.steady_concurrency <= pol.batch_size
    assert r.limit_tokens_per_s == pytest.approx(r.bound.generated_tokens_per_s)
    with pytest.raises(ValueError, match="attention_device='cpu'"):
        predict_continuous(setup.model, setup.hardware, wl,
                           pol.replace(attention_device="gpu", kv_cache_device="gpu"))


def test_search_continuous_fits_and_is_deterministic():
    setup = get_setup("mixtral_l4")
    wl = Workload(77, 64, num_sequences=4000)
    pol, pred = search_continuous(setup.model, setup.hardware, wl)
    assert search_continuous(setup.model, setup.hardware, wl)[0] == pol
    assert pred.peak_device_bytes <= 0.9 * setup.hardware.gpu_memory_bytes
    assert pred.tokens_per_s <= pred.steady_tokens_per_s <= pred.limit_tokens_per_s
    # a smaller device keeps fewer experts resident
    small, _ = search_continuous(setup.model, setup.hardware, wl,
                                 device_memory_bytes=12 * 2**30)
    assert small.gpu_weight_fraction < pol.gpu_weight_fraction
    assert np.isfinite(pred.sweep_s) and pred.sweeps > wl.gen_len


def test_pack_prefill_caps_prompts_and_padded_tokens():
    lens = [70, 5, 33, 20, 17, 90]  # padded 80, 16, 48, 32, 32, 96
    assert pack_prefill(lens, 2) == [[1, 4], [3, 2], [0, 5]]  # sorted, ≤ 2 prompts
    assert pack_prefill(lens, 8, cap=100) == [[1, 4, 3], [2], [0], [5]]  # 3·32 ≤ 100
    assert pack_prefill([500], 4, cap=100) == [[0]]  # a longer prompt goes alone


def test_admit_stops_at_concurrency_budget_and_kv():
    pol = Policy.from_micro_batches(2, 2, max_concurrency=3, prefill_tokens_per_sweep=40)
    reqs = [(10, 4)] * 3 + [(40, 4)]
    taken = []
    yes = lambda p, g: taken.append((p, g)) or True
    assert admit(reqs, 0, 0, pol, yes) == 2  # 16 + 16 ≤ 40 < 48
    assert admit(reqs, 0, 2, pol, yes) == 1  # 2 running + 1 = concurrency 3
    assert admit(reqs, 3, 0, pol, yes) == 1  # 48 > 40, but the first always counts
    assert admit(reqs, 0, 0, pol, lambda p, g: False) == 0  # KV full
    assert taken == [(10, 4)] * 3 + [(40, 4)]
