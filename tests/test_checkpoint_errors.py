"""Broken checkpoints give one ValueError naming the file and tensor."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moejax
from tests.oracle import hf_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, d = hf_model("mixtral", tmp_path_factory.mktemp("mixtral"))
    return d


def _copy_with(ckpt, tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_tensor_named(ckpt, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    d = _copy_with(ckpt, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        moejax.load_pretrained(d)


def test_extra_tensor_named_with_file(ckpt, tmp_path):
    d = _copy_with(ckpt, tmp_path, lambda t: t.update(stray=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="model.safetensors: unexpected tensor 'stray'"):
        moejax.load_pretrained(d)


def test_misshaped_tensor_named(ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    d = _copy_with(ckpt, tmp_path, lambda t: t.update({name: t[name][:, :-1].copy()}))
    with pytest.raises(ValueError, match=f"'{name}' has shape"):
        moejax.load_pretrained(d)


def test_truncated_file(ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    f = out / "model.safetensors"
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        moejax.load_pretrained(out)


def test_garbage_header(ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        moejax.load_pretrained(out)


def test_missing_directory_and_config():
    with pytest.raises(ValueError, match="does not exist"):
        moejax.load_pretrained("/nonexistent/ckpt")


def test_bad_config_json(ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        moejax.load_pretrained(out)


def _raw_header(header) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + b"\x00" * 16


@pytest.mark.parametrize("header", [
    [1, 2],
    {"w": [1]},
    {"w": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": None}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},  # past the end
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},  # shorter than 2 f32
], ids=["list", "entry-not-object", "shape-str", "offsets-null", "negative", "past-end",
        "too-short"])
def test_malformed_header_is_one_value_error(tmp_path, header):
    from moejax.checkpoints.safetensors_io import SafetensorsFile

    f = tmp_path / "x.safetensors"
    f.write_bytes(_raw_header(header))
    with pytest.raises(ValueError, match="safetensors file .*x.safetensors"):
        SafetensorsFile(str(f))


def test_deeply_nested_header_is_unreadable_not_a_recursion_error(tmp_path):
    from moejax.checkpoints.safetensors_io import SafetensorsFile

    h = b"[" * 100_000 + b"]" * 100_000
    f = tmp_path / "x.safetensors"
    f.write_bytes(len(h).to_bytes(8, "little") + h)
    with pytest.raises(ValueError, match="unreadable safetensors file .*x.safetensors"):
        SafetensorsFile(str(f))


def _split_in_two(ckpt, tmp_path, edit_second=None, index_edit=None):
    """The checkpoint as two shards s1 (embedding, LM head) and s2 (the rest) plus an
    index; `edit_second(tensors)` and `index_edit(weight_map)` alter them first."""
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    tensors = load_file(str(out / "model.safetensors"))
    os.remove(out / "model.safetensors")
    first = {k: v for k, v in tensors.items() if "layers" not in k}
    second = {k: v for k, v in tensors.items() if "layers" in k}
    (edit_second or (lambda t: None))(second)
    save_file(first, str(out / "s1.safetensors"))
    save_file(second, str(out / "s2.safetensors"))
    wm = {k: "s1.safetensors" for k in first} | {k: "s2.safetensors" for k in second}
    (index_edit or (lambda m: None))(wm)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return out


def test_two_shards_load_like_one(ckpt, tmp_path):
    tok = np.arange(6)[None] % 50
    np.testing.assert_array_equal(moejax.load_pretrained(_split_in_two(ckpt, tmp_path))
                                  .logits(tok), moejax.load_pretrained(ckpt).logits(tok))


def test_tensor_stored_in_two_shards_is_refused(ckpt, tmp_path):
    def dup(t):
        t["lm_head.weight"] = np.full((101, 48), 7.0, np.float32)
    with pytest.raises(ValueError, match="'lm_head.weight' is stored twice: in .*s1"):
        moejax.load_pretrained(_split_in_two(ckpt, tmp_path, edit_second=dup))


def test_index_naming_a_tensor_its_shard_lacks_is_refused(ckpt, tmp_path):
    def move(wm):
        wm["lm_head.weight"] = "s2.safetensors"
    with pytest.raises(ValueError, match="names tensors absent from their shard: "
                                         r"\['lm_head.weight'\]"):
        moejax.load_pretrained(_split_in_two(ckpt, tmp_path, index_edit=move))


def test_unsupported_tensor_dtype_is_named_not_called_corrupt(tmp_path):
    from moejax.checkpoints.safetensors_io import SafetensorsFile

    f = tmp_path / "x.safetensors"
    f.write_bytes(_raw_header({"u": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}}))
    with pytest.raises(ValueError, match="tensor 'u' has dtype U32, which moejax does not"):
        SafetensorsFile(str(f))


@pytest.mark.parametrize("index,needle", [
    ([], "unreadable index"),
    ({"weight_map": ["a"]}, "weight_map must map tensor names to shard file names"),
    ({"weight_map": {"a": 3}}, "weight_map must map tensor names to shard file names"),
], ids=["list", "map-is-list", "shard-is-int"])
def test_malformed_index_is_one_value_error(ckpt, tmp_path, index, needle):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    os.remove(out / "model.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=needle):
        moejax.load_pretrained(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_without_dtype_takes_the_tensors_dtype(ckpt, tmp_path, dtype):
    """HF loads such a checkpoint in its stored dtype (`dtype="auto"`), not bfloat16."""
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    if dtype != "float32":
        import ml_dtypes
        t = load_file(str(out / "model.safetensors"))
        save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()},
                  str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg))
    m = moejax.load_pretrained(out)
    assert m.config.dtype == dtype
    assert m.params["embed"]["embedding"].dtype == dtype
