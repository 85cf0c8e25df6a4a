"""The PostgreSQL tier: where the test server is, a throwaway schema per test, and the skip/fail rule.

`BATCHD_TEST_POSTGRES_URL` names the server (default: the local one, trust auth, database `test`).
Each test gets a schema of its own with a random name, passed to the store as the URL query
parameter `schema=NAME` (PostgresStore creates it and puts it on the search_path), and dropped
afterwards. With no server answering, the tier is skipped with a message saying how to run it,
unless `BATCHD_REQUIRE_POSTGRES_TIER=1` (CI), which makes that a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT = 5.0


def server_url() -> str:
    return os.environ.get("BATCHD_TEST_POSTGRES_URL", DEFAULT_URL)


def redacted(url: str) -> str:
    """The URL without its password: skip messages end up in CI logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def with_schema(url: str, schema: str) -> str:
    """`url` with the query parameter schema=NAME added (other parameters kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"] + [("schema", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def tier_unavailable(reason: str) -> None:
    """Skip loudly, or fail where the tier is required."""
    message = (
        f"PostgreSQL tier NOT RUN: {reason} at {redacted(server_url())}. Start a server there (trust auth,"
        " database `test`) or point BATCHD_TEST_POSTGRES_URL at one, e.g."
        " `BATCHD_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test .venv/bin/pytest tests/store`;"
        " CI sets BATCHD_REQUIRE_POSTGRES_TIER=1, which turns this skip into a failure."
    )
    if os.environ.get("BATCHD_REQUIRE_POSTGRES_TIER") == "1":
        pytest.fail(message)
    pytest.skip(message)


async def admin_connection() -> Any:
    """A plain asyncpg connection to the test server (no schema), or skip/fail the tier."""
    try:
        import asyncpg
    except ImportError:
        tier_unavailable("asyncpg is not installed (pip install -e '.[dev]')")
        raise AssertionError("unreachable") from None
    try:
        return await asyncpg.connect(server_url(), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        tier_unavailable(f"no server answers ({type(exc).__name__}: {exc})")
        raise AssertionError("unreachable") from None


@asynccontextmanager
async def fresh_schema(prefix: str = "bt") -> AsyncIterator[tuple[str, str]]:
    """(store URL with schema=NAME, NAME) for a schema nobody else uses; dropped (CASCADE) afterwards.

    The schema itself is left for the store to create: creating it is part of what `open()` does.
    """
    connection = await admin_connection()
    schema = f"{prefix}_{secrets.token_hex(6)}"
    try:
        yield with_schema(server_url(), schema), schema
    finally:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await connection.close()


async def pg_fetch(schema: str, sql: str, *args: object) -> list[dict[str, Any]]:
    """Rows of a query run inside `schema`, for tests that look behind the contract."""
    connection = await admin_connection()
    try:
        await connection.execute(f'SET search_path TO "{schema}"')
        rows = await connection.fetch(sql, *args)
        return [dict(row) for row in rows]
    finally:
        await connection.close()
