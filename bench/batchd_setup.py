"""batchd-side helpers: settings for a store on a temporary root, and queued-store templates.

Imported only by the runner and by batchd-side workers (it imports batchd).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from batchd.logs import configure_logging
from batchd.settings import BatchingSettings, DaemonSettings, ProviderProfile, Settings
from batchd.spool import Spool, SpoolPaths
from batchd.store import open_store
from batchd.store.contract import Store

from .common import API_KEY_ANTHROPIC, API_KEY_OPENAI

UNREACHABLE_OPENAI = "http://127.0.0.1:9/v1"
UNREACHABLE_ANTHROPIC = "http://127.0.0.1:9"


def quiet_logs() -> None:
    """batchd's own log events at warning level, on stderr (never into the table on stdout)."""
    configure_logging("json", "warning", stream=sys.stderr)


def make_settings(
    root: Path,
    openai_url: str = UNREACHABLE_OPENAI,
    anthropic_url: str = UNREACHABLE_ANTHROPIC,
    max_in_flight: int = 20,
    **batching: Any,
) -> Settings:
    """Settings for a store and spool under `root`, like tests/conftest.py's make_settings."""
    return Settings(
        daemon=DaemonSettings(spool_dir=root / "spool", state_dir=root / "state", log_format="json"),
        batching=BatchingSettings(**batching),
        providers={
            "openai": ProviderProfile(
                kind="openai", base_url=openai_url, api_key=SecretStr(API_KEY_OPENAI), max_in_flight=max_in_flight
            ),
            "anthropic": ProviderProfile(
                kind="anthropic", base_url=anthropic_url, api_key=SecretStr(API_KEY_ANTHROPIC)
            ),
        },
    )


async def ingest_file(settings: Settings, store: Store, source: Path, name: str = "bench.jsonl") -> int:
    """Ingest `source` through the real spool intake (hard-linked into new/); returns its line count."""
    SpoolPaths(settings.daemon.spool_dir).create()
    os.link(source, settings.daemon.spool_dir / "new" / name)
    report = await Spool(settings, store, on_ingest=lambda: None).ingest(name)
    assert report is not None
    return report.lines


async def build_queued_store(root: Path, source: Path) -> Path:
    """A database with every line of `source` queued; returns its path (closed, WAL checkpointed)."""
    settings = make_settings(root)
    store = open_store("sqlite:///" + str(settings.daemon.database_path), "bench")
    await store.open()
    try:
        await ingest_file(settings, store, source)
    finally:
        await store.close()
    shutil.rmtree(settings.daemon.spool_dir, ignore_errors=True)
    return settings.daemon.database_path


def install_database(template: Path, root: Path) -> Path:
    """Copy a template database into a fresh root's state dir; returns the new path."""
    target = root / "state" / "batchd.sqlite3"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, target)
    return target
