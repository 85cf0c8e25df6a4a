"""OpenAI Files and Batch API: routes, create-time input scan, and the batch life cycle."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batchd.emulator import webhooks
from batchd.emulator.common import (
    ApiError,
    fail_after_create,
    fail_before_create,
    int_query,
    json_response,
    read_json,
    state_of,
    stream_file,
)
from batchd.emulator.jobs import JsonlSink, LineRun, run_lines, wait_until
from batchd.emulator.responses import (
    ENDPOINTS,
    OPENAI_SERVER_ERROR,
    RequestRejected,
    embedding_items,
    estimate_input_tokens,
    openai_body,
)
from batchd.emulator.state import EmulatorState, FileRecord, InputScan, Limits, OpenAIBatch

_UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_THIRTY_DAYS = 30 * 86400
# Share of processing time spent in each phase; the rest (0.6) is in_progress.
_VALIDATING, _FINALIZING = 0.2, 0.2
_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _file_or_404(state: EmulatorState, file_id: str, param: str = "id") -> FileRecord:
    record = state.files.get(file_id)
    if record is None:
        raise ApiError(404, f"No such File object: {file_id}", param=param)
    return record


def _batch_or_404(state: EmulatorState, batch_id: str) -> OpenAIBatch:
    batch = state.openai_batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def _page(items: list[Any], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI cursor page over items already in list order."""
    if after is not None:
        ids = [i.id for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": [i.to_json() for i in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(items) > limit,
    }


