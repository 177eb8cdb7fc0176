"""Native (orbax) checkpoints: round trip, CLI, dispatch, and loud failures."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import moejax
from moejax.checkpoints.native import convert_hf as convert
from moejax.checkpoints.native import META, PARAMS
from tests.oracle import hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_model("mixtral", tmp_path_factory.mktemp("hf"))[1]


@pytest.fixture(scope="module")
def native(hf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("n") / "native")
    convert(hf, out, page_bytes=4 * 300)
    return out


def same_params(a, b) -> bool:
    return jax.tree.all(jax.tree.map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_round_trip_equals_the_hf_load(hf, native):
    a, b = moejax.load_pretrained(hf), moejax.load_pretrained(native)
    assert b.config == a.config and same_params(a.params, b.params)


def test_experts_stored_flat_and_chunked_by_page(native):
    meta = json.load(open(os.path.join(native, META)))
    assert meta["page_bytes"] == 1200
    assert meta["leaves"]["layers_0/experts/w1"]["shape"] == [4 * 48 * 40]


def test_experts_on_host_are_numpy(native):
    m = moejax.load_pretrained(native, experts="host")
    assert isinstance(m.params["layers_1"]["experts"]["w2"], np.ndarray)
    assert isinstance(m.params["layers_1"]["attn"]["q_proj"]["kernel"], jax.Array)


def test_cli_with_dtype_cast(hf, tmp_path):
    out = tmp_path / "bf16"
    subprocess.run([sys.executable, "-m", "experiments.convert", "--checkpoint", hf,
                    "--out", str(out), "--dtype", "bfloat16"], check=True, cwd=ROOT,
                   capture_output=True)
    m = moejax.load_pretrained(out)
    assert m.config.dtype == "bfloat16"
    assert m.params["layers_0"]["experts"]["w1"].dtype == jax.numpy.bfloat16


def corrupt_copy(native, tmp_path, edit):
    out = tmp_path / "c"
    shutil.copytree(native, out)
    edit(out)
    return out


def _flip_data_byte(d):
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / PARAMS / "layers_1") for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    for name in (f for f in files if os.path.getsize(f) > 4096):  # the data files
        data = bytearray(open(name, "rb").read())
        for i in range(100, len(data), 997):  # spread over every chunk in the file
            data[i] ^= 0xFF
        open(name, "wb").write(bytes(data))


def _drop_leaf(d):
    meta = json.load(open(d / META))
    del meta["leaves"]["layers_1/experts/w3"]
    json.dump(meta, open(d / META, "w"))


@pytest.mark.parametrize("edit,needle", [
    (lambda d: os.remove(d / META), "is not a checkpoint"),
    (lambda d: (d / META).write_text("{"), "unreadable native checkpoint metadata"),
    (lambda d: shutil.rmtree(d / PARAMS), "no params/ directory"),
    (_drop_leaf, "missing leaf 'layers_1/experts/w3'"),
    (_flip_data_byte, "corrupt native checkpoint"),
    (lambda d: shutil.rmtree(d / PARAMS / "layers_1" / "ocdbt.process_0"),
     "corrupt native checkpoint"),
], ids=["no-meta", "bad-meta", "no-params", "meta-leaf-missing", "flipped-byte",
        "missing-data"])
def test_corrupt_or_partial_directories_fail_loudly(native, tmp_path, edit, needle):
    with pytest.raises(ValueError, match=needle):
        moejax.load_pretrained(corrupt_copy(native, tmp_path, edit))


def test_interrupted_conversion_leaves_no_checkpoint(hf, tmp_path):
    out = tmp_path / "out"
    os.makedirs(str(out) + ".tmp")  # what a killed save leaves behind
    with pytest.raises(ValueError, match="does not exist"):
        moejax.load_pretrained(out)
    convert(hf, str(out))  # and a re-run replaces the leftover
    assert moejax.load_pretrained(out).config.num_layers == 2


def test_existing_output_is_not_overwritten(hf, native):
    with pytest.raises(ValueError, match="already exists"):
        convert(hf, native)


def test_format_1_one_tree_checkpoints_still_load(hf, native, tmp_path):
    import orbax.checkpoint as ocp

    out = tmp_path / "v1"
    os.makedirs(out)
    tree, ckptr = {}, ocp.PyTreeCheckpointer()
    for group in os.listdir(os.path.join(native, PARAMS)):  # format 2: one per group
        tree.update(ckptr.restore(os.path.join(native, PARAMS, group)))
    ckptr.save(str(out / PARAMS), args=ocp.args.PyTreeSave(tree))
    meta = json.load(open(os.path.join(native, META)))
    json.dump({**meta, "version": 1}, open(out / META, "w"))
    assert same_params(moejax.load_pretrained(out).params, moejax.load_pretrained(hf).params)
