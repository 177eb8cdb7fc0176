"""experiments.throughput: the JSON contract and one-line errors for bad flags."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.throughput", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_tiny_run_writes_both_sections(tmp_path):
    out = tmp_path / "t.json"
    png = tmp_path / "t.png"
    r = run("--config", "mixtral_l4", "--local_hidden_size", "64", "--local_num_layers",
            "2", "--prompt_len", "8", "--gen_len", "3", "--max_local_batch", "4",
            "--gpu_weight_fraction", "0.3", "--output_json", str(out),
            "--timeline_png", str(png), "--batching", "static")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    t, loc = d["target"], d["local"]
    assert d["batching"] == loc["batching"] == "static"
    assert t["policy"]["batch_size"] > 1000  # the L4 policy batches thousands
    assert t["limit_tokens_per_s"] >= t["predicted_tokens_per_s"] > 0
    assert t["moe_lightning"]["decode_tokens_per_s"] > 0
    for k in ("policy", "predicted_tokens_per_s", "measured_tokens_per_s",
              "limit_tokens_per_s", "prefill_s", "decode_s"):
        assert k in loc
    assert loc["measured_tokens_per_s"] > 0 and "scaled" in loc["note"]
    # the flag's 0.3 is cut to whole pages: the policy printed and written is what ran
    wg = loc["store_gpu_weight_fraction"]
    assert wg < 0.3 and loc["policy"]["gpu_weight_fraction"] == wg
    assert f"--gpu_weight_fraction=0.3 runs as {wg:.4g}" in r.stdout
    assert f"gpu_weight_fraction={wg!r}," in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_continuous_by_default_runs_a_trace(tmp_path):
    out = tmp_path / "c.json"
    r = run("--config", "mixtral_l4", "--local_hidden_size", "64", "--local_num_layers",
            "2", "--workload", "mtbench", "--num_requests", "6", "--target_sequences",
            "256", "--output_json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    t, loc = d["target"], d["local"]
    assert d["batching"] == t["batching"] == loc["batching"] == "continuous"
    assert t["limit_tokens_per_s"] >= t["predicted_tokens_per_s"] > 0
    assert t["requests"] == 256 and t["policy"]["prefill_tokens_per_sweep"] > 0
    assert loc["requests"] == 6 and loc["measured_tokens_per_s"] > 0
    assert loc["sweeps"] >= 32 and loc["predicted_sweeps"] >= 32  # the trace's outputs
    assert loc["policy"]["max_concurrency"] <= 6


@pytest.mark.parametrize("args,needle", [
    (["--batching", "dynamic"], "--batching"),
    (["--workload", "nope"], "--workload"),
    (["--attention_device", "gpu"], "drop --attention_device=gpu or add --batching=static"),
    (["--workload", "rag", "--prompt_len", "5"], "--workload gives the lengths"),
    (["--workload", "rag", "--batching", "static"], "--workload runs ragged requests"),
    (["--batching", "static", "--num_requests", "4"], "belong to continuous batching"),
    (["--config", "nope"], "--config"),
    (["--batch_size", "0"], "--batch_size"),
    (["--checkpoint", "/nonexistent/ckpt"], "--checkpoint"),
    (["--timeline_png", "x.jpg"], "--timeline_png"),
    (["--timeline_png", "/proc/x.png"], "--timeline_png=/proc/x.png: must be a writable"),
    (["--batch_size", "10", "--micro_batch_size", "4"], "multiple of --micro_batch_size"),
    (["--skip_local", "--device_memory_gb", "2"], "--skip_local runs nothing here"),
    (["--skip_local", "--nooverlap"], "so --overlap would be ignored"),
    (["--gpu_weight_fraction", "nan"], "--gpu_weight_fraction=nan: must be a finite"),
    (["--device_memory_gb", "inf"], "--device_memory_gb=inf: must be a finite number > 0"),
    (["--checkpoint", "experiments", "--local_num_layers", "2"],
     "drop --local_hidden_size and --local_num_layers"),
    (["--skip_local", "--prompt_len", "40000"], "exceeds mixtral_8x7b's 32768 positions"),
    (["--skip_local", "--batching", "static", "--prompt_len", "30000"],
     "--config=mixtral_l4: no policy fits mixtral_8x7b"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["stray"], "throughput: unexpected arguments: stray"),
])
def test_bad_flags_exit_with_one_line(args, needle):
    r = run(*args, "--output_json", "")  # all caught before the local run
    assert r.returncode != 0
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unwritable_output_json_is_refused_before_running(tmp_path):
    (tmp_path / "afile").write_text("")
    r = run("--skip_local", "--output_json", str(tmp_path / "afile" / "x.json"))
    assert r.returncode != 0 and "--output_json" in r.stderr
    assert "target (" not in r.stdout  # refused at start-up, nothing ran


def test_budget_nothing_fits_is_one_line(tmp_path):
    r = run("--local_hidden_size", "64", "--local_num_layers", "2", "--prompt_len", "8",
            "--gen_len", "2", "--device_memory_gb", "0.000001", "--output_json", "")
    assert r.returncode != 0
    assert "throughput: --device_memory_gb" in r.stderr and "Traceback" not in r.stderr


def test_batch_whose_activations_do_not_fit_is_one_line():
    r = run("--local_hidden_size", "64", "--local_num_layers", "2", "--prompt_len", "200",
            "--gen_len", "2", "--batch_size", "64", "--micro_batch_size", "64",
            "--attention_device", "gpu", "--device_memory_gb", "0.05", "--output_json", "",
            "--batching", "static")
    assert r.returncode != 0, r.stdout[-1000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("throughput: --device_memory_gb=0.05: a batch of 64") \
        and "of device memory" in last and "Traceback" not in r.stderr


def test_help_exits_zero():
    r = run("--help")
    assert r.returncode == 0 and "--gpu_weight_fraction" in r.stdout
