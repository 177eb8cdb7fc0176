"""Load HF `*.safetensors` checkpoints into moejax parameter trees, tensor by tensor."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.checkpoints.safetensors_io import CheckpointFiles
from moejax.checkpoints.weight_maps import IGNORED_SUFFIXES, WEIGHT_MAPS, Path, Rule
from moejax.model_config.hf_config import named_dtype
from moejax.model_config.model import ModelConfig, read_hf_config
from moejax.quant import is_expert_path, is_qtensor, quantize_expert

# place(path, host array) -> the leaf to keep (device array, host-store handle, ...)
Placer = Callable[[Path, np.ndarray], object]


def param_shapes(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the moejax parameter tree (no allocation)."""
    from moejax.layers.decoder import MoETransformer

    tree = jax.eval_shape(lambda: MoETransformer(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]
    return {tuple(k.key for k in kp): v for kp, v in flat}


def unflatten(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def _check_names(files: CheckpointFiles, rules: dict[Path, Rule], directory: str):
    needed = {s: r for r in rules.values() for s in r.sources}
    have = files.names()
    missing = sorted(set(needed) - have)
    if missing:
        raise ValueError(f"checkpoint {directory}: missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(n for n in have - set(needed) if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"checkpoint {files.file_of(extra[0])}: unexpected tensor "
                         f"{extra[0]!r}" + (f" (and {len(extra) - 1} more)"
                                             if len(extra) > 1 else ""))
    for name, rule in needed.items():
        if files.shape(name) != rule.src_shape:
            raise ValueError(f"checkpoint {files.file_of(name)}: tensor {name!r} has shape "
                             f"{files.shape(name)}, expected {rule.src_shape}")


def _assemble(files: CheckpointFiles, rule: Rule, dtype: np.dtype) -> np.ndarray:
    if not rule.stacked:
        return np.ascontiguousarray(rule.transform(files.read(rule.sources[0], rule.rows)),
                                    dtype)
    first = rule.transform(files.read(rule.sources[0], rule.rows))
    out = np.empty((len(rule.sources),) + first.shape, dtype)
    out[0] = first
    del first
    for e, name in enumerate(rule.sources[1:], start=1):
        out[e] = rule.transform(files.read(name, rule.rows))
    return out


def default_placer(path: Path, arr: np.ndarray):
    return jax.device_put(arr)


def load_hf_params(directory: str, cfg: ModelConfig, place: Placer | None = None) -> dict:
    """Read every tensor the family's weight map names, cast to `cfg.dtype`, place it.

    Names and shapes are all checked from the headers before any tensor is read; then one
    parameter at a time is assembled on the host and handed to `place`, so the host never
    holds more than the placed weights plus one parameter in flight.
    """
    if cfg.family not in WEIGHT_MAPS:
        raise ValueError(f"no weight map for family {cfg.family!r}; supported: "
                         f"{', '.join(sorted(WEIGHT_MAPS))}")
    place = place or default_placer
    files = CheckpointFiles(directory)
    try:
        rules = WEIGHT_MAPS[cfg.family](cfg)
        shapes = param_shapes(cfg)
        assert set(rules) == set(shapes), set(rules) ^ set(shapes)
        _check_names(files, rules, directory)
        dtype = np.dtype(jnp.dtype(cfg.dtype))
        flat = {}
        for path, rule in rules.items():
            arr = _assemble(files, rule, dtype)
            if arr.shape != shapes[path].shape:
                raise ValueError(f"checkpoint {directory}: {rule.sources[0]!r} gives "
                                 f"{arr.shape} for {'/'.join(path)}, expected "
                                 f"{shapes[path].shape}")
            if is_qtensor(shapes[path]) and is_expert_path(path):  # quantize on load
                arr = quantize_expert(cfg, arr)
            flat[path] = place(path, arr)
            del arr
        return unflatten(flat)
    finally:
        files.close()


def hf_checkpoint_config(directory: str) -> ModelConfig:
    """config.json's ModelConfig. A config naming no dtype (`dtype` / `torch_dtype`)
    gets the dtype its tensors are stored in, as HF's `dtype="auto"` loads them."""
    d, name = read_hf_config(directory)
    cfg = ModelConfig.from_hf(d, name=name)
    if named_dtype(d):
        return cfg
    files = CheckpointFiles(directory)
    try:
        return cfg.replace(dtype=files.float_dtype())
    finally:
        files.close()


def is_hf_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "config.json")) and (
        os.path.exists(os.path.join(directory, "model.safetensors")) or
        os.path.exists(os.path.join(directory, "model.safetensors.index.json")))