async def create_file(request: web.Request) -> web.Response:
    """POST /v1/files: multipart upload streamed straight to disk."""
    state = state_of(request)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "Expected a multipart/form-data body.")
    file_id = state.new_id("file-")
    path = state.data_dir / "files" / file_id
    fields: dict[str, str] = {}
    filename: str | None = None
    size = 0
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file":
                filename = part.filename or "upload"
                with path.open("wb") as out:
                    while chunk := await part.read_chunk(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
            elif part.name:
                fields[part.name] = await part.text()
        purpose = fields.get("purpose")
        if filename is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        if purpose not in _UPLOAD_PURPOSES:
            raise ApiError(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose", code="invalid_value")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
        now = int(state.now())
        expires_at = now + _THIRTY_DAYS if purpose == "batch" else None
        if "expires_after[seconds]" in fields:
            seconds = int(fields["expires_after[seconds]"]) if fields["expires_after[seconds]"].isdigit() else 0
            if fields.get("expires_after[anchor]") != "created_at" or not 3600 <= seconds <= 2592000:
                raise ApiError(
                    400,
                    "Invalid 'expires_after': anchor must be 'created_at' and seconds between 3600 and 2592000.",
                    param="expires_after",
                )
            expires_at = now + seconds
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    record = FileRecord(file_id, size, now, filename, purpose, path, expires_at)
    state.files[file_id] = record
    state.counters["files_uploaded"] += 1
    return json_response(record.to_json())


async def list_files(request: web.Request) -> web.Response:
    """GET /v1/files."""
    state = state_of(request)
    purpose = request.query.get("purpose")
    items = [f for f in state.files.values() if purpose is None or f.purpose == purpose]
    if request.query.get("order", "desc") == "desc":
        items.reverse()
    limit = int_query(request, "limit", 10000, 1, 10000)
    return json_response(_page(items, request.query.get("after"), limit))


async def retrieve_file(request: web.Request) -> web.Response:
    """GET /v1/files/{id}."""
    return json_response(_file_or_404(state_of(request), request.match_info["file_id"]).to_json())


async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{id}/content, streamed from disk."""
    record = _file_or_404(state_of(request), request.match_info["file_id"])
    return await stream_file(request, record.path, "application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /v1/files/{id}."""
    state = state_of(request)
    record = _file_or_404(state, request.match_info["file_id"])
    del state.files[record.id]
    record.path.unlink(missing_ok=True)
    return json_response({"id": record.id, "object": "file", "deleted": True})


_DUPLICATE = (
    "The custom_id for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each request in a batch."
)
_MODEL_MISMATCH = (
    "The provided model for this request does not match the other requests in the batch. "
    "All requests must use the same model."
)
_URL_MISMATCH = "The provided URL for this request does not match the batch endpoint."


def _nonblank_lines(path: Path) -> Generator[tuple[int, bytes]]:
    """(1-based physical line number, line) for every non-blank line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def scan_input(path: Path, endpoint: str, size: int, limits: Limits) -> InputScan:
    """Validate an input file line by line (runs in a worker thread)."""
    scan = InputScan()

    def error(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(scan.errors) < limits.max_validation_errors:
            scan.errors.append({"code": code, "line": line, "message": message, "param": param})

    if size > limits.openai_max_file_bytes:
        error("file_too_large", f"The input file is larger than the {limits.openai_max_file_bytes:,} byte limit.")
        return scan
    seen: set[str] = set()
    for number, raw in _nonblank_lines(path):
        scan.lines += 1
        if scan.lines > limits.openai_max_lines:
            error("too_many_tasks", f"The batch input file has more than {limits.openai_max_lines:,} requests.")
            break
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        missing = [k for k in ("custom_id", "method", "url", "body") if not isinstance(line, dict) or k not in line]
        if missing:
            error("missing_required_parameter", f"Missing required parameter: '{missing[0]}'.", number, missing[0])
            continue
        custom_id, body = line["custom_id"], line["body"]
        if not (isinstance(custom_id, str) and custom_id and isinstance(body, dict)):
            bad = "body" if isinstance(custom_id, str) and custom_id else "custom_id"
            error("invalid_type", f"Invalid type for '{bad}'.", number, bad)
            continue
        scan.custom_ids.append(custom_id)
        if custom_id in seen:
            error("duplicate_custom_id", _DUPLICATE, number, "custom_id")
        seen.add(custom_id)
        if line["method"] != "POST":
            error("invalid_value", "The method for each request must be 'POST'.", number, "method")
        if line["url"] != endpoint:
            error("url_mismatch", _URL_MISMATCH, number, "url")
        if len(seen) == 1:
            scan.model = body.get("model") if isinstance(body.get("model"), str) else None
        elif body.get("model") != scan.model:
            error("model_mismatch", _MODEL_MISMATCH, number, "body.model")
        scan.tokens += estimate_input_tokens(endpoint, body)
        if endpoint == "/v1/embeddings":
            scan.inputs += len(embedding_items(body.get("input", "")))
    if scan.inputs > limits.openai_max_embedding_inputs:
        # The documented limit; the emulator's own error code (the API's is not documented).
        error(
            "too_many_embedding_inputs",
            f"The batch has {scan.inputs:,} embedding inputs;"
            f" at most {limits.openai_max_embedding_inputs:,} are allowed.",
        )
    if scan.lines == 0:
        error("empty_file", "The batch input file is empty.")
    return scan


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _valid_metadata(metadata: Any) -> bool:
    if metadata is None:
        return True
    return (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()
        )
    )


async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/batches: returns `validating`; the input is scanned now, judged when validation ends."""
    state = state_of(request)
    action = state.next_create_action()
    fail_before_create(action)
    body = await read_json(request)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    if body["endpoint"] not in ENDPOINTS:
        raise _bad("endpoint", f"Invalid value for 'endpoint': {body['endpoint']!r} is not supported by the emulator.")
    accepted = state.config.completion_windows
    if body["completion_window"] not in accepted:
        words = ", ".join(f"'{w}'" for w in accepted)
        raise _bad("completion_window", f"Invalid value for 'completion_window': supported values are {words}.")
    if not _valid_metadata(body.get("metadata")):
        raise _bad("metadata", "Invalid 'metadata': at most 16 string pairs, keys <= 64 and values <= 512 chars.")
    expires_after = body.get("output_expires_after")
    seconds = expires_after.get("seconds") if isinstance(expires_after, dict) else None
    if expires_after is not None and not (isinstance(seconds, int) and 3600 <= seconds <= 2592000):
        raise _bad("output_expires_after", "Invalid 'output_expires_after.seconds': expected 3600 to 2592000.")
    record = _file_or_404(state, body["input_file_id"], "input_file_id")
    if record.purpose != "batch":
        raise _bad("input_file_id", "The input file must have purpose 'batch'.")
    batch_id = state.new_id("batch_")
    # A private link keeps the input readable even if the client deletes the file meanwhile.
    private = state.data_dir / "files" / f"{batch_id}.input"
    try:
        os.link(record.path, private)
    except OSError:
        await asyncio.to_thread(shutil.copyfile, record.path, private)
    scan = await asyncio.to_thread(scan_input, private, body["endpoint"], record.bytes, state.limits)
    for custom_id in scan.custom_ids:
        state.openai_custom_ids.setdefault(custom_id, []).append(batch_id)
    scan.custom_ids = []
    batch = OpenAIBatch(
        batch_id,
        body["endpoint"],
        record.id,
        int(state.now()),
        body.get("metadata"),
        seconds,
        job=state.new_job(),
        seq=len(state.openai_batches),
        scan=scan,
        completion_window=body["completion_window"],
    )
    state.openai_batches[batch_id] = batch
    state.counters["openai_batches"] += 1
    state.spawn(run_batch(state, batch, private))
    return fail_after_create(request, action) or json_response(batch.to_json())


async def retrieve_batch(request: web.Request) -> web.Response:
    """GET /v1/batches/{id}; serves the late_output_file fault."""
    state = state_of(request)
    batch = _batch_or_404(state, request.match_info["batch_id"])
    hide = batch.late_pending
    if hide:
        batch.late_pending = False
        state.counters["late_output_files"] += 1
    return json_response(batch.to_json(hide_files=hide))


async def list_batches(request: web.Request) -> web.Response:
    """GET /v1/batches, newest first."""
    state = state_of(request)
    items = list(state.openai_batches.values())
    if state.faults.list_order != "asc":
        items.reverse()
    return json_response(_page(items, request.query.get("after"), int_query(request, "limit", 20, 1, 100)))


async def cancel_batch(request: web.Request) -> web.Response:
    """POST /v1/batches/{id}/cancel."""
    state = state_of(request)
    batch = _batch_or_404(state, request.match_info["batch_id"])
    batch.status_override = None
    if batch.status in ("validating", "in_progress", "finalizing"):
        batch.status = "cancelling"
        batch.times["cancelling"] = int(state.now())
        if state.faults.cancel_delay > 0:
            _cancel_later(batch, state.faults.cancel_delay)
        else:
            batch.job.cancel_requested = True
            batch.job.poke()
    elif batch.status != "cancelling":
        raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
    return json_response(batch.to_json())


def _cancel_later(batch: OpenAIBatch, delay: float) -> None:
    """Fault cancel_delay: the batch says "cancelling" at once but keeps working for `delay` seconds
    (a slow cancel), so answers it finishes meanwhile come after the client gave up waiting."""

    def cancel() -> None:
        batch.job.cancel_requested = True
        batch.job.poke()

    asyncio.get_running_loop().call_later(delay, cancel)


def expire_batch(state: EmulatorState, batch: OpenAIBatch, fraction: float) -> dict[str, Any]:
    """Admin: make the 24 h window elapse now."""
    if batch.status not in ("validating", "in_progress", "finalizing"):
        raise ApiError(409, f"Cannot expire a batch with status '{batch.status}'.")
    batch.job.expire_fraction = fraction
    batch.job.poke()
    return batch.to_json()


class _Run(LineRun):
    """Output and error file of one batch."""

    def __init__(self, state: EmulatorState, batch: OpenAIBatch, source: Path) -> None:
        self.out = JsonlSink(state.data_dir / "files" / state.new_id("file-"))
        self.err = JsonlSink(state.data_dir / "files" / state.new_id("file-"))
        super().__init__(source, [self.out, self.err])
        self.batch = batch
        self.created = int(state.now())
        self.usage = {"input": 0, "output": 0}

    def _write(self, sink: JsonlSink, custom_id: str, status: int = 0, body: Any = None, error: Any = None) -> None:
        # Ids derive from (batch, position) so a replayed run writes identical files.
        h = hashlib.sha256(f"{self.batch.id}:{self.pos}".encode()).hexdigest()
        response = {"status_code": status, "request_id": f"req_{h[32:]}", "body": body} if status else None
        sink.write({"id": f"batch_req_{h[:32]}", "custom_id": custom_id, "response": response, "error": error})
        if sink is self.err:
            self.batch.failed += 1
        else:
            self.batch.completed += 1

    def answer(self, line: Any, inject_error: bool) -> None:
        """One request: a 200 output line, or an error line (rejected or injected server error)."""
        if inject_error:
            self._write(self.err, line["custom_id"], 500, {"error": OPENAI_SERVER_ERROR})
            return
        try:
            body, tokens_in, tokens_out = openai_body(self.batch.endpoint, line["body"], self.created)
        except RequestRejected as exc:
            self._write(self.err, line["custom_id"], 400, exc.openai_body())
            return
        self._write(self.out, line["custom_id"], 200, body)
        self.usage["input"] += tokens_in
        self.usage["output"] += tokens_out

    def close_out(self, line: Any) -> None:
        """An unanswered request expires."""
        self._write(self.err, line["custom_id"], error=_EXPIRED_ERROR)

    def finish(self, shuffle: random.Random | None) -> list[tuple[str, Path, int]]:
        """Close both files; returns (kind, path, size) of the non-empty ones, dropping empty ones."""
        kept = []
        for sink, kind in ((self.out, "output"), (self.err, "error")):
            size = sink.finish(shuffle if sink.count else None)
            if sink.count:
                kept.append((kind, sink.path, size))
            else:
                sink.path.unlink()
        return kept


def _token_limit_error(state: EmulatorState, batch: OpenAIBatch) -> dict[str, Any] | None:
    model = batch.scan.model
    limit = state.faults.token_limits.get(model or "")
    if limit is None:
        return None
    # Enqueued = running batches of the model plus those created earlier and still validating.
    running = ("in_progress", "finalizing", "cancelling")
    enqueued = sum(
        b.scan.tokens
        for b in state.openai_batches.values()
        if b.scan.model == model and not b.scan.errors and b is not batch
        if b.status in running or (b.status == "validating" and b.seq < batch.seq)
    )
    if enqueued + batch.scan.tokens <= limit:
        return None
    message = (
        f"Enqueued token limit reached for {model} in organization org-emulator. Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    return {"code": "token_limit_exceeded", "line": None, "param": None, "message": message}


def _note_enqueued(state: EmulatorState, batch: OpenAIBatch) -> None:
    """Keep the highest enqueued-token total per model, counted the emulator's own way."""
    model = batch.scan.model or ""
    running = ("in_progress", "finalizing", "cancelling")
    enqueued = sum(
        b.scan.tokens for b in state.openai_batches.values() if b.scan.model == model and b.status in running
    )
    state.peak_enqueued[model] = max(state.peak_enqueued.get(model, 0), enqueued)


async def run_batch(state: EmulatorState, batch: OpenAIBatch, source: Path) -> None:
    """The whole life of one batch: validating → in_progress → finalizing → terminal."""
    job = batch.job

    def span() -> float:
        return state.config.batch_seconds

    def stamp(status: str) -> None:
        batch.status = status
        batch.times[status] = int(state.now())
        webhooks.batch_ended(state, batch)

    try:
        start = time.monotonic()
        await wait_until(state, job, lambda: start + _VALIDATING * span())
        if state.closing:
            return
        if job.cancel_requested:
            stamp("cancelled")
            return
        errors = batch.scan.errors or [e for e in (_token_limit_error(state, batch),) if e]
        if errors:
            batch.errors = errors
            state.failed_batches.update({str(errors[0]["code"]): 1})
            stamp("failed")
            return
        stamp("in_progress")
        _note_enqueued(state, batch)
        run = _Run(state, batch, source)
        try:
            await run_lines(state, job, run, batch.scan.lines, lambda: (1 - _VALIDATING - _FINALIZING) * span())
            if not job.interrupted and not state.closing:
                stamp("finalizing")
                mark = time.monotonic()
                await wait_until(state, job, lambda: mark + _FINALIZING * span())
            if state.closing:
                return
            final = "cancelled" if job.cancel_requested else "completed"
            if job.expire_fraction is not None and not job.cancel_requested:
                final = "expired"
                await asyncio.to_thread(run.close_rest)
            files = await asyncio.to_thread(run.finish, job.rng if state.faults.shuffle_results else None)
        finally:
            run.close()
        created = int(state.now())
        for kind, path, size in files:
            name = f"{batch.id}_{kind}.jsonl"
            expires_at = created + (batch.output_expires_after or _THIRTY_DAYS)
            state.files[path.name] = FileRecord(path.name, size, created, name, "batch_output", path, expires_at)
            setattr(batch, f"{kind}_file_id", path.name)
        batch.usage = run.usage
        if state.faults.lose_output and batch.output_file_id in state.files:
            state.files.pop(batch.output_file_id).path.unlink(missing_ok=True)
        batch.late_pending = (
            final in ("completed", "expired", "cancelled") and state.faults.late_output_file and bool(files)
        )
        stamp(final)
    except Exception:
        # An emulator bug must show up as a failed batch, not as a batch stuck forever.
        logging.getLogger(__name__).exception("batch %s crashed", batch.id)
        batch.errors = [{"code": "server_error", "line": None, "param": None, "message": "Emulator error."}]
        stamp("failed")
    finally:
        source.unlink(missing_ok=True)


def add_routes(app: web.Application) -> None:
    """Register the OpenAI routes."""
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
