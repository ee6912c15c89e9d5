"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status codes.

400 `invalid_request_error` naming the `param`, 401 a bad or missing key, 404 an unknown id, 409 a
state change the object's state does not allow, 413 an upload over the size limit. The SDK turns
each into its exception class (`BadRequestError`, `AuthenticationError`, `NotFoundError`,
`ConflictError`, ...) with the inner object as `.body`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("rft.api")


class APIError(Exception):
    """An error answered to the client: status code and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request cannot be used; `param` names the field."""
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """404: an id (file, job, model, checkpoint) this server does not know."""
    return APIError(404, message, param=param, code=code)


def conflict(message: str, code: str = "invalid_state") -> APIError:
    """409: the object's state does not allow this change."""
    return APIError(409, message, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def _param_of(loc: tuple[Any, ...], body: Any, missing: bool = False) -> str | None:
    """The field of the request an error is about, as OpenAI names it (`method.type`): the path of
    `loc` as far as it exists in the body (pydantic adds the tags of union members after it), plus
    the missing field's name for a missing one."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    if loc and loc[0] != "body":
        return ".".join(str(p) for p in parts[:1]) or None
    path: list[str] = []
    node = body
    for i, part in enumerate(parts):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
        else:
            if missing and i == len(parts) - 1 and isinstance(node, dict):
                path.append(str(part))
            break
        path.append(str(part))
    return ".".join(path) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A body or query that does not parse: 400 naming the first bad field, every problem in the message."""
    errors = exc.errors()
    body = getattr(exc, "body", None)
    problems = []
    params = []
    for err in errors:
        kind = err.get("type")
        where = _param_of(tuple(err.get("loc", ())), body, missing=kind == "missing")
        params.append(where)
        if kind == "extra_forbidden":
            problems.append(f"unrecognized request argument supplied: {where}")
        elif kind == "missing":
            problems.append(f"missing required parameter: '{where}'")
        elif kind == "json_invalid":
            problems.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        else:
            problems.append(f"invalid value for '{where or 'body'}': {err.get('msg')}")
    # Several errors for one field (one per member of a union) say the same thing once.
    unique = list(dict.fromkeys(problems))
    return invalid("; ".join(unique) or "invalid request", param=next((p for p in params if p), None))


def install_handlers(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape; an unexpected exception is a 500 with no traceback."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail) if exc.status_code != 404 else "unknown URL: not an endpoint of this server"
        body = APIError(exc.status_code, message, type=kind).body()
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while answering a request")
        body = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)
