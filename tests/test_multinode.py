"""Two daemons on one PostgreSQL queue, SIGKILLed at random moments: nothing lost, duplicated or misdelivered.

Daemons A and B run as `python -m batchd run` subprocesses, each with its own spool and state
directory (so its own node id), sharing one PostgreSQL schema and one emulator account with
seeded faults (HTTP errors on every call, retryable errors inside batches). Files are dropped into
both spools, with the same names in both. A is SIGKILLed and restarted at seeded random moments
while B runs; in some rounds A stays down longer than the lease, and B must take A's live batches
over and finish them while A is down. Then B is killed and restarted a few times too. At the end
every input line of each spool has exactly one result in its own out/, answering its own request;
no request was in two live batches; every re-send follows an injected failure.

PostgreSQL tier: skipped loudly without a server, failed instead with BATCHD_REQUIRE_POSTGRES_TIER=1.
`CHAOS_SEED` replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from batchd.emulator import Faults, RunningEmulator

from .conftest import wait_until
from .harness import DaemonProcess, NotifySocket, read_results, wait_for_file, write_config
from .store.pgtier import fresh_schema, pg_fetch
from .test_control import batchd
from .test_crash import assert_answers_are_their_own
from .test_faults import (
    all_custom_ids,
    assert_resent_only_after_failure,
    chat_line,
    claude_line,
    drop,
    embedding_line,
    emulator_stats,
    emulator_with,
    out_path,
)

KILLED = -signal.SIGKILL
LEASE = 5.0
A_KILLS = 12
B_KILLS = 3
# Rounds in which A stays down past the lease (tried again next round if A owned nothing live).
LONG_DOWN_ROUNDS = (3, 8)
A_FILES = 6
B_FILES = 4
TAKEOVER_DEADLINE = LEASE * 4 + 60


def files_for(rng: random.Random, count: int, base: int, lines_each: int = 700) -> dict[str, list[dict[str, Any]]]:
    """`count` files of mixed requests; the names (part-K) are the same in both spools, the requests are not."""
    files: dict[str, list[dict[str, Any]]] = {}
    for k in range(count):
        n0 = base + k * 10_000
        share = lines_each // 7
        lines: list[dict[str, Any]] = [chat_line(n0 + n) for n in range(3 * share)]
        lines += [embedding_line(n0 + n) for n in range(share)]
        lines += [claude_line(n0 + n) for n in range(lines_each - 4 * share)]
        rng.shuffle(lines)
        files[f"part-{k}"] = lines
    return files


class Node:
    """One daemon: its root, config, process, notify socket."""

    def __init__(self, name: str, root: Path, emu: RunningEmulator, url: str, **sections: dict[str, Any]) -> None:
        self.name = name
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.spool = root / "spool"
        self.notify = NotifySocket(root / "notify.sock")
        config = write_config(root, emu, store={"url": url, "lease": LEASE}, **sections)
        self.daemon = DaemonProcess(config, root / "daemon.log", env={"NOTIFY_SOCKET": str(self.notify.path)})

    async def start(self) -> None:
        self.notify.messages.clear()
        self.daemon.start()

        def ready() -> bool:
            if not self.daemon.running():
                raise AssertionError(
                    f"daemon {self.name} exited with {self.daemon.proc and self.daemon.proc.returncode}"
                )
            return self.notify.seen("READY=1")

        await wait_until(ready, timeout=60)

    @property
    def node_id(self) -> str:
        """The node id the daemon keeps in its state directory (made at its first start)."""
        return (self.root / "state" / "node-id").read_text().strip()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.log_events() if e.get("event") == name]


async def live_batches_of(schema: str, node: str) -> set[int]:
    rows = await pg_fetch(
        schema, "SELECT id FROM batches WHERE owner = $1 AND state IN ('pending', 'unverified', 'submitted')", node
    )
    return {int(row["id"]) for row in rows}


async def batch_states(schema: str, ids: set[int]) -> dict[int, tuple[str, str | None]]:
    rows = await pg_fetch(schema, "SELECT id, state, owner FROM batches WHERE id = ANY($1::bigint[])", sorted(ids))
    return {int(r["id"]): (str(r["state"]), r["owner"]) for r in rows}


@contextmanager
def closing(*nodes: Node) -> Iterator[None]:
    try:
        yield
    finally:
        for node in nodes:
            node.notify.close()


async def stay_down_until_taken_over(schema: str, down: Node, survivor: Node, killed_at: float) -> set[int]:
    """Keep `down` down past its lease; the survivor must take its live batches and finish them meanwhile.

    Returns the batches that moved (empty when the killed node owned nothing live: then the wait is
    just past the lease, so the downtime still exceeds it).
    """
    owned = await live_batches_of(schema, down.node_id)
    if not owned:
        await wait_until(lambda: time.monotonic() > killed_at + LEASE + 1, timeout=LEASE + 5)
        return set()

    async def finished_by_survivor() -> bool:
        states = await batch_states(schema, owned)
        return all(state == "done" for state, _owner in states.values())

    await wait_until(finished_by_survivor, timeout=TAKEOVER_DEADLINE, interval=0.25)
    assert not down.daemon.running()
    taken = {int(e["batch"]) for e in survivor.events("batch.taken_over") if e.get("previous_owner") == down.node_id}
    assert owned <= taken, f"{survivor.name} finished {sorted(owned - taken)} without logging a takeover"
    for _state, owner in (await batch_states(schema, owned)).values():
        assert owner != down.node_id
    return owned


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_two_daemons_share_one_postgresql_queue_through_kills_and_takeovers(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "4321"))
    rng = random.Random(seed)
    a_files = files_for(rng, A_FILES, 0)
    b_files = files_for(rng, B_FILES, 700_000)
    faults = Faults(seed=seed, http_error_rate=0.1, request_error_rate=0.02)
    limits = {"providers.openai": {"max_requests": 500}, "providers.anthropic": {"max_requests": 600}}
    batching = {"max_wait": 0.5, "retry_backoff_max": 4, "max_attempts": 10}
    async with fresh_schema("mn") as (url, schema), emulator_with(faults, processing_seconds=1.0) as emu:
        a = Node("A", tmp_path / "a", emu, url, batching=batching, **limits)
        b = Node("B", tmp_path / "b", emu, url, batching=batching, **limits)
        kills: list[int | None] = []
        taken_from_a: set[int] = set()
        taken_from_b: set[int] = set()
        with closing(a, b):
            try:
                await b.start()
                for number, (name, lines) in enumerate(b_files.items()):
                    if number < 2:
                        drop(b.spool, f"{name}.jsonl", lines)
                long_down_due = list(LONG_DOWN_ROUNDS)
                for round_number in range(A_KILLS):
                    await a.start()
                    if round_number < A_FILES:  # dropped while A runs: the kill may land mid-ingest
                        drop(a.spool, f"part-{round_number}.jsonl", a_files[f"part-{round_number}"])
                    if round_number in (2, 5):  # B's spool keeps getting work too
                        name = f"part-{2 + (round_number == 5)}"
                        drop(b.spool, f"{name}.jsonl", b_files[name])
                    # The chaos itself: a seeded random moment, not a wait for a condition.
                    await asyncio.sleep(rng.uniform(0.3, 2.0))
                    assert b.daemon.running(), "B died"
                    await a.daemon.kill()
                    killed_at = time.monotonic()
                    kills.append(a.daemon.proc.returncode if a.daemon.proc else None)
                    if long_down_due and round_number >= long_down_due[0]:
                        moved = await stay_down_until_taken_over(schema, a, b, killed_at)
                        if moved:
                            long_down_due.pop(0)
                        taken_from_a |= moved
                await a.start()
                # Then B is the one killed, the last time past its lease (A takes over).
                for round_number in range(B_KILLS):
                    await asyncio.sleep(rng.uniform(0.3, 2.0))
                    await b.daemon.kill()
                    killed_at = time.monotonic()
                    kills.append(b.daemon.proc.returncode if b.daemon.proc else None)
                    if round_number == B_KILLS - 1:
                        taken_from_b |= await stay_down_until_taken_over(schema, b, a, killed_at)
                    assert a.daemon.running(), "A died"
                    await b.start()
                for node, files in ((a, a_files), (b, b_files)):
                    for name in files:
                        await wait_for_file(out_path(node.spool, name), timeout=300, daemon=node.daemon)

                async def all_done() -> bool:
                    rows = await pg_fetch(schema, "SELECT count(*) AS n FROM batches WHERE state != 'done'")
                    return rows[0]["n"] == 0

                await wait_until(all_done, timeout=120, interval=0.25)
                a_total = assert_answers_are_their_own(a.spool, a_files)
                b_total = assert_answers_are_their_own(b.spool, b_files)
                for node, files in ((a, a_files), (b, b_files)):
                    # Each daemon wrote the results of its own files only, and finished each.
                    written = sorted(p.name for p in (node.spool / "out").iterdir())
                    assert written == sorted(f"{name}.results.jsonl" for name in files), (node.name, written)
                    assert not list((node.spool / "new").iterdir())
            finally:
                await a.daemon.stop()
                await b.daemon.stop()
        stats = await emulator_stats(emu)
        resent = await assert_resent_only_after_failure(emu)
        items = await pg_fetch(schema, "SELECT state, count(*) AS n FROM items GROUP BY state")
    assert kills == [KILLED] * (A_KILLS + B_KILLS)
    assert a_total == A_FILES * 700 and b_total == B_FILES * 700
    # A killed daemon's batches were finished by the survivor while it was down.
    assert taken_from_a, "A never owned a live batch when it stayed down: no takeover was exercised"
    # Every request of both daemons reached the provider under an id of its own, none in two live
    # batches (checked per request by assert_resent_only_after_failure), and the only re-sends are
    # the injected retryable failures: sent = valid lines + injected request errors.
    ids = all_custom_ids(stats)
    assert len(ids) == a_total + b_total
    sent = sum(len(batches) for batches in ids.values())
    assert sent == a_total + b_total + stats["faults_injected"]["request_errors"], (
        sent,
        stats["faults_injected"],
    )
    assert 0 < resent <= stats["faults_injected"]["request_errors"]
    assert stats["faults_injected"]["http_errors"] > 0
    assert {row["state"]: row["n"] for row in items} == {"succeeded": a_total + b_total}
    takeovers = Counter(str(e.get("previous_owner")) for e in b.events("batch.taken_over"))
    assert takeovers[a.node_id] >= len(taken_from_a), (takeovers, taken_from_a, taken_from_b)


@pytest.mark.timeout(300)
async def test_a_cancel_given_beside_another_daemon_is_carried_out_by_the_batchs_lease_holder(tmp_path: Path) -> None:
    # Batches stay in progress until cancelled.
    async with fresh_schema("mc") as (url, schema), emulator_with(processing_seconds=3600) as emu:
        a = Node("A", tmp_path / "a", emu, url)
        b = Node("B", tmp_path / "b", emu, url)
        with closing(a, b):
            try:
                await a.start()
                await b.start()
                drop(a.spool, "mine.jsonl", [chat_line(n) for n in range(3)])

                async def a_holds_one() -> set[int]:
                    return await live_batches_of(schema, a.node_id)

                [batch_id] = await wait_until(a_holds_one, timeout=60, interval=0.25)
                # The command runs beside B, with B's configuration: it only writes the intent.
                done = await batchd("cancel", str(batch_id), "--config", str(b.daemon.config))
                assert done.returncode == 0, done.stderr
                results = out_path(a.spool, "mine")
                await wait_for_file(results, timeout=60, daemon=a.daemon)
                assert [line["status"] for line in read_results(results)] == ["canceled"] * 3
                assert [e["batch"] for e in a.events("batch.operator_cancelled")] == [batch_id]
                assert b.events("batch.operator_cancelled") == []
                [row] = await pg_fetch(schema, "SELECT fate, cancel_reason FROM batches WHERE id = $1", batch_id)
                assert (row["fate"], row["cancel_reason"]) == ("cancelled", "operator")
            finally:
                await a.daemon.stop()
                await b.daemon.stop()
