import pytest

from moejax.model_config.workload import Workload, get_workload, workload_names


def test_presets():
    for g in (32, 64, 128, 256):
        w = get_workload(f"mtbench_g{g}")
        assert (w.prompt_len, w.gen_len, w.context_len) == (77, g, 77 + g)
    assert get_workload("mtbench") == Workload(77, 32, name="mtbench")
    assert "tiny" in workload_names()
    with pytest.raises(ValueError, match="unknown workload 'x'.*mtbench_g32"):
        get_workload("x")


@pytest.mark.parametrize("kw, bad", [(dict(prompt_len=0, gen_len=4), "prompt_len=0"),
                                     (dict(prompt_len=4, gen_len=2.5), "gen_len=2.5"),
                                     (dict(prompt_len=4, gen_len=4, num_sequences=0),
                                      "num_sequences=0"),
                                     (dict(prompt_len=4, gen_len=4, kv_bytes_per_elem=True),
                                      "kv_bytes_per_elem=True"),
                                     (dict(prompt_len=4, gen_len=4, expert_imbalance=0.5),
                                      "expert_imbalance=0.5"),
                                     (dict(prompt_len=4, gen_len=4,
                                           decode_expert_imbalance=True),
                                      "decode_expert_imbalance=True")])
def test_validation_names_bad_value(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Workload(**kw)


def test_decode_imbalance_defaults_to_the_prefill_one():
    assert Workload(4, 4, expert_imbalance=1.5).imbalance == {"prefill": 1.5, "decode": 1.5}
    wl = Workload(4, 4, expert_imbalance=1.5, decode_expert_imbalance=1.0)
    assert wl.imbalance == {"prefill": 1.5, "decode": 1.0}
