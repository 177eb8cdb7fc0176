import pytest

from moejax.model_config import ModelConfig, get_model, model_names

TINY = dict(name="t", family="mixtral", vocab_size=10, hidden_size=4, expert_ffn_size=6,
            num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, num_experts=3, top_k=2,
            dtype="bfloat16")


def test_design_presets_match_design_table():
    m = get_model("mixtral_8x7b")
    assert (m.num_layers, m.hidden_size, m.expert_ffn_size, m.num_heads, m.num_kv_heads,
            m.num_experts, m.top_k, m.vocab_size) == (32, 4096, 14336, 32, 8, 8, 2, 32000)
    assert 93e9 < get_model("mixtral_8x7b").weight_bytes() < 95e9  # ~94 GB
    assert 280e9 < get_model("mixtral_8x22b").weight_bytes() < 284e9  # ~282 GB
    assert 262e9 < get_model("dbrx").weight_bytes() < 266e9  # ~264 GB


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="mixtral_8x7b") as e:
        get_model("mixtral_9x9b")
    assert "mixtral_9x9b" in str(e.value)
    assert "tiny_mixtral" in model_names()


def test_byte_helpers_hand_computed():
    c = ModelConfig(**TINY)
    assert c.expert_params() == 3 * 4 * 6
    assert c.expert_bytes_per_layer() == 3 * 72 * 2  # W_E = 2·3·h·f·E
    # q, o: 4×(2·2); k, v: 4×(1·2)
    assert c.attention_params() == 2 * 16 + 2 * 8
    assert c.layer_non_expert_params() == 48 + 2 * 4 + 4 * 3
    assert c.embedding_params() == 2 * 40 + 4
    assert c.total_params() == 84 + 2 * 68 + 2 * 3 * 72
    assert c.weight_bytes() == 2 * c.total_params()
    assert c.non_expert_bytes() + 2 * c.expert_bytes_per_layer() == c.weight_bytes()
    assert c.kv_bytes_per_token() == 2 * (2 * 1 * 2 * 2)


def test_flop_helpers_hand_computed():
    c = ModelConfig(**TINY)
    assert c.expert_flops_per_token() == 2 * 2 * 72
    assert c.attention_core_flops(10) == 2 * 10 * (2 * 2 + 2)


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", 0, "hidden_size=0"),
    ("num_kv_heads", 3, "num_kv_heads=3"),
    ("top_k", 5, "top_k=5"),
    ("dtype", "int4", "dtype='int4'"),
    ("norm_type", "batchnorm", "batchnorm"),
    ("dense_layers", (7,), "[7]"),
])
def test_invalid_fields_are_named(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(**{**TINY, field: value})


def test_from_hf_dict_and_unknown_type():
    d = {"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "num_local_experts": 4, "num_experts_per_tok": 2, "rope_parameters":
         {"rope_theta": 5.0, "rope_type": "default"}, "dtype": "float32"}
    c = ModelConfig.from_hf(d)
    assert (c.head_dim, c.rope_theta, c.dtype, c.top_k) == (4, 5.0, "float32", 2)
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*mixtral"):
        ModelConfig.from_hf({**d, "model_type": "llama"})


def test_from_hf_rejects_sliding_window():
    d = {"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
         "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 4,
         "max_position_embeddings": 64}
    with pytest.raises(ValueError, match="sliding_window=4"):
        ModelConfig.from_hf(d)
