"""Every error the gateway answers, in the OpenAI error shape, from one set of handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("deploykit.gateway")


class GatewayError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status, headers=e.headers)


def unexpected_error_response(e: Exception) -> JSONResponse:
    log.exception("unexpected error in the gateway")
    return JSONResponse(error_body(f"Internal gateway error: {type(e).__name__}", "server_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, e: GatewayError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        # OpenAI answers an unknown path too as an invalid request (404, "Invalid URL")
        return JSONResponse(
            error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(e.errors()), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return unexpected_error_response(e)
