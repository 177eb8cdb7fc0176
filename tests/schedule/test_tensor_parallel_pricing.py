"""k-device HardwareSpecs (num_devices): per-device streams, the all-reduce, memory per
device, and MoE-Lightning's model on the aggregated view."""

import pytest

from moejax.model_config import hardware, setups
from moejax.model_config.model import get_model
from moejax.model_config.workload import Workload
from moejax.schedule import costs
from moejax.schedule.predict import memory_bytes
from moejax.schedule.hrm import moe_lightning_evaluate

T4 = hardware.get_hardware("t4_moe_lightning")
M = get_model("dbrx")


def test_k_links_carry_their_share_unless_they_share_a_root_complex():
    two = setups.tensor_parallel(T4, 2)
    assert costs.h2d_s(two, 1e9) == pytest.approx(costs.h2d_s(T4, 1e9) / 2)
    capped = two.replace(host_link_bytes_per_s=T4.h2d_bytes_per_s)
    assert costs.h2d_s(capped, 1e9) == pytest.approx(costs.h2d_s(T4, 1e9))


def test_allreduce_and_split_device_work():
    four = setups.tensor_parallel(T4, 4)
    assert costs.allreduce_s(M, T4, 64) == 0.0
    want = four.allreduce_latency_s + 2 * 3 / 4 * 64 * M.hidden_size * 2 / T4.d2h_bytes_per_s
    assert costs.allreduce_s(M, four, 64) == pytest.approx(want)
    one = costs.gpu_ffn_s(M, T4, 4096)
    assert costs.gpu_ffn_s(M, four, 4096) == pytest.approx(
        one / 4 + costs.allreduce_s(M, four, 4096, 4), rel=1e-6)
    assert costs.gpu_lm_head_s(M, four, 64) == costs.gpu_lm_head_s(M, T4, 64)


def test_memory_is_per_device_and_more_devices_predict_more():
    wl = Workload(77, 32)
    d1 = memory_bytes(M, wl, 8, 2, 0.5)[0]
    d4 = memory_bytes(M, wl, 8, 2, 0.5, devices=4)[0]
    experts = 0.5 * M.expert_bytes_total() + 2 * 0.5 * M.expert_bytes_per_layer()
    assert d1 - d4 == pytest.approx(M.non_expert_bytes() - M.non_expert_bytes_per_device(4)
                                    + 0.75 * experts)
    two, four = (setups.get_setup(n) for n in ("dbrx_t4x2", "dbrx_t4x4"))
    assert two.hardware.num_devices == 2 and four.hardware.num_devices == 4
    from moejax.schedule import search_policy
    p2 = search_policy(M, two.hardware, wl)[1]
    p4 = search_policy(M, four.hardware, wl)[1]
    assert p4.tokens_per_s > p2.tokens_per_s
    assert p4.peak_device_bytes <= T4.gpu_memory_bytes
    assert p4.limit_tokens_per_s > p2.limit_tokens_per_s


def test_moe_lightning_model_prices_the_aggregate():
    big = T4.replace(host_memory_bytes=416e9)
    a = moe_lightning_evaluate(M, setups.tensor_parallel(big, 4), 77, 32, 36, 4)
    b = moe_lightning_evaluate(M, setups.scale_gpus(big, 4), 77, 32, 36, 4)
    assert a.decode_tokens_per_s == pytest.approx(b.decode_tokens_per_s)


def test_bad_device_fields_are_named():
    with pytest.raises(ValueError, match="num_devices=0"):
        T4.replace(num_devices=0)
    with pytest.raises(ValueError, match="host_link_bytes_per_s=-1"):
        T4.replace(host_link_bytes_per_s=-1)
