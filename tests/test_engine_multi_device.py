"""Tensor parallel over k devices (host_offload/sharding.py) on the four CPU devices that
tests/conftest.py forces: greedy tokens equal the single-device reference."""

import jax
import numpy as np
import pytest

import moejax
from moejax.host_offload import make_plan
from moejax.host_offload.sharding import EXPERT_SPECS, check_split
from moejax.model import MoEModel
from moejax.schedule.predict import memory_bytes
from moejax.model_config.workload import Workload

NEW = 6
# 8 q heads over 4 KV heads (GQA group 2), f = 96: 4 devices take 2 q heads, 1 KV head
# and 24 columns of every expert each; pages of 10 columns round down to 8 (4 devices)
CFG = moejax.get_model("tiny_mixtral").replace(num_layers=5, num_heads=8, num_kv_heads=4,
                                               head_dim=8)
PAGE = 10 * CFG.expert_col_bytes()


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(CFG, seed=1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(0, CFG.vocab_size, n))) for n in (5, 11, 2, 7)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return moejax.Engine(model).generate(prompts, NEW)


def _devices(k):
    assert len(jax.devices()) >= 4, "tests/conftest.py forces 4 CPU devices"
    return jax.devices()[:k]


@pytest.mark.parametrize("k", [1, 4])
def test_k_devices_stream_their_share_and_equal_the_reference(model, prompts, reference, k):
    # a per-device budget that fits this batch only streaming every expert column
    budget = int(memory_bytes(CFG, Workload(16, NEW), 2, 2, 0.0, devices=k)[0])
    assert make_plan(CFG, PAGE, 1.0, shards=k).device_bytes() > budget  # must stream
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=PAGE, micro_batch_size=2, devices=_devices(k))
    st = e.store
    assert st.shards == k and st.plan.resident_cols == 0 and st.num_pages(0) > 0
    assert all(p.cols % k == 0 for p in st.plan.pages)
    assert st.device_bytes == st.plan.device_bytes() <= budget
    assert e.generate(prompts, NEW) == reference
    _check_shards(st, k, page=True)


def _check_shards(st, k, page):
    """Each of the k devices holds 1/k of a page's (or the resident part's) columns and
    of the q projection's heads."""
    w1, _, w2 = st.wait(0, step=99)[1 if st.plan.resident_cols and page else 0]
    cols = st.plan.pages[0].cols if page else st.plan.resident_cols
    assert w1.sharding.spec == EXPERT_SPECS["w1"] and len(w1.sharding.device_set) == k
    assert {s.data.shape for s in w1.addressable_shards} == {
        (CFG.num_experts, CFG.hidden_size, cols // k)}
    assert {s.data.shape[1] for s in w2.addressable_shards} == {cols // k}
    q = st.device_params(0)["attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {
        (CFG.hidden_size, CFG.num_heads * CFG.head_dim // k)}
    st.release_all()


def test_two_devices_resident_columns_continuous(model, prompts, reference):
    e = moejax.Engine(model, gpu_weight_fraction=0.5, page_bytes=PAGE, micro_batch_size=2,
                      devices=_devices(2))
    assert e.store.plan.resident_cols == 48 and e.store.num_pages(0) > 0
    assert e.generate(prompts, NEW, batching="continuous") == reference
    _check_shards(e.store, 2, page=False)


def test_bad_devices_are_one_line_errors(model):
    with pytest.raises(ValueError, match=r"devices: 5 requested but only 4 cpu device"):
        moejax.Engine(model, devices=jax.devices() + jax.devices()[:1])
    with pytest.raises(ValueError, match="lists a device twice"):
        moejax.Engine(model, devices=jax.devices()[:1] * 2)
    with pytest.raises(ValueError, match=r"3 devices do not divide num_heads=8"):
        moejax.Engine(model, devices=jax.devices()[:3])
    with pytest.raises(ValueError, match=r"4 devices do not divide num_kv_heads=2"):
        check_split(CFG.replace(num_kv_heads=2), 4)
    with pytest.raises(ValueError, match=r"2 devices do not divide expert_ffn_size=95"):
        check_split(CFG.replace(expert_ffn_size=95), 2)
    with pytest.raises(ValueError, match=r"device_memory_bytes=1000 per device \(of 2\) "
                                         r"is too small by"):
        moejax.Engine(model, device_memory_bytes=1000, devices=_devices(2))
    with pytest.raises(ValueError, match="offload=False takes no offload knobs"):
        moejax.Engine(model, offload=False, devices=_devices(2))


def test_two_devices_int8_experts_equal_one_device(model, prompts):
    # f = 96 in groups of 16: 2 devices take 3 whole w2 groups each; pages round to 32
    one = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE,
                        micro_batch_size=2, expert_dtype="int8", expert_group_size=16)
    two = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE,
                        micro_batch_size=2, expert_dtype="int8", expert_group_size=16,
                        devices=_devices(2))
    assert all(p.cols % 32 == 0 for p in two.store.plan.pages[:-1])
    assert two.generate(prompts, NEW) == one.generate(prompts, NEW)
    with pytest.raises(ValueError, match=r"whole groups of 32"):
        check_split(CFG.replace(expert_dtype="int8", expert_group_size=32), 4)
