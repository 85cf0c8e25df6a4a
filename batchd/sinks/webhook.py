"""The webhook sink: POSTs result lines in signed JSON chunks to a URL.

Body: `{"sink": NAME, "results": [{"idempotency_key": KEY, "result": <result line>}, …]}`.
Redirects are never followed: a 3xx is a failed delivery, retried like any other.
Headers: `X-Batchd-Timestamp: <unix seconds>` and
`X-Batchd-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`, plus an
`Idempotency-Key` for the chunk. Each result's key is stable across retries and restarts, so a
receiver that drops keys it has seen gets every result exactly once. Any 2xx is a delivery;
anything else is retried with backoff (by the sink runner) until the oldest result of the chunk
is older than `max_age`, when the chunk is parked (`batchd status` shows it, `batchd redeliver`
sends it again). With several daemons on one store, whichever holds the sink's lease delivers it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

import aiohttp

from ..logs import get_logger
from ..settings import WebhookSink as WebhookSettings
from ..store.contract import PendingResult, Store
from .base import Sink

log = get_logger("batchd.webhook")

SIGNATURE_HEADER = "X-Batchd-Signature"
TIMESTAMP_HEADER = "X-Batchd-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps (replays)."""
    try:
        if abs(time.time() - float(timestamp)) > tolerance:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _origin(url: str) -> str:
    """scheme://host:port of a Location header, for the log; its path and query may carry secrets."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.netloc else "(same origin)"
    except ValueError:
        return "(unparsable)"


class DeliveryError(Exception):
    """The receiver did not accept a chunk."""


class WebhookSink(Sink):
    """One `[[sinks]]` entry of kind webhook."""

    def __init__(self, store: Store, settings: WebhookSettings, instance: str, lease: float = 30.0) -> None:
        super().__init__(store)
        self.name = settings.name
        self._lease = lease
        self.settings = settings
        self._secret = settings.require_secret()
        self._instance = instance
        self._session: aiohttp.ClientSession | None = None

    async def cursor(self) -> int:
        return await self.store.sink_cursor(self.name)

    async def may_deliver(self) -> bool:
        # Several daemons may share the store: one at a time delivers this sink, under its lease.
        return await self.store.take_sink_lease(self.name, self._lease, time.time())

    def _key(self, result_id: int) -> str:
        return f"{self._instance}-{result_id}"

    def _body(self, results: list[PendingResult]) -> bytes:
        items = b",".join(
            b'{"idempotency_key":"%s","result":%s}' % (self._key(r.id).encode(), r.payload) for r in results
        )
        return b'{"sink":"%s","results":[%s]}' % (self.name.encode(), items)

    async def _post(self, results: list[PendingResult]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        body = self._body(results)
        timestamp = str(int(time.time()))
        headers = {
            **self.settings.headers,
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            "Idempotency-Key": f"{self._key(results[0].id)}..{results[-1].id}",
        }
        try:
            # Never follow a redirect: a 301/302 would turn the POST into an empty GET that "succeeds",
            # and a 307/308 would send the results, the signature and our headers to another origin.
            async with self._session.post(
                self.settings.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 300 <= response.status < 400:
                    location = _origin(response.headers.get("Location", ""))
                    log.warning("webhook.redirect_refused", sink=self.name, status=response.status, location=location)
                    raise DeliveryError(f"receiver answered {response.status} (a redirect, not followed)")
                if not 200 <= response.status < 300:
                    raise DeliveryError(f"receiver answered {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"receiver unreachable: {exc.__class__.__name__}: {exc}") from exc

    async def before_delivery(self) -> None:
        """Send again what `batchd redeliver` asked for; failures stay parked."""
        while parked := await self.store.to_redeliver(self.name, self.settings.batch_size):
            try:
                await self._post(parked)
            except DeliveryError as exc:
                await self.store.park(self.name, [r.id for r in parked], str(exc), advance_to=None)
                return
            await self.store.unpark(self.name, [r.id for r in parked])
            log.info("sink.redelivered", sink=self.name, results=len(parked))

    async def deliver(self, results: list[PendingResult]) -> None:
        size = self.settings.batch_size
        for start in range(0, len(results), size):
            chunk = results[start : start + size]
            try:
                await self._post(chunk)
            except DeliveryError as exc:
                if time.time() - chunk[0].created_at < self.settings.max_age:
                    raise
                await self.store.park(self.name, [r.id for r in chunk], str(exc), advance_to=chunk[-1].id)
                log.warning("sink.parked", sink=self.name, results=len(chunk), error=str(exc))
                continue
            await self.store.advance_cursor(self.name, chunk[-1].id)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
