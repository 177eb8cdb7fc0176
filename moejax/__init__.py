"""moejax: high-throughput batched MoE inference with host offload, in JAX."""

from moejax import calibration  # noqa: F401 (registers the `local` hardware)
from moejax.checkpoints import load_pretrained
from moejax.engine import Engine
from moejax.model import MoEModel
from moejax.model_config import ModelConfig, get_model
from moejax.sampling import Sampling
from moejax.tokenizer import load_tokenizer

__all__ = ["Engine", "MoEModel", "ModelConfig", "Sampling", "get_model", "load_pretrained",
           "load_tokenizer"]
