"""The batcher's input: an OpenAI input file written as a pipeline (read, join, write overlap), an Anthropic
batch streamed from the store; byte for byte the request lines either way."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from batchd import batcher as batcher_module
from batchd.batcher import Batcher
from batchd.crashpoints import CrashPoints
from batchd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from batchd.formats import anthropic_request, openai_request_line
from batchd.providers import ProviderError, ProviderPool
from batchd.providers.base import RequestStream
from batchd.store.contract import BatchRow, InputSize
from batchd.store.sqlite import SQLiteStore

from .conftest import make_settings
from .store.factories import claim, ingest


def fails_on_third_read(store: SQLiteStore) -> Callable[..., AsyncIterator[list[tuple[int, str, bytes]]]]:
    """The store's batch_bodies, but its third read fails as a disk would."""
    real = store.batch_bodies

    async def failing(batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        count = 0
        async for part in real(batch_id, chunk):
            count += 1
            if count == 3:
                raise OSError("disk I/O error")
            yield part

    return failing


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_input_file_is_every_request_line_in_order_across_many_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(batcher_module, "INPUT_CHUNK", 3)  # 10 requests: four reads, overlapping writes
    store = SQLiteStore(tmp_path / "t.sqlite3", "n1")
    await store.open()
    settings = make_settings(tmp_path, None)
    providers = ProviderPool(settings.providers)
    try:
        await ingest(store, count=10)
        batch = await claim(store, kind=kind)
        instance = await store.instance_id()
        runner = Batcher(settings, store, providers, tmp_path, lambda _id: None, CrashPoints(""))
        await runner.recover()
        target = tmp_path / "input.jsonl"
        await runner._write_input(batch, target)
        rows = [row async for chunk in store.batch_bodies(batch.id) for row in chunk]
        assert len(rows) == 10
        if kind == "openai":
            expected = b"".join(openai_request_line(i, endpoint, body, instance) for i, endpoint, body in rows)
        else:
            expected = b"".join(anthropic_request(i, body, instance) + b"\n" for i, _endpoint, body in rows)
        assert target.read_bytes() == expected
    finally:
        await providers.close()
        await store.close()


async def test_a_failed_read_fails_the_input_file_and_leaves_no_write_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "INPUT_CHUNK", 2)
    store = SQLiteStore(tmp_path / "t.sqlite3", "n1")
    await store.open()
    settings = make_settings(tmp_path, None)
    providers = ProviderPool(settings.providers)
    failing = fails_on_third_read(store)

    try:
        await ingest(store, count=10)
        batch = await claim(store)
        runner = Batcher(settings, store, providers, tmp_path, lambda _id: None, CrashPoints(""))
        await runner.recover()
        monkeypatch.setattr(store, "batch_bodies", failing)
        with pytest.raises(OSError, match="disk I/O error"):
            await runner._write_input(batch, tmp_path / "input.jsonl")
        # The two chunks read before the failure were written whole before the file was closed.
        assert (tmp_path / "input.jsonl").read_bytes().count(b"\n") == 4
    finally:
        await providers.close()
        await store.close()


async def test_an_anthropic_batch_goes_from_the_store_to_the_provider_byte_for_byte_with_no_input_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "INPUT_CHUNK", 3)  # 10 requests: four reads, each sent as it is read
    store = SQLiteStore(tmp_path / "t.sqlite3", "n1")
    await store.open()
    async with await start_emulator(EmulatorConfig(processing_seconds=600)) as emulator:
        settings = make_settings(tmp_path, emulator)
        providers = ProviderPool(settings.providers)
        try:
            # Bodies of different lengths, multi-byte UTF-8 among them: the declared length is exact.
            route = {"profile": "anthropic", "endpoint": "/v1/messages", "model": "claude-haiku-4-5"}
            await ingest(store, "a.jsonl", count=4, body='{"x":"é€"}'.encode(), **route)
            await ingest(store, "b.jsonl", count=6, body=b'{"max_tokens":5}', **route)
            batch = await claim(store, kind="anthropic")
            instance = await store.instance_id()
            runner = Batcher(settings, store, providers, tmp_path, lambda _id: None, CrashPoints(""))
            await runner.recover()

            async def no_file(*_args: object) -> None:
                raise AssertionError("an Anthropic batch must not be written to an input file")

            monkeypatch.setattr(runner, "_write_input", no_file)
            await runner._submit(batch)
            done = await store.batch(batch.id)
            assert done is not None and done.state == "submitted" and done.remote_id is not None
            sent = emulator.state.anthropic_batches[done.remote_id].requests_path.read_bytes().splitlines()
            rows = [row async for chunk in store.batch_bodies(batch.id) for row in chunk]
            assert [orjson.loads(line) for line in sent] == [
                orjson.loads(anthropic_request(i, body, instance)) for i, _endpoint, body in rows
            ]
            assert not list(tmp_path.glob("batch-*.jsonl"))
        finally:
            await providers.close()
            await store.close()


