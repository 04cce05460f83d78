"""Models: the local store, import of GGUF files and model directories, and config.json facts."""

from deploykit.models.config import ModelConfig, read_model_config
from deploykit.models.fit import DTYPE_BYTES, kv_bytes_per_token, weight_bytes
from deploykit.models.importer import import_model
from deploykit.models.store import LocalModel, ModelStore

__all__ = [
    "DTYPE_BYTES",
    "LocalModel",
    "ModelConfig",
    "ModelStore",
    "import_model",
    "kv_bytes_per_token",
    "read_model_config",
    "weight_bytes",
]
