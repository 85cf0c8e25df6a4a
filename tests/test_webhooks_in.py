"""OpenAI webhooks in: our Standard Webhooks check agrees with the SDK's; a signed event from the
emulator gets a batch collected although polling waits an hour; forged, stale or unsigned ones are refused."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from batchd.webhooks_in import WebhookRefused, batch_event, poll_ceiling, signed_headers, verify

from .conftest import wait_until
from .emulator_helpers import admin
from .harness import DaemonProcess, http_url, metric, metric_samples, read_results, write_config

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
TOLERANCE = 300


def sdk_accepts(body: bytes, headers: dict[str, str], secret: str) -> bool:
    client = openai.OpenAI(api_key="sk-unused")
    try:
        client.webhooks.verify_signature(body, headers, secret=secret, tolerance=TOLERANCE)
    except openai.InvalidWebhookSignatureError:
        return False
    finally:
        client.close()
    return True


def ours_accepts(body: bytes, headers: dict[str, str], secret: str) -> bool:
    try:
        verify(secret, headers, body, time.time(), TOLERANCE)
    except WebhookRefused:
        return False
    return True


def event(kind: str = "batch.completed", batch_id: str = "batch_abc") -> bytes:
    return orjson.dumps({"id": "evt_1", "object": "event", "created_at": 1, "type": kind, "data": {"id": batch_id}})


@pytest.mark.parametrize(
    "case",
    ["good", "plain-secret", "wrong-secret", "tampered", "stale", "future", "second-signature", "garbage-signature"],
)
def test_our_verification_agrees_with_the_sdk(case: str) -> None:
    body, secret, now = event(), SECRET, int(time.time())
    if case == "plain-secret":
        secret = "not-a-whsec-secret"
    headers = signed_headers(secret, "evt_1", now, body)
    check_secret, check_body = secret, body
    if case == "wrong-secret":
        check_secret = OTHER_SECRET
    elif case == "tampered":
        check_body = body.replace(b"batch_abc", b"batch_xyz")
    elif case == "stale":
        headers = signed_headers(secret, "evt_1", now - TOLERANCE - 60, body)
    elif case == "future":
        headers = signed_headers(secret, "evt_1", now + TOLERANCE + 60, body)
    elif case == "second-signature":
        # A rotated secret: the sender signs with both, the receiver knows one of them.
        other = signed_headers(OTHER_SECRET, "evt_1", now, body)["webhook-signature"]
        headers["webhook-signature"] = f"{other} {headers['webhook-signature']}"
    elif case == "garbage-signature":
        headers["webhook-signature"] = "v1,bm90IGEgc2lnbmF0dXJl"
    expected = case in ("good", "plain-secret", "second-signature")
    assert sdk_accepts(check_body, headers, check_secret) is expected
    assert ours_accepts(check_body, headers, check_secret) is expected


def test_missing_headers_and_non_batch_events() -> None:
    with pytest.raises(WebhookRefused) as refused:
        verify(SECRET, {"webhook-id": "evt_1"}, event(), time.time(), TOLERANCE)
    assert refused.value.status == 400
    assert batch_event(event("batch.expired", "batch_9")) == ("batch.expired", "batch_9")
    assert batch_event(event("response.completed")) is None
    with pytest.raises(WebhookRefused):
        batch_event(b"[1, 2]")


def test_polling_waits_longer_only_while_webhooks_are_healthy() -> None:
    assert poll_ceiling(300, 1800, None, 1000.0, 3600) == 300
    assert poll_ceiling(300, 1800, 900.0, 1000.0, 3600) == 1800
    assert poll_ceiling(300, 1800, 900.0, 900.0 + 3601, 3600) == 300
    assert poll_ceiling(300, 60, 900.0, 1000.0, 3600) == 300  # never shorter than the plain ceiling


# -- against a running daemon ---------------------------------------------------------------------


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    # Long enough that the daemon has recorded the remote batch before the batch ends and its event goes out.
    running = await start_emulator(EmulatorConfig(processing_seconds=1.5))
    try:
        yield running
    finally:
        await running.close()


def chat_lines(path: Path, n: int, prefix: str) -> None:
    lines = [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"ticket {i}"}], "max_tokens": 8},
        }
        for i in range(n)
    ]
    tmp = path.parent.parent / "tmp" / path.name
    tmp.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    tmp.rename(path)


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def test_a_signed_webhook_gets_a_batch_collected_and_forged_or_stale_ones_are_refused(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = write_config(
        tmp_path,
        emulator,
        batching={"max_wait": 0.5, "poll_interval_min": 3600, "poll_interval_max": 3600, "tick": 0.1},
        http={"listen": "127.0.0.1:0"},
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log", env={"OPENAI_WEBHOOK_SECRET": SECRET}).start()
    try:
        base = await http_url(daemon)
        hook = base + "/webhooks/openai"
        spool = tmp_path / "spool"
        await wait_until(lambda: (spool / "tmp").is_dir())

        # 1. The emulator signs with the right secret: its event wakes the poller, the batch is collected
        #    although the next poll is up to an hour away.
        status, _ = await admin(emulator, "PUT", "/_emulator/webhooks", {"url": hook, "secret": SECRET})
        assert status == 200
        chat_lines(spool / "new" / "first.jsonl", 3, "a")
        results = spool / "out" / "first.results.jsonl"
        await wait_until(results.exists, timeout=60)
        assert [r["status"] for r in read_results(results)] == ["succeeded"] * 3
        _, deliveries = await admin(emulator, "GET", "/_emulator/webhooks")
        assert [(d["type"], d["status"]) for d in deliveries["deliveries"]] == [("batch.completed", 200)]
        received = [e for e in daemon.log_events() if e.get("event") == "webhook.received"]
        assert received and received[0]["woken"] is True

        # 2. The emulator signs with a secret the daemon does not have: refused, and nothing is collected.
        await admin(emulator, "PUT", "/_emulator/webhooks", {"url": hook, "secret": OTHER_SECRET})
        chat_lines(spool / "new" / "second.jsonl", 2, "b")

        async def refused_delivery() -> bool:
            _, data = await admin(emulator, "GET", "/_emulator/webhooks")
            return len(data["deliveries"]) == 2 and data["deliveries"][1]["status"] == 401

        await wait_until(refused_delivery, timeout=60)
        _, deliveries = await admin(emulator, "GET", "/_emulator/webhooks")
        remote_id = deliveries["deliveries"][1]["batch_id"]
        # 3. A stale event, correctly signed, is refused too; an unknown batch is acknowledged and ignored.
        body = event("batch.completed", remote_id)
        stale = signed_headers(SECRET, "evt_stale", int(time.time()) - 3600, body)
        assert (await post(hook, body, stale))[0] == 401
        unsigned = {"content-type": "application/json"}
        assert (await post(hook, body, unsigned))[0] == 400
        other = event("batch.completed", "batch_made_elsewhere")
        status, answer = await post(hook, other, signed_headers(SECRET, "evt_other", int(time.time()), other))
        assert (status, answer.get("ignored")) == (200, "unknown batch")
        second = spool / "out" / "second.results.jsonl"
        assert not second.exists()
        samples = metric_samples(await get_text(base + "/metrics"))
        assert metric(samples, "batchd_webhooks_received_total", outcome="refused") == 3
        assert metric(samples, "batchd_webhooks_received_total", outcome="unknown") == 1

        # 4. The same event, freshly signed with the right secret: collected at once.
        status, answer = await post(hook, body, signed_headers(SECRET, "evt_good", int(time.time()), body))
        assert status == 200 and answer["polled"] is True
        await wait_until(second.exists, timeout=60)
        assert len(read_results(second)) == 2
        assert SECRET not in (tmp_path / "daemon.log").read_text()
    finally:
        assert await daemon.stop() == -signal.SIGTERM  # a graceful stop re-raises SIGTERM


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def test_a_webhook_at_the_node_without_the_lease_gets_the_lease_holder_to_poll(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    """Several daemons, one PostgreSQL store: the event marks the batch in the store; its lease holder polls."""
    from .store.pgtier import fresh_schema, pg_fetch
    from .test_multinode import Node, closing

    batching = {"max_wait": 0.5, "poll_interval_min": 3600, "poll_interval_max": 3600, "tick": 0.1}
    async with fresh_schema("wh") as (url, schema):
        nodes = [
            Node(name, tmp_path / name, emulator, url, batching=batching, http={"listen": "127.0.0.1:0"})
            for name in ("a", "b")
        ]
        for node in nodes:
            node.daemon.env["OPENAI_WEBHOOK_SECRET"] = SECRET
        with closing(*nodes):
            for node in nodes:
                await node.start()
            try:
                a = nodes[0]
                chat_lines(a.spool / "new" / "shared.jsonl", 2, "s")

                async def submitted() -> list[dict[str, Any]]:
                    return await pg_fetch(
                        schema,
                        "SELECT owner, remote_id FROM batches WHERE state = 'submitted' AND remote_id IS NOT NULL",
                    )

                [row] = await wait_until(submitted, timeout=60)
                client = openai.AsyncOpenAI(base_url=emulator.openai_base_url, api_key="sk-test", max_retries=0)
                try:
                    await wait_until(
                        lambda: _status_is(client, row["remote_id"], "completed"), timeout=60, interval=0.2
                    )
                finally:
                    await client.close()
                holder = next(n for n in nodes if n.node_id == row["owner"])
                other = next(n for n in nodes if n is not holder)
                body = event("batch.completed", row["remote_id"])
                status, answer = await post(
                    await http_url(other.daemon) + "/webhooks/openai",
                    body,
                    signed_headers(SECRET, "evt_elsewhere", int(time.time()), body),
                )
                assert (status, answer["polled"]) == (200, False)
                results = a.spool / "out" / "shared.results.jsonl"
                await wait_until(results.exists, timeout=60)
                assert [r["status"] for r in read_results(results)] == ["succeeded"] * 2
                assert holder.events("batch.poll_requested")
            finally:
                for node in nodes:
                    await node.daemon.stop()


async def _status_is(client: openai.AsyncOpenAI, remote_id: str, status: str) -> bool:
    return (await client.batches.retrieve(remote_id)).status == status
