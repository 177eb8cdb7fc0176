"""experiments/roofline.py: the picture, the table, and one-line flag errors."""
import subprocess
import sys

from moejax.model_config.hardware import get_hardware
from moejax.model_config.model import get_model
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


def test_bad_flag_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "experiments.roofline", "--hardware", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--hardware=nope" in r.stderr and "Traceback" not in r.stderr
