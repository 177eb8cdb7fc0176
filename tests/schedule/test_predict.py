"""moejax's own model: composition of the op prices, hand-computed memory and bound."""
import numpy as np
import pytest

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model
from moejax.model_config.workload import Workload
from moejax.schedule import Policy, costs, predict
from moejax.schedule.predict import memory_bytes, memory_budgets, moe_lens_bound
from moejax.schedule.search import search_policy

from tests.schedule.hand import HW as _HW
from tests.schedule.hand import M

HW = _HW.replace(link_latency_s=0.01)
WL = Workload(3, 2)
POL = Policy.from_micro_batches(2, 3, gpu_weight_fraction=0.25, page_bytes=100)


def _layer_from_costs(hw, overlap):
    """One decode layer at context s+1 = 4, priced op by op as a timeline would: 288 of
    384 expert bytes streamed in 3 pages, read by the FFN where they land."""
    gpu = 3 * (costs.gpu_pre_attention_s(M, hw, 2) + costs.gpu_post_attention_s(M, hw, 2)
               + costs.gpu_ffn_s(M, hw, 2))
    h2d = costs.h2d_s(hw, 288, transfers=3) + 3 * costs.h2d_s(hw, costs.attn_out_bytes(M, 2))
    d2h = 3 * costs.d2h_s(hw, costs.qkv_bytes(M, 2))
    io = 288 + 3 * (costs.attn_out_bytes(M, 2) + costs.qkv_bytes(M, 2))
    cpu = 3 * costs.cpu_attention_s(M, hw, 2, 4,
                                    concurrent_host_bytes=io / 3 if overlap else 0)
    if not overlap:
        return h2d + d2h + gpu + cpu, cpu
    # the timeline's stalls: micro-batch 0's trip through the other lanes before the
    # first post-attention; its output behind the first chunk of pages
    out, qkv = costs.h2d_s(hw, costs.attn_out_bytes(M, 2)), costs.d2h_s(hw, costs.qkv_bytes(M, 2))
    stalls = max(gpu + cpu / 3 + out + qkv, cpu + gpu / 3 + out + qkv,
                 gpu + costs.h2d_s(hw, 288, transfers=3) / 3 + out)
    return max(h2d, d2h, gpu, cpu, stalls), cpu


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_layer_is_composed_from_op_prices(overlap):
    p = predict(M, HW, WL, POL.replace(overlap=overlap))
    layer, _ = _layer_from_costs(HW, overlap)
    assert p.decode_layer_s == pytest.approx(layer)


def test_contention_slows_cpu_attention():
    hw = HW.replace(cpu_flops_per_s=1e6)  # attention memory-bound: contention visible
    p = predict(M, hw, WL, POL)
    layer, cpu = _layer_from_costs(hw, True)
    assert p.decode_layer_s == pytest.approx(layer)
    io = 288 + 3 * (costs.attn_out_bytes(M, 2) + costs.qkv_bytes(M, 2))
    kv = 3 * (costs.kv_bytes(M, 2 * 5) + costs.qkv_bytes(M, 2) + costs.attn_out_bytes(M, 2))
    assert cpu == pytest.approx((kv + io) / hw.host_memory_bytes_per_s)


def test_device_is_host_shares_cores_between_compute_and_copies():
    hw = HW.replace(device_is_host=True, cpu_cores=2)
    p = predict(M, hw, WL, POL)
    gpu = 3 * (costs.gpu_pre_attention_s(M, hw, 2) + costs.gpu_post_attention_s(M, hw, 2)
               + costs.gpu_ffn_s(M, hw, 2))
    h2d = costs.h2d_s(hw, 288, transfers=3) + 3 * costs.h2d_s(hw, costs.attn_out_bytes(M, 2))
    d2h = 3 * costs.d2h_s(hw, costs.qkv_bytes(M, 2))
    _, cpu = _layer_from_costs(hw, True)
    # compute uses both cores, each copy one: core-seconds / 2 cores
    assert p.decode_layer_s == pytest.approx(max(h2d, d2h, gpu + cpu + (h2d + d2h) / 2))
    # a copy that takes both cores' worth from compute: the layer is the serial sum
    busy = predict(M, hw.replace(copy_core_demand=2.0), WL, POL)
    assert busy.decode_layer_s == pytest.approx(max(h2d, d2h, gpu + cpu + h2d + d2h))


