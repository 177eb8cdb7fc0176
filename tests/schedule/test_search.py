"""Policy search: speed, determinism, budgets, monotonicity, optimality, errors."""
import itertools
import time

import pytest

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model, model_names
from moejax.model_config.workload import Workload
from moejax.schedule import Policy, predict, search_policy
from moejax.schedule.hrm import ubs_candidates
from moejax.schedule.search import ubs_grid
from moejax.schedule.predict import memory_budgets, memory_bytes
from tests.schedule.hand import HW as HAND_HW
from tests.schedule.hand import M

MIXTRAL = get_model("mixtral_8x7b")
MTBENCH = Workload(77, 32)


def _within_budgets(model, hw, wl, policy, pred, device_memory_bytes=None):
    dev, host = memory_budgets(hw, device_memory_bytes)
    assert pred.peak_device_bytes <= dev * (1 + 1e-9)
    assert pred.peak_host_bytes + (pred.peak_device_bytes if hw.device_is_host else 0) \
        <= host * (1 + 1e-9)
    d, h = memory_bytes(model, wl, policy.micro_batch_size, policy.num_micro_batches,
                        policy.gpu_weight_fraction, policy.attention_device,
                        policy.kv_cache_device)
    assert (d, h) == pytest.approx((pred.peak_device_bytes, pred.peak_host_bytes))


def test_l4_fast_deterministic_and_consistent():
    hw = get_hardware("l4")
    t = time.perf_counter()
    policy, pred = search_policy(MIXTRAL, hw, MTBENCH)
    assert time.perf_counter() - t < 5
    assert search_policy(MIXTRAL, hw, MTBENCH) == (policy, pred)
    assert predict(MIXTRAL, hw, MTBENCH, policy) == pred
    assert 0 < pred.tokens_per_s <= pred.limit_tokens_per_s
    _within_budgets(MIXTRAL, hw, MTBENCH, policy, pred)


CASES = [("mixtral_8x7b", hw, g) for hw in ("l4_moe_lightning", "t4", "a40", "h100")
         for g in (32, 256)]
CASES += [("qwen3_30b_a3b", "l4", 64)] if "qwen3_30b_a3b" in model_names() else []


@pytest.mark.parametrize("model, hw, gen", CASES)
def test_never_breaks_a_budget(model, hw, gen):
    m, h, wl = get_model(model), get_hardware(hw), Workload(77, gen)
    policy, pred = search_policy(m, h, wl)
    _within_budgets(m, h, wl, policy, pred)


def test_device_budget_and_sequence_cap():
    hw = get_hardware("l4").replace(device_is_host=True, host_memory_bytes=40e9)
    m, wl = get_model("mixtral_4l_1024"), Workload(64, 16, num_sequences=300)
    policy, pred = search_policy(m, hw, wl, device_memory_bytes=2e9)
    assert policy.batch_size <= 300
    _within_budgets(m, hw, wl, policy, pred, 2e9)


@pytest.mark.parametrize("field, factors", [("host_memory_bytes", (1.0, 1.25, 1.6)),
                                            ("h2d_bytes_per_s", (1.0, 1.5, 3.0))])
@pytest.mark.parametrize("hw_name, gen", [("l4", 128), ("t4", 32)])
def test_monotone_in_host_memory_and_link(field, factors, hw_name, gen):
    hw, wl = get_hardware(hw_name), Workload(77, gen)
    best = [search_policy(MIXTRAL, hw.replace(**{field: getattr(hw, field) * f}), wl)[1]
            .tokens_per_s for f in factors]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(best, best[1:]))


HW = HAND_HW.replace(gpu_fp16_flops_per_s=1e5, gpu_fp32_flops_per_s=5e4,
                     gpu_memory_bytes=1e6, gpu_memory_bytes_per_s=1e4, cpu_flops_per_s=1e3,
                     host_memory_bytes=1e6, host_memory_bytes_per_s=5e3,
                     h2d_bytes_per_s=200, d2h_bytes_per_s=250)


def test_optimal_over_brute_force_grid():
    wl, budget = Workload(3, 4, num_sequences=40), 9000
    policy, pred = search_policy(M, HW, wl, device_memory_bytes=budget)
    dev_cap, host_cap = memory_budgets(HW, budget)
    for ubs, n_ub, wg, (a, k) in itertools.product(
            ubs_grid(40), range(1, 41), (0.0, 0.3, 0.6, 1.0),
            (("cpu", "cpu"), ("gpu", "cpu"), ("gpu", "gpu"))):
        if ubs * n_ub > 40:
            continue
        d, h = memory_bytes(M, wl, ubs, n_ub, wg, a, k)
        if d > dev_cap or h > host_cap:
            continue
        p = Policy.from_micro_batches(ubs, n_ub, gpu_weight_fraction=wg,
                                      attention_device=a, kv_cache_device=k)
        assert predict(M, HW, wl, p).tokens_per_s <= pred.tokens_per_s * (1 + 1e-9)


def test_ubs_grid_adds_powers_of_two_and_the_cap():
    assert ubs_grid(40) == [1, 2, 3, 4, 8, 16, 32, 36, 40]
    assert ubs_grid(1) == [1]
    assert set(itertools.takewhile(lambda u: u <= 500, ubs_candidates())) <= set(ubs_grid(500))


