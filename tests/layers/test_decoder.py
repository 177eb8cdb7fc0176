import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.attention import causal_mask, gqa_attention
from moejax.layers.decoder import DecoderLayer, MoETransformer
from moejax.model_config import get_model

CFG = get_model("tiny_mixtral")


def test_split_pieces_equal_the_whole_layer():
    layer = DecoderLayer(CFG)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, CFG.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = causal_mask(jnp.ones((2, 5), jnp.int32))
    p = layer.init(jax.random.PRNGKey(0), x, pos, mask)
    q, k, v = layer.apply(p, x, pos, method="pre_attention")
    h, normed, w, ids = layer.apply(p, x, gqa_attention(q, k, v, mask),
                                    method="post_attention")
    y = layer.apply(p, h, normed, w, ids, None, method="ffn")
    np.testing.assert_allclose(y, layer.apply(p, x, pos, mask), rtol=1e-5, atol=1e-6)


def test_dense_layer_has_mlp_not_experts():
    cfg = CFG.replace(dense_layers=(1,), dense_ffn_size=32)
    p = MoETransformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert "experts" in p["params"]["layers_0"] and "mlp" in p["params"]["layers_1"]


def test_tied_embeddings_have_no_lm_head():
    cfg = CFG.replace(tie_word_embeddings=True)
    p = MoETransformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
    assert "lm_head" not in p["params"]
