"""Admin endpoints under /_emulator/ (no auth, never fault-injected): stats, faults, timing, expiry."""

from __future__ import annotations

from aiohttp import web

from batchd.emulator import anthropic_api, openai_api, webhooks
from batchd.emulator.common import ApiError, json_response, read_json, state_of
from batchd.emulator.config import Faults
from batchd.emulator.state import AnthropicBatch, OpenAIBatch


async def stats(request: web.Request) -> web.Response:
    """GET /_emulator/stats."""
    return json_response(state_of(request).stats())


async def get_faults(request: web.Request) -> web.Response:
    """GET /_emulator/faults."""
    return json_response(state_of(request).faults.to_json())


async def put_faults(request: web.Request) -> web.Response:
    """PUT /_emulator/faults: merge the given fields into the live faults."""
    state = state_of(request)
    try:
        state.set_faults(state.faults.merged(await read_json(request)))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, str(exc)) from None
    return json_response(state.faults.to_json())


async def put_config(request: web.Request) -> web.Response:
    """PUT /_emulator/config: processing_seconds and/or time_scale; running batches adapt at once."""
    state = state_of(request)
    body = await read_json(request)
    unknown = set(body) - {"processing_seconds", "time_scale"}
    if unknown:
        raise ApiError(400, f"unknown config field(s): {', '.join(sorted(unknown))}")
    try:
        state.set_timing(body.get("processing_seconds"), body.get("time_scale"))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, str(exc)) from None
    return json_response({"processing_seconds": state.config.processing_seconds, "time_scale": state.config.time_scale})


async def expire(request: web.Request) -> web.Response:
    """POST /_emulator/batches/{id}/expire: the 24 h window elapses now.

    ``completed_fraction`` (default 0) of the requests, in input order, finish normally; work that
    had already finished before the call stays finished, so the real fraction can be higher.
    """
    state = state_of(request)
    body = await read_json(request)
    fraction = body.get("completed_fraction", 0.0)
    if not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ApiError(400, "completed_fraction must be a number between 0 and 1")
    batch_id = request.match_info["batch_id"]
    if batch_id in state.openai_batches:
        return json_response(openai_api.expire_batch(state, state.openai_batches[batch_id], float(fraction)))
    if batch_id in state.anthropic_batches:
        base = f"{request.scheme}://{request.host}"
        return json_response(
            anthropic_api.expire_batch(state, state.anthropic_batches[batch_id], float(fraction), base)
        )
    raise ApiError(404, f"no batch {batch_id}")


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /_emulator/files/{id}: the file is gone (an output deleted before the client downloads it)."""
    state = state_of(request)
    record = state.files.pop(request.match_info["file_id"], None)
    if record is None:
        raise ApiError(404, f"no file {request.match_info['file_id']}")
    record.path.unlink(missing_ok=True)
    return json_response({"id": record.id, "deleted": True})


async def delete_batch(request: web.Request) -> web.Response:
    """DELETE /_emulator/batches/{id}: the batch is gone, whatever its state (retrieve answers 404)."""
    state = state_of(request)
    batch_id = request.match_info["batch_id"]
    batch: OpenAIBatch | AnthropicBatch | None = state.openai_batches.pop(batch_id, None)
    if batch is None:
        batch = state.anthropic_batches.pop(batch_id, None)
    if batch is None:
        raise ApiError(404, f"no batch {batch_id}")
    batch.job.cancel_requested = True  # its task stops; nobody can see what it writes
    batch.job.poke()
    return json_response({"id": batch_id, "deleted": True})


async def patch_batch(request: web.Request) -> web.Response:
    """PATCH /_emulator/batches/{id}: {"status": word or null, "hold": bool, "age_seconds": s}.

    ``status`` is shown instead of the real status until a cancel arrives (an unknown status);
    ``hold`` keeps the batch running after its work is done until it is cancelled, expired or
    released; ``age_seconds`` moves its creation time into the past.
    """
    state = state_of(request)
    body = await read_json(request)
    unknown = set(body) - {"status", "hold", "age_seconds"}
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    batch_id = request.match_info["batch_id"]
    batch: OpenAIBatch | AnthropicBatch | None = state.openai_batches.get(batch_id) or state.anthropic_batches.get(
        batch_id
    )
    if batch is None:
        raise ApiError(404, f"no batch {batch_id}")
    if "status" in body:
        if body["status"] is not None and not isinstance(body["status"], str):
            raise ApiError(400, "status must be a string or null")
        batch.status_override = body["status"]
    if "hold" in body:
        batch.job.held = bool(body["hold"])
        batch.job.poke()
    if "age_seconds" in body:
        age = body["age_seconds"]
        if not isinstance(age, int | float):
            raise ApiError(400, "age_seconds must be a number")
        if isinstance(batch, OpenAIBatch):
            batch.created_at -= int(age)
        else:
            batch.created_at -= float(age)
    if isinstance(batch, OpenAIBatch):
        return json_response(batch.to_json())
    return json_response(batch.to_json(f"{request.scheme}://{request.host}"))


async def reset(request: web.Request) -> web.Response:
    """POST /_emulator/reset: faults back to defaults; batches and stats stay."""
    state = state_of(request)
    state.set_faults(Faults())
    state.rng.seed(0)
    return json_response(state.faults.to_json())


def add_routes(app: web.Application) -> None:
    """Register the admin routes."""
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_get("/_emulator/faults", get_faults)
    app.router.add_put("/_emulator/faults", put_faults)
    app.router.add_put("/_emulator/config", put_config)
    app.router.add_post("/_emulator/batches/{batch_id}/expire", expire)
    app.router.add_delete("/_emulator/batches/{batch_id}", delete_batch)
    app.router.add_patch("/_emulator/batches/{batch_id}", patch_batch)
    app.router.add_delete("/_emulator/files/{file_id}", delete_file)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_get("/_emulator/webhooks", webhooks.get_webhooks)
    app.router.add_put("/_emulator/webhooks", webhooks.put_webhooks)
