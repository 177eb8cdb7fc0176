"""HostWeightStore: page layout, budget accounting, streaming = the original experts."""

import jax
import numpy as np
import pytest

import moejax
from moejax.host_offload import HostWeightStore, has_pinned_host, make_plan
from moejax.model import MoEModel

CFG = moejax.get_model("tiny_mixtral").replace(num_layers=5)  # 5 MoE layers, float32


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(CFG, seed=3)


def experts(model, i):
    return {k: np.asarray(v) for k, v in model.params[f"layers_{i}"]["experts"].items()}


def joined(parts) -> dict:
    """FFN-column parts [(w1, w3, w2), …] put back together along f."""
    cat = lambda t, axis: np.concatenate([np.asarray(p[t]) for p in parts], axis=axis)
    return {"w1": cat(0, 2), "w3": cat(1, 2), "w2": cat(2, 1)}


def assert_streams_the_experts(store, model):
    """Every layer's parts (resident columns, then streamed pages) are exactly the
    model's experts, split along the FFN axis."""
    for i in range(CFG.num_layers):
        got = joined(store.wait(i))
        for k, v in experts(model, i).items():
            np.testing.assert_array_equal(got[k], v)
        store.release(i)


def test_pages_tile_the_ffn_axis_once_with_a_narrower_last_page():
    plan = make_plan(CFG, page_bytes=4 * 1000)  # a column of w1, w3, w2: 3·4·64 = 768
    assert [p.cols for p in plan.pages] == [1] * 96  # elements: one column per page
    plan = make_plan(CFG, page_bytes=4 * 768 * 10)
    assert [p.start for p in plan.pages] == list(range(0, 96, 10))
    assert sum(p.cols for p in plan.pages) == 96 and plan.pages[-1].cols == 6
    assert plan.page_nbytes(plan.pages[0]) == 4 * 768 * 10 == CFG.page_nbytes(4 * 768 * 10)


@pytest.mark.parametrize("wg,page_bytes", [(0.0, 4 * 768 * 5), (0.37, 4 * 777 * 7),
                                           (1.0, None)])
def test_wait_returns_the_exact_experts(model, wg, page_bytes):
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=wg,
                                        page_bytes=page_bytes)
    assert_streams_the_experts(store, model)


def test_pages_issued_in_any_order_assemble_the_layer(model):
    store = HostWeightStore.from_params(CFG, model.params, page_bytes=4 * 999)
    n = store.num_pages(2)
    for p in np.random.default_rng(0).permutation(n):
        store.prefetch_page(2, int(p))
    got = joined(store.wait(2))
    for k, v in experts(model, 2).items():
        np.testing.assert_array_equal(got[k], v)


def test_resident_fraction_is_rounded_down_to_whole_columns(model):
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=0.37,
                                        page_bytes=4 * 768 * 7)
    plan, w = store.plan, CFG.expert_bytes_per_layer()
    resident = plan.resident_cols * plan.col_bytes
    assert plan.resident_cols == 35  # ⌊0.37 · 96⌋
    assert [p.start for p in plan.pages] == list(range(35, 96, 7))
    assert resident <= 0.37 * w < resident + plan.col_bytes
    assert plan.streamed_bytes == w - resident
    assert store.num_pages(0) == len(store.plan.pages)
    assert store.resident_bytes(0) == resident == w - sum(
        store.page_bytes(0, p) for p in range(store.num_pages(0)))


def test_accounting_matches_placed_arrays(model):
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=0.25,
                                        page_bytes=4 * 1000)
    kinds = store.device_bytes_by_kind
    assert kinds == store.plan.device_bytes_by_kind()
    assert kinds["non_expert"] == CFG.non_expert_bytes()
    assert kinds["stream_buffers"] == store.stream_buffer_bytes == 2 * store.plan.streamed_bytes
    assert store.host_bytes == CFG.num_layers * store.plan.streamed_bytes


