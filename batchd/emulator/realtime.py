"""The real-time endpoints (what a deadline fallback sends to), with rate limits and the flex tier.

Same deterministic bodies and usage as the batch answers (responses.py), so a request answered in
real time and the same request answered in a batch cost the same tokens. Rate limits are per
(vendor, model) over a sliding window of ``faults.rate_window`` seconds: requests
(``realtime_rpm``) and tokens, input plus output (``realtime_tpm``); a model missing from the map
falls back to the ``"*"`` entry; none means unlimited. Past a limit the answer is 429 with
``retry-after`` (seconds until the window has room), as both vendors send it. OpenAI's flex tier
(``"service_tier": "flex"``) answers 429 "resource unavailable" at ``faults.flex_busy_rate``.

Every answered request is recorded (GET /_emulator/realtime): vendor, endpoint, model, tier,
body digest and usage, so tests can tell exactly what was sent in real time and price it.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from batchd.emulator.common import ApiError, json_response, read_json, state_of
from batchd.emulator.ledger import Window
from batchd.emulator.responses import ENDPOINTS, RequestRejected, anthropic_message, digest, openai_body
from batchd.emulator.state import EmulatorState

_SAMPLING_REMOVED = "2026-10-21"  # as anthropic_api: older versions still accept temperature etc.
_TIERS = ("auto", "default", "flex", "priority", "scale")


def _limit(limits: dict[str, int], model: str) -> int | None:
    value = limits.get(model, limits.get("*"))
    return value if value and value > 0 else None


def _admit(state: EmulatorState, vendor: str, model: str, tokens: int) -> None:
    """Count one request against its window, or answer 429 with retry-after."""
    faults = state.faults
    ledger = state.realtime
    window = ledger.windows.setdefault((vendor, model), Window())
    now = time.monotonic()
    span = max(faults.rate_window, 0.001)
    wait = window.wait(now, span, _limit(faults.realtime_rpm, model), _limit(faults.realtime_tpm, model), tokens)
    if wait is not None:
        ledger.rate_limited += 1
        seconds = max(wait, 0.001)
        headers = {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(math.ceil(seconds * 1000))}
        message = (
            f"Rate limit reached for {model}: retry after {seconds:.3f} s."
            if vendor == "openai"
            else f"This request would exceed the rate limit for {model}; retry after {seconds:.3f} s."
        )
        raise ApiError(429, message, code="rate_limit_exceeded" if vendor == "openai" else None, headers=headers)
    window.entries.append((now, tokens))
    window.tokens += tokens


def _record(
    state: EmulatorState, vendor: str, endpoint: str, model: str, tier: str, body: Any, usage: tuple[int, int]
) -> None:
    state.realtime.served.append(
        {
            "vendor": vendor,
            "endpoint": endpoint,
            "model": model,
            "tier": tier,
            "digest": digest(body).hex(),
            "input_tokens": usage[0],
            "output_tokens": usage[1],
        }
    )


async def _openai(request: web.Request) -> web.Response:
    state = state_of(request)
    endpoint = request.path
    body = await read_json(request)
    if body.get("stream"):
        raise ApiError(400, "The emulator does not stream; send stream=false.", param="stream")
    tier = body.pop("service_tier", None) or "default"
    if tier not in _TIERS:
        raise ApiError(400, f"Invalid value for 'service_tier': {tier!r}.", param="service_tier")
    tier = "default" if tier == "auto" else tier
    try:
        result, tokens_in, tokens_out = openai_body(endpoint, body)
    except RequestRejected as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    if tier == "flex" and state.chance(state.faults.flex_busy_rate):
        state.realtime.flex_busy += 1
        raise ApiError(
            429,
            "Resource unavailable on the flex tier; retry later or use the default tier.",
            code="resource_unavailable",
            headers={"retry-after": "1"},
        )
    model = str(body["model"])
    _admit(state, "openai", model, tokens_in + tokens_out)
    if endpoint in ("/v1/chat/completions", "/v1/responses"):
        result["service_tier"] = tier
    _record(state, "openai", endpoint, model, tier, body, (tokens_in, tokens_out))
    return json_response(result)


async def _anthropic(request: web.Request) -> web.Response:
    state = state_of(request)
    params = await read_json(request)
    if params.get("stream"):
        raise ApiError(400, "stream: the emulator does not stream")
    version = request.headers.get("anthropic-version", _SAMPLING_REMOVED)
    try:
        message = anthropic_message(params, legacy_sampling=version < _SAMPLING_REMOVED)
    except RequestRejected as exc:
        raise ApiError(400, exc.message) from None
    usage = message["usage"]
    usage["service_tier"] = "standard"
    model = str(params["model"])
    _admit(state, "anthropic", model, usage["input_tokens"] + usage["output_tokens"])
    _record(
        state, "anthropic", "/v1/messages", model, "standard", params, (usage["input_tokens"], usage["output_tokens"])
    )
    return json_response(message)


async def _served(request: web.Request) -> web.Response:
    ledger = state_of(request).realtime
    return json_response({**ledger.summary(), "served": ledger.served})


def add_routes(app: web.Application) -> None:
    """Mount the real-time endpoints of both vendors and the ledger view."""
    for endpoint in ENDPOINTS:
        app.router.add_post(endpoint, _openai)
    app.router.add_post("/v1/messages", _anthropic)
    app.router.add_get("/_emulator/realtime", _served)
