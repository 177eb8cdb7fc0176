"""A tiny calibration (seconds, not the real 1 GB copies) and its JSON cache."""
import json

import pytest

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model
from moejax.model_config.workload import Workload
from moejax.calibration import calibrate
from moejax.schedule import search_policy

TINY = dict(token_counts=(4, 8, 16), copy_bytes=1 << 20, read_bytes=1 << 20,
            attention_batch=2, attention_context=16, repeats=1)


def test_tiny_calibration_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "local_hw.json"
    spec = calibrate("tiny_mixtral", path=str(path), **TINY)
    assert spec.name == "local" and spec.device_is_host  # CPU-only test machine
    for k in ("h2d_bytes_per_s", "d2h_bytes_per_s", "host_memory_bytes_per_s",
              "gpu_memory_bytes_per_s", "gemm_flops_per_s", "cpu_attention_bytes_per_s"):
        assert getattr(spec, k) > 0, k
    assert spec.gemm_intercept_s >= 0
    assert 0.1 <= spec.copy_core_demand <= 2 * spec.cpu_cores  # fitted, clipped
    meta = json.loads(path.read_text())["meta"]
    assert meta["model"] == "tiny_mixtral" and len(meta["gemm_points"]) == 3
    assert meta["backend"] == "cpu" and meta["jax"] and meta["device_kind"]
    monkeypatch.setenv("MOEJAX_CALIBRATION", str(path))
    local = get_hardware("local")
    assert local == spec
    policy, pred = search_policy(get_model("tiny_mixtral"), local,
                                 Workload(16, 8, num_sequences=64), device_memory_bytes=2e6)
    assert pred.tokens_per_s > 0 and pred.peak_device_bytes <= 2e6


def test_an_unwritable_cache_loses_only_the_cache():
    spec = calibrate("tiny_mixtral", path="/proc/moejax/local_hw.json", **TINY)
    assert spec.gemm_flops_per_s > 0


def test_a_model_whose_first_layers_are_dense_calibrates():
    cfg = get_model("tiny_mixtral").replace(num_layers=4, dense_layers=(0, 1),
                                            dense_ffn_size=32)
    assert calibrate(cfg, save=False, **TINY).gemm_flops_per_s > 0


def test_no_save(tmp_path):
    spec = calibrate("tiny_mixtral", path=str(tmp_path / "x.json"), save=False, **TINY)
    assert spec.gemm_flops_per_s > 0 and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("kw, bad", [(dict(token_counts=()), "token_counts"),
                                     (dict(copy_bytes=0), "copy_bytes=0"),
                                     (dict(repeats=0), "repeats=0")])
def test_bad_arguments(kw, bad):
    with pytest.raises(ValueError, match=bad):
        calibrate("tiny_mixtral", save=False, **{**TINY, **kw})
    with pytest.raises(ValueError, match="unknown model"):
        calibrate("nope", save=False, **TINY)


def test_page_rates_one_per_timed_run_of_the_probe():
    import importlib

    mod = importlib.import_module("moejax.calibration.in_situ")
    model = mod.probe_model(get_model("tiny_mixtral"))
    assert model.config.num_layers == 2
    records = []
    rates = mod.page_rates(model, 4096, 2, records=records)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    # each figure is its run's streamed bytes over the time its pages took
    pages = [e for e in records[0].entries if e.op == "page"]
    assert pages
    dur = records[0].trace.end_s - records[0].trace.start_s
    full = [e for e in pages if e.nbytes == 4096] or pages
    assert rates[0] == pytest.approx(sum(e.nbytes for e in full)
                                     / sum(dur[e.id] for e in full))
