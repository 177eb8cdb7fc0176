"""MoEModel: a config plus its parameter tree, with the all-on-device reference forward."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.host_offload.memory import default_device, on_accelerator
from moejax.layers.decoder import MoETransformer
from moejax.model_config.model import ModelConfig
from moejax.quant import check_expert, is_qtensor


@partial(jax.jit, static_argnames=("cfg",))
def _forward(cfg, params, tokens, attention_mask):
    return MoETransformer(cfg).apply({"params": params}, tokens, attention_mask)


def check_padding_mask(raw, mask: np.ndarray) -> None:
    """A padding mask is 0/1 with each row's real tokens one contiguous run (left-,
    right- or both-side padding): positions are counted along that run."""
    if raw is not None and not np.array_equal(np.asarray(raw), mask) \
            or not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    count = mask.sum(1)
    idx = np.arange(mask.shape[1])
    first = np.where(mask, idx, mask.shape[1]).min(1)
    last = np.where(mask, idx, -1).max(1)
    bad = np.flatnonzero((count == 0) | (last - first + 1 != count))
    if bad.size:
        raise ValueError(f"attention_mask row {int(bad[0])} has no token or a hole: "
                         "real tokens must be one contiguous run")


@dataclass
class MoEModel:
    """`config` and `params` (nested dict of arrays, see `MoETransformer`)."""

    config: ModelConfig
    params: dict

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0,
               experts: str | None = None) -> "MoEModel":
        """Randomly initialised weights (benchmarks, tests). `experts="host"` (the
        default on an accelerator) builds on the host and keeps expert tensors there as
        NumPy, so a model larger than the device never lands on it whole."""
        experts = experts or ("host" if on_accelerator() else "device")
        if experts not in ("device", "host"):
            raise ValueError(f"experts={experts!r} not in ('device', 'host')")
        with jax.default_device(jax.devices("cpu")[0]) if experts == "host" else \
                contextlib.nullcontext():
            params = MoETransformer(config).init(
                jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
        if experts == "host":
            params = jax.tree_util.tree_map_with_path(
                lambda p, a: np.asarray(a) if p[1:2] == (jax.tree_util.DictKey("experts"),)
                else jax.device_put(a, default_device()), params)
        return cls(config, params)

    def check_params(self) -> None:
        """ValueError naming the first parameter whose path, shape or dtype is not the
        config's (a hand-built model; loaders check theirs as they read)."""
        from moejax.checkpoints.hf import param_shapes

        want = param_shapes(self.config)
        if not isinstance(self.params, Mapping):  # a dict or flax's FrozenDict
            raise ValueError(f"params must be a nested dict, got "
                             f"{type(self.params).__name__}")
        flat = jax.tree_util.tree_flatten_with_path(self.params, is_leaf=is_qtensor)[0]
        got = {tuple(getattr(k, "key", k) for k in kp): leaf for kp, leaf in flat}
        for path in sorted(set(want) | set(got)):
            name = "/".join(map(str, path))
            if path not in got or path not in want:
                raise ValueError(f"params {'lack' if path not in got else 'have an extra'}"
                                 f" {name!r} for config {self.config.name!r}")
            if is_qtensor(want[path]) or is_qtensor(got[path]):
                check_expert(self.config, f"params {name!r}", path[-1], got[path])
                continue
            shape, dtype = tuple(np.shape(got[path])), np.dtype(got[path].dtype)
            if shape != want[path].shape or dtype != want[path].dtype:
                raise ValueError(f"params {name!r}: {dtype}{shape}, config "
                                 f"{self.config.name!r} needs "
                                 f"{np.dtype(want[path].dtype)}{want[path].shape}")

    def check_tokens(self, tokens: np.ndarray) -> None:
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    def logits(self, tokens, attention_mask=None) -> jax.Array:
        """Full causal forward: int tokens [B, T] -> float32 logits [B, T, vocab].

        `attention_mask` [B, T] (1 = real token) allows left- or right-padded rows.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} "
                             f"{tokens.shape}")
        if 0 in tokens.shape:
            raise ValueError(f"tokens [B, T] must not be empty, got shape {tokens.shape}")
        if tokens.shape[1] > self.config.max_positions:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_positions "
                             f"{self.config.max_positions}")
        self.check_tokens(tokens)
        mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(
            attention_mask, np.int32)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != tokens {tokens.shape}")
        check_padding_mask(attention_mask, mask)
        return _forward(self.config, self.params, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(mask))

    def weight_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params))  # codes + scales
