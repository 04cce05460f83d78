"""The FastAPI gateway in front of the engines: OpenAI-compatible routes, errors in OpenAI's shape."""

from deploykit.serve.gateway.app import create_app
from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.routing import Backend

__all__ = ["Backend", "GatewayError", "create_app"]