@pytest.mark.parametrize("wg", [0.0, 0.5])
def test_stream_buffers_hold_at_most_two_passes_of_streamed_bytes(model, wg):
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=wg,
                                        page_bytes=4 * 768 * 10)
    page = store.plan.page_nbytes(store.plan.pages[0])
    assert store.stream_buffer_bytes <= 2 * store.plan.streamed_bytes + page
    store.prefetch(0)
    store.prefetch(1)
    live = sum(a.nbytes for s in store._slots for p in s.pages.values() for a in p)
    assert live == 2 * store.plan.streamed_bytes <= store.stream_buffer_bytes


def test_budget_picks_the_largest_fraction_that_fits():
    w, ne = CFG.expert_bytes_per_layer(), CFG.non_expert_bytes()
    stream_all = make_plan(CFG, 4 * 1000, 0.0).device_bytes()
    assert stream_all == ne + 2 * w  # two passes' pages
    assert make_plan(CFG, 4 * 1000, device_memory_bytes=stream_all).resident_cols == 0
    assert make_plan(CFG, 4 * 1000, device_memory_bytes=ne + 5 * w).gpu_weight_fraction == 1
    mid = make_plan(CFG, 4 * 1000, device_memory_bytes=ne + 3 * w)
    assert 0 < mid.gpu_weight_fraction < 1 and mid.device_bytes() <= ne + 4 * w


def test_budget_too_small_says_by_how_much():
    need = make_plan(CFG, 4 * 1000, 0.0).device_bytes()
    with pytest.raises(ValueError, match=f"too small by 100 bytes"):
        make_plan(CFG, 4 * 1000, device_memory_bytes=need - 100)


def test_explicit_fraction_over_budget_is_refused():
    need = make_plan(CFG, 4 * 1000, 1.0).device_bytes()
    with pytest.raises(ValueError, match="gpu_weight_fraction=1.0"):
        make_plan(CFG, 4 * 1000, 1.0, device_memory_bytes=need - 1)


@pytest.mark.parametrize("page_bytes,needle", [(0, "positive"), (-8, "positive"),
                                               (6, "multiple of the 4-byte"),
                                               (True, "positive")])
def test_bad_page_bytes(page_bytes, needle):
    with pytest.raises(ValueError, match=f"page_bytes={page_bytes!r}.*{needle}"):
        make_plan(CFG, page_bytes)


@pytest.mark.parametrize("wg", [-0.1, 1.5, "half"])
def test_bad_fraction(wg):
    with pytest.raises(ValueError, match="gpu_weight_fraction"):
        make_plan(CFG, None, wg)


def test_reservation_over_budget_is_refused(model):
    need = make_plan(CFG, 4 * 1000, 0.0).device_bytes()
    store = HostWeightStore.from_params(CFG, model.params, page_bytes=4 * 1000,
                                        device_memory_bytes=need + 10)
    store.reserve("kv_cache", 10)
    with pytest.raises(ValueError, match="exceeds device_memory_bytes=.* by 1 bytes"):
        store.reserve("scratch", 1)


def test_third_layer_needs_a_released_slot(model):
    store = HostWeightStore.from_params(CFG, model.params, page_bytes=4 * 4000)
    store.prefetch(0)
    store.prefetch(1)
    with pytest.raises(RuntimeError, match="both stream slots are busy"):
        store.prefetch(2)
    store.release(0)
    store.prefetch(2)


def test_one_layer_in_two_steps_takes_both_slots():
    cfg = CFG.replace(num_layers=1)  # a single MoE layer: every pass is layer 0
    store = HostWeightStore.from_params(cfg, MoEModel.random(cfg, seed=4).params,
                                        page_bytes=4 * 4000)
    held = joined(store.wait(0, step=1))
    before = {k: v.copy() for k, v in held.items()}
    store.prefetch(0, step=2)  # the next step's pass fills the other slot …
    with pytest.raises(RuntimeError, match="both stream slots are busy"):
        store.prefetch(0, step=3)
    for k, v in joined(store.wait(0, step=1)).items():  # … and leaves this one alone
        np.testing.assert_array_equal(v, before[k])
    store.release_all()
    store.prefetch(0, step=3)


