"""MoE-Lightning reproduction: hand-computed formulas on a tiny config, the L4 figure."""
import time

import pytest

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model
from moejax.schedule import hrm, moe_lightning_evaluate, moe_lightning_search

from tests.schedule.hand import HW, M


def test_hand_computed_terms():
    assert hrm.expert_bytes_per_layer(M) == 384  # 2·3·4·8·2
    assert hrm.ctog_s(M, HW, 0.25) == pytest.approx(14.4)  # 0.75·384/20
    # 3 · max(2·2·4·8·3·1/1000, (2·2·4 + 2·2·8 + 384)/100)
    assert hrm.gpu_s(M, HW, 2, 3) == pytest.approx(12.96)
    assert hrm.attention_flops(M, 2, 3, 2) == 120  # 2·5·2·(2·2+2)
    assert hrm.attention_bytes(M, 2, 3, 2) == 112  # 2·(2·2·2·2 + 2·2·5·1·2)
    assert hrm.cpu_s(M, HW, 2, 3, 3, 2) == pytest.approx(36.0)  # 3·max(120/10, 112/50)
    # w_other 288 + wg·W_E·L 576 + act 336 + 2(1−wg)W_E 384 + inter 403.2
    assert hrm.gpu_memory_bytes(M, 2, 3, 3, 0.5, "prefill") == pytest.approx(1987.2)
    assert hrm.gpu_memory_bytes(M, 2, 3, 3, 0.5, "decode") == pytest.approx(1747.2)
    # 576 + 4·5·2·6·3 + 2·4·6·3 + 384
    assert hrm.cpu_memory_bytes(M, 2, 3, 3, 2, 0.5) == pytest.approx(1824.0)


def test_hand_computed_evaluate():
    r = moe_lightning_evaluate(M, HW, 3, 2, 2, 3)
    assert r.policy.gpu_weight_fraction == 0.0  # cpu_T = 36 already exceeds ctog = 19.2
    assert r.layer_s == pytest.approx(36.0)
    assert r.decode_tokens_per_s == pytest.approx(6 * 2 / (36.0 * 3 * 1))


def test_l4_reproduction():
    m, hw = get_model("mixtral_8x7b"), get_hardware("l4_moe_lightning")
    t = time.perf_counter()
    r = moe_lightning_search(m, hw, 77, 32)
    assert time.perf_counter() - t < 5
    p = r.policy
    assert (p.micro_batch_size, p.num_micro_batches) == (324, 14)
    assert r.decode_tokens_per_s == pytest.approx(944.66, rel=0.01)
    assert p.gpu_weight_fraction == pytest.approx(0.056, abs=0.001)
    again = moe_lightning_evaluate(m, hw, 77, 32, 324, 14)
    assert again.decode_tokens_per_s == pytest.approx(r.decode_tokens_per_s, rel=1e-12)
    assert again.gpu_memory_bytes <= 0.86 * hw.gpu_memory_bytes * (1 + 1e-12)
    assert again.cpu_memory_bytes <= 0.8 * hw.host_memory_bytes


def test_wg_balances_link_against_compute():
    # With memory to spare, wg is the smallest fraction with ctog <= max(cpu_T, gpu_T).
    hw = HW.replace(cpu_flops_per_s=1000, host_memory_bytes_per_s=1e4)
    r = moe_lightning_evaluate(M, hw, 3, 2, 2, 3)
    assert r.ctog_s == pytest.approx(max(r.cpu_s, r.gpu_s))
    assert 0 < r.policy.gpu_weight_fraction < 1


def test_errors():
    with pytest.raises(ValueError, match="gen_len=1"):
        moe_lightning_search(M, HW, 3, 1)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        moe_lightning_evaluate(M, HW, 3, 2, 0, 1)
    with pytest.raises(ValueError, match="GPU memory short"):
        moe_lightning_evaluate(M, HW.replace(gpu_memory_bytes=100), 3, 2, 1, 1)
    with pytest.raises(ValueError, match="CPU memory short"):
        moe_lightning_evaluate(M, HW.replace(host_memory_bytes=100), 3, 2, 1, 1)
