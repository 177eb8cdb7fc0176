"""The offloaded Engine equals the all-on-device reference, for every placement knob."""

import numpy as np
import pytest

import moejax
from moejax.host_offload import make_plan
from moejax.model import MoEModel
from moejax.model_config.workload import Workload
from moejax.schedule.predict import memory_bytes
from tests.oracle import hf_model, rel_err

NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny HF Mixtral (widened weights: routing is not near-tied), 5 MoE layers so a
    budget can force streaming (needs L_moe > 3, see weight_store.py)."""
    _, d = hf_model("mixtral", tmp_path_factory.mktemp("mixtral5"), num_hidden_layers=5)
    return moejax.load_pretrained(d)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(0, 101, n))) for n in (5, 11, 2, 7)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return moejax.Engine(model).generate(prompts, NEW)


def masked(logits, prompts):
    lens = np.array([len(p) for p in prompts])
    return logits[np.arange(logits.shape[1])[None] < lens[:, None]]


@pytest.fixture(scope="module")
def reference_logits(model, prompts):
    t = max(map(len, prompts))
    tokens = np.array([p + [0] * (t - len(p)) for p in prompts])
    am = np.array([[1] * len(p) + [0] * (t - len(p)) for p in prompts])
    return masked(np.asarray(model.logits(tokens, am)), prompts)


def test_no_knob_is_the_all_on_device_reference(model):
    e = moejax.Engine(model)
    assert not e.offload and e.store is None and e.attention_device == "gpu"


@pytest.mark.parametrize("knobs", [
    dict(gpu_weight_fraction=0.0),
    dict(gpu_weight_fraction=0.5, page_bytes=4 * 1001),
    dict(gpu_weight_fraction=1.0),
    dict(gpu_weight_fraction=0.3, page_bytes=4 * 333, attention_device="gpu"),
    dict(gpu_weight_fraction=0.0, page_bytes=4 * 777, host_memory="numpy"),
], ids=["wg0", "wg0.5-ragged-pages", "wg1", "gpu-attention", "numpy-host"])
def test_greedy_tokens_identical(model, prompts, reference, knobs):
    assert moejax.Engine(model, **knobs).generate(prompts, NEW) == reference


def _need(model, wg, **kw):
    """Predicted peak device bytes of the prompts' batch as one micro-batch (prompts
    pad to 16 positions)."""
    return int(memory_bytes(model.config, Workload(16, NEW), 4, 1, wg, **kw)[0])


def test_budget_that_fits_only_streaming_every_expert(model, prompts, reference):
    budget = _need(model, 0.0)
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=4 * 1000)
    assert e.store.num_pages(0) > 0
    assert e.store.device_bytes <= budget
    assert e.generate(prompts, NEW, batching="static") == reference


def test_budget_alone_leaves_room_for_activations(model):
    budget = int(1.2 * make_plan(model.config, 4 * 1000, 0.0).device_bytes())
    e = moejax.Engine(model, device_memory_bytes=budget, page_bytes=4 * 1000)
    assert 0 < e.store.gpu_weight_fraction < 1
    assert e.store.device_bytes <= (1 - moejax.placement.ACTIVATION_SHARE) * budget


def test_batch_whose_activations_do_not_fit_is_refused_before_running(model, prompts):
    budget = make_plan(model.config, 4 * 1000, 0.0).device_bytes()  # weights only
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=4 * 1000)
    with pytest.raises(ValueError, match=r"needs ~[0-9.]+ MiB of device memory; "
                                         rf"device_memory_bytes={budget} "):
        e.generate(prompts, NEW)
    assert e.last_run is None


@pytest.mark.parametrize("knobs", [dict(gpu_weight_fraction=0.0),
                                   dict(gpu_weight_fraction=0.5, page_bytes=4 * 1001,
                                        attention_device="gpu")], ids=["cpu", "gpu"])
def test_prefill_logits_within_1e5(model, prompts, reference_logits, knobs):
    got = masked(moejax.Engine(model, **knobs).prompt_logits(prompts), prompts)
    assert rel_err(got, reference_logits) < 1e-5


def test_store_loaded_straight_from_the_checkpoint(model, prompts, reference, tmp_path):
    from moejax.checkpoints.native import convert_hf as convert
    from moejax.checkpoints import load_store

    _, d = hf_model("mixtral", tmp_path / "hf", num_hidden_layers=5)
    convert(d, str(tmp_path / "native"), page_bytes=4 * 512)
    store = load_store(tmp_path / "native", gpu_weight_fraction=0.2, page_bytes=4 * 900)
    assert moejax.Engine(store).generate(prompts, NEW) == reference


def test_dense_layers_are_run_too():
    cfg = moejax.get_model("tiny_mixtral").replace(num_layers=3, dense_layers=(1,),
                                                   dense_ffn_size=48)
    m = MoEModel.random(cfg, seed=2)
    ps = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert moejax.Engine(m, gpu_weight_fraction=0).generate(ps, 4) == \
        moejax.Engine(m).generate(ps, 4)


def test_int8_kv_cache_accuracy(model, prompts, reference_logits):
    """int8 KV: per attention call ≤ 2 % error (test_kv_cache); end to end the router's
    discrete top-k amplifies it, so only top-1 agreement of prefill logits is asserted."""
    got = masked(moejax.Engine(model, kv_dtype="int8").prompt_logits(prompts), prompts)
    assert np.mean(got.argmax(-1) == reference_logits.argmax(-1)) >= 0.95


def test_int8_kv_cache_is_priced_at_one_byte(model, monkeypatch):
    """The micro-batching search prices the host KV cache the engine will keep."""
    import importlib

    mod = importlib.import_module("moejax.schedule.search")
    seen, real = [], mod.predict
    monkeypatch.setattr(mod, "predict", lambda m, hw, wl, pol: (
        seen.append(wl.kv_bytes_per_elem), real(m, hw, wl, pol))[1])
    moejax.Engine(model, kv_dtype="int8").policy_for(8, 16, 4)
    assert seen and set(seen) == {1}


@pytest.mark.parametrize("knobs,needle", [
    (dict(attention_device="tpu"), "attention_device='tpu'"),
    (dict(page_bytes=0), "page_bytes=0"),
    (dict(device_memory_bytes=1000), "device_memory_bytes=1000 is too small by"),
    (dict(kv_dtype="int8", attention_device="gpu"), "needs attention_device='cpu'"),
    (dict(offload=False, gpu_weight_fraction=0.5), "offload=False"),
    (dict(offload="no"), "offload=.no. must be None, True or False"),
])
def test_bad_knobs(model, knobs, needle):
    with pytest.raises(ValueError, match=needle):
        moejax.Engine(model, **knobs)


def test_device_kv_cache_over_budget_is_refused(model, prompts):
    kw = dict(attention_device="gpu", kv_cache_device="gpu")
    budget = _need(model, 0.0, **kw) - 1
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=4 * 1000, attention_device="gpu", micro_batch_size=4)
    with pytest.raises(ValueError, match="attention on the gpu needs ~"):
        e.generate(prompts, NEW)


def test_device_kv_cache_fits_the_budget_the_model_prices(model, prompts, reference):
    """The device cache holds at most padded prompt + new tokens = 16 + NEW positions
    (not bucket(11 + NEW) = 32): the budget `memory_bytes` asks for, which is what the
    search keeps to, runs."""
    kw = dict(attention_device="gpu", kv_cache_device="gpu")
    e = moejax.Engine(model, device_memory_bytes=_need(model, 0.0, **kw),
                      gpu_weight_fraction=0.0, page_bytes=4 * 1000, attention_device="gpu",
                      micro_batch_size=4)
    for _ in range(3):  # each run hands its cache's reservation back
        assert e.generate(prompts, NEW) == reference


def test_searched_micro_batching_keeps_to_the_budget(model, prompts, reference):
    """A budget that 2 × 2 fits and 4 × 1 does not: the search runs one that fits."""
    wl = Workload(16, NEW)
    budget = int(memory_bytes(model.config, wl, 2, 2, 0.0)[0]) + 1
    assert memory_bytes(model.config, wl, 4, 1, 0.0)[0] > budget
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=4 * 1000)
    assert e.generate(prompts, NEW, batching="static") == reference
    assert e.last_run.policy.micro_batch_size <= 2


def test_an_offloading_engine_keeps_no_reference_to_the_model(tmp_path):
    """The store holds every weight; the caller's model (here a copy the store was
    made from, NumPy → pinned or jax → NumPy) is freed once the caller drops it."""
    import gc
    import weakref

    m = MoEModel.random(moejax.get_model("tiny_mixtral").replace(num_layers=2), seed=2)
    ref = weakref.ref(m)
    e = moejax.Engine(m, gpu_weight_fraction=0.0, page_bytes=4 * 1000, host_memory="numpy")
    want = moejax.Engine(m).generate([[1, 2, 3]], 3)
    del m
    gc.collect()
    assert ref() is None and e.model is None
    assert e.generate([[1, 2, 3]], 3) == want


def test_a_ready_store_runs_a_matching_policy(model, prompts, reference):
    from moejax.host_offload import HostWeightStore
    from moejax.schedule import Policy

    store = HostWeightStore.from_params(model.config, model.params,
                                        gpu_weight_fraction=0.5, page_bytes=4 * 1000)
    pol = Policy.from_micro_batches(2, 2, gpu_weight_fraction=store.gpu_weight_fraction,
                                    page_bytes=4 * 1000, overlap=False)
    assert moejax.Engine(store, policy=pol).generate(prompts, NEW) == reference
    with pytest.raises(ValueError, match="does not place experts as the HostWeightStore"):
        moejax.Engine(store, policy=pol.replace(gpu_weight_fraction=0.0))


def test_check_memory_says_before_generate_would(model, prompts):
    budget = make_plan(model.config, 4 * 1000, 0.0).device_bytes()  # weights only
    e = moejax.Engine(model, device_memory_bytes=budget, gpu_weight_fraction=0.0,
                      page_bytes=4 * 1000)
    with pytest.raises(ValueError, match="needs ~"):
        e.check_memory(len(prompts), 11, NEW)
    roomy = moejax.Engine(model, device_memory_bytes=_need(model, 0.0),
                          gpu_weight_fraction=0.0, page_bytes=4 * 1000)
    roomy.check_memory(len(prompts), 11, NEW)  # fits: no error
    assert len(roomy.generate(prompts, np.int64(2), batching="static")[0]) == 2  # NumPy ints


def test_all_resident_store_runs_an_all_resident_policy_of_any_page_size(model, prompts,
                                                                          reference):
    from moejax.host_offload import HostWeightStore
    from moejax.schedule import Policy

    store = HostWeightStore.from_params(model.config, model.params, gpu_weight_fraction=1.0)
    pol = Policy.from_micro_batches(4, 1, gpu_weight_fraction=1.0, page_bytes=4096)
    assert moejax.Engine(store, policy=pol).generate(prompts, NEW) == reference


def test_numpy_scalars_are_accepted_as_knobs(model):
    e = moejax.Engine(model, gpu_weight_fraction=np.float32(0.5),
                      micro_batch_size=np.int64(2))
    assert 0 < e.store.gpu_weight_fraction <= 0.5 and e.micro_batch_size == 2


@pytest.mark.parametrize("path,needle", [(None, "must be a str"),
                                         (__file__, "is a file")])
def test_load_pretrained_names_a_bad_path(path, needle):
    with pytest.raises(ValueError, match=needle):
        moejax.load_pretrained(path)
