"""HTTP plumbing shared by the vendor modules: errors, JSON bodies, streamed downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchd.emulator.state import EmulatorState

STATE_KEY = web.AppKey("batchd_emulator_state", EmulatorState)
_DOWNLOAD_CHUNK = 256 * 1024
_OPENAI_TYPES = {401: "invalid_request_error", 429: "requests"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An HTTP error rendered in the vendor's own error shape by the server middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def render(self, vendor: str, request_id: str) -> web.Response:
        """The vendor-shaped error response."""
        if vendor == "anthropic":
            kind = self.kind or _ANTHROPIC_TYPES.get(self.status, "api_error")
            body: dict[str, Any] = {
                "type": "error",
                "error": {"type": kind, "message": self.message},
                "request_id": request_id,
            }
        else:
            default = "server_error" if self.status >= 500 else "invalid_request_error"
            kind = self.kind or _OPENAI_TYPES.get(self.status, default)
            body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return web.Response(
            status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers
        )


def state_of(request: web.Request) -> EmulatorState:
    """The emulator state behind this request's app."""
    return request.app[STATE_KEY]


def json_response(body: Any, status: int = 200) -> web.Response:
    """Serialize with orjson."""
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON object body; an empty body (cancel, DELETE) reads as {}."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A bounded integer query parameter."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"Invalid '{name}': expected an integer.", param=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"Invalid '{name}': must be between {low} and {high}.", param=name)
    return value


async def stream_file(request: web.Request, path: Path, content_type: str) -> web.StreamResponse:
    """Stream a file from disk; the drop_download_rate fault cuts the connection half way through."""
    state = state_of(request)
    size = path.stat().st_size
    drop = size > 1 and state.chance(state.faults.drop_download_rate)
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = size
    await response.prepare(request)
    limit = size // 2 if drop else size
    sent = 0
    with path.open("rb") as f:
        while sent < limit:
            chunk = f.read(min(_DOWNLOAD_CHUNK, limit - sent))
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
    if drop:
        state.counters["dropped_downloads"] += 1
        # The client was promised `size` bytes; closing now is what a dropped connection looks like.
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


def fail_before_create(action: str) -> None:
    """create_script "before:STATUS": the create fails and nothing is created."""
    if action.startswith("before:"):
        raise ApiError(int(action.split(":", 1)[1]), "Internal server error")


def fail_after_create(request: web.Request, action: str) -> web.Response | None:
    """create_script "after:STATUS" / "after:drop": the batch exists, the client never learns its id."""
    if not action.startswith("after:"):
        return None
    how = action.split(":", 1)[1]
    if how == "drop":
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)
    raise ApiError(int(how), "Internal server error")
