"""The batcher's input file: written as a pipeline (read, join, write overlap), byte for byte the request lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd import batcher as batcher_module
from batchd.batcher import Batcher
from batchd.crashpoints import CrashPoints
from batchd.formats import anthropic_request, openai_request_line
from batchd.providers import ProviderPool
from batchd.store.sqlite import SQLiteStore

from .conftest import make_settings
from .store.factories import claim, ingest


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
    real = store.batch_bodies

    async def failing(batch_id: int, chunk: int = 2000) -> AsyncIterator[list[tuple[int, str, bytes]]]:
        count = 0
        async for part in real(batch_id, chunk):
            count += 1
            if count == 3:
                raise OSError("disk I/O error")
            yield part

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
