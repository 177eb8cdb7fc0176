"""HF `config.json` parsers: DBRX and Qwen3-MoE (and the unsupported-type error)."""

import json

import pytest

from moejax.model_config import ModelConfig, get_model
from moejax.model_config.hf_config import PARSERS, qwen3_moe_dense_layers

# databricks/dbrx-base config.json as released (transformers 4.38 layout).
DBRX_HUB = {
    "architectures": ["DbrxForCausalLM"],
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
    "d_model": 6144, "emb_pdrop": 0.0,
    "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0.01,
                   "moe_loss_weight": 0.05, "moe_num_experts": 16, "moe_top_k": 4},
    "initializer_range": 0.02, "max_seq_len": 32768, "model_type": "dbrx", "n_heads": 48,
    "n_layers": 40, "output_router_logits": False, "resid_pdrop": 0.0,
    "router_aux_loss_coef": 0.05, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.2", "use_cache": True, "vocab_size": 100352}

# Qwen/Qwen3-30B-A3B config.json as released.
QWEN3_HUB = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


@pytest.mark.parametrize("mt", ["llama", "qwen2_moe", None])
def test_unsupported_model_type_lists_supported(mt):
    with pytest.raises(ValueError, match="supported: dbrx, mixtral, qwen3_moe") as e:
        ModelConfig.from_hf({"model_type": mt, "hidden_size": 8})
    assert repr(mt) in str(e.value)
    assert {"dbrx", "mixtral", "qwen3_moe"} <= set(PARSERS)


