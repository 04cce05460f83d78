"""The FastAPI gateway: an OpenAI-compatible front for one or more engines, built by `create_app`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from deploykit import __version__
from deploykit.serve.gateway.errors import GatewayError, error_body, install_error_handlers
from deploykit.serve.gateway.proxy import Backend, forward, get_json, parse_body


class Backends:
    """The engines behind the gateway, by the model name clients ask for."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.by_model = {b.model: b for b in backends}

    def route(self, body: dict[str, object]) -> Backend:
        model = body.get("model")
        names = ", ".join(sorted(self.by_model))
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400,
                f"The request needs a 'model' field; this gateway serves: {names}.",
                "invalid_request_error",
                "missing_model",
                "model",
            )
        backend = self.by_model.get(model)
        if backend is None:
            raise GatewayError(
                404,
                f"The model '{model}' does not exist here; this gateway serves: {names}.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return backend


def _backends(request: Request) -> Backends:
    backends: Backends = request.app.state.backends
    return backends


BackendsDep = Annotated[Backends, Depends(_backends)]


def create_app(backends: Sequence[Backend]) -> FastAPI:
    app = FastAPI(title="deploykit gateway", version=__version__)
    app.state.backends = Backends(backends)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The gateway process is alive (whether or not an engine can serve)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(backends: BackendsDep) -> Response:
        """200 when every model has an engine that can serve, else 503 with each model's status."""
        status = {name: b.status for name, b in backends.by_model.items()}
        if all(s == "ready" for s in status.values()):
            return JSONResponse({"status": "ready", "models": status})
        body = error_body("Not every model can serve yet.", "service_unavailable", "not_ready")
        return JSONResponse({**body, "models": status}, status_code=503)

    @app.get("/v1/models")
    async def models(backends: BackendsDep) -> dict[str, object]:
        data: list[object] = []
        for backend in backends.by_model.values():
            if backend.status == "ready":
                listing = await get_json(backend, "/v1/models")
                data += list(listing.get("data", []))  # type: ignore[call-overload]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, backends: BackendsDep) -> Response:
        return await _proxy(request, backends, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request, backends: BackendsDep) -> Response:
        return await _proxy(request, backends, "/v1/completions")

    return app


async def _proxy(request: Request, backends: Backends, path: str) -> Response:
    raw = await request.body()
    backend = backends.route(parse_body(raw))
    return await forward(backend, path, raw, request)
