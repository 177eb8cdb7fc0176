import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.norm import Norm, layer_norm, rms_norm


def test_rms_norm_hand_value():
    # mean(x²) = (9 + 16) / 2 = 12.5
    y = rms_norm(jnp.array([[3.0, 4.0]]), jnp.array([1.0, 2.0]), eps=0.0)
    np.testing.assert_allclose(y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_layer_norm_hand_value_no_bias():
    # mean 2, variance 1 → (x − 2) / 1 · scale
    y = layer_norm(jnp.array([[1.0, 3.0]]), jnp.array([1.0, 3.0]), eps=0.0)
    np.testing.assert_allclose(y, [[-1.0, 3.0]], rtol=1e-6)


def test_norm_module_selects_kind_and_has_one_scale_param():
    x = jnp.array([[1.0, 3.0]])
    m = Norm(2, 0.0, "layernorm")
    params = m.init(jax.random.PRNGKey(0), x)
    assert list(params["params"]) == ["scale"]
    np.testing.assert_allclose(m.apply(params, x), [[-1.0, 1.0]], rtol=1e-6)
