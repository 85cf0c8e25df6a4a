"""The emulator's OpenAI webhooks: a `batch.*` event POSTed to a configured URL when a batch ends.

Signed the Standard Webhooks way, as OpenAI signs them (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,BASE64`), with the configured secret (`whsec_…`). Set at start-up
(`EmulatorConfig.webhook_url` / `webhook_secret`, `--webhook-url` / `--webhook-secret`) or at run
time with `PUT /_emulator/webhooks {"url": …, "secret": …}`; `GET /_emulator/webhooks` lists the
deliveries made (event id, type, batch id, HTTP status), never the secret. A delivery that fails
is retried a few times with a short backoff, as OpenAI retries, then dropped (polling is the
fallback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from batchd.emulator.common import ApiError, json_response, read_json, state_of
from batchd.emulator.state import EmulatorState, OpenAIBatch
from batchd.webhooks_in import signed_headers

EVENT_TYPES = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.cancelled",
}
ATTEMPTS = 3
TIMEOUT = 5.0


def batch_ended(state: EmulatorState, batch: OpenAIBatch) -> None:
    """Called as an OpenAI batch takes a status: a terminal one sends its event, if webhooks are set."""
    url, secret = state.config.webhook_url, state.config.webhook_secret
    kind = EVENT_TYPES.get(batch.status)
    if not url or not secret or kind is None:
        return
    event = {
        "id": state.new_id("evt_"),
        "object": "event",
        "created_at": int(state.now()),
        "type": kind,
        "data": {"id": batch.id},
    }
    state.spawn(deliver(state, url, secret, event))


async def deliver(state: EmulatorState, url: str, secret: str, event: dict[str, Any]) -> None:
    body = orjson.dumps(event)
    record: dict[str, Any] = {"id": event["id"], "type": event["type"], "batch_id": event["data"]["id"], "status": None}
    state.webhook_deliveries.append(record)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        for attempt in range(ATTEMPTS):
            # Signed at each attempt, as OpenAI does: a retry is not stale.
            headers = signed_headers(secret, event["id"], int(time.time()), body)
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    record["status"] = response.status
                    if response.status < 500:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                record["status"] = f"error: {exc.__class__.__name__}"
            if state.closing:
                break
            await asyncio.sleep(0.2 * 2**attempt)
    state.counters["webhooks_sent"] += 1


async def put_webhooks(request: web.Request) -> web.Response:
    """PUT /_emulator/webhooks: {"url": URL or null, "secret": "whsec_…" or null}."""
    state = state_of(request)
    body = await read_json(request)
    unknown = set(body) - {"url", "secret"}
    if unknown:
        raise ApiError(400, f"unknown webhook field(s): {', '.join(sorted(unknown))}")
    changes = {f"webhook_{key}": value for key, value in body.items()}
    if any(value is not None and not isinstance(value, str) for value in changes.values()):
        raise ApiError(400, "url and secret must be strings or null")
    state.config = dataclasses.replace(state.config, **changes)
    return json_response({"url": state.config.webhook_url, "secret_set": bool(state.config.webhook_secret)})


async def get_webhooks(request: web.Request) -> web.Response:
    """GET /_emulator/webhooks: the configured URL and every delivery made so far."""
    state = state_of(request)
    return json_response({"url": state.config.webhook_url, "deliveries": state.webhook_deliveries})
