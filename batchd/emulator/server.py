"""The aiohttp application serving both vendors, its middleware, and start_emulator()."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web

from batchd.emulator import admin, anthropic_api, openai_api, realtime
from batchd.emulator.common import STATE_KEY, ApiError, state_of
from batchd.emulator.config import EmulatorConfig
from batchd.emulator.state import EmulatorState

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = web.RequestKey("batchd_emulator_request_id", tuple[str, str])
_FAULT_MESSAGES = {
    ("openai", 429): ("Rate limit reached for requests", "rate_limit_exceeded"),
    ("openai", 500): ("The server had an error while processing your request. Sorry about that!", None),
    ("openai", 503): ("The server is overloaded or not ready yet.", None),
    ("anthropic", 429): ("Number of requests has exceeded your rate limit", None),
    ("anthropic", 500): ("Internal server error", None),
    ("anthropic", 529): ("Overloaded", None),
}


def _vendor(path: str) -> str | None:
    if path.startswith("/_emulator/"):
        return None
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def _inject_fault(state: EmulatorState, path: str, vendor: str) -> None:
    faults = state.faults
    if faults.http_error_paths and not path.startswith(faults.http_error_paths):
        return
    if not faults.http_error_statuses or not state.chance(faults.http_error_rate):
        return
    status = state.rng.choice(faults.http_error_statuses)
    if status == 529 and vendor == "openai":
        status = 503  # 529 is Anthropic's private "overloaded" status
    state.counters["http_errors"] += 1
    message, code = _FAULT_MESSAGES.get((vendor, status), (f"Injected error {status}", None))
    retry = {"retry-after-ms": str(round(faults.retry_after * 1000)), "retry-after": f"{faults.retry_after:g}"}
    raise ApiError(status, message, code=code, headers=retry)


def _authenticate(state: EmulatorState, request: web.Request, vendor: str) -> None:
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if key is None and vendor == "anthropic":
        key = request.headers.get("x-api-key")
    keys = state.config.api_keys
    if key and (keys is None or key in keys):
        return
    if vendor == "anthropic":
        raise ApiError(401, "invalid x-api-key" if key else "Missing API key: send x-api-key or Authorization.")
    if not key:
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    masked = key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)
    raise ApiError(
        401,
        f"Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


@web.middleware
async def _middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Request ids, fault injection, auth, and vendor-shaped errors for every API call."""
    state = state_of(request)
    vendor = _vendor(request.path)
    request_id = "req_" + uuid.uuid4().hex
    if vendor is not None:
        request[_REQUEST_ID] = (vendor, request_id)
        state.counters["http_calls"] += 1
    try:
        if vendor is not None:
            _inject_fault(state, request.path, vendor)
            _authenticate(state, request, vendor)
        return await handler(request)
    except ApiError as exc:
        return exc.render(vendor or "openai", request_id)
    except web.HTTPException as exc:
        return ApiError(exc.status, exc.reason).render(vendor or "openai", request_id)
    except Exception:
        logging.getLogger(__name__).exception("error handling %s %s", request.method, request.path)
        return ApiError(500, "Internal server error").render(vendor or "openai", request_id)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Runs for every response, streamed ones included, just before headers go out."""
    tagged = request.get(_REQUEST_ID)
    if tagged is not None:
        vendor, request_id = tagged
        response.headers["request-id" if vendor == "anthropic" else "x-request-id"] = request_id


def build_app(state: EmulatorState) -> web.Application:
    """The aiohttp application for one emulator state."""
    app = web.Application(middlewares=[_middleware])
    app[STATE_KEY] = state
    app.on_response_prepare.append(_add_request_id)
    openai_api.add_routes(app)
    anthropic_api.add_routes(app)
    realtime.add_routes(app)
    admin.add_routes(app)
    return app


class RunningEmulator:
    """A started emulator; ``async with`` closes it."""

    def __init__(self, runner: web.AppRunner, state: EmulatorState, url: str) -> None:
        self._runner = runner
        self.state = state
        self.url = url
        self.openai_base_url = url + "/v1"
        self.anthropic_base_url = url
        self._closed = False

    async def close(self) -> None:
        """Stop serving, stop batch tasks and remove temporary storage (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self._runner.cleanup()
        await self.state.close()

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def start_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningEmulator:
    """Start serving both batch APIs on host:port (port 0 picks a free one)."""
    state = EmulatorState(config or EmulatorConfig())
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        await state.close()
        raise
    bound = runner.addresses[0][1]
    return RunningEmulator(runner, state, f"http://{host}:{bound}")
