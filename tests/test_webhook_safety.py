"""Webhooks never follow a redirect, never send to another origin, and never run without a secret.

Real aiohttp receivers on 127.0.0.1: one that answers 301 (which a client following it turns into
an empty GET that "succeeds"), and one that answers 307 to a second receiver on another port,
which must receive nothing: not the results, not the signature, not the configured headers.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web
from pydantic import ValidationError

from batchd.daemon import Daemon
from batchd.settings import Settings
from batchd.settings import WebhookSink as WebhookSettings
from batchd.sinks.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from batchd.spool import SpoolPaths

from .conftest import make_settings, wait_until
from .harness import write_config
from .test_faults import drop, out_path
from .test_outbox import invalid_lines

SECRET = "whsec-safety-0123456789abcdef"


@dataclass
class Receiver:
    """A receiver that redirects until told to accept; records everything it is sent."""

    redirect_status: int = 301
    location: str = "/landing"
    accept: bool = False
    posts: int = 0
    keys: list[str] = field(default_factory=list)
    elsewhere: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        if not self.accept:
            return web.Response(status=self.redirect_status, headers={"Location": self.location})
        assert verify(SECRET, request.headers[TIMESTAMP_HEADER], body, request.headers[SIGNATURE_HEADER])
        self.keys.extend(item["idempotency_key"] for item in orjson.loads(body)["results"])
        return web.Response(status=204)

    async def anything(self, request: web.Request) -> web.Response:
        self.elsewhere.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.Response(status=200)


@dataclass
class Served:
    receiver: Receiver
    port: int


async def serve(receiver: Receiver) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    app.router.add_route("*", "/{tail:.*}", receiver.anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Served, Served]]:
    """The configured receiver and a second one on another port (another origin)."""
    first, second = Receiver(), Receiver(accept=True)
    runner_a, port_a = await serve(first)
    runner_b, port_b = await serve(second)
    try:
        yield Served(first, port_a), Served(second, port_b)
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


def hooked_settings(tmp_path: Path, port: int) -> Settings:
    settings = make_settings(tmp_path, None)
    settings.sinks = [
        WebhookSettings(
            name="crm",
            url=f"http://127.0.0.1:{port}/hook",
            secret=SECRET,
            headers={"Authorization": "Bearer crm-token-7777"},
        )
    ]
    SpoolPaths(settings.daemon.spool_dir).create()
    return settings


async def redirect_then_accept(settings: Settings, receiver: Receiver) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a daemon while `receiver` redirects: nothing counts as delivered; then let it accept."""
    lines = invalid_lines(12)
    with structlog.testing.capture_logs() as events:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        try:
            drop(settings, "hooked", lines)
            # Redirected, then retried with the sink's backoff: a second POST to the configured URL.
            await wait_until(lambda: receiver.posts >= 2 or task.done(), timeout=30)
            assert not task.done()
            assert await daemon.store.sink_cursor("crm") == 0
            # A failing webhook never holds up the results file.
            await wait_until(out_path(settings.daemon.spool_dir, "hooked").exists, timeout=30)
            status = await daemon.store.status()
            receiver.accept = True
            await wait_until(lambda: len(receiver.keys) >= len(lines), timeout=30)
            await wait_until(lambda: daemon.store.sink_cursor("crm"), timeout=30)
        finally:
            daemon.request_stop("test over")
            assert await asyncio.wait_for(task, 30) == 0
    assert len(receiver.keys) == len(set(receiver.keys)) == len(lines)
    return events, status


async def test_a_301_is_a_failed_delivery_not_an_empty_get_that_succeeds(
    tmp_path: Path, receivers: tuple[Served, Served]
) -> None:
    first, _ = receivers
    first.receiver.redirect_status, first.receiver.location = 301, "/landing"
    events, status = await redirect_then_accept(hooked_settings(tmp_path, first.port), first.receiver)
    assert first.receiver.elsewhere == [], "the redirect was followed"
    refused = [e for e in events if e.get("event") == "webhook.redirect_refused"]
    assert refused and refused[0]["status"] == 301
    assert any(e["event"] == "sink.delivery_failed" and "301" in e["message"] for e in status["errors"])


async def test_a_307_to_another_origin_sends_it_nothing(tmp_path: Path, receivers: tuple[Served, Served]) -> None:
    first, second = receivers
    first.receiver.redirect_status = 307
    first.receiver.location = f"http://127.0.0.1:{second.port}/steal"
    events, status = await redirect_then_accept(hooked_settings(tmp_path, first.port), first.receiver)
    assert second.receiver.elsewhere == [], "results, signature or headers went to another origin"
    assert second.receiver.posts == 0
    refused = [e for e in events if e.get("event") == "webhook.redirect_refused"]
    assert refused and refused[0]["status"] == 307 and refused[0]["location"] == f"http://127.0.0.1:{second.port}"
    # `batchd status` shows the failure (from the errors table).
    assert any(e["event"] == "sink.delivery_failed" and "crm" in e["message"] for e in status["errors"])


@pytest.mark.parametrize(
    "sink",
    [
        'name = "crm"\nurl = "http://127.0.0.1:9/hook"\n',
        'name = "crm"\nurl = "http://127.0.0.1:9/hook"\nsecret_env = "BATCHD_TEST_UNSET_WEBHOOK_SECRET"\n',
        'name = "crm"\nurl = "http://127.0.0.1:9/hook"\nsecret = ""\n',
    ],
    ids=["no-secret", "secret-env-unset", "empty-secret"],
)
async def test_a_webhook_without_a_secret_is_a_configuration_error(tmp_path: Path, sink: str) -> None:
    config = write_config(tmp_path, _FakeEmulator())  # type: ignore[arg-type]
    with config.open("a") as handle:
        handle.write(f"\n[[sinks]]\n{sink}")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(tmp_path / "no-credentials")},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 78, (stdout, stderr)
    assert b"secret" in stderr and (b"'crm'" in stderr or b"sinks[0].secret" in stderr), stderr
    assert b"Traceback" not in stderr
    assert b"daemon.ready" not in stdout


def test_an_empty_secret_is_refused_by_settings_validation() -> None:
    with pytest.raises(ValidationError, match="secret"):
        WebhookSettings(name="crm", url="http://127.0.0.1:9/hook", secret="")
    with pytest.raises(ValidationError, match="secret_env"):
        WebhookSettings(name="crm", url="http://127.0.0.1:9/hook", secret_env="")


class _FakeEmulator:
    """Only the addresses write_config puts in the config; nothing listens there."""

    openai_base_url = "http://127.0.0.1:9/v1"
    anthropic_base_url = "http://127.0.0.1:9"
