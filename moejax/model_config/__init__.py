"""Model, hardware and workload presets: data, not code."""

from moejax.model_config.model import ModelConfig, get_model, model_names, register_model

__all__ = ["ModelConfig", "get_model", "model_names", "register_model"]
