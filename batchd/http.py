"""The daemon's HTTP listener (`[http] listen`): /metrics, /healthz, /readyz, the status page, webhooks in.

One aiohttp application, run by the daemon as a supervised side task on "HOST:PORT" or on a unix
socket ("unix:/run/batchd/http.sock", made 0660 so that the group may scrape it). Everything here
reads; the only thing it changes is when a poller polls next (`POST /webhooks/openai`).

- `/healthz`: 200 while the event loop answers (a stuck loop answers nothing; systemd's watchdog
  restarts it).
- `/readyz`: 200 when the store takes a write, the spool's new/ can be listed, and every provider
  profile answers one cheap authenticated call with its key; else 503 with the reasons. Provider
  answers are reused for `[http] ready_cache` seconds, so a busy probe does not call them each time.
- `/metrics`: see batchd/metrics.py. `/`: see batchd/page.py. `/webhooks/openai`: see
  batchd/webhooks_in.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import page
from .aio import wait_any
from .exits import OperatorError, creating_status, reason
from .logs import get_logger, redact_text
from .metrics import CONTENT_TYPE, Metrics
from .poller import Pollers
from .providers import ProviderError, ProviderPool
from .settings import HttpSettings, Settings, configured_secrets
from .store.contract import Store
from .webhooks_in import OpenAIWebhooks

log = get_logger("batchd.http")

PING_TIMEOUT = 5.0
# Read at most this much of a webhook delivery: OpenAI's events are a few hundred bytes.
MAX_WEBHOOK_BYTES = 1 << 20


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class HttpServer:
    """The routes and the listener; `run` serves until the daemon stops."""

    def __init__(
        self,
        settings: Settings,
        http: HttpSettings,
        store: Store,
        providers: ProviderPool,
        pollers: Pollers,
        sink_failures: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.settings = settings
        self.http = http
        self.store = store
        self.providers = providers
        self.metrics = Metrics(store, settings.store.lease, lambda: pollers.live, sink_failures)
        self.webhooks = OpenAIWebhooks(
            http.resolve_webhook_secret(),
            http.webhook_tolerance,
            store,
            pollers.poll_now,
            lambda outcome: self.metrics.webhooks.labels(outcome).inc(),
        )
        pollers.webhook_seen_at = lambda: self.webhooks.last_verified_at
        self._secrets = configured_secrets(settings)
        self._pings: dict[str, tuple[float, str | None]] = {}
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
        self.app.router.add_get("/", self.status_page)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics_page)
        self.app.router.add_post("/webhooks/openai", self.openai_webhook)

    async def healthz(self, _request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = await self.readiness()
        reasons = [f"{name}: {problem}" for name, problem in checks.items() if problem]
        body = {"ready": not reasons, "checks": {name: problem or "ok" for name, problem in checks.items()}}
        if reasons:
            body["reason"] = "; ".join(reasons)
            return _json(body, 503)
        return _json(body)

    async def readiness(self) -> dict[str, str | None]:
        """Each check's problem (None: fine), secrets taken out of every message."""
        names = sorted(self.settings.providers)
        store, spool, *pings = await asyncio.gather(
            self._store_writable(), self._spool_readable(), *(self._ping(name) for name in names)
        )
        checks = {"store": store, "spool": spool}
        checks.update({f"provider {name}": problem for name, problem in zip(names, pings, strict=True)})
        return {name: None if p is None else redact_text(p, self._secrets) for name, p in checks.items()}

    async def _store_writable(self) -> str | None:
        try:
            # A real write transaction (this node's heartbeat and leases), as the lease task makes.
            await self.store.renew_leases(self.settings.store.lease, time.time())
        except Exception as exc:
            return f"not writable: {exc}"
        return None

    async def _spool_readable(self) -> str | None:
        new = self.settings.daemon.spool_dir / "new"
        try:
            with os.scandir(new) as entries:
                next(entries, None)
        except OSError as exc:
            return f"cannot list {new}: {exc.strerror or exc}"
        return None

    async def _ping(self, name: str) -> str | None:
        now = time.monotonic()
        cached = self._pings.get(name)
        if cached is not None and now - cached[0] < self.http.ready_cache:
            return cached[1]
        try:
            await self.providers.get(name).ping(PING_TIMEOUT)
            problem = None
        except ProviderError as exc:
            problem = str(exc)
        except Exception as exc:  # an unreadable credential file, a broken base_url: still a reason, not a 500
            problem = f"{type(exc).__name__}: {exc}"
        self._pings[name] = (time.monotonic(), problem)
        if problem:
            log.warning("http.provider_unready", provider=name, reason=redact_text(problem, self._secrets))
        return problem

    async def metrics_page(self, _request: web.Request) -> web.Response:
        body = await self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def status_page(self, _request: web.Request) -> web.Response:
        from .control import route_section

        now = time.time()
        status = await self.store.status()
        data = await self.metrics.store_read()
        routes = await route_section(self.settings, self.store, now)
        html = page.render(status, data, routes, self.http.page_refresh, now)
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def openai_webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = await self.webhooks.receive(request.headers, body)
        return _json(answer.body, answer.status)

    async def start(self) -> None:
        """Bind the listener (before READY): a listener that cannot bind is an OperatorError."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        address = self.http.address()
        site: web.BaseSite
        try:
            if isinstance(address, str):
                path = Path(address)
                if path.is_socket():
                    path.unlink()  # left by a daemon that was killed: the state lock says none runs now
                site = web.UnixSite(self._runner, address)
                await site.start()
                os.chmod(address, 0o660)  # the group (e.g. the scraper's) may connect; others may not
            else:
                site = web.TCPSite(self._runner, address[0], address[1], reuse_address=True)
                await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OperatorError(
                f"[http] listen {self.http.listen}: cannot listen: {reason(exc)}", creating_status(exc)
            ) from None
        bound = [f"http://{a[0]}:{a[1]}" if isinstance(a, tuple) else f"unix:{a}" for a in self._runner.addresses]
        log.info("http.listening", listen=self.http.listen, bound=bound)

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve (and hold the metrics lease) until `stopping`, then close the listener."""
        assert self._runner is not None, "start() first"
        lease = asyncio.create_task(self.metrics.hold_lease(stopping), name="metrics-lease")
        try:
            await wait_any(float("inf"), stopping)
        finally:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            await self._runner.cleanup()
