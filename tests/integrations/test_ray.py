"""moejax.integrations.ray on a local two-CPU Ray cluster (one per module): batches over
two engine workers, one killed mid-run, equal to a one-machine run, each id once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from experiments.make_tiny import make_tiny  # noqa: E402
from moejax.integrations.ray import (_Generator, GenerateBatch, batches,  # noqa: E402
                                     check_address, run_requests)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny_ray") / "ckpt"))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(0)
    return [{"id": f"r{i}" if i % 2 else i, "index": i,
             "ids": list(map(int, rng.integers(1, 300, 3 + i % 5))),
             "max_new_tokens": 4 if i < 6 else 6} for i in range(10)]


@pytest.fixture(scope="module")
def one_machine(ckpt, requests):
    gen = _Generator(ckpt)
    return {json.dumps(rec["id"]): rec for b in batches(requests, 3)
            for rec in gen.records(b)}, gen


def test_two_workers_one_killed_mid_run_equal_one_machine(cluster, ckpt, requests,
                                                          one_machine):
    events, seen = [], []
    for recs in run_requests(ckpt, requests, 2, batch_size=3, fault={0: 0},
                             events=events):
        seen += recs
    assert events and events[0][0] == "retry"  # worker 0 died in its first batch
    keys = [json.dumps(r["id"]) for r in seen]
    assert sorted(keys) == sorted(one_machine[0]) and len(set(keys)) == len(keys)
    assert {json.dumps(r["id"]): r for r in seen} == one_machine[0]


def test_map_batches_callable_keeps_the_batch_order(ckpt, requests, one_machine,
                                                    monkeypatch):
    gb = GenerateBatch.__new__(GenerateBatch)
    gb.gen = one_machine[1]  # the loaded engine: map_batches constructs it once per actor
    cols = {k: [r[k] for r in requests[4:8]] for k in ("id", "index", "ids",
                                                       "max_new_tokens")}
    out = gb(cols)
    assert out["id"] == cols["id"]
    assert [one_machine[0][json.dumps(i)]["token_ids"] for i in cols["id"]] == \
        out["token_ids"]


def test_unreachable_address_is_one_line_before_loading(tmp_path, ckpt):
    with pytest.raises(ValueError, match=r"ray address '127.0.0.1:1' is unreachable"):
        check_address("127.0.0.1:1")
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        check_address("nowhere")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "the cat"}\n')
    r = subprocess.run([sys.executable, "-m", "experiments.generate", "--checkpoint", ckpt,
                        "--prompts", prompts, "--output", tmp_path / "o.jsonl",
                        "--ray_address", "127.0.0.1:1"], cwd=ROOT, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode != 0 and "unreachable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.jsonl").exists()
