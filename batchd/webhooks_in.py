"""OpenAI webhooks in: Standard Webhooks signatures, and `batch.*` events that wake a batch's poller.

OpenAI signs each delivery the Standard Webhooks way: headers `webhook-id`, `webhook-timestamp`
(unix seconds) and `webhook-signature` ("v1,BASE64" entries separated by spaces), where BASE64 is
HMAC-SHA256 over "ID.TIMESTAMP.BODY" keyed by the secret (base64-decoded after its `whsec_`
prefix). `verify` is our equivalent of the openai SDK's `client.webhooks.verify_signature`
(tests/test_webhooks_in.py checks the two agree on good, forged and stale deliveries); keeping it
here keeps the SDK inside its adapter and the check a pure function.

Webhooks cover the whole provider project: an event for a batch this store does not hold is
acknowledged and ignored; only a delivery that is not provably OpenAI's (bad, missing or stale
signature) is refused. Polling stays the fallback: while verified events keep arriving, pollers
may wait longer between polls (`poll_ceiling`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .logs import get_logger

log = get_logger("batchd.webhooks_in")

BATCH_EVENTS = frozenset({"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"})


class WebhookRefused(Exception):
    """A delivery that is not provably OpenAI's: `status` is the HTTP answer (400 malformed, 401 not verified)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _key(secret: str) -> bytes:
    # As the SDK does: a whsec_ secret is base64 after its prefix; any other string is the key itself.
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret is not whsec_ followed by base64") from None
    return secret.encode()


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The "v1,BASE64" signature of one delivery (what OpenAI, and our emulator, send)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, webhook_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance: float) -> None:
    """Raise WebhookRefused unless `body` is signed with `secret` within `tolerance` seconds of `now`."""
    lowered = {key.lower(): value for key, value in headers.items()}
    try:
        webhook_id = lowered["webhook-id"]
        timestamp_text = lowered["webhook-timestamp"]
        header = lowered["webhook-signature"]
    except KeyError as exc:
        raise WebhookRefused(400, f"missing header {exc.args[0]}") from None
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookRefused(400, "webhook-timestamp is not unix seconds") from None
    if now - timestamp > tolerance:
        raise WebhookRefused(401, f"stale: signed {int(now - timestamp)} s ago (tolerance {tolerance:g} s)")
    if timestamp > now + tolerance:
        raise WebhookRefused(401, f"signed {int(timestamp - now)} s in the future (tolerance {tolerance:g} s)")
    expected = signature(secret, webhook_id, timestamp, body)[len("v1,") :]
    offered = [part[3:] if part.startswith("v1,") else part for part in header.split()]
    # Every candidate is compared (constant time each), so timing says nothing about which one matched.
    matched = [hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in offered]
    if not any(matched):
        raise WebhookRefused(401, "signature does not match")


def batch_event(body: bytes) -> tuple[str, str] | None:
    """(event type, remote batch id) of a batch.* event; None for any other event type.

    Raises WebhookRefused(400) for a verified body that is not an event at all.
    """
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookRefused(400, "body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise WebhookRefused(400, "body is not an event (no type)")
    kind = event["type"]
    if kind not in BATCH_EVENTS:
        return None
    data = event.get("data")
    remote_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(remote_id, str) or not remote_id:
        raise WebhookRefused(400, f"{kind} event without data.id")
    return kind, remote_id


def healthy(last_event_at: float | None, now: float, healthy_for: float) -> bool:
    """Whether webhooks count as working: a verified event arrived within `healthy_for` seconds."""
    return last_event_at is not None and now - last_event_at <= healthy_for


def poll_ceiling(
    poll_interval_max: float, webhook_poll_interval: float, last_event_at: float | None, now: float, healthy_for: float
) -> float:
    """The longest wait between two polls of an OpenAI batch: longer while webhooks are healthy."""
    if healthy(last_event_at, now, healthy_for):
        return max(poll_interval_max, webhook_poll_interval)
    return poll_interval_max


class Lookup(Protocol):
    async def remote_owner(self, remote_id: str) -> int | None: ...

    async def request_poll(self, batch_id: int, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]


class OpenAIWebhooks:
    """POST /webhooks/openai: verify, then wake the poller of the batch the event names (if it is ours)."""

    def __init__(
        self,
        secret: str | None,
        tolerance: float,
        store: Lookup,
        poll_now: Callable[[int], bool],
        counted: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self._tolerance = tolerance
        self._store = store
        self._poll_now = poll_now
        self._counted = counted
        self._clock = clock
        self.last_verified_at: float | None = None

    async def receive(self, headers: Mapping[str, str], body: bytes) -> Answer:
        if not self._secret:
            self._counted("refused")
            log.warning("webhook.refused", reason="no webhook secret configured ([http] webhook_secret_env)")
            return Answer(503, {"error": "no webhook secret configured"})
        now = self._clock()
        try:
            verify(self._secret, headers, body, now, self._tolerance)
            event = batch_event(body)
        except WebhookRefused as exc:
            self._counted("refused")
            log.warning("webhook.refused", status=exc.status, reason=exc.reason)
            return Answer(exc.status, {"error": exc.reason})
        self.last_verified_at = now
        webhook_id = {key.lower(): value for key, value in headers.items()}.get("webhook-id")
        if event is None:
            self._counted("ignored")
            log.info("webhook.ignored", webhook_id=webhook_id, reason="not a batch event")
            return Answer(200, {"ok": True, "ignored": "not a batch event"})
        kind, remote_id = event
        batch_id = await self._store.remote_owner(remote_id)
        if batch_id is None:
            # The project's webhooks also cover batches made outside batchd: acknowledged, not ours.
            self._counted("unknown")
            log.info("webhook.unknown_batch", webhook_id=webhook_id, type=kind, remote_id=remote_id)
            return Answer(200, {"ok": True, "ignored": "unknown batch"})
        woken = self._poll_now(batch_id)
        if not woken:
            # Another node holds the batch's lease (several daemons, one store): it polls at its next renewal.
            await self._store.request_poll(batch_id, now)
        self._counted("accepted")
        log.info("webhook.received", webhook_id=webhook_id, type=kind, batch=batch_id, remote_id=remote_id, woken=woken)
        return Answer(200, {"ok": True, "batch": batch_id, "polled": woken})
