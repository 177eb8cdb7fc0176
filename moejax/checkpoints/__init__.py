"""Checkpoint formats: Hugging Face safetensors and moejax's native (orbax) format."""

from __future__ import annotations

import os

import jax

from moejax.checkpoints.hf import hf_checkpoint_config, is_hf_checkpoint, load_hf_params
from moejax.checkpoints.native import is_native_checkpoint, load_native, native_config
from moejax.host_offload.memory import default_device, device_memory_limit, loading_memory
from moejax.model import MoEModel
from moejax.model_config.model import ModelConfig

EXPERT_PLACES = ("device", "host")


def _bounded(place):
    """`place`, then wait for its copies, so loading holds the placed weights plus one
    tensor in flight (not a queue of pending transfers, each pinning its source)."""
    def placed(path, arr):
        return jax.block_until_ready(place(path, arr))
    return placed


def _read(path: str, dtype: str | None, place) -> tuple[ModelConfig, dict]:
    """(config, params) of a native or HF checkpoint directory, leaves through `place`."""
    cfg = checkpoint_config(path)
    path = os.fspath(path)
    place = _bounded(place or jax.device_put)
    if is_native_checkpoint(path):
        with loading_memory():
            return load_native(path, dtype, place)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    with loading_memory():
        return cfg, load_hf_params(path, cfg, place)


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a native or HF checkpoint directory, read from its metadata
    alone (no tensor is read); ValueError when `path` is not a checkpoint."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path must be a str or os.PathLike, got {path!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} "
                         + ("is a file" if os.path.isfile(path) else "does not exist"))
    if is_native_checkpoint(path):
        return native_config(path)
    if is_hf_checkpoint(path):
        return hf_checkpoint_config(path)
    raise ValueError(f"{path!r} is not a checkpoint: expected moejax_native.json (native) "
                     "or config.json with model.safetensors[.index.json] (HF)")


def load_pretrained(path: str | os.PathLike, dtype: str | None = None,
                    experts: str | None = None) -> MoEModel:
    """A native or HF checkpoint directory as a MoEModel; `dtype` ("float32", "bfloat16",
    "float16") overrides the stored one. `experts="host"` keeps expert tensors as host NumPy
    arrays, for `Engine(model, <offload knobs>)` to page in place (no second host copy);
    "device" puts every parameter on the device (the reference placement); None (default):
    "host" on an accelerator whose allocator limit the model exceeds, else "device"."""
    if experts is None:  # an accelerator too small for the model keeps experts on host
        limit = device_memory_limit(default_device())
        experts = "host" if limit is not None and checkpoint_config(path).replace(
            **({"dtype": dtype} if dtype else {})).weight_bytes() > limit else "device"
    if experts not in EXPERT_PLACES:
        raise ValueError(f"experts={experts!r} not in {EXPERT_PLACES}")

    def place(p, a):
        if experts == "host" and len(p) == 3 and p[1] == "experts":
            return a
        return jax.device_put(a)  # a copy: `a` is freed once placed

    cfg, params = _read(path, dtype, place)
    return MoEModel(cfg, params)


def load_store(path: str | os.PathLike, dtype: str | None = None, **store_knobs):
    """A checkpoint read into a HostWeightStore (knobs: gpu_weight_fraction, page_bytes,
    device_memory_bytes, host_memory), each tensor straight to its device or host pages:
    `Engine(load_store(dir, ...))`."""
    from moejax.host_offload.weight_store import HostWeightStore

    cfg = checkpoint_config(path)
    path = os.fspath(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    store = HostWeightStore(cfg, **store_knobs)
    _read(path, dtype, store.place)
    store.check_complete()
    return store


__all__ = ["checkpoint_config", "load_pretrained", "load_store", "load_hf_params", "load_native",
           "is_hf_checkpoint", "is_native_checkpoint"]
