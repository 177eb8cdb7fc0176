"""Weight-only group-wise int8 / int4 expert tensors (issue 22; docs/design.md §2).

Format (symmetric, no zero point: expert weights are zero-centred, so a zero point would
cost bytes and an op for nothing): a tensor w [..., K, N] whose reduction axis is K
(axis −2: h for w1, w3 [E, h, f]; f for w2 [E, f, h]) is cut into groups of G rows
along K (the last one ragged when G ∤ K); each group and output column has one scale
s = max|w| / qmax (qmax 127 for int8, 7 for int4) in the model dtype, and the code is
round(w / s) ∈ [−qmax, qmax]. int4 packs rows 2i (low nibble) and 2i + 1 (high nibble)
of K into one uint8. Dequantized: w ≈ code · s, elementwise.

Why this layout pages: a store page is a range of FFN columns f. For w1, w3 that is
axis N, so any split keeps groups and packed bytes whole; for w2 it is axis K, so splits
fall on group boundaries (`ModelConfig.expert_col_align`, G even for int4), and a page
carries the scale rows of its own groups.

`QTensor` is a pytree (codes, scales) with static (bits, group): it rides through jit,
`device_put` and `lax.map` like an array, and the expert FFN dequantizes one expert of
one part at a time (`layers.experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model_config.model import EXPERT_BITS, ModelConfig

QMAX = {8: 127, 4: 7}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QTensor:
    """Codes q [..., K, N] int8 (int4: [..., K/2, N] uint8) and scales [..., ⌈K/G⌉, N]."""

    q: Any
    scale: Any
    bits: int
    group: int

    def tree_flatten(self):
        return (self.q, self.scale), (self.bits, self.group)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def rows(self) -> int:
        """K, the unpacked length of the reduction axis."""
        return self.q.shape[-2] * (8 // self.bits)

    @property
    def shape(self) -> tuple[int, ...]:
        """The float tensor's shape [..., K, N]."""
        return tuple(self.q.shape[:-2]) + (self.rows, self.q.shape[-1])

    @property
    def dtype(self):
        """The dtype it dequantizes to (its scales')."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)

    def cols(self, lo: int, hi: int) -> "QTensor":
        """Columns [lo, hi) of N (groups run along K: every split keeps them whole)."""
        return QTensor(self.q[..., lo:hi], self.scale[..., lo:hi], self.bits, self.group)

    def row_range(self, lo: int, hi: int) -> "QTensor":
        """Rows [lo, hi) of K; lo on a group boundary, hi on one or K."""
        g, p = self.group, 8 // self.bits
        if lo % g or (hi % g and hi != self.rows) or lo % p or hi % p:
            raise ValueError(f"rows [{lo}, {hi}) of a G={g} int{self.bits} tensor do not "
                             "fall on group boundaries")
        return QTensor(self.q[..., lo // p:hi // p, :], self.scale[..., lo // g:-(-hi // g), :],
                       self.bits, self.group)

    def expert(self, e) -> "QTensor":
        """Expert e of a stacked [E, ...] tensor (e may be traced)."""
        return QTensor(self.q[e], self.scale[e], self.bits, self.group)


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def quantize(w, bits: int, group: int, scale_dtype=None) -> QTensor:
    """w [..., K, N] float → QTensor (module doc). NumPy in, NumPy out (the loaders, on the
    host); jax in, jax out. Scales are rounded to `scale_dtype` (default w's) before the
    codes are computed, so code·scale uses the stored scale."""
    if bits not in QMAX:
        raise ValueError(f"bits={bits!r} not in (8, 4)")
    xp, k = _xp(w), w.shape[-2]
    if bits == 4 and (k % 2 or group % 2):
        raise ValueError(f"int4 needs an even reduction length and group, got K={k}, G={group}")
    sdt = scale_dtype or w.dtype
    ng, lead = -(-k // group), tuple(w.shape[:-2])
    wf = w.astype(np.float32)
    if ng * group != k:  # the last group is ragged: zero rows do not change its max
        pad = [(0, 0)] * len(lead) + [(0, ng * group - k), (0, 0)]
        wf = xp.pad(wf, pad)
    wg = wf.reshape(lead + (ng, group, w.shape[-1]))
    amax = xp.max(xp.abs(wg), axis=-2)  # [..., ng, N]
    scale = (amax / QMAX[bits]).astype(sdt)
    s = xp.where(scale.astype(np.float32) == 0, 1.0, scale.astype(np.float32))
    q = xp.clip(xp.round(wg / s[..., None, :]), -QMAX[bits], QMAX[bits])
    q = q.reshape(lead + (ng * group, w.shape[-1]))[..., :k, :].astype(np.int8)
    if bits == 4:
        nib = (q & 0xF).astype(np.uint8)
        q = nib[..., 0::2, :] | (nib[..., 1::2, :] << 4).astype(np.uint8)
    return QTensor(q, scale, bits, group)


def unpack_codes(qt: QTensor):
    """The int8 codes [..., K, N] (int4: nibbles sign-extended and interleaved)."""
    if qt.bits == 8:
        return qt.q
    xp, p = _xp(qt.q), qt.q
    lo = ((p & 0xF).astype(np.int8) ^ 8) - 8
    hi = ((p >> 4).astype(np.int8) ^ 8) - 8
    both = xp.stack([lo, hi], axis=-2)  # [..., K/2, 2, N]
    return both.reshape(tuple(p.shape[:-2]) + (2 * p.shape[-2], p.shape[-1]))


def dequantize(qt: QTensor, dtype=None):
    """w ≈ code · scale [..., K, N] in `dtype` (default the scales')."""
    xp, dt = _xp(qt.q), dtype or qt.dtype
    s = xp.repeat(qt.scale, qt.group, axis=-2)[..., :qt.rows, :]
    return unpack_codes(qt).astype(dt) * s.astype(dt)


def weight(w, dtype):
    """A float tensor as is; a QTensor dequantized to `dtype` (inside the jitted FFN)."""
    return dequantize(w, dtype) if is_qtensor(w) else w


# ------------------------------------------------------------------ experts
def expert_format(cfg: ModelConfig) -> tuple[int, int] | None:
    """(bits, group) of the config's quantized experts, or None (float experts)."""
    if cfg.expert_dtype is None:
        return None
    return EXPERT_BITS[cfg.expert_dtype], cfg.expert_group_size


def expert_float_shape(cfg: ModelConfig, name: str) -> tuple[int, int, int]:
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
    return (e, f, h) if name == "w2" else (e, h, f)


def expert_spec(cfg: ModelConfig, name: str):
    """The leaf `name` ("w1", "w3", "w2") of a layer's experts must have: a
    ShapeDtypeStruct, or a QTensor of them."""
    shape, dt = expert_float_shape(cfg, name), jnp.dtype(cfg.dtype)
    fmt = expert_format(cfg)
    if fmt is None:
        return jax.ShapeDtypeStruct(shape, dt)
    bits, g = fmt
    e, k, n = shape
    qdt = jnp.int8 if bits == 8 else jnp.uint8
    return QTensor(jax.ShapeDtypeStruct((e, k * bits // 8, n), qdt),
                   jax.ShapeDtypeStruct((e, -(-k // g), n), dt), bits, g)


def signature(x) -> tuple:
    """(shape, dtype) of every array of a leaf (QTensor: codes then scales) and its
    format: what a loaded leaf must match of `expert_spec`."""
    if is_qtensor(x):
        return (tuple(x.q.shape), str(np.dtype(x.q.dtype)), tuple(x.scale.shape),
                str(np.dtype(x.scale.dtype)), x.bits, x.group)
    return (tuple(np.shape(x)), str(np.dtype(x.dtype)))


def check_expert(cfg: ModelConfig, where: str, name: str, x) -> None:
    """One-line ValueError when a quantized (or float) expert leaf is not the config's:
    wrong format, group size, scale shape or packed length."""
    want = expert_spec(cfg, name)
    if is_qtensor(want) != is_qtensor(x):
        wanted = f"quantized {cfg.expert_dtype}" if is_qtensor(want) else "float"
        raise ValueError(f"{where}: expected {wanted} experts, got "
                         f"{'a quantized' if is_qtensor(x) else 'a float'} tensor")
    if not is_qtensor(x):
        if signature(x) != signature(want):
            raise ValueError(f"{where}: {signature(x)}, expected {signature(want)}")
        return
    if (x.bits, x.group) != (want.bits, want.group):
        raise ValueError(f"{where}: int{x.bits} with group size {x.group}, the config says "
                         f"int{want.bits} with group size {want.group}")
    if (tuple(x.q.shape), np.dtype(x.q.dtype)) != (want.q.shape, np.dtype(want.q.dtype)):
        raise ValueError(f"{where}: packed codes {np.dtype(x.q.dtype)}{tuple(x.q.shape)}, "
                         f"expected {np.dtype(want.q.dtype)}{want.q.shape}")
    if (tuple(x.scale.shape), np.dtype(x.scale.dtype)) != (want.scale.shape,
                                                           np.dtype(want.scale.dtype)):
        raise ValueError(f"{where}: scales {np.dtype(x.scale.dtype)}{tuple(x.scale.shape)}, "
                         f"expected {np.dtype(want.scale.dtype)}{want.scale.shape} "
                         f"(group size {want.group})")


def quantize_expert(cfg: ModelConfig, w) -> QTensor:
    """One float expert tensor [E, K, N] in the config's format (scales in cfg.dtype)."""
    bits, g = expert_format(cfg)
    return quantize(w, bits, g, scale_dtype=jnp.dtype(cfg.dtype))


def is_expert_path(path) -> bool:
    return len(path) == 3 and path[1] == "experts" and path[2] in ("w1", "w3", "w2")


def quantized_config(cfg: ModelConfig, expert_dtype: str | None,
                     group_size: int | None = None) -> ModelConfig:
    """cfg with experts stored as `expert_dtype` (group `group_size`, default the
    config's): the one place a float config becomes a quantized one."""
    changes = {"expert_dtype": expert_dtype}
    if group_size is not None:
        changes["expert_group_size"] = group_size
    return cfg.replace(**changes)


def quantize_params(cfg: ModelConfig, params: dict) -> dict:
    """A float parameter tree with its expert leaves quantized as `cfg` (quantized) says;
    every other leaf kept. Quantized in NumPy one tensor at a time (device leaves go to
    the host and back), so the result is bit-identical to a converted checkpoint's."""
    def conv(path, leaf):
        keys = tuple(getattr(k, "key", k) for k in path)
        if not is_expert_path(keys) or is_qtensor(leaf) or \
                not cfg.is_moe_layer(int(keys[0][len("layers_"):])):
            return leaf
        if isinstance(leaf, np.ndarray):
            return quantize_expert(cfg, leaf)
        # on the host in NumPy (as the loaders do: bit-identical), then back where it was
        return jax.device_put(quantize_expert(cfg, np.asarray(leaf)), leaf.sharding)
    return jax.tree_util.tree_map_with_path(conv, params, is_leaf=is_qtensor)


def quantize_model(model, expert_dtype: str | None, group_size: int | None = None):
    """A MoEModel with float experts → the same model with quantized experts (a new
    MoEModel; `model` is unchanged). Already in that format: returned as is; a model
    quantized otherwise: ValueError (re-quantizing compounds the error)."""
    cfg = model.config
    want = quantized_config(cfg, expert_dtype, group_size)
    if want == cfg:
        return model
    if cfg.expert_quantized:
        raise ValueError(f"model experts are already {cfg.expert_dtype} (group "
                         f"{cfg.expert_group_size}); cannot re-quantize to "
                         f"{expert_dtype} (group {want.expert_group_size})")
    return type(model)(want, quantize_params(want, model.params))  # a MoEModel


def with_expert_dtype(model, expert_dtype: str | None, group_size: int | None = None):
    """What `Engine(model, expert_dtype=…)` runs: a MoEModel quantized on load
    (`quantize_model`); a HostWeightStore must already hold that format (ValueError)."""
    if expert_dtype is None and group_size is None:
        return model
    if hasattr(model, "config"):
        return quantize_model(model, expert_dtype, group_size)
    want = quantized_config(model.cfg, expert_dtype, group_size)
    if want != model.cfg:
        raise ValueError(f"expert_dtype={expert_dtype!r} (group {group_size}): the "
                         f"HostWeightStore holds {model.cfg.expert_dtype} experts (group "
                         f"{model.cfg.expert_group_size}); load it quantized instead")
    return model
