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


def _edit_meta(change):
    def edit(d):
        meta = json.load(open(d / META))
        change(meta)
        json.dump(meta, open(d / META, "w"))
    return edit


def _set(key, value):
    return _edit_meta(lambda m: m.__setitem__(key, value))


def _leaf(name, key, value):
    def change(m):
        if value is None:
            del m["leaves"][name][key]
        else:
            m["leaves"][name][key] = value(m["leaves"][name][key])
    return _edit_meta(change)


@pytest.mark.parametrize("edit,needle", [
    (_set("leaves", []), "'leaves' must be a JSON object"),
    (_set("config", [1, 2]), "'config' must be a JSON object"),
    (_set("page_bytes", "4"), "'page_bytes' must be a JSON integer"),
    (_set("version", 3), "format version 3"),
    (_leaf("embed/embedding", "crc32", None), "leaf 'embed/embedding' must be an object"),
    (_edit_meta(lambda m: m["leaves"].__setitem__("final_norm/scale", 3)),
     "leaf 'final_norm/scale' must be an object"),
    (_leaf("lm_head/kernel", "crc32", lambda c: c ^ 1),
     "leaf 'lm_head/kernel' fails its CRC-32"),
    (_leaf("layers_0/experts/w1", "shape", lambda s: [s[0] - 1]),
     r"leaf 'layers_0/experts/w1' has shape \(7679,\), expected \(7680,\)"),
    (_edit_meta(lambda m: m["config"].__setitem__("dense_layers", 5)), "bad config"),
    (lambda d: (d / META).write_bytes(b'{"format": "\xff"}'),
     "unreadable native checkpoint metadata"),
], ids=["leaves-list", "config-list", "page-bytes-str", "version-3", "no-crc",
        "leaf-int", "crc-edited", "shape-edited", "dense-layers-int", "not-utf8"])
def test_malformed_metadata_is_one_value_error(native, tmp_path, edit, needle):
    with pytest.raises(ValueError, match=needle):
        moejax.load_pretrained(corrupt_copy(native, tmp_path, edit))


def test_dtype_override_casts_a_native_checkpoint(hf, native):
    m = moejax.load_pretrained(native, dtype="bfloat16")
    assert m.config.dtype == "bfloat16"
    assert m.params["layers_0"]["experts"]["w1"].dtype == jax.numpy.bfloat16
    ref = moejax.load_pretrained(hf, dtype="bfloat16")
    assert same_params(m.params, ref.params)


def test_page_bytes_not_a_multiple_of_the_dtype_is_refused(hf, tmp_path):
    with pytest.raises(ValueError, match="page_bytes=6 must be a positive multiple of 4"):
        convert(hf, str(tmp_path / "out"), page_bytes=6)


def test_failed_conversion_leaves_no_tmp(hf, tmp_path, monkeypatch):
    import moejax.checkpoints.hf as hf_mod

    def half(checkpoint, cfg, place):
        place(("embed", "embedding"), np.zeros((101, 48), np.float32))
        raise ValueError("disk full")
    monkeypatch.setattr(hf_mod, "load_hf_params", half)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="disk full"):
        convert(hf, str(out))
    assert not os.path.exists(str(out) + ".tmp") and not os.path.exists(out)


def test_a_save_whose_rename_failed_is_cleaned_up_by_the_next(hf, tmp_path):
    from moejax.checkpoints.hf import hf_checkpoint_config, load_hf_params
    from moejax.checkpoints.native import NativeWriter

    out = tmp_path / "out"
    w = NativeWriter(str(out), hf_checkpoint_config(hf))
    load_hf_params(hf, w.cfg, place=w.add)
    os.makedirs(out / "x")  # the rename onto a non-empty directory fails
    with pytest.raises(OSError):
        w.finish()
    shutil.rmtree(out)
    convert(hf, str(out))
    assert not os.path.exists(out / ".moejax-partial")
    assert moejax.load_pretrained(out).config.num_layers == 2


def test_foreign_tmp_directory_is_not_deleted(hf, tmp_path):
    out = tmp_path / "out"
    os.makedirs(str(out) + ".tmp")
    (tmp_path / "out.tmp" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="out.tmp' exists and is not an unfinished moejax"):
        convert(hf, str(out))
    assert (tmp_path / "out.tmp" / "notes.txt").read_text() == "precious"


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
    from moejax.checkpoints.hf import hf_checkpoint_config
    from moejax.checkpoints.native import NativeWriter

    out = tmp_path / "out"
    NativeWriter(str(out), hf_checkpoint_config(hf))  # killed before finish()
    assert os.path.exists(str(out) + ".tmp")
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