@pytest.mark.parametrize("declared", [-1, +1])
async def test_a_stream_whose_length_is_not_the_declared_one_creates_no_batch(declared: int, tmp_path: Path) -> None:
    lines = b"".join(anthropic_request(n, b'{"max_tokens":5}', "ab" * 16) + b"\n" for n in range(1, 4))

    async def chunks() -> AsyncIterator[bytes]:
        yield lines

    async with await start_emulator(EmulatorConfig(processing_seconds=600)) as emulator:
        providers = ProviderPool(make_settings(tmp_path, emulator).providers)
        try:
            provider = providers.get("anthropic")
            assert provider.streams_input
            with pytest.raises(ProviderError):
                await provider.submit(1, "/v1/messages", RequestStream(len(lines) + declared, chunks()), 3, {}, print)
            assert emulator.state.anthropic_batches == {}
        finally:
            await providers.close()


@contextlib.asynccontextmanager
async def claimed_anthropic_batch(
    tmp_path: Path, count: int
) -> AsyncIterator[tuple[SQLiteStore, RunningEmulator, Batcher, BatchRow]]:
    """`count` Anthropic requests claimed into one batch, an emulator that never ends a batch, and
    the batcher that submits it."""
    store = SQLiteStore(tmp_path / "t.sqlite3", "n1")
    await store.open()
    try:
        async with await start_emulator(EmulatorConfig(processing_seconds=600)) as emulator:
            settings = make_settings(tmp_path, emulator)
            providers = ProviderPool(settings.providers)
            try:
                await ingest(store, count=count, profile="anthropic", endpoint="/v1/messages", model="claude-haiku-4-5")
                batch = await claim(store, kind="anthropic")
                runner = Batcher(settings, store, providers, tmp_path, lambda _id: None, CrashPoints(""))
                await runner.recover()
                yield store, emulator, runner, batch
            finally:
                await providers.close()
    finally:
        await store.close()


async def test_a_store_failure_mid_stream_is_reported_as_the_store_s_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "INPUT_CHUNK", 2)
    async with claimed_anthropic_batch(tmp_path, 10) as (store, emulator, runner, batch):
        monkeypatch.setattr(store, "batch_bodies", fails_on_third_read(store))
        # Not a provider's connection error to back off from and retry: the store's own, raised.
        with pytest.raises(OSError, match="disk I/O error"):
            await runner._submit(batch)
        # Two chunks went out before the failure: the provider got a torn body and made nothing.
        assert emulator.state.anthropic_batches == {}
        still = await store.batch(batch.id)
        assert still is not None and still.state == "pending" and still.remote_id is None


# A byte more or less than the bodies, or half of them: the excess then comes in an early chunk.
@pytest.mark.parametrize(
    "declared", [lambda n: n + 1, lambda n: n - 1, lambda n: n // 2], ids=["short", "over_by_a_byte", "over_by_half"]
)
async def test_a_wrong_input_size_is_reported_as_such_not_as_a_connection_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, declared: Callable[[int], int]
) -> None:
    # The SDK wraps whatever the body raises into "Connection error": an operator reading that would
    # look at the network for a bug of ours in batch_input_size.
    monkeypatch.setattr(batcher_module, "INPUT_CHUNK", 2)  # several chunks: the excess may come early
    async with claimed_anthropic_batch(tmp_path, 40) as (store, emulator, runner, batch):
        real = store.batch_input_size

        async def wrong(batch_id: int) -> InputSize:
            size = await real(batch_id)
            return dataclasses.replace(size, body_bytes=declared(size.body_bytes))

        monkeypatch.setattr(store, "batch_input_size", wrong)
        await runner._submit(batch)  # a submit failure, backed off and retried like any other
        assert emulator.state.anthropic_batches == {}
        failed = await store.batch(batch.id)
        assert failed is not None and failed.state == "pending" and failed.last_error is not None
        assert "declared" in failed.last_error and "Connection error" not in failed.last_error
        assert not failed.last_error.startswith("anthropic connection")
