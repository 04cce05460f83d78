"""deploykit: serve open models with vLLM behind an OpenAI-compatible gateway, and measure them."""

from deploykit.core.errors import DeploykitError

__version__ = "0.1.0"
__all__ = ["DeploykitError", "__version__"]