@pytest.mark.parametrize("config,needle", [
    ({**QWEN3_HUB, "hidden_size": "2048"}, "hidden_size='2048' in config.json must be an int"),
    ({**QWEN3_HUB, "num_experts": True}, "num_experts=True"),
    ({**QWEN3_HUB, "rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' .* must be a number"),
    ({**DBRX_HUB, "ffn_config": {**DBRX_HUB["ffn_config"], "moe_top_k": "4"}},
     "moe_top_k='4' in config.json ffn_config"),
    ({**DBRX_HUB, "attn_config": [1]}, "config.json attn_config must be a JSON object"),
])
def test_wrong_json_types_are_named(config, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf(config)


MIXTRAL_TINY = {"model_type": "mixtral", "vocab_size": 32, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("config,needle", [
    ({**MIXTRAL_TINY, "hidden_act": "gelu"}, "mixtral.*hidden_act 'gelu' is not supported"),
    ({**MIXTRAL_TINY, "rope_parameters": [1]}, "rope_parameters must be a JSON object"),
    ({**QWEN3_HUB, "mlp_only_layers": 5}, "mlp_only_layers=5 .* list of layer indices"),
    ({**DBRX_HUB, "ffn_config": {**DBRX_HUB["ffn_config"], "ffn_act_fn": "silu"}},
     "ffn_act_fn must be a JSON object"),
])
def test_unsupported_or_malformed_fields_are_refused(config, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf(config)


def test_from_hf_of_neither_path_nor_dict_is_a_value_error():
    with pytest.raises(ValueError, match="takes a config.json path or a dict, got list"):
        ModelConfig.from_hf([1])


def test_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        ModelConfig.from_hf(tmp_path)


def test_released_dbrx_config_is_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DBRX_HUB))
    with pytest.warns(UserWarning, match="disagree"):  # transformers 5 would run 1e4
        c = ModelConfig.from_hf(tmp_path)
    assert c.replace(name="dbrx") == get_model("dbrx")
    # attn_config.rope_theta is DBRX's θ; transformers 5 would fall back to 1e4 here.
    assert c.rope_theta == 5e5 and c.clip_qkv == 8.0 and c.topk_norm_p == 1.0


@pytest.mark.parametrize("config,theta", [
    (MIXTRAL_TINY, 1e6), ({**QWEN3_HUB, "rope_theta": None}, 1e4),
    ({**DBRX_HUB, "attn_config": {"kv_n_heads": 8}}, 1e4)])
def test_rope_theta_default_is_the_familys(config, theta):
    """A config naming no θ runs HF's class default: Mixtral 1e6, Qwen3 and DBRX 1e4."""
    assert ModelConfig.from_hf(config).rope_theta == theta


@pytest.mark.parametrize("kind", ["MixtralConfig", "Qwen3MoeConfig"])
def test_rope_theta_defaults_are_transformers(kind):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, kind)()
    mt = {"MixtralConfig": MIXTRAL_TINY, "Qwen3MoeConfig": {**QWEN3_HUB, "rope_theta": None}}
    assert hf.rope_parameters["rope_theta"] == ModelConfig.from_hf(mt[kind]).rope_theta


def test_rope_scaling_wins_over_rope_parameters():
    """transformers reads `rope_scaling` first when both are present: linear scaling
    there is refused even though rope_parameters says default."""
    d = {**MIXTRAL_TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
         "rope_scaling": {"type": "linear", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope scaling .*linear"):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("flag", [False, None])
def test_mixtral_window_applies_whatever_use_sliding_window_says(flag):
    """HF's Mixtral ignores `use_sliding_window` (a Qwen key): a short window is refused."""
    d = {**MIXTRAL_TINY, "sliding_window": 4, "max_position_embeddings": 64,
         "use_sliding_window": flag}
    with pytest.raises(ValueError, match="sliding_window=4"):
        ModelConfig.from_hf(d)


def test_qwen3_window_without_its_switch_is_ignored_as_in_hf():
    d = {k: v for k, v in QWEN3_HUB.items() if k != "use_sliding_window"}
    assert ModelConfig.from_hf({**d, "sliding_window": 64}).num_layers == 48


def test_dbrx_conflicting_rope_theta_warns_and_keeps_attn_config():
    d = {**DBRX_HUB, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    with pytest.warns(UserWarning, match="disagree"):
        assert ModelConfig.from_hf(d).rope_theta == 5e5


def test_dbrx_transformers5_config_round_trips():
    """A config written by transformers 5 (sub-config dicts, rope_parameters, aliases)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.DbrxConfig(
        vocab_size=101, d_model=48, n_heads=4, n_layers=3, max_seq_len=128,
        attn_config=dict(kv_n_heads=2, clip_qkv=None, rope_theta=2e4),
        ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2,
                        moe_normalize_expert_weights=None),
        rope_parameters=dict(rope_type="default", rope_theta=2e4))
    c = ModelConfig.from_hf(hf.to_dict())
    assert (c.family, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim, c.expert_ffn_size, c.num_experts, c.top_k,
            c.max_positions) == ("dbrx", 101, 48, 3, 4, 2, 12, 40, 4, 2, 128)
    assert (c.norm_type, c.norm_eps, c.clip_qkv, c.topk_norm_p, c.rope_theta,
            c.tie_word_embeddings) == ("layernorm", 1e-5, None, None, 2e4, False)


@pytest.mark.parametrize("change,needle", [
    (dict(ffn_config={**DBRX_HUB["ffn_config"], "ffn_act_fn": {"name": "gelu"}}), "gelu"),
    (dict(ffn_config={"moe_num_experts": 16, "moe_top_k": 4}), "ffn_hidden_size"),
    (dict(n_heads=5), "multiple of n_heads=5"),
    (dict(d_model=None), "d_model"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
])
def test_dbrx_rejects(change, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf({**DBRX_HUB, **change})


def test_released_qwen3_config_is_the_preset():
    c = ModelConfig.from_hf(QWEN3_HUB)
    assert c.replace(name="qwen3_30b_a3b") == get_model("qwen3_30b_a3b")
    assert c.head_dim == 128 != c.hidden_size // c.num_heads
    assert c.dense_layers == () and c.qk_norm and c.topk_norm_p == 1.0


def test_qwen3_transformers5_config_round_trips():
    """transformers 5 writes `num_local_experts` (not `num_experts`) and rope_parameters."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3MoeConfig(
        vocab_size=101, hidden_size=48, intermediate_size=56, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0],
        decoder_sparse_step=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=3e4))
    d = hf.to_dict()
    assert "num_experts" not in d and d["num_local_experts"] == 8
    c = ModelConfig.from_hf(d)
    assert (c.num_experts, c.top_k, c.head_dim, c.expert_ffn_size, c.dense_ffn_size,
            c.dense_layers, c.topk_norm_p, c.rope_theta, c.norm_eps,
            c.tie_word_embeddings) == (8, 3, 16, 24, 56, (0, 2), None, 3e4, 1e-6, True)


@pytest.mark.parametrize("layers,mlp_only,step", [
    (6, [], 1), (6, [1, 4], 1), (6, [], 2), (6, [], 3), (6, [1], 2), (4, [9], 1)])
def test_qwen3_dense_layers_follow_hf(layers, mlp_only, step):
    """Our rule against HF's own: which Qwen3MoeDecoderLayer gets a sparse MoE block."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, moe_intermediate_size=4,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
        num_experts=2, num_experts_per_tok=1, mlp_only_layers=mlp_only,
        decoder_sparse_step=step)
    hf_dense = tuple(i for i in range(layers) if not isinstance(
        mq.Qwen3MoeDecoderLayer(cfg, i).mlp, mq.Qwen3MoeSparseMoeBlock))
    assert qwen3_moe_dense_layers(layers, mlp_only, step) == hf_dense
    c = ModelConfig.from_hf({**QWEN3_HUB, "num_hidden_layers": layers,
                             "mlp_only_layers": mlp_only, "decoder_sparse_step": step})
    assert c.dense_layers == hf_dense and c.num_moe_layers == layers - len(hf_dense)


@pytest.mark.parametrize("change,needle", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(num_hidden_layers=2, mlp_only_layers=[0, 1]), "every layer is dense"),
    (dict(mlp_only_layers=[3], intermediate_size=None), "intermediate_size"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(moe_intermediate_size=None), "moe_intermediate_size"),
])
def test_qwen3_rejects(change, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf({**QWEN3_HUB, **change})


def test_preset_sizes():
    q, d = get_model("qwen3_30b_a3b"), get_model("dbrx")
    assert 30.4e9 < q.total_params() < 30.6e9  # "30.5B total"
    active = q.total_params() - q.num_moe_layers * (q.num_experts - q.top_k) \
        * q.expert_params()
    assert 3.2e9 < active < 3.4e9  # "3.3B activated"
    assert q.expert_bytes() == 2 * 3 * 2048 * 768  # 9.4 MB: small experts
    assert q.expert_bytes_per_layer() == 128 * q.expert_bytes()
    assert q.kv_bytes_per_token_per_layer() == 2 * 4 * 128 * 2  # head_dim, not h / heads
    assert q.attention_params() == 2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 2 * 128
    assert q.expert_flops_per_token() == 8 * 2 * 3 * 2048 * 768
    assert 131e9 < d.total_params() < 133e9  # "132B total"
    assert 35e9 < d.total_params() - d.num_moe_layers * 12 * d.expert_params() < 37e9
