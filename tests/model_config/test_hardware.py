import json

import pytest

from moejax.model_config import hardware
from moejax.model_config.hardware import GiB, HardwareSpec, get_hardware, hardware_names


def test_presets_exist_and_unknown_name_lists_valid():
    for name in ("l4_moe_lightning", "t4_moe_lightning", "l4", "t4", "a40", "h100"):
        assert get_hardware(name).name == name
    assert "local" in hardware_names()
    with pytest.raises(ValueError, match="unknown hardware 'nope'.*l4_moe_lightning"):
        get_hardware("nope")


def test_moe_lightning_constants_exact():
    l4 = get_hardware("l4_moe_lightning")
    assert l4.gpu_memory_bytes == 24 * GiB
    assert l4.host_memory_bytes == 184.29 * GiB
    assert l4.h2d_bytes_per_s == 16 * GiB
    assert l4.gpu_memory_bytes_per_s == 285 * GiB
    assert l4.host_memory_bytes_per_s == 76 * GiB
    assert l4.gpu_fp16_flops_per_s == 104e12 and l4.cpu_flops_per_s == 1.6e12
    t4 = get_hardware("t4_moe_lightning")
    assert t4.gpu_memory_bytes == 15 * GiB and t4.gpu_memory_bytes_per_s == 300 * GiB
    assert t4.gpu_fp16_flops_per_s == 65e12 and t4.cpu_flops_per_s == 0.8e12
    assert t4.h2d_bytes_per_s == 16 * GiB


def test_validation_and_dtype_rates():
    l4 = get_hardware("l4")
    with pytest.raises(ValueError, match="h2d_bytes_per_s=-1"):
        l4.replace(h2d_bytes_per_s=-1)
    with pytest.raises(ValueError, match="copy_core_demand=0"):
        l4.replace(copy_core_demand=0)
    with pytest.raises(ValueError, match="together"):
        l4.replace(gemm_flops_per_s=1e12)
    assert l4.gpu_flops_per_s("float32") == l4.gpu_fp32_flops_per_s
    assert l4.gpu_flops_per_s("bfloat16") == l4.gpu_fp16_flops_per_s
    with pytest.raises(ValueError, match="dtype 'int3'"):
        l4.gpu_flops_per_s("int3")


def test_json_round_trip_and_unknown_field():
    spec = get_hardware("a40").replace(gemm_intercept_s=1e-4, gemm_flops_per_s=1e14)
    assert HardwareSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="unknown fields"):
        HardwareSpec.from_json({**spec.to_json(), "warp_drive": 1})


@pytest.mark.parametrize("change,needle", [
    (dict(h2d_bytes_per_s=float("inf")), "h2d_bytes_per_s=inf"),
    (dict(link_latency_s=float("inf")), "link_latency_s=inf"),
    (dict(cpu_cores=True), "cpu_cores=True"),
    (dict(cpu_cores=2.5), "cpu_cores=2.5"),
    (dict(device_is_host="false"), "device_is_host='false'"),
    (dict(gemm_flops_per_s="1e12", gemm_intercept_s=0.0), "gemm_flops_per_s='1e12'"),
    (dict(h2d_curve=[[1, "x"]]), "h2d_curve"),
])
def test_spec_refuses_values_that_would_poison_prices(change, needle):
    with pytest.raises(ValueError, match=needle):
        get_hardware("l4").replace(**change)


def test_spec_curve_is_stored_hashable():
    spec = get_hardware("l4").replace(h2d_curve=[[1e6, 1e9], [1e8, 2e9]])
    assert spec.h2d_curve == ((1e6, 1e9), (1e8, 2e9)) and hash(spec)


def test_fmt_bytes_switches_to_gib_at_a_gib():
    assert hardware.fmt_bytes(GiB) == "1.00 GiB"
    assert hardware.fmt_bytes(GiB - 2**20) == "1023.0 MiB"