def test_h2d_curve_prices_big_transfers_at_their_own_rate():
    hw = HW.replace(h2d_curve=((1e3, 4e9), (1e5, 1e9)))
    assert costs.h2d_s(hw, 1e3) == pytest.approx(hw.link_latency_s + 1e3 / 4e9)
    assert costs.h2d_s(hw, 1e6) == pytest.approx(hw.link_latency_s + 1e6 / 1e9)  # flat
    assert costs.h2d_s(hw, 2e5, transfers=200) == pytest.approx(2 + 2e5 / 4e9)
    assert costs.h2d_rate(hw, 1e4) == pytest.approx(2.5e9)  # halfway in log size


def test_totals_and_fields():
    p = predict(M, HW, WL, POL)
    assert p.tokens_per_s == pytest.approx(6 * 2 / (p.prefill_s + p.decode_s))
    assert p.decode_tokens_per_s == pytest.approx(6 * 1 / p.decode_s)
    assert set(p.busy_s) == {"gpu", "cpu", "h2d", "d2h"}
    assert p.bottleneck in p.busy_s and p.total_s == p.prefill_s + p.decode_s
    # the one decode step (context 4): 3 layers + LM head + one micro-batch's fill
    io = 288 + 3 * (costs.attn_out_bytes(M, 2) + costs.qkv_bytes(M, 2))
    fill = (costs.gpu_pre_attention_s(M, HW, 2) + costs.gpu_post_attention_s(M, HW, 2)
            + costs.gpu_ffn_s(M, HW, 2) + costs.cpu_attention_s(M, HW, 2, 4, None, io / 3)
            + costs.h2d_s(HW, costs.attn_out_bytes(M, 2))
            + costs.d2h_s(HW, costs.qkv_bytes(M, 2)))
    lm = 3 * costs.gpu_lm_head_s(M, HW, 2)
    assert p.decode_s == pytest.approx(3 * p.decode_layer_s + lm + fill)
    assert p.limit_tokens_per_s == p.bound.generated_tokens_per_s


def test_gen_len_one_is_prefill_only():
    p = predict(M, HW, Workload(3, 1), POL)
    assert p.decode_s == 0 and p.decode_tokens_per_s == 0
    assert p.tokens_per_s == pytest.approx(6 / p.prefill_s)


def test_memory_hand_computed():
    # device: non-expert 552 + wg·experts 288 + stream buffers (two passes' pages) 2·288
    # + prefill activations 776
    # (hidden 6·3·4·2 = 144, working set 6·34·2 = 408, scores 2·2·9·4 = 144, logits 80)
    dev, host = memory_bytes(M, WL, 2, 3, 0.25)
    assert dev == pytest.approx(2192)
    # host: 0.75·1152 streamed experts + KV 6·5·24 + staging 6·12·2
    assert host == pytest.approx(1728)
    dh, hh = memory_bytes(M, WL, 2, 3, 0.5)
    d0, h0 = memory_bytes(M, WL, 2, 3, 0.0)
    assert dev == pytest.approx(d0 + 0.5 * (dh - d0))  # affine in wg below 1
    assert host == pytest.approx(h0 + 0.5 * (hh - h0))
    d1, _ = memory_bytes(M, WL, 2, 3, 1.0)  # all resident: no stream buffers
    assert d1 == pytest.approx(2 * dh - d0)
    assert d0 - d1 == pytest.approx(2 * 384 - 1152)  # wg 0 → 1: +experts, −buffers
    dk, hk = memory_bytes(M, WL, 2, 3, 0.25, "gpu", "gpu")
    assert hk == pytest.approx(host - 720) and dk > dev + 720 - 1e-9


def test_memory_decode_peak_hand_computed():
    """A long generation from a 1-token prompt: the decode activations set the peak."""
    wl = Workload(1, 40)
    # weights 552 + 288 + stream 2·288, then decode: hidden 2·6·4·2 = 96, two
    # working sets 2·2·34·2 = 272, logits 80 (prefill's would be 280)
    assert memory_bytes(M, wl, 2, 3, 0.25)[0] == pytest.approx(1416 + 448)
    # attention on the device: + fp32 scores 2·2·2·41·4 = 1312, and from a host cache two
    # micro-batches' staged K, V 2·(2·41)·8 = 1312
    assert memory_bytes(M, wl, 2, 3, 0.25, "gpu", "cpu")[0] == pytest.approx(
        1416 + 448 + 1312 + 1312)
    # a device cache instead: all 6·41 tokens of 3 layers, 24 B each
    assert memory_bytes(M, wl, 2, 3, 0.25, "gpu", "gpu")[0] == pytest.approx(
        1416 + 448 + 1312 + 5904)


