"""Memory discipline: loading a checkpoint costs at most 1.2x the weight bytes of RSS,
converting one well under 1x (a layer at a time).

A ~300 MB random Mixtral-family checkpoint is written as HF safetensors (and converted to
the native format); each load runs in a fresh subprocess, which reports its resident set
just before loading (after JAX is up) and its peak (`resource.getrusage` ru_maxrss) after.
The figure checked is peak − before: what loading added, weights included. The probe runs
under `sh -c "...; true"` so it is not the direct exec of a fork of this (large) pytest
process: Linux carries a process's RSS high-water mark across fork+exec into ru_maxrss.
"""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from moejax.checkpoints.weight_maps import mixtral_rules
from moejax.model_config.model import ModelConfig

HF_CONFIG = dict(model_type="mixtral", vocab_size=1024, hidden_size=512,
                 intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=256, rope_theta=1e4, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, dtype="float32")

PROBE = r"""
import json, os, resource, sys
import jax, jax.numpy as jnp, orbax.checkpoint
import moejax
from moejax.checkpoints import load_store
jnp.zeros(8).block_until_ready()  # libraries imported and JAX up: the baseline
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
how, path = sys.argv[1], sys.argv[2]
before = rss()
if how == "device":
    keep = moejax.load_pretrained(path)
elif how == "host":
    keep = moejax.load_pretrained(path, experts="host")
elif how == "convert":
    from moejax.checkpoints.native import convert_hf
    keep = convert_hf(path, sys.argv[3])
else:
    keep = load_store(path, gpu_weight_fraction=0.25, page_bytes=4 << 20)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(before=before, peak=peak)))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(hf dir, native dir, weight bytes) of a random ~300 MB float32 Mixtral."""
    from safetensors.numpy import save_file

    from moejax.checkpoints.native import convert_hf as convert

    d = tmp_path_factory.mktemp("rss")
    hf = d / "hf"
    os.makedirs(hf)
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    cfg = ModelConfig.from_hf(str(hf))
    rng = np.random.default_rng(0)
    tensors = {s: rng.standard_normal(r.src_shape, np.float32) * np.float32(0.02)
               for r in mixtral_rules(cfg).values() for s in r.sources}
    save_file(tensors, str(hf / "model.safetensors"))
    del tensors
    convert(str(hf), str(d / "native"))
    return str(hf), str(d / "native"), cfg.weight_bytes()


@pytest.mark.parametrize("which,how", [("hf", "device"), ("native", "host"),
                                       ("native", "store")])
def test_peak_rss_while_loading_is_at_most_1_2x_weights(checkpoints, which, how):
    hf, native, weight_bytes = checkpoints
    assert 250e6 < weight_bytes < 400e6
    path = hf if which == "hf" else native
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)} {how} {path}; true"
    out = subprocess.run(["/bin/sh", "-c", cmd], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    added = r["peak"] - r["before"]
    print(f"{which}->{how}: peak RSS added {added / weight_bytes:.3f}x weight bytes")
    assert added <= 1.2 * weight_bytes, (added / weight_bytes, r)


def test_converting_holds_about_a_layer_not_the_model(checkpoints, tmp_path):
    hf, _, weight_bytes = checkpoints
    out = tmp_path / "converted"
    cmd = (f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)} convert {hf} {out}; "
           "true")
    r = json.loads(subprocess.run(["/bin/sh", "-c", cmd], check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1])
    added = r["peak"] - r["before"]
    print(f"convert: peak RSS added {added / weight_bytes:.3f}x weight bytes")
    assert added <= 0.75 * weight_bytes, (added / weight_bytes, r)  # 8 layers: ~0.6x
