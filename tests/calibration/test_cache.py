import importlib
import json

import pytest

from moejax.calibration import cache, load_local
from moejax.model_config.hardware import get_hardware


STAMP = cache.cache_stamp(None)  # this machine and process, no model shape


def test_local_loads_cache_without_calibrating(tmp_path, monkeypatch):
    path = tmp_path / "hw.json"
    spec = get_hardware("t4").replace(name="local", device_is_host=True)
    path.write_text(json.dumps({"spec": spec.to_json(), "meta": STAMP}))
    monkeypatch.setenv("MOEJAX_CALIBRATION", str(path))
    cal = importlib.import_module("moejax.calibration.microbench")

    monkeypatch.setattr(cal, "calibrate", lambda **kw: pytest.fail("recalibrated"))
    assert cache.calibration_path() == str(path)
    assert get_hardware("local") == spec


def test_local_recalibrates_a_broken_cache(tmp_path, monkeypatch):
    path = tmp_path / "hw.json"
    path.write_text("{not json")
    monkeypatch.setenv("MOEJAX_CALIBRATION", str(path))
    cal = importlib.import_module("moejax.calibration.microbench")

    sentinel = get_hardware("l4").replace(name="local")
    monkeypatch.setattr(cal, "calibrate", lambda *a, **kw: sentinel)
    assert get_hardware("local") is sentinel


@pytest.mark.parametrize("content", [
    {"meta": {}},  # a cache from before cache versions
    {"meta": {**STAMP, "cpu_count": 64}},  # another machine's
    {"meta": STAMP, "spec": []},
    "[" * 100_000,
    {"meta": {**STAMP, "backend": "gpu", "device_kind": "NVIDIA H200"}},  # another device
    {"meta": {**STAMP, "jax": "0.0.1"}},  # another jax
], ids=["old-format", "other-machine", "spec-list", "deep-nesting", "other-device",
        "other-jax"])
def test_local_recalibrates_a_cache_it_cannot_trust(tmp_path, monkeypatch, content):
    path = tmp_path / "hw.json"
    path.write_text(content if isinstance(content, str) else json.dumps(
        {"spec": get_hardware("t4").to_json(), **content}))
    monkeypatch.setenv("MOEJAX_CALIBRATION", str(path))
    cal = importlib.import_module("moejax.calibration.microbench")
    sentinel = get_hardware("l4").replace(name="local")
    monkeypatch.setattr(cal, "calibrate", lambda *a, **kw: sentinel)
    assert get_hardware("local") is sentinel


def test_local_for_a_model_is_cached_per_expert_shape(tmp_path, monkeypatch):
    from moejax.model_config.model import get_model

    monkeypatch.delenv("MOEJAX_CALIBRATION", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = get_model("tiny_mixtral")
    path = cache.local_calibration_path(cfg)
    assert path.endswith(f"local_hw_tiny_mixtral_{cfg.hidden_size}x"
                         f"{cfg.expert_ffn_size}.json")
    cal = importlib.import_module("moejax.calibration.microbench")
    seen = []
    monkeypatch.setattr(cal, "calibrate", lambda model, path: seen.append(
        (model, path)) or get_hardware("l4"))
    load_local(model=cfg)
    assert seen == [(cfg, path)]