def test_accelerator_path_pages_are_pinned_copies(model):
    store = HostWeightStore.from_params(CFG, model.params, page_bytes=4 * 4000,
                                        accelerator_path=True)
    page = store._host[0][0]["w1"]
    if has_pinned_host(jax.devices()[0]):
        assert page.sharding.memory_kind == "pinned_host"
    else:
        assert isinstance(page, np.ndarray)
    assert not np.shares_memory(np.asarray(page),
                                np.asarray(model.params["layers_0"]["experts"]["w1"]))
    assert_streams_the_experts(store, model)


def test_accelerator_path_follows_the_environment(monkeypatch):
    from moejax.host_offload.weight_store import use_accelerator_path

    cpu = jax.devices("cpu")[0]
    monkeypatch.setenv("MOEJAX_ACCELERATOR_PATH", "1")
    assert use_accelerator_path(cpu) and not use_accelerator_path(cpu, False)
    monkeypatch.setenv("MOEJAX_ACCELERATOR_PATH", "0")
    assert not use_accelerator_path(cpu) and use_accelerator_path(cpu, True)


def test_numpy_leaves_are_adopted_without_a_copy(model):
    params = jax.tree.map(np.asarray, model.params)
    params = jax.tree.map(np.array, params)  # host-owned NumPy leaves
    store = HostWeightStore.from_params(CFG, params, page_bytes=4 * 4000,
                                        accelerator_path=False)
    assert np.shares_memory(store._host[1][0]["w1"], params["layers_1"]["experts"]["w1"])


def test_dense_layers_have_no_pages():
    cfg = CFG.replace(dense_layers=(1,), dense_ffn_size=32)
    store = HostWeightStore.from_params(cfg, MoEModel.random(cfg).params)
    assert store.num_pages(1) == 0 and store.num_pages(0) > 0
    with pytest.raises(ValueError, match="layer 1 is dense"):
        store.wait(1)


def test_incomplete_store_names_the_missing_parameter(model):
    store = HostWeightStore(CFG)
    store.place(("embed", "embedding"), model.params["embed"]["embedding"])
    with pytest.raises(ValueError, match="incomplete: .* was never placed"):
        store.check_complete()



@pytest.mark.parametrize("wg", [1.0, 0.37])
def test_accelerator_leaves_bring_only_their_streamed_bytes_to_the_host(model, wg,
                                                                      monkeypatch):
    """Device arrays off the host (as on a GPU) are cut on the device: the resident
    prefix never round-trips through the host, the streamed pages come over once."""
    from moejax.host_offload import weight_store

    moved = []

    class CountingNumpy:
        def __getattr__(self, k):
            return getattr(np, k)

        def _count(self, fn, a, *args, **kw):
            moved.append(a.nbytes if isinstance(a, jax.Array) else 0)
            return fn(a, *args, **kw)

        def asarray(self, a, *args, **kw):
            return self._count(np.asarray, a, *args, **kw)

        def array(self, a, *args, **kw):
            return self._count(np.array, a, *args, **kw)

    monkeypatch.setattr(weight_store, "np", CountingNumpy())
    monkeypatch.setattr(weight_store, "in_host_memory", lambda arr: False)
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=wg,
                                        page_bytes=4 * 777 * 3)
    assert sum(moved) == CFG.num_layers * store.plan.streamed_bytes
    assert (sum(moved) == 0) == (wg == 1.0)
    assert_streams_the_experts(store, model)


def test_host_device_leaves_are_viewed_not_copied(model):
    """On the CPU a device array is host memory: its pages view it (no second copy of
    the weights per engine)."""
    store = HostWeightStore.from_params(CFG, model.params, gpu_weight_fraction=0.3,
                                        page_bytes=4 * 4000, accelerator_path=False)
    assert np.shares_memory(np.asarray(store._host[1][-1]["w2"]),
                            np.asarray(model.params["layers_1"]["experts"]["w2"]))
