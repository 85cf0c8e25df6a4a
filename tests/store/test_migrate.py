"""Migrations on both engines: `batchd migrate` applies them explicitly and idempotently, a newer schema is refused.

Through the command line (`python -m batchd migrate --config …`, as an operator runs it) and
through the store's own `migrate()` / `open()`.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
from pathlib import Path

import orjson
import pytest

from batchd.exits import EX_DATAERR, OperatorError
from batchd.store.contract import Store

from .conftest import StoreFactory, open_any
from .factories import file_key, never_taken
from .pgtier import admin_connection


def config_for(root: Path, url: str) -> Path:
    """A config with the daemon's directories and `[store] url`; the providers keep their defaults."""
    values = {
        "daemon": {"spool_dir": str(root / "spool"), "state_dir": str(root / "state"), "log_format": "json"},
        "store": {"url": url},
    }
    lines = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {orjson.dumps(value).decode()}" for key, value in entries.items()]
    path = root / "batchd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_cli(*args: str, timeout: float = 120) -> tuple[int, str]:
    """`python -m batchd ARGS`: (exit status, stdout and stderr together)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def schema_of(url: str) -> str:
    match = re.search(r"[?&]schema=([A-Za-z0-9_]+)", url)
    assert match, url
    return match.group(1)


async def schema_version(url: str) -> int:
    """The version the database records, read behind the store's back."""
    if url.startswith("sqlite:"):
        connection = sqlite3.connect(url[len("sqlite:///") :])
        try:
            return int(connection.execute("PRAGMA user_version").fetchone()[0])
        finally:
            connection.close()
    connection = await admin_connection()
    try:
        value = await connection.fetchval(f'SELECT max(version) FROM "{schema_of(url)}".schema_version')
        return int(value or 0)
    finally:
        await connection.close()


async def make_newer(url: str) -> int:
    """Record a schema version one above the newest (as a newer batchd would); returns it."""
    newer = await schema_version(url) + 1
    if url.startswith("sqlite:"):
        connection = sqlite3.connect(url[len("sqlite:///") :])
        try:
            connection.execute(f"PRAGMA user_version = {newer}")
            connection.commit()
        finally:
            connection.close()
        return newer
    connection = await admin_connection()
    try:
        schema = schema_of(url)
        # Copy the newest row whatever the other columns are, with the version bumped.
        async with connection.transaction():
            await connection.execute(
                f'CREATE TEMP TABLE newer AS SELECT * FROM "{schema}".schema_version ORDER BY version DESC LIMIT 1'
            )
            await connection.execute("UPDATE newer SET version = version + 1")
            await connection.execute(f'INSERT INTO "{schema}".schema_version SELECT * FROM newer')
    finally:
        await connection.close()
    return newer


async def test_migrate_on_a_store_never_opened_applies_everything_and_reports_both_versions(store_url: str) -> None:
    """What `batchd migrate` does: migrate() without open() first (open() would migrate itself)."""
    store = open_any(store_url, "n1")
    try:
        before, after = await store.migrate()
    finally:
        await store.close()
    assert (before, after) == (0, await schema_version(store_url)) and after > 0
    again = open_any(store_url, "n1")
    try:
        assert await again.migrate() == (after, after)
    finally:
        await again.close()


async def test_migrate_applies_every_migration_once(store_factory: StoreFactory, store_url: str) -> None:
    store: Store = await store_factory("n1")  # open() migrates to the newest
    newest = await schema_version(store_url)
    assert newest > 0
    assert await store.migrate() == (newest, newest)
    # Another node opening the same database finds nothing to do and the data kept.
    row = await store.begin_file(file_key("kept.jsonl"), never_taken)
    other = await store_factory("n2")
    assert await other.migrate() == (newest, newest)
    assert await store.file(row.id) is not None


async def test_a_newer_schema_is_refused_with_65(store_factory: StoreFactory, store_url: str) -> None:
    store = await store_factory("n1")
    await store.close()
    newer = await make_newer(store_url)
    again = open_any(store_url, "n1")
    with pytest.raises(OperatorError) as raised:
        await again.open()
    assert raised.value.status == EX_DATAERR
    assert await schema_version(store_url) == newer, "a refused open must not touch the schema"


def versions_printed(output: str, url: str) -> list[int]:
    """The numbers in the command's last line (its report), without the store URL's."""
    report = output.strip().splitlines()[-1].replace(url, "")
    return [int(number) for number in re.findall(r"\b\d+\b", report)]


async def test_batchd_migrate_is_idempotent_and_prints_the_versions(tmp_path: Path, store_url: str) -> None:
    config = config_for(tmp_path, store_url)
    status, output = await run_cli("migrate", "--config", str(config))
    assert status == 0, output
    newest = await schema_version(store_url)
    assert newest > 0
    assert versions_printed(output, store_url) == [0, newest], output
    status, again = await run_cli("migrate", "--config", str(config))
    assert status == 0, again
    assert set(versions_printed(again, store_url)) == {newest}, again
    assert await schema_version(store_url) == newest
    await make_newer(store_url)
    status, refused = await run_cli("migrate", "--config", str(config))
    assert status == EX_DATAERR, refused
    assert "newer" in refused.lower(), refused


async def test_a_store_without_a_schema_yet_is_not_created_for_a_command(store_url: str, tmp_path: Path) -> None:
    # Found by the suite: `batchd status` beside a daemon creating its database was refused with an
    # error instead of showing nothing yet. Both engines say NotCreated; status turns it into None.
    from batchd.store.contract import NotCreated

    if store_url.startswith("sqlite:"):
        (Path(store_url[len("sqlite:///") :])).touch()
    store = open_any(store_url, "n1")
    with pytest.raises(NotCreated):
        await store.open_existing()
