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
                                      "expert_imbalance=0.5")])
def test_validation_names_bad_value(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Workload(**kw)