def test_infeasible_names_the_short_memory():
    with pytest.raises(ValueError, match=r"device memory is short by \d+\.\d+ GiB"):
        search_policy(MIXTRAL, get_hardware("l4"), MTBENCH, device_memory_bytes=4e9)
    with pytest.raises(ValueError, match=r"host memory is short by \d+\.\d+ GiB"):
        search_policy(MIXTRAL, get_hardware("l4").replace(host_memory_bytes=50e9), MTBENCH)


def test_bad_arguments():
    with pytest.raises(ValueError, match="device_memory_bytes=-1"):
        search_policy(MIXTRAL, get_hardware("l4"), MTBENCH, device_memory_bytes=-1)
    with pytest.raises(ValueError, match="hw='l4'"):
        search_policy(MIXTRAL, "l4", MTBENCH)


def test_keeps_everything_resident_when_a_budget_holds_it():
    """Stream buffers hold only streamed bytes, so memory is continuous at wg = 1: a
    budget that holds every expert keeps them all (nothing streams, fastest)."""
    hw, wl = get_hardware("h100"), Workload(77, 32, num_sequences=8)
    resident, _ = memory_bytes(MIXTRAL, wl, 4, 2, 1.0)  # wg = 1: no stream buffers
    streaming, _ = memory_bytes(MIXTRAL, wl, 4, 2, 1.0 - 1e-6)
    assert streaming == pytest.approx(resident, rel=1e-6)
    policy, pred = search_policy(MIXTRAL, hw, wl, device_memory_bytes=resident * 1.001)
    assert policy.gpu_weight_fraction >= 0.999  # all, or all but what the batch needs
    _within_budgets(MIXTRAL, hw, wl, policy, pred, resident * 1.001)


def test_infeasible_error_names_the_all_resident_need_when_that_is_smallest():
    m = MIXTRAL.replace(num_layers=2)  # 2 MoE layers: streaming needs more, not less
    hw, wl = get_hardware("l4"), Workload(77, 32, num_sequences=1)
    resident, _ = memory_bytes(m, wl, 1, 1, 1.0)
    with pytest.raises(ValueError, match=rf"needs {resident / 2**30:.2f} GiB"):
        search_policy(m, hw, wl, device_memory_bytes=resident - 2**30)
    policy, _ = search_policy(m, hw, wl, device_memory_bytes=resident + 2**20)
    assert policy.gpu_weight_fraction == 1.0


def test_fitting_weight_fraction_lowers_wg_only_as_far_as_the_budget_needs():
    """The searched CPU-attention policy moved to device attention: its KV cache needs
    device memory, so wg drops to the largest value that fits; a fitting policy keeps
    its wg; a batch nothing fits gives None."""
    from moejax.schedule.search import fitting_weight_fraction

    hw = get_hardware("l4")
    pol, _ = search_policy(MIXTRAL, hw, MTBENCH)
    assert fitting_weight_fraction(MIXTRAL, hw, MTBENCH, pol) == pol.gpu_weight_fraction
    gpu = pol.replace(micro_batch_size=16, batch_size=16 * pol.num_micro_batches,
                      attention_device="gpu", kv_cache_device="gpu",
                      gpu_weight_fraction=0.2)
    wg = fitting_weight_fraction(MIXTRAL, hw, MTBENCH, gpu)
    dev_budget = memory_budgets(hw)[0]
    mem = lambda w: memory_bytes(MIXTRAL, MTBENCH, 16, gpu.num_micro_batches, w, "gpu",
                                 "gpu")[0]
    assert 0 <= wg < 0.2 and mem(wg) <= dev_budget < mem(wg + 0.01)
    huge = gpu.replace(micro_batch_size=4096, batch_size=4096 * gpu.num_micro_batches)
    assert fitting_weight_fraction(MIXTRAL, hw, MTBENCH, huge) is None


def test_fitting_weight_fraction_respects_the_host_floor_and_the_gap_below_one():
    """DBRX on an A40: streaming every expert overflows the host, so wg = 0 has no
    fitting value at or below it. Mixtral with a budget just above all-resident: wg
    0.97 fits as it is; a budget that holds wg 0.95 lowers it to the interval's top."""
    from moejax.schedule.search import fitting_weight_fraction

    dbrx, a40, wl = get_model("dbrx"), get_hardware("a40"), Workload(512, 32)
    pol, _ = search_policy(dbrx, a40, wl)
    assert fitting_weight_fraction(dbrx, a40, wl, pol.replace(gpu_weight_fraction=0.0)) \
        is None
    hw = get_hardware("l4").replace(host_memory_bytes=2 ** 40)
    small = Policy.from_micro_batches(4, 1, gpu_weight_fraction=0.97)
    budget = 1.001 * memory_bytes(MIXTRAL, MTBENCH, 4, 1, 1.0)[0]
    assert fitting_weight_fraction(MIXTRAL, hw, MTBENCH, small, budget) == 0.97
    assert fitting_weight_fraction(MIXTRAL, hw, MTBENCH, small.replace(
        gpu_weight_fraction=1.0), budget) == 1.0
    budget = memory_bytes(MIXTRAL, MTBENCH, 4, 1, 0.95)[0]
    wg = fitting_weight_fraction(MIXTRAL, hw, MTBENCH, small, budget)
    assert wg < 0.97 and memory_bytes(MIXTRAL, MTBENCH, 4, 1, wg)[0] <= budget
    assert memory_bytes(MIXTRAL, MTBENCH, 4, 1, wg + 0.01)[0] > budget
