"""Quantized native checkpoints: convert → load equals quantize-on-load; codes and scales
stored side by side; a mismatched or corrupt one is a one-line ValueError."""

import json
import os
import shutil

import numpy as np
import pytest

import moejax
from moejax.checkpoints import load_store
from moejax.checkpoints.native import META
from moejax.checkpoints.native import convert_hf as convert
from moejax.quant import QTensor
from tests.oracle import hf_model

PROMPTS = [[1, 5, 9, 2], [7, 3]]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_model("mixtral", tmp_path_factory.mktemp("hfq"))[1]


@pytest.fixture(scope="module")
def native(hf, tmp_path_factory):
    """int4, G = 16: h = 48 is 3 groups, f = 40 is 2 groups and a ragged one of 8."""
    out = str(tmp_path_factory.mktemp("nq") / "native")
    convert(hf, out, expert_dtype="int4", group_size=16)
    return out


def test_convert_equals_quantize_on_load(hf, native):
    m = moejax.load_pretrained(native)
    assert (m.config.expert_dtype, m.config.expert_group_size) == ("int4", 16)
    w2 = m.params["layers_0"]["experts"]["w2"]
    assert isinstance(w2, QTensor) and w2.q.shape == (4, 20, 48) and w2.scale.shape == (4, 3, 48)
    meta = json.load(open(os.path.join(native, META)))
    assert meta["leaves"]["layers_0/experts/w2/q"]["shape"] == [4 * 20 * 48]
    assert meta["leaves"]["layers_0/experts/w2/scale"]["shape"] == [4 * 3 * 48]
    ref = moejax.Engine(moejax.load_pretrained(hf), expert_dtype="int4", expert_group_size=16)
    assert ref.cfg == m.config
    np.testing.assert_array_equal(ref.prompt_logits(PROMPTS),
                                  moejax.Engine(m).prompt_logits(PROMPTS))
    store = load_store(native, gpu_weight_fraction=0.4, page_bytes=4 * 1000)
    assert store.plan.resident_cols == 16 and store.plan.streaming
    assert moejax.Engine(store, micro_batch_size=2).generate(PROMPTS, 4) == \
        ref.generate(PROMPTS, 4)


def _edited(native, tmp_path, edit):
    bad = str(tmp_path / "bad")
    shutil.copytree(native, bad)
    meta = json.load(open(os.path.join(bad, META)))
    edit(meta)
    json.dump(meta, open(os.path.join(bad, META), "w"))
    return bad


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["config"].update(expert_group_size=8), "scales .* group size 8"),
    (lambda m: m["leaves"]["layers_1/experts/w1/scale"].update(shape=[7]), "scales"),
    (lambda m: m["leaves"]["layers_0/experts/w3/q"].update(shape=[4 * 48 * 40]),
     "packed codes"),
    (lambda m: m["config"].update(expert_dtype=None), "missing leaf .* float experts"),
    (lambda m: m["leaves"]["layers_0/experts/w2/scale"].update(crc32=1), "CRC-32"),
], ids=["group-size", "scale-shape", "packed-length", "float-config", "corrupt-scales"])
def test_bad_quantized_checkpoint_is_one_line_value_error(native, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match) as e:
        moejax.load_pretrained(_edited(native, tmp_path, edit))
    assert "\n" not in str(e.value)


def test_engine_refuses_a_store_of_another_format(native):
    store = load_store(native)
    with pytest.raises(ValueError, match="holds int4 experts"):
        moejax.Engine(store, expert_dtype="int8")
