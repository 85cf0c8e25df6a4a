"""`batchd retry --file NAME [--status errored,expired]`: send a file's failed requests again.

The retried lines become a new input in the store, `STEM.retryN.jsonl`, whose results go to
out/STEM.retryN.results.jsonl: exactly the retried lines, each with its original line number and
custom_id. The original results file is never touched, so every results file keeps one line per
line it covers; a second retry takes each line's latest outcome (retry1's, where it was retried)
and writes retry2. The store drops a request's body once it has a final result, so the bodies are
read back from the original file in done/, each line checked against the custom_id the store holds
for it. The command only writes to the store; the running daemon batches the requests as any others.

A retried request keeps no deadline (the original one has most likely passed, and a route's
default counts from an arrival the retry does not have) unless `--deadline` gives one: relative
to now, with each request's fallback time from its route's deadline_lead, recorded as the retry
file's options as a sidecar would be.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from .exits import EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, OperatorError, reading_status, reason
from .formats import LineError, parse_line
from .policy import lines_to_retry
from .settings import Settings
from .sidecar import FileOptions, encode_options, parse_options
from .spool import LINE_OVERHEAD, RESULTS_SUFFIX, _Deadlines, request_capacity
from .status import existing_store, no_store
from .store.contract import FileItem, FileKey, FileRow, FileState, NewItem, Store, WholeFile

RETRYABLE = ("errored", "expired")


def _latest(rows: list[FileRow]) -> FileRow | None:
    return rows[-1] if rows else None


def _input_lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OperatorError(
            f"{path}: {reason(exc)} (its input is read back from done/; pruned after daemon.done_retention?)",
            reading_status(exc),
        ) from None
    return data.split(b"\n")


def _requests(path: Path, items: list[FileItem]) -> list[NewItem]:
    """The retried requests, their bodies read back from the input file in done/."""
    lines = _input_lines(path)
    requests = []
    for item in items:
        raw = lines[item.line - 1] if item.line <= len(lines) else b""
        try:
            parsed = parse_line(raw.rstrip(b"\r"), item.line)
        except LineError:
            parsed = None
        if parsed is None or parsed.custom_id != item.custom_id:
            raise OperatorError(
                f"{path}: line {item.line} is not the request {item.custom_id!r} the store holds: cannot retry it",
                EX_DATAERR,
            )
        size = len(parsed.body) + len(item.endpoint) + LINE_OVERHEAD
        tokens, inputs = request_capacity(item.endpoint, parsed.body)
        requests.append(
            NewItem(
                item.line, item.custom_id, item.profile, item.endpoint, item.model, parsed.body, size, tokens,
                inputs=inputs,
            )
        )  # fmt: skip
    return requests


def _with_deadline(settings: Settings, requests: list[NewItem], options: FileOptions | None) -> list[NewItem]:
    """The requests with the retry's own deadline and their fallback times (none without one)."""
    if options is None or options.deadline is None:
        return requests
    deadlines = _Deadlines(settings, time.time(), options.deadline)
    dated = []
    for item in requests:
        deadline, fallback_at = deadlines.of(item.profile, item.model)
        dated.append(dataclasses.replace(item, deadline=deadline, fallback_at=fallback_at))
    return dated


async def retry(settings: Settings, name: str, statuses: list[str], deadline: str | None = None) -> int:
    """Queue the file's requests whose latest outcome is in `statuses` again; `deadline` as
    sidecar.deadline_text gives it (relative: from now)."""
    options = None if deadline is None else parse_options(encode_options(deadline), time.time())
    async with existing_store(settings, writable=True) as store:
        if store is None:
            raise no_store(settings)
        return await _retry(settings, store, name, statuses, options)


async def _retry(
    settings: Settings, store: Store, name: str, statuses: list[str], options: FileOptions | None = None
) -> int:
    original = _latest(await store.files_named(name))
    if original is None:
        raise OperatorError(f"no input file {name!r} in the store (see batchd status)", EX_NOINPUT)
    if original.state == FileState.INGESTING:
        raise OperatorError(f"{name} is still being ingested: retry once it is in the store", EX_TEMPFAIL)
    stem = original.out_name.removesuffix(RESULTS_SUFFIX)
    generations = [await store.file_items(original.id)]
    number = 1
    while (earlier := _latest(await store.files_named(f"{stem}.retry{number}.jsonl"))) is not None:
        generations.append(await store.file_items(earlier.id))
        number += 1
    chosen = lines_to_retry(generations, statuses)
    wanted = "/".join(statuses)
    if not chosen:
        print(f"{name}: no request's latest outcome is {wanted}: nothing to retry")
        return 1
    spool = settings.daemon.spool_dir
    requests = _with_deadline(settings, _requests(spool / "done" / f"{stem}.jsonl", chosen), options)
    content = b"".join(request.body + b"\n" for request in requests)
    key = FileKey(f"{stem}.retry{number}.jsonl", hashlib.sha256(content).hexdigest(), len(content), 0, 0)
    out = spool / "out"
    whole = WholeFile(
        key,
        len(requests),
        requests,
        (),
        options.text if options is not None else None,
        options.deadline if options is not None else None,
    )
    [row] = await store.add_files([whole], lambda n: (out / n).exists())
    # Never in new/: nothing for the spool to move.
    await store.files_moved([row.id])
    counts = ", ".join(f"{n} {status}" for status, n in sorted(Counter(i.state.value for i in chosen).items()))
    due = "" if row.deadline is None else f", deadline {datetime.fromtimestamp(row.deadline, UTC).isoformat()}"
    print(f"{name}: {len(requests)} requests ({counts}) queued again as {key.name}{due}; results: {out / row.out_name}")
    return 0
