"""Checkpoint formats: Hugging Face safetensors (and the native format of host offload)."""

from __future__ import annotations

import os

from moejax.checkpoints.hf import is_hf_checkpoint, load_hf_params
from moejax.model import MoEModel
from moejax.model_config.model import ModelConfig


def load_pretrained(path: str | os.PathLike, dtype: str | None = None) -> MoEModel:
    """Load a checkpoint directory (HF `config.json` + `*.safetensors`) as a MoEModel.

    `dtype` ("float32", "bfloat16", "float16") overrides the checkpoint's dtype.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    if is_hf_checkpoint(path):
        cfg = ModelConfig.from_hf(path)
        if dtype is not None:
            cfg = cfg.replace(dtype=dtype)
        return MoEModel(cfg, load_hf_params(path, cfg))
    raise ValueError(f"{path!r} is not a checkpoint: expected config.json with "
                     "model.safetensors or model.safetensors.index.json")