def test_moe_lens_bound_hand_computed():
    b = moe_lens_bound(M, HW.replace(gpu_memory_bytes=1000), WL)
    assert b.pme == pytest.approx(0.625)  # 2·5 / (8·2)
    # only what cannot stay on the device moves: 552 + 1152 − 0.9·1000 = 804 bytes,
    # and the host keeps KV next to those bytes
    assert b.kv_capacity_tokens == pytest.approx((90_000 - 804) / 24)
    assert b.delta_s == pytest.approx(804 / 20)
    assert b.kv_bound_tokens_per_s == pytest.approx(0.625 * 3716.5 / 40.2)
    # per processed token: (4 tokens through 3 layers of 96 + 192, 2 LM heads of 80) / 5
    assert b.gpu_bound_tokens_per_s == pytest.approx(1000 / 723.2)
    assert b.processed_tokens_per_s == pytest.approx(1000 / 723.2)
    assert b.generated_tokens_per_s == pytest.approx(1000 / 723.2 * 2 / 5)


def test_limit_bounds_a_policy_whose_experts_do_not_all_fit_on_the_host():
    """DBRX on an A40 host (256 GiB): its 236 GiB of experts leave no room for KV beside
    all of them, but a policy keeping some on the device runs; the limit stays above."""
    m, hw = get_model("dbrx"), get_hardware("a40")
    assert m.expert_bytes_total() > memory_budgets(hw)[1]
    _, p = search_policy(m, hw, Workload(512, 32))
    assert 0 < p.tokens_per_s <= p.limit_tokens_per_s


def test_moe_lens_bound_when_the_model_fits_is_the_gpu_bound():
    b = moe_lens_bound(M, HW, WL)  # 1704 weight bytes fit in 0.9·10000
    assert b.delta_s == 0 and b.kv_bound_tokens_per_s == float("inf")
    assert b.processed_tokens_per_s == pytest.approx(b.gpu_bound_tokens_per_s)


def test_mixtral_l4_moe_lightning_policy():
    m, hw = get_model("mixtral_8x7b"), get_hardware("l4_moe_lightning")
    p = predict(m, hw, Workload(77, 32), Policy.from_micro_batches(324, 14,
                                                                 gpu_weight_fraction=0.056))
    assert 0 < p.tokens_per_s < p.decode_tokens_per_s
    assert p.tokens_per_s < p.limit_tokens_per_s
    # stream buffers hold only streamed bytes, 2·(1−wg)·W_E as MoE-Lightning counts
    # them: its own policy fits moejax's device memory model on the L4
    assert p.peak_device_bytes <= memory_budgets(hw)[0]
    assert p.peak_host_bytes <= memory_budgets(hw)[1]
    slow = predict(m, hw.replace(host_memory_bytes_per_s=5e9), Workload(77, 32), p.policy)
    assert slow.busy_s["cpu"] > p.busy_s["cpu"]


def test_kv_and_attention_placements_and_local_like_spec():
    hw = HW.replace(gemm_intercept_s=1e-3, gemm_flops_per_s=500, device_is_host=True,
                    cpu_attention_bytes_per_s=40)
    for a, k in (("cpu", "cpu"), ("gpu", "cpu"), ("gpu", "gpu")):
        p = predict(M, hw, WL, POL.replace(attention_device=a, kv_cache_device=k))
        assert np.isfinite(p.tokens_per_s) and p.tokens_per_s > 0
        assert (p.busy_s["cpu"] > 0) == (a == "cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy="):
        predict(M, HW, WL, "fast")
    with pytest.raises(ValueError, match="model='mixtral_8x7b'"):
        predict("mixtral_8x7b", HW, WL, POL)
    with pytest.raises(ValueError, match="workload="):
        predict(M, HW, (3, 2), POL)


@pytest.mark.parametrize("prompt,gen", [(8, 2), (8, 3), (77, 32), (512, 256)])
def test_searched_prediction_never_beats_the_hardware_limit(prompt, gen):
    from moejax.schedule import search_policy

    m, hw = get_model("mixtral_8x7b"), get_hardware("l4_moe_lightning")
    _, p = search_policy(m, hw, Workload(prompt, gen))
    assert p.tokens_per_s <= p.limit_tokens_per_s * (1 + 1e-9)


def test_decode_imbalance_prices_only_the_decode():
    pol = Policy.from_micro_batches(64, 1, gpu_weight_fraction=1.0, page_bytes=100)
    even = predict(M, HW, WL, pol)
    hot = predict(M, HW, WL.replace(decode_expert_imbalance=3.0), pol)
    assert hot.prefill_s == even.prefill_s and hot.decode_s > even.decode_s
