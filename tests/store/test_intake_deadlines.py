"""The intake's deadlines and per-file options through the store contract, on both engines (issue 11).

A file's sidecar options and the deadline it gave are recorded with its row (begin_file, add_files),
so a resumed ingest reads them back instead of a sidecar; each request keeps the deadline, fallback
time, token estimate and inputs it was queued with (add_chunk, add_files), read back by file_items.
"""

from __future__ import annotations

import dataclasses

from batchd.store.contract import NewItem, Store, WholeFile

from .factories import chunk, file_key, never_taken, new_item, whole_file

OPTIONS = '{"deadline":"2026-12-01T07:00+01:00"}'
DEADLINE = 1_796_104_800.0  # 2026-12-01T06:00Z


def with_deadline(item: NewItem, deadline: float | None, lead: float = 600.0, tokens: int = 0) -> NewItem:
    fallback = None if deadline is None else deadline - lead
    return dataclasses.replace(item, deadline=deadline, fallback_at=fallback, tokens=tokens)


async def test_begin_file_records_options_and_deadline_and_find_file_returns_them(store: Store) -> None:
    key = file_key("dated.jsonl")
    row = await store.begin_file(key, never_taken, options=OPTIONS, deadline=DEADLINE)
    assert (row.options, row.deadline) == (OPTIONS, DEADLINE)
    found = await store.find_file(key)
    assert found is not None and (found.options, found.deadline) == (OPTIONS, DEADLINE)
    plain = await store.begin_file(file_key("plain.jsonl"), never_taken)
    assert (plain.options, plain.deadline) == (None, None)
    await store.finish_file(row.id, 0)
    assert [(r.options, r.deadline) for r in await store.files_named("dated.jsonl")] == [(OPTIONS, DEADLINE)]


async def test_add_chunk_keeps_each_items_deadline_fallback_tokens_and_inputs(store: Store) -> None:
    row = await store.begin_file(file_key(), never_taken, options=OPTIONS, deadline=DEADLINE)
    lines = chunk(1, 3)
    items = [
        with_deadline(lines.items[0], DEADLINE, lead=600.0, tokens=123),
        dataclasses.replace(with_deadline(lines.items[1], DEADLINE + 60, lead=30.0, tokens=7), inputs=2048),
        lines.items[2],  # no deadline: none stored, no fallback time
    ]
    assert await store.add_chunk(row.id, dataclasses.replace(lines, items=items))
    await store.finish_file(row.id, 3)
    got = [(i.line, i.deadline, i.fallback_at, i.tokens, i.inputs) for i in await store.file_items(row.id)]
    assert got == [
        (1, DEADLINE, DEADLINE - 600.0, 123, 1),
        (2, DEADLINE + 60, DEADLINE + 30.0, 7, 2048),
        (3, None, None, 0, 1),
    ]


async def test_add_files_records_each_files_options_and_deadline_with_its_items(store: Store) -> None:
    dated = whole_file("dated.jsonl", 2)
    dated = dataclasses.replace(
        dated, items=[with_deadline(i, DEADLINE, tokens=5) for i in dated.items], options=OPTIONS, deadline=DEADLINE
    )
    plain = whole_file("plain.jsonl", 1)
    rows = await store.add_files([dated, plain], never_taken)
    assert [(r.name, r.options, r.deadline) for r in rows] == [
        ("dated.jsonl", OPTIONS, DEADLINE),
        ("plain.jsonl", None, None),
    ]
    reread = await store.file(rows[0].id)
    assert reread is not None and (reread.options, reread.deadline) == (OPTIONS, DEADLINE)
    items = await store.file_items(rows[0].id)
    assert [(i.deadline, i.fallback_at, i.tokens) for i in items] == [(DEADLINE, DEADLINE - 600.0, 5)] * 2
    assert [(i.deadline, i.fallback_at) for i in await store.file_items(rows[1].id)] == [(None, None)]


async def test_a_file_committed_before_keeps_its_deadline_whatever_a_second_add_files_says(store: Store) -> None:
    """A sidecar swapped in after a crash (before the move) changes nothing of a committed file."""
    first = whole_file("once.jsonl", 1)
    first = dataclasses.replace(
        first, items=[with_deadline(first.items[0], DEADLINE)], options=OPTIONS, deadline=DEADLINE
    )
    [committed] = await store.add_files([first], never_taken)
    later = dataclasses.replace(
        first, items=[with_deadline(first.items[0], DEADLINE + 86_400)], options='{"deadline":"1d"}', deadline=None
    )
    [again] = await store.add_files([later], never_taken)
    assert again.id == committed.id and (again.options, again.deadline) == (OPTIONS, DEADLINE)
    assert [i.deadline for i in await store.file_items(committed.id)] == [DEADLINE]


async def test_a_whole_file_without_options_is_what_it_was_before(store: Store) -> None:
    """WholeFile's new fields default to none: callers that give no options store none."""
    item = new_item(1)
    [row] = await store.add_files([WholeFile(file_key("old.jsonl"), 1, [item], [])], never_taken)
    assert (row.options, row.deadline) == (None, None)
    [stored] = await store.file_items(row.id)
    assert (stored.deadline, stored.fallback_at, stored.inputs) == (None, None, 1)
