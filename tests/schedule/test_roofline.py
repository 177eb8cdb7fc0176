"""experiments/roofline.py: the picture, the table, and one-line flag errors."""
import subprocess
import sys

import pytest

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model
from moejax.model_config.setups import get_setup, setup_names
from moejax.model_config.workload import get_workload
from moejax.schedule import search_policy

from experiments import roofline


def test_plot_and_table(tmp_path):
    m, hw = get_model("mixtral_8x7b"), get_hardware("l4_moe_lightning")
    wl = get_workload("mtbench")
    policy, pred = search_policy(m, hw, wl)
    points = roofline.operating_points(m, hw, wl, policy)
    assert len(points) == 3 and all(i > 0 and p > 0 for i, p in points.values())
    out = tmp_path / "r.png"
    roofline.plot(m, hw, wl, policy, pred, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = roofline.comparison_table(m, hw, 77, gens=(32,))
    assert "944.66 (324×14, 0.056)" in table


@pytest.mark.parametrize("args,needle", [
    (["--hardware", "nope"], "--hardware=nope"),
    (["--device_memory_gib", "100"], "--device_memory_gib=100 exceeds l4_moe_lightning's "
                                     "24.0 GiB"),
    (["--device_memory_gib", "nan"], "--device_memory_gib=nan: must be a finite number"),
])
def test_bad_flag_is_one_line_error(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.roofline", *args,
                        "--out", str(tmp_path / "r.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_preset_has_a_target_policy():
    """Each --config's model fits its hardware and budget (tiny_local's 1 GiB did not)."""
    for name in setup_names():
        s = get_setup(name)
        gib = s.device_memory_gib
        policy, pred = search_policy(s.model, s.hardware, s.workload,
                                     device_memory_bytes=None if gib is None else gib * 2**30)
        assert pred.tokens_per_s > 0, name
