"""experiments.gpu_check: its CPU-side parts run here; without a GPU it says so in one
line and exits non-zero."""

import os
import shutil
import subprocess
import sys

import pytest

from experiments import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--output_dir",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "gpu_check: no GPU here (nvidia-smi found none): run this on a GPU machine"]
    assert not (tmp_path / "out").exists()


def test_parity_of_the_offloaded_engine_in_float32():
    p = gpu_check.parity("float32")
    assert p["tokens_identical"] and p["logits_max_rel_err"] <= 1e-5
    assert p["pages_per_layer"] > 1  # the check streams pages, not one block


def test_link_rates_are_measured_for_each_path():
    r = gpu_check.link(total=4 * 2**20, page=2**20)
    assert all(r[k] > 0 for k in ("pinned_pages_GBps", "pinned_one_copy_GBps",
                                  "pageable_one_copy_GBps"))
