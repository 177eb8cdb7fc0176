import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.router import Router, route

LOGITS = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0]]))  # softmax → [.1, .2, .3, .4]


def test_top2_renormalised_like_mixtral():
    w, ids = route(LOGITS, 2, 1.0)
    np.testing.assert_array_equal(ids, [[3, 2]])
    np.testing.assert_allclose(w, [[4 / 7, 3 / 7]], rtol=1e-6)


def test_top2_without_renormalisation_keeps_softmax_probs():
    w, _ = route(LOGITS, 2, None)
    np.testing.assert_allclose(w, [[0.4, 0.3]], rtol=1e-6)


def test_p2_norm_renormalisation():
    w, _ = route(LOGITS, 2, 2.0)
    np.testing.assert_allclose(w, [[0.8, 0.6]], rtol=1e-6)  # (.4, .3) / 0.5


def test_router_module_gate_kernel_is_hidden_by_experts():
    r = Router(num_experts=4, top_k=2)
    p = r.init(jax.random.PRNGKey(0), jnp.ones((3, 5)))
    assert p["params"]["gate"]["kernel"].shape == (5, 4)
