"""Anthropic Message Batches API: routes, streaming create-body parser, and the batch life cycle."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchd.emulator.common import (
    ApiError,
    fail_after_create,
    fail_before_create,
    int_query,
    json_response,
    state_of,
    stream_file,
)
from batchd.emulator.jobs import JsonlSink, LineRun, run_lines
from batchd.emulator.responses import RequestRejected, anthropic_message
from batchd.emulator.state import AnthropicBatch, EmulatorState, Limits

_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_PREFIX = re.compile(r'\s*\{\s*"requests"\s*:\s*\[\s*')
_SEPARATOR = re.compile(r"\s*([,\]])\s*")
_READ_CHARS = 4 << 20
# API versions before this one still accept temperature / top_p / top_k.
_SAMPLING_REMOVED = "2026-10-21"


def _base_url(request: web.Request) -> str:
    """How the client reached us, so results_url points back at this emulator (unless a fault says otherwise)."""
    return state_of(request).faults.results_url_base or f"{request.scheme}://{request.host}"


def _batch_or_404(state: EmulatorState, batch_id: str) -> AnthropicBatch:
    batch = state.anthropic_batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"Message batch not found: {batch_id}")
    return batch


def iter_requests(path: Path) -> Iterator[Any]:
    """Yield the items of the body's ``requests`` array without loading the whole body.

    Uses the stdlib decoder's ``raw_decode`` because orjson cannot decode one value out of a
    longer buffer; each request is decoded once, in C.
    """
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        buf = f.read(_READ_CHARS)
        head = _PREFIX.match(buf)
        if head is None:
            # Not the SDK's layout (other keys first?): parse whole; only small hand-made bodies do this.
            try:
                body = orjson.loads(buf + f.read())
            except orjson.JSONDecodeError:
                raise RequestRejected("The request body is not valid JSON.") from None
            requests = body.get("requests") if isinstance(body, dict) else None
            if not isinstance(requests, list):
                raise RequestRejected("requests: Field required")
            yield from requests
            return
        pos, eof = head.end(), False
        if buf.startswith("]", pos):
            return
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:
                    raise ValueError("value may continue in the next chunk")
                sep = _SEPARATOR.match(buf, end)
                if sep is None or (sep.end() == len(buf) and not eof):
                    raise ValueError("separator may continue in the next chunk")
            except ValueError:
                more = f.read(max(_READ_CHARS, len(buf) - pos))
                if not more:
                    if eof:
                        raise RequestRejected("The request body is not valid JSON.") from None
                    eof = True
                buf, pos = buf[pos:] + more, 0
                continue
            yield item
            if sep.group(1) == "]":
                return
            pos = sep.end()


def normalize_requests(source: Path, target: Path, limits: Limits) -> list[str]:
    """Validate the create body and write one ``{custom_id, params}`` line per request (in a thread).

    Returns the custom_ids; raises RequestRejected with the API's synchronous 400 message.
    """
    seen: set[str] = set()
    ids: list[str] = []
    with target.open("wb") as out:
        for i, item in enumerate(iter_requests(source)):
            if i >= limits.anthropic_max_requests:
                continue  # keep counting for the error message
            if not isinstance(item, dict):
                raise RequestRejected(f"requests.{i}: Input should be a valid dictionary")
            custom_id, params = item.get("custom_id"), item.get("params")
            where = f"requests.{i}.custom_id"
            if custom_id is None:
                raise RequestRejected(f"{where}: Field required")
            if not isinstance(custom_id, str):
                raise RequestRejected(f"{where}: Input should be a valid string")
            if len(custom_id) > 64:
                raise RequestRejected(f"{where}: String should have at most 64 characters")
            if not _CUSTOM_ID.fullmatch(custom_id):
                if not custom_id:
                    raise RequestRejected(f"{where}: String should have at least 1 character")
                raise RequestRejected(f"{where}: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if custom_id in seen:
                raise RequestRejected(
                    f"{where}: Duplicate custom_id '{custom_id}'; custom_id must be unique within a batch"
                )
            if params is None:
                raise RequestRejected(f"requests.{i}.params: Field required")
            if not isinstance(params, dict):
                raise RequestRejected(f"requests.{i}.params: Input should be a valid dictionary")
            seen.add(custom_id)
            ids.append(custom_id)
            out.write(orjson.dumps({"custom_id": custom_id, "params": params}))
            out.write(b"\n")
    count = len(ids) if len(ids) < limits.anthropic_max_requests else i + 1
    if count == 0:
        raise RequestRejected("requests: List should have at least 1 item after validation, not 0")
    if count > limits.anthropic_max_requests:
        raise RequestRejected(
            f"requests: List should have at most {limits.anthropic_max_requests} items after validation, not {count}"
        )
    return ids


def _check_queue_limit(state: EmulatorState, adding: int, requests_path: Path) -> None:
    """Answer 429 when the batch would take the requests queued in processing batches past the limit."""
    limit = state.faults.anthropic_queue_limit
    if limit <= 0:
        return
    queued = sum(b.total for b in state.anthropic_batches.values() if b.status == "in_progress")
    state.peak_enqueued["anthropic"] = max(state.peak_enqueued.get("anthropic", 0), queued)
    if queued + adding > limit:
        requests_path.unlink(missing_ok=True)
        state.counters["queue_limited"] += 1
        raise ApiError(429, f"Number of queued batch requests would exceed your limit of {limit:,}.")
    state.peak_enqueued["anthropic"] = max(state.peak_enqueued.get("anthropic", 0), queued + adding)


async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/messages/batches: the body is spooled to disk, then validated and normalized."""
    state = state_of(request)
    action = state.next_create_action()
    fail_before_create(action)
    limit = state.limits.anthropic_max_body_bytes
    too_large = ApiError(413, "Request exceeds the maximum allowed number of bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    batch_id = state.new_id("msgbatch_")
    body_path = state.data_dir / "anthropic" / f"{batch_id}.body.json"
    requests_path = state.data_dir / "anthropic" / f"{batch_id}.requests.jsonl"
    try:
        size = 0
        with body_path.open("wb") as f:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise too_large
                f.write(chunk)
        custom_ids = await asyncio.to_thread(normalize_requests, body_path, requests_path, state.limits)
    except RequestRejected as exc:
        requests_path.unlink(missing_ok=True)
        raise ApiError(400, exc.message) from None
    except BaseException:
        requests_path.unlink(missing_ok=True)
        raise
    finally:
        body_path.unlink(missing_ok=True)
    _check_queue_limit(state, len(custom_ids), requests_path)
    version = request.headers.get("anthropic-version", _SAMPLING_REMOVED)
    batch = AnthropicBatch(
        id=batch_id,
        created_at=state.now(),
        total=len(custom_ids),
        requests_path=requests_path,
        results_path=state.data_dir / "anthropic" / f"{batch_id}.results.jsonl",
        legacy_sampling=version < _SAMPLING_REMOVED,
        job=state.new_job(),
    )
    state.anthropic_batches[batch_id] = batch
    state.counters["anthropic_batches"] += 1
    for custom_id in custom_ids:
        state.anthropic_custom_ids.setdefault(custom_id, []).append(batch_id)
    state.spawn(run_batch(state, batch))
    return fail_after_create(request, action) or json_response(batch.to_json(_base_url(request)))


async def retrieve_batch(request: web.Request) -> web.Response:
    """GET /v1/messages/batches/{id}."""
    batch = _batch_or_404(state_of(request), request.match_info["batch_id"])
    return json_response(batch.to_json(_base_url(request)))


async def list_batches(request: web.Request) -> web.Response:
    """GET /v1/messages/batches: newest first; after_id pages toward older, before_id toward newer."""
    state = state_of(request)
    items = list(state.anthropic_batches.values())
    if state.faults.list_order != "asc":
        items.reverse()
    ids = [b.id for b in items]
    limit = int_query(request, "limit", 20, 1, 1000)
    before, after = request.query.get("before_id"), request.query.get("after_id")
    if before is not None:
        items = items[: ids.index(before)] if before in ids else []
        page, has_more = items[-limit:], len(items) > limit
    else:
        if after is not None:
            items = items[ids.index(after) + 1 :] if after in ids else []
        page, has_more = items[:limit], len(items) > limit
    base = _base_url(request)
    return json_response(
        {
            "data": [b.to_json(base) for b in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
    )


async def cancel_batch(request: web.Request) -> web.Response:
    """POST /v1/messages/batches/{id}/cancel."""
    state = state_of(request)
    batch = _batch_or_404(state, request.match_info["batch_id"])
    batch.status_override = None
    if batch.status == "ended":
        raise ApiError(400, f"Message batch {batch.id} has already ended and cannot be canceled.")
    if batch.status == "in_progress":
        batch.status = "canceling"
        batch.cancel_initiated_at = state.now()
        batch.job.cancel_requested = True
        batch.job.poke()
    return json_response(batch.to_json(_base_url(request)))


async def delete_batch(request: web.Request) -> web.Response:
    """DELETE /v1/messages/batches/{id}: only once ended."""
    state = state_of(request)
    batch = _batch_or_404(state, request.match_info["batch_id"])
    if batch.status != "ended":
        raise ApiError(
            400,
            f"Message batch {batch.id} cannot be deleted while it is still processing; "
            "cancel it first and delete it once it has ended.",
        )
    del state.anthropic_batches[batch.id]
    batch.results_path.unlink(missing_ok=True)
    return json_response({"id": batch.id, "type": "message_batch_deleted"})


async def batch_results(request: web.Request) -> web.StreamResponse:
    """GET /v1/messages/batches/{id}/results: JSONL streamed from disk."""
    batch = _batch_or_404(state_of(request), request.match_info["batch_id"])
    if batch.status != "ended":
        raise ApiError(400, f"Message batch {batch.id} has not finished processing; results are not available yet.")
    if not batch.results_path.exists():
        raise ApiError(404, f"Results of message batch {batch.id} are no longer available.")
    return await stream_file(request, batch.results_path, "application/x-jsonl")


def expire_batch(state: EmulatorState, batch: AnthropicBatch, fraction: float, base_url: str) -> dict[str, Any]:
    """Admin: make the 24 h window elapse now."""
    if batch.status == "ended":
        raise ApiError(409, f"Message batch {batch.id} has already ended.")
    batch.job.expire_fraction = fraction
    batch.job.poke()
    return batch.to_json(base_url)


class _Run(LineRun):
    """Results file of one message batch, in input order until an optional shuffle."""

    def __init__(self, batch: AnthropicBatch) -> None:
        self.sink = JsonlSink(batch.results_path)
        super().__init__(batch.requests_path, [self.sink])
        self.batch = batch
        self.counts: Counter[str] = Counter()
        self.rest = "expired"

    def _write(self, custom_id: str, result: dict[str, Any]) -> None:
        self.sink.write({"custom_id": custom_id, "result": result})
        self.counts[result["type"]] += 1

    def _errored(self, custom_id: str, kind: str, message: str) -> None:
        request_id = "req_" + hashlib.sha256(f"{self.batch.id}:{self.pos}".encode()).hexdigest()[:24]
        error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
        self._write(custom_id, {"type": "errored", "error": error})

    def answer(self, line: Any, inject_error: bool) -> None:
        """One request: succeeded, or errored (rejected params or an injected api_error)."""
        if inject_error:
            self._errored(line["custom_id"], "api_error", "Internal server error")
            return
        try:
            message = anthropic_message(line["params"], self.batch.legacy_sampling)
        except RequestRejected as exc:
            self._errored(line["custom_id"], "invalid_request_error", exc.message)
            return
        self._write(line["custom_id"], {"type": "succeeded", "message": message})

    def close_out(self, line: Any) -> None:
        """A request that never ran: canceled or expired."""
        self._write(line["custom_id"], {"type": self.rest})


async def run_batch(state: EmulatorState, batch: AnthropicBatch) -> None:
    """The whole life of one batch: in_progress (or canceling) → ended."""
    job = batch.job
    run = _Run(batch)
    try:
        await run_lines(state, job, run, batch.total, lambda: state.config.batch_seconds)
        if state.closing:
            return
        run.rest = "canceled" if job.cancel_requested else "expired"
        await asyncio.to_thread(run.close_rest)
        await asyncio.to_thread(run.sink.finish, job.rng if state.faults.shuffle_results else None)
        batch.counts = run.counts
        if state.faults.lose_output:
            batch.results_path.unlink(missing_ok=True)
    except Exception:
        # An emulator bug must end the batch (every request errored) rather than leave it stuck.
        logging.getLogger(__name__).exception("message batch %s crashed", batch.id)
        batch.counts = Counter(errored=batch.total)
    finally:
        run.close()
    batch.requests_path.unlink(missing_ok=True)
    batch.status = "ended"
    batch.ended_at = state.now()


def add_routes(app: web.Application) -> None:
    """Register the Anthropic routes."""
    app.router.add_post("/v1/messages/batches", create_batch)
    app.router.add_get("/v1/messages/batches", list_batches)
    app.router.add_get("/v1/messages/batches/{batch_id}", retrieve_batch)
    app.router.add_delete("/v1/messages/batches/{batch_id}", delete_batch)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", batch_results)
