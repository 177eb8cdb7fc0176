"""Op prices, hand-computed on a tiny config (bf16: 2 bytes; h=4, f=8, Hq=2, Hkv=1,
head_dim=2, E=2, k=1, V=10) and round-number hardware."""
import numpy as np
import pytest

from moejax.schedule import costs

from tests.schedule.hand import HW, M


def test_sizes():
    assert costs.qkv_bytes(M, 3) == 48  # 3·(2+2)·2·2
    assert costs.attn_out_bytes(M, 3) == 24  # 3·2·2·2
    assert costs.kv_bytes(M, 3) == 24 and costs.kv_bytes(M, 3, 1) == 12
    assert costs.streamed_expert_bytes(M, 0.25) == pytest.approx(288)  # 0.75·384
    assert costs.expected_active_experts(M, 2) == pytest.approx(1.5)  # 2·(1 − 0.5²)
    assert costs.num_pages(300, 100) == 3 and costs.num_pages(301, 100) == 4


def test_links():
    hw = HW.replace(link_latency_s=0.5)
    assert costs.h2d_s(hw, 40, transfers=2) == pytest.approx(3.0)  # 2·0.5 + 40/20
    assert costs.d2h_s(hw, 50) == pytest.approx(2.5)  # 0.5 + 50/25


def test_device_ops():
    # flops 2·3·4·8 = 192 → 0.192 s; bytes (4·8 + 3·12)·2 = 136 → 1.36 s
    assert costs.gpu_pre_attention_s(M, HW, 3) == pytest.approx(1.36)
    # flops 2·3·4·(4+2) = 144; bytes (4·6 + 3·(4+12))·2 = 144 → 1.44 s
    assert costs.gpu_post_attention_s(M, HW, 3) == pytest.approx(1.44)
    # 2 tokens take the capacity path: C = 2 rows for each of E = 2 experts → 4 rows;
    # flops 4·2·96 = 768; bytes W_E 384 + 4·(8+24)·2 = 640 → 6.4 s
    assert costs.gpu_ffn_s(M, HW, 2) == pytest.approx(6.4)
    # flops 2·2·4·10 = 160; bytes (40 + 8)·2 + 2·10·4 = 176 → 1.76 s
    assert costs.gpu_lm_head_s(M, HW, 2) == pytest.approx(1.76)
    # flops 2·2·5·6 = 120 → 0.12 s; bytes 8·10 + 2·16 = 112 → 1.12 s
    assert costs.gpu_decode_attention_s(M, HW, 2, 5) == pytest.approx(1.12)
    # flops 2·2·6·(3·4/2) = 144; bytes qkv(6) 96 + out(6) 48 = 144 → 1.44 s
    assert costs.gpu_prefill_attention_s(M, HW, 2, 3) == pytest.approx(1.44)


def test_calibrated_gemm_line():
    hw = HW.replace(gemm_intercept_s=0.1, gemm_flops_per_s=50)
    # compute = E = 2 calls·0.1 + 768/50 = 15.56 > memory 6.4
    assert costs.gpu_ffn_s(M, hw, 2) == pytest.approx(15.56)
    assert costs.device_compute_s(M, hw, 100, calls=2) == pytest.approx(2.2)
    assert costs.device_compute_s(M, HW, 100) == pytest.approx(0.1)  # 100/1000 (bf16)


def test_gemm_line_prices_other_weights_per_byte_of_an_expert():
    # the intercept is one expert's weights (3·4·8·2 = 192 bytes) read: 96 bytes → half
    hw = HW.replace(gemm_intercept_s=0.1, gemm_flops_per_s=50)
    assert costs.device_compute_s(M, hw, 100, weight_bytes=96) == pytest.approx(2.05)
    # LM head, 2 tokens: 2·2·4·10 = 160 flops → 3.2 s, weights 4·10·2 = 80 bytes → 0.0417
    assert costs.gpu_lm_head_s(M, hw, 2) == pytest.approx(3.2 + 0.1 * 80 / 192)


def test_cpu_attention_and_contention():
    # flops 120/10 = 12 s; bytes kv(12) 96 + qkv(2) 32 + out(2) 16 = 144 → 2.88 s
    assert costs.cpu_attention_s(M, HW, 2, 5) == pytest.approx(12.0)
    # B_mem ≥ B_kv + B_io: (144 + 1000)/50 once the link's traffic dominates
    t = costs.cpu_attention_s(M, HW, 2, 5, concurrent_host_bytes=1000)
    assert t == pytest.approx(22.88)
    hw = HW.replace(cpu_attention_bytes_per_s=4)  # calibrated kernel rate: 144/4
    assert costs.cpu_attention_s(M, hw, 2, 5) == pytest.approx(36.0)


def test_cpu_attention_contention_is_the_shared_core_models_on_host_devices():
    hw = HW.replace(device_is_host=True)
    assert costs.cpu_attention_s(M, hw, 2, 5, concurrent_host_bytes=1000) \
        == pytest.approx(12.0)


def test_copy_core_demand_is_the_calibrated_one_for_copies_and_every_core_for_compute():
    hw = HW.replace(copy_core_demand=1.7, cpu_cores=2)
    assert costs.core_demand(hw, "h2d") == costs.core_demand(hw, "d2h") == 1.7
    assert costs.core_demand(hw, "gpu") == costs.core_demand(hw, "cpu") == 2


def test_broadcasting():
    t = costs.cpu_attention_s(M, HW, np.array([[1.0], [2.0]]), np.array([[5.0, 6.0, 7.0]]))
    assert t.shape == (2, 3)
    assert t[1, 0] == pytest.approx(12.0)
    assert np.all(np.diff(t, axis=1) > 0) and np.all(np.diff(t, axis=0) > 0)


def test_h2d_rate_interpolates_the_curve_in_log_size_and_is_flat_outside():
    hw = HW.replace(h2d_curve=((1e3, 10.0), (1e5, 30.0)))
    assert costs.h2d_rate(hw, 1e4) == pytest.approx(20.0)  # log-midpoint: the mean
    assert costs.h2d_rate(hw, 1e2) == 10.0 and costs.h2d_rate(hw, 1e7) == 30.0
    # per-transfer size picks the rate: 2 transfers of 1e4 bytes at 20 B/s
    assert costs.h2d_s(hw, 2e4, transfers=2) == pytest.approx(2e4 / 20.0)


def test_device_op_overhead_is_added_once_per_op():
    hw = HW.replace(device_op_overhead_s=0.25)
    assert costs.gpu_pre_attention_s(M, hw, 3) == pytest.approx(1.36 + 0.25)


def test_cpu_attention_call_cost_and_int8_cache():
    hw = HW.replace(cpu_attention_bytes_per_s=4, cpu_attention_call_s=0.5)
    assert costs.cpu_attention_s(M, hw, 2, 5) == pytest.approx(36.0 + 0.5)
    # an int8 cache: kv(12) at 1 byte per element is 48 bytes, not 96: (48+32+16)/4
    assert costs.cpu_attention_s(M, hw, 2, 5, kv_bytes_per_elem=1) == pytest.approx(
        24.0 + 0.5)


def test_expert_imbalance_raises_the_ffn_price_of_a_many_token_call():
    hw = HW.replace(gemm_intercept_s=0.0, gemm_flops_per_s=50)
    assert costs.gpu_ffn_s(M, hw, 64, imbalance=2.0) > costs.gpu_ffn_s(M, hw, 64)
