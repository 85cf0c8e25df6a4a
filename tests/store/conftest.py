"""The contract suite's fixtures: every test runs once per engine (SQLite, PostgreSQL).

`store` is node "n1" on a fresh database; `second_node` is node "n2" on the same database (for
PostgreSQL the same schema; for SQLite a second connection to the same file), for the multi-node
guarantees. `store_factory(node)` opens more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from batchd.store.contract import Store

from .pgtier import fresh_schema

ENGINES = ["sqlite", "postgres"]

StoreFactory = Callable[[str], Awaitable[Store]]


@pytest.fixture(params=ENGINES)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL for an empty database of the engine under test."""
    if request.param == "sqlite":
        yield "sqlite:///" + str(tmp_path / "t.sqlite3")
        return
    async with fresh_schema() as (url, _schema):
        yield url


@pytest.fixture
def engine(store_url: str) -> str:
    return "sqlite" if store_url.startswith("sqlite:") else "postgres"


def open_any(url: str, node: str) -> Store:
    """`open_store`, imported when used so that collecting the suite needs no engine."""
    from batchd.store import open_store

    return open_store(url, node=node)


@pytest.fixture
async def store_factory(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores (nodes) on the test database; closes them all afterwards."""
    opened: list[Store] = []

    async def make(node: str) -> Store:
        store: Store = open_any(store_url, node)
        await store.open()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in reversed(opened):
            await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory("n1")


@pytest.fixture
async def second_node(store: Store, store_factory: StoreFactory) -> Store:
    """Node n2 on the same database, opened after n1 (which created the schema)."""
    return await store_factory("n2")
