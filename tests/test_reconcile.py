"""Reconciliation after an ambiguous create never adopts a stranger's batch and never creates twice.

Two daemons (separate state directories, so separate databases and instances) share one
emulator, i.e. one provider account. The emulator's create_script decides, call by call, whether
a create fails before creating, or creates the batch and then answers 500 / drops the connection.
Each daemon's answers must be answers to its own prompts: the emulator's responses are
deterministic functions of the request.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import openai

from batchd.emulator import Faults

from .conftest import make_settings, wait_until
from .test_faults import (
    admin,
    all_custom_ids,
    assert_one_result_per_line,
    chat_line,
    daemon_in_process,
    drop,
    emulator_stats,
    emulator_with,
    expected_response_id,
    out_path,
    wait_results,
)


def prompts(owner: str, n: int) -> list[dict[str, Any]]:
    """n Anthropic requests whose prompts name their owner, so a misattributed answer shows."""
    return [
        {
            "custom_id": f"q-{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": f"daemon {owner}, question {i}"}],
            },
        }
        for i in range(n)
    ]


def assert_own_answers(results: list[dict[str, Any]], lines: list[dict[str, Any]]) -> None:
    by_id = assert_one_result_per_line(results, lines)
    for line in lines:
        result = by_id[line["custom_id"]]
        assert result["status"] == "succeeded", result
        assert result["response"]["id"] == expected_response_id(line), "an answer to somebody else's prompt"


def query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(database)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


async def test_an_ambiguous_anthropic_create_never_adopts_another_daemons_batch(tmp_path: Path) -> None:
    """A's create fails; B then creates a batch of the same size; A must not take B's batch for its own."""
    a_lines, b_lines = prompts("A", 10), prompts("B", 10)
    # A's first create fails before creating; every later create happens but its answer is lost.
    script = ("before:500", "after:500", "after:500", "after:500")
    async with emulator_with(Faults(create_script=script), processing_seconds=1.0) as emu:
        a_settings = make_settings(tmp_path / "a", emu, max_wait=0.1)
        b_settings = make_settings(tmp_path / "b", emu, max_wait=0.1)
        async with daemon_in_process(a_settings) as (_a, a_task), daemon_in_process(b_settings) as (_b, b_task):
            drop(a_settings, "work.jsonl", a_lines)

            async def a_failed() -> bool:
                return bool((await emulator_stats(emu))["create_faults"] >= 1)

            await wait_until(a_failed, timeout=30, interval=0.01)
            # Before A tries again (a backoff of 1-2 s), B creates a batch of the same request count.
            drop(b_settings, "work.jsonl", b_lines)
            a_results = await wait_results(out_path(a_settings.daemon.spool_dir, "work"), a_task, timeout=60)
            b_results = await wait_results(out_path(b_settings.daemon.spool_dir, "work"), b_task, timeout=60)
        stats = await emulator_stats(emu)
    assert_own_answers(a_results, a_lines)
    assert_own_answers(b_results, b_lines)
    # One remote batch per daemon: nothing created twice, nothing lost.
    assert stats["anthropic"]["batches_created"] == 2
    ids = all_custom_ids(stats)
    assert len(ids) == 20 and all(len(batches) == 1 for batches in ids.values())
    a_remote = query(tmp_path / "a" / "state" / "batchd.sqlite3", "SELECT remote_id FROM batches")
    b_remote = query(tmp_path / "b" / "state" / "batchd.sqlite3", "SELECT remote_id FROM batches")
    assert len(a_remote) == len(b_remote) == 1 and a_remote != b_remote


async def test_two_daemons_whose_creates_all_lose_their_answers_each_adopt_only_their_own(tmp_path: Path) -> None:
    """Both creates happen and both answers are lost (a dropped connection, then a 500): the same count twice."""
    files = {"a": prompts("A", 12), "b": prompts("B", 12)}
    script = ("after:drop", "after:500", "after:drop", "after:500")
    async with emulator_with(Faults(create_script=script), processing_seconds=1.0) as emu:
        settings = {name: make_settings(tmp_path / name, emu, max_wait=0.1) for name in files}
        async with (
            daemon_in_process(settings["a"]) as (_a, a_task),
            daemon_in_process(settings["b"]) as (_b, b_task),
        ):
            for name, lines in files.items():
                drop(settings[name], "work.jsonl", lines)
            results = {
                name: await wait_results(out_path(settings[name].daemon.spool_dir, "work"), task, timeout=60)
                for name, task in (("a", a_task), ("b", b_task))
            }
        stats = await emulator_stats(emu)
    for name, lines in files.items():
        assert_own_answers(results[name], lines)
    assert stats["create_faults"] >= 2
    assert stats["anthropic"]["batches_created"] == 2, "a second batch for the same requests"
    ids = all_custom_ids(stats)
    assert len(ids) == 24 and all(len(batches) == 1 for batches in ids.values())


async def test_openai_reconciliation_reads_the_whole_window_whatever_the_list_order(tmp_path: Path) -> None:
    lines = [chat_line(n) for n in range(10)]
    async with emulator_with(Faults(list_order="asc"), processing_seconds=0.5) as emu:
        # Older batches of the account, listed first (oldest-first order).
        client = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-test", max_retries=0)
        try:
            for n in range(3):
                upload = await client.files.create(
                    file=("old.jsonl", b'{"custom_id":"x","method":"POST","url":"/v1/embeddings",'
                          b'"body":{"model":"text-embedding-3-small","input":"%d"}}\n' % n, "application/jsonl"),
                    purpose="batch",
                )  # fmt: skip
                old = await client.batches.create(
                    input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
                )
                await admin(emu, "PATCH", f"/_emulator/batches/{old.id}", {"age_seconds": 7200})
        finally:
            await client.close()
        await admin(emu, "PUT", "/_emulator/faults", {"create_script": ["after:500"]})
        settings = make_settings(tmp_path, emu)
        async with daemon_in_process(settings) as (_daemon, task):
            drop(settings, "work.jsonl", lines)
            results = await wait_results(out_path(settings.daemon.spool_dir, "work"), task, timeout=60)
        stats = await emulator_stats(emu)
    by_id = assert_one_result_per_line(results, lines)
    assert Counter(r["status"] for r in by_id.values()) == {"succeeded": 10}
    assert stats["create_faults"] == 1
    assert stats["openai"]["batches_created"] == 4, "the batch whose answer was lost was created again"
    ours = {k: v for k, v in all_custom_ids(stats).items() if k != "x"}
    assert len(ours) == 10 and all(len(batches) == 1 for batches in ours.values())
