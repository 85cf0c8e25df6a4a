"""Operators' commands against a running subprocess daemon (issue 12): `batchd pause`, `resume`,
`batches`, what `status` says about the daemon, and retention pruning with the report unchanged.

Every command runs as `python -m batchd ...`, as an operator would, beside `python -m batchd run`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import orjson

from batchd.emulator import Faults, RunningEmulator

from .conftest import wait_until
from .emulator_helpers import admin
from .harness import DaemonProcess, python_for, read_results, wait_for_file, write_config
from .test_acceptance import chat_line, claude_line, emulator_stats
from .test_faults import emulator_with


async def batchd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    python, python_env = python_for(None)
    proc = await asyncio.to_thread(
        subprocess.run,
        [*python, "-m", "batchd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **python_env, **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


async def ok_json(*args: str) -> Any:
    proc = await batchd(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return orjson.loads(proc.stdout)


def drop(root: Path, name: str, lines: list[dict[str, Any]]) -> Path:
    """Write a file into the spool the safe way (tmp/ then rename into new/); its results path."""
    staged = root / "spool" / "tmp" / name
    staged.parent.mkdir(parents=True, exist_ok=True)
    (root / "spool" / "new").mkdir(parents=True, exist_ok=True)
    staged.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    staged.rename(root / "spool" / "new" / name)
    return root / "spool" / "out" / f"{name.removesuffix('.jsonl')}.results.jsonl"


async def ready(daemon: DaemonProcess) -> None:
    await wait_until(lambda: any(e.get("event") == "daemon.ready" for e in daemon.log_events()) or None, 60)


async def test_pause_holds_submission_across_a_restart_while_intake_and_other_routes_go_on(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config = str(write_config(tmp_path, emulator))
    daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        paused = await batchd("pause", "openai", "--reason", "incident 7", "--config", config)
        assert paused.returncode == 0 and "paused openai" in paused.stdout, paused.stderr

        held = drop(tmp_path, "held.jsonl", [chat_line(n) for n in range(5)])
        other = drop(tmp_path, "other.jsonl", [claude_line(n) for n in range(3)])
        await wait_for_file(other, timeout=60, daemon=daemon)
        # Intake went on (the file is in the store, queued and due) but no openai batch was made,
        # while the anthropic route flushed and collected meanwhile.
        status = await ok_json("status", "--config", config)
        assert status["daemon"] == {"running": True, "pid": daemon.pid, "state_dir": str(tmp_path / "state")}
        assert [(p["route"], p["reason"]) for p in status["paused"]] == [("openai", "incident 7")]
        [flush] = status["next_flush"]
        assert (flush["provider"], flush["queued"], flush["next_flush"]) == ("openai", 5, None)
        assert flush["reason"] == "paused"
        batches = await ok_json("batches", "--config", config)
        assert {b["provider"] for b in batches} == {"anthropic"}
        assert not held.exists()
        text = await batchd("status", "--config", config)
        assert f"Daemon: running (pid {daemon.pid})" in text.stdout and "Paused: openai" in text.stdout

        # A restart keeps the pause: the next anthropic file goes through, the openai one still waits.
        assert await daemon.stop() in (0, -15)
        daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
        await ready(daemon)
        await wait_for_file(drop(tmp_path, "again.jsonl", [claude_line(n) for n in range(2)]), 60, daemon)
        assert {b["provider"] for b in await ok_json("batches", "--config", config)} == {"anthropic"}

        resumed = await batchd("resume", "openai", "--config", config)
        assert resumed.returncode == 0 and "resumed openai" in resumed.stdout, resumed.stderr
        await wait_for_file(held, timeout=60, daemon=daemon)
        assert [r["status"] for r in read_results(held)] == ["succeeded"] * 5

        async def none_live() -> bool:
            return await ok_json("batches", "--live", "--config", config) == []

        await wait_until(none_live, 30)
        everything = await ok_json("batches", "--config", config)
        assert {b["provider"] for b in everything} == {"anthropic", "openai"}
        assert all(b["state"] == "done" and b["node"] for b in everything)
        assert everything == sorted(everything, key=lambda b: -b["id"])
        nothing = await batchd("resume", "--config", config)
        assert nothing.returncode == 0 and "nothing was paused" in nothing.stdout
    finally:
        await daemon.stop()
    stopped = await ok_json("status", "--config", config)
    assert stopped["daemon"]["running"] is False and stopped["daemon"]["pid"] is None
    assert stopped["paused"] == []


async def test_pause_names_a_known_profile_and_needs_a_database(tmp_path: Path, emulator: RunningEmulator) -> None:
    config = str(write_config(tmp_path, emulator))
    unknown = await batchd("pause", "opneai", "--config", config)
    assert unknown.returncode == 64 and "opneai" in unknown.stderr and "openai" in unknown.stderr
    missing = await batchd("pause", "openai", "--config", config)
    assert missing.returncode == 66 and "no database" in missing.stderr
    assert not (tmp_path / "state" / "batchd.sqlite3").exists()


async def test_retention_prunes_spool_files_and_rows_and_the_report_is_unchanged(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    forever = {"done_retention": 0, "rejected_retention": 0, "out_retention": 0, "rows_retention": 0}
    config = write_config(tmp_path, emulator, daemon=forever)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        results = drop(tmp_path, "kept.jsonl", [chat_line(n) for n in range(6)] + [claude_line(n) for n in range(4)])
        # A symlink is refused: it goes to rejected/ with its .error.json.
        os.symlink(results.parent.parent / "elsewhere.jsonl", tmp_path / "spool" / "new" / "link.jsonl")
        await wait_for_file(results, timeout=60, daemon=daemon)
        # Retention keeps the rows holding the newest ids (never handed out twice): a later file holds them.
        newer = drop(tmp_path, "newer.jsonl", [chat_line(n) for n in range(100, 102)])
        await wait_for_file(newer, timeout=60, daemon=daemon)
        await wait_until(lambda: list((tmp_path / "spool" / "rejected").iterdir()), 30)
    finally:
        await daemon.stop()
    reports = {by: await ok_json("report", "--by", by, "--config", str(config)) for by in ("model", "file", "day")}
    assert reports["model"]["total"]["requests"] == 12
    assert len(await ok_json_lines("results", "--file", "kept.jsonl", "--config", str(config))) == 10

    short = {"done_retention": "1s", "rejected_retention": "1s", "out_retention": "1s", "rows_retention": "1s"}
    config = write_config(tmp_path, emulator, daemon=short)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        spool = tmp_path / "spool"

        def pruned() -> bool:
            return not any([*(spool / "done").iterdir(), *(spool / "rejected").iterdir(), *(spool / "out").iterdir()])

        await wait_until(pruned, 60)

        async def rows_gone() -> bool:
            return await ok_json_lines("results", "--file", "kept.jsonl", "--config", str(config)) == []

        await wait_until(rows_gone, 60)
        assert any(e.get("event") == "store.pruned" for e in daemon.log_events())
    finally:
        await daemon.stop()
    for by, before in reports.items():
        after = await ok_json("report", "--by", by, "--config", str(config))
        # Sums of costs folded at different times differ in the last bits of a float, nothing more.
        assert _rounded(after) == _rounded(before), by


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


async def ok_json_lines(*args: str) -> list[Any]:
    proc = await batchd(*args, "--json")
    assert proc.returncode in (0, 1), proc.stderr  # 1: no results matched
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


async def test_the_config_comes_from_batchd_config_when_not_given(tmp_path: Path, emulator: RunningEmulator) -> None:
    config = write_config(tmp_path, emulator)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        found = await batchd("status", "--json", env={"BATCHD_CONFIG": str(config)})
        assert found.returncode == 0, found.stderr
        assert orjson.loads(found.stdout)["daemon"]["pid"] == daemon.pid
        # --config wins over $BATCHD_CONFIG.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        other = write_config(elsewhere, emulator)
        wins = await batchd("status", "--config", str(other), env={"BATCHD_CONFIG": str(config)})
        assert wins.returncode == 66 and str(elsewhere / "state") in wins.stderr
    finally:
        await daemon.stop()


async def live_openai(config: str, requests: int) -> dict[str, Any] | None:
    """The live openai batch of `requests` requests once it is at the provider, else None."""
    for batch in await ok_json("batches", "--live", "--config", config):
        if batch["provider"] == "openai" and batch["requests"] == requests and batch["state"] == "submitted":
            return dict(batch)
    return None


async def queued_openai(config: str) -> int:
    return sum(f["queued"] for f in (await ok_json("status", "--config", config))["next_flush"])


async def test_cancel_a_batch_or_a_file_through_the_store_with_the_daemon_running(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    # Leases of 3 s: the daemon sees an operator's intent at its next renewal, within a second.
    config = str(write_config(tmp_path, emulator, store={"lease": 3}))
    daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        # Batches stay in progress until cancelled; the route is paused so that files queue up.
        assert (await admin(emulator, "PUT", "/_emulator/config", {"processing_seconds": 3600}))[0] == 200
        assert (await batchd("pause", "openai", "--config", config)).returncode == 0

        # Queued requests of a cancelled file end canceled at once, with no batch at all.
        queued = drop(tmp_path, "queued.jsonl", [chat_line(n) for n in range(3)])
        await wait_until(_equals(queued_openai, config, 3), 60, interval=0.5)
        done = await batchd("cancel", "--file", "queued.jsonl", "--config", config)
        assert done.returncode == 0, done.stderr
        assert "queued.jsonl: 3 queued requests canceled" in done.stdout and "batch" not in done.stdout
        await wait_for_file(queued, timeout=60, daemon=daemon)
        assert [(r["custom_id"], r["status"]) for r in read_results(queued)] == [
            (f"chat-{n}", "canceled") for n in range(3)
        ]

        # Two files in one batch: cancelling one of them cancels the batch at the provider; its
        # requests end canceled, the other file's are requeued and answered by a later batch.
        mine = drop(tmp_path, "mine.jsonl", [chat_line(n) for n in range(3)])
        theirs = drop(tmp_path, "theirs.jsonl", [chat_line(n) for n in range(10, 12)])
        await wait_until(_equals(queued_openai, config, 5), 60, interval=0.5)
        assert (await batchd("resume", "--config", config)).returncode == 0
        shared = await wait_until(lambda: live_openai(config, 5), 60, interval=0.5)
        solo = drop(tmp_path, "solo.jsonl", [chat_line(n) for n in range(20, 22)])
        alone = await wait_until(lambda: live_openai(config, 2), 60, interval=0.5)

        by_file = await batchd("cancel", "--file", "mine.jsonl", "--config", config)
        assert by_file.returncode == 0, by_file.stderr
        assert "mine.jsonl: 0 queued requests canceled" in by_file.stdout
        assert f"cancel requested for batch {shared['id']} " in by_file.stdout
        by_batch = await batchd("cancel", alone["remote_id"], "--config", config)  # the provider's id
        assert by_batch.returncode == 0, by_batch.stderr
        assert f"cancel requested for batch {alone['id']} " in by_batch.stdout

        async def cancelled_at_provider() -> bool:
            statuses = []
            for batch in (shared, alone):
                status, remote = await admin(emulator, "PATCH", f"/_emulator/batches/{batch['remote_id']}", {})
                statuses.append(remote["status"] if status == 200 else None)
            return statuses == ["cancelled", "cancelled"]

        await wait_until(cancelled_at_provider, 60, interval=0.5)
        # The requeued requests of theirs.jsonl go out again, to a provider that answers now.
        assert (await admin(emulator, "PUT", "/_emulator/config", {"processing_seconds": 0.2}))[0] == 200
        for path in (mine, theirs, solo):
            await wait_for_file(path, timeout=60, daemon=daemon)
        assert [(r["custom_id"], r["status"]) for r in read_results(mine)] == [
            (f"chat-{n}", "canceled") for n in range(3)
        ]
        assert [(r["custom_id"], r["status"]) for r in read_results(theirs)] == [
            (f"chat-{n}", "succeeded") for n in range(10, 12)
        ]
        assert [r["status"] for r in read_results(solo)] == ["canceled", "canceled"]
        assert all(r["batch_id"] != shared["remote_id"] for r in read_results(theirs))

        batches = {b["id"]: b for b in await ok_json("batches", "--config", config)}
        assert batches[shared["id"]]["fate"] == batches[alone["id"]]["fate"] == "cancelled"
        assert (batches[shared["id"]]["cancel_reason"], batches[alone["id"]]["cancel_reason"]) == ("file", "operator")
        answered = await batchd("results", "--file", "theirs.jsonl", "--status", "canceled", "--config", config)
        assert answered.returncode == 1  # nothing of theirs.jsonl was cancelled

        ended = await batchd("cancel", str(alone["id"]), "--config", config)
        assert ended.returncode == 1 and "has already ended" in ended.stdout, ended.stdout
        unknown = await batchd("cancel", "batch_nope", "--config", config)
        assert unknown.returncode == 66 and "no batch 'batch_nope'" in unknown.stderr
        assert len(unknown.stderr.strip().splitlines()) == 1
        missing = await batchd("cancel", "--file", "nope.jsonl", "--config", config)
        assert missing.returncode == 66 and "no input file 'nope.jsonl'" in missing.stderr
        neither = await batchd("cancel", "--config", config)
        assert neither.returncode == 64, neither.stderr
    finally:
        await daemon.stop()


def _equals(read: Any, config: str, value: int) -> Any:
    async def check() -> bool:
        return bool(await read(config) == value)

    return check


async def test_retry_sends_failed_lines_again_into_a_results_file_of_their_own(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    # One attempt: an injected server error is final at once, as after a provider's last retry.
    config = str(write_config(tmp_path, emulator, batching={"max_attempts": 1}))
    faults = "/_emulator/faults"
    assert (await admin(emulator, "PUT", faults, {"request_error_rate": 1.0}))[0] == 200
    daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        first = drop(tmp_path, "tickets.jsonl", [chat_line(n) for n in range(3)])
        await wait_for_file(first, timeout=60, daemon=daemon)
        assert [r["status"] for r in read_results(first)] == ["errored"] * 3
        original = first.read_bytes()

        # Still failing: retry1 holds the three lines again, errored again.
        again = await batchd("retry", "--file", "tickets.jsonl", "--config", config)
        assert again.returncode == 0, again.stderr
        assert "3 requests (3 errored) queued again as tickets.retry1.jsonl" in again.stdout
        retry1 = first.with_name("tickets.retry1.results.jsonl")
        assert str(retry1) in again.stdout
        await wait_for_file(retry1, timeout=60, daemon=daemon)
        assert [r["status"] for r in read_results(retry1)] == ["errored"] * 3

        # Fixed: retry2 takes each line's latest outcome (retry1's) and succeeds.
        assert (await admin(emulator, "PUT", faults, {"request_error_rate": 0.0}))[0] == 200
        fixed = await batchd("retry", "--file", "tickets.jsonl", "--status", "errored", "--config", config)
        assert fixed.returncode == 0, fixed.stderr
        retry2 = first.with_name("tickets.retry2.results.jsonl")
        await wait_for_file(retry2, timeout=60, daemon=daemon)
        results = read_results(retry2)
        assert [(r["custom_id"], r["line"], r["status"]) for r in results] == [
            (f"chat-{n}", n + 1, "succeeded") for n in range(3)
        ]
        # Every results file keeps one line per line it covers; the original is never rewritten.
        assert first.read_bytes() == original and len(read_results(retry1)) == 3

        nothing = await batchd("retry", "--file", "tickets.jsonl", "--config", config)
        assert nothing.returncode == 1 and "nothing to retry" in nothing.stdout
        missing = await batchd("retry", "--file", "nope.jsonl", "--config", config)
        assert missing.returncode == 66 and "no input file 'nope.jsonl'" in missing.stderr
        wrong = await batchd("retry", "--file", "tickets.jsonl", "--status", "succeeded", "--config", config)
        assert wrong.returncode == 64 and "succeeded" in wrong.stderr
    finally:
        await daemon.stop()


async def test_cancel_an_anthropic_batch_by_its_remote_id(tmp_path: Path, emulator: RunningEmulator) -> None:
    config = str(write_config(tmp_path, emulator, store={"lease": 3}))
    assert (await admin(emulator, "PUT", "/_emulator/config", {"processing_seconds": 3600}))[0] == 200
    daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
    try:
        await ready(daemon)
        results = drop(tmp_path, "claude.jsonl", [claude_line(n) for n in range(3)])

        async def live() -> dict[str, Any] | None:
            batches = await ok_json("batches", "--live", "--config", config)
            return next((b for b in batches if b["state"] == "submitted" and b["remote_id"]), None)

        batch = await wait_until(live, 60, interval=0.5)
        assert batch["provider"] == "anthropic"
        done = await batchd("cancel", batch["remote_id"], "--config", config)
        assert done.returncode == 0 and f"cancel requested for batch {batch['id']} " in done.stdout, done.stderr
        await wait_for_file(results, timeout=60, daemon=daemon)
        assert [(r["custom_id"], r["status"]) for r in read_results(results)] == [
            (f"claude-{n}", "canceled") for n in range(3)
        ]
        [ended] = [b for b in await ok_json("batches", "--config", config) if b["id"] == batch["id"]]
        assert (ended["fate"], ended["cancel_reason"]) == ("cancelled", "operator")
    finally:
        await daemon.stop()


async def test_a_batch_cancelled_before_the_provider_created_it_is_never_sent(tmp_path: Path) -> None:
    # The provider refuses creates for a while (before creating anything); the intent waits in its
    # backoff when the operator cancels it: its requests end canceled and no batch is ever created,
    # where the daemon used to create it once the provider recovered, only to cancel it.
    faults = Faults(create_script=("before:500",) * 6)
    async with emulator_with(faults) as emu:
        config = str(write_config(tmp_path, emu, batching={"max_wait": 0.2, "retry_backoff_max": 4}))
        daemon = DaemonProcess(Path(config), tmp_path / "daemon.log").start()
        try:
            await ready(daemon)
            results = drop(tmp_path, "early.jsonl", [chat_line(n) for n in range(3)])
            await wait_until(lambda: any(e.get("event") == "batch.submit_failed" for e in daemon.log_events()), 60)
            [pending] = [b for b in await ok_json("batches", "--config", config) if b["state"] == "pending"]
            cancelled = await batchd("cancel", str(pending["id"]), "--config", config)
            assert cancelled.returncode == 0, cancelled.stderr
            await wait_for_file(results, timeout=60, daemon=daemon)
            [dropped] = [e for e in daemon.log_events() if e.get("event") == "batch.dropped_unsent"]
            assert (dropped["batch"], dropped["canceled"], dropped["requeued"]) == (pending["id"], 3, 0)
            stats = await emulator_stats(emu)
        finally:
            await daemon.stop()
    assert [(r["custom_id"], r["status"]) for r in read_results(results)] == [
        (f"chat-{n}", "canceled") for n in range(3)
    ]
    assert stats["openai"]["batches_created"] == 0
    batches = {b["id"]: b for b in await ok_json("batches", "--config", config)}
    assert (batches[pending["id"]]["state"], batches[pending["id"]]["fate"]) == ("done", "cancelled")
