"""Input line parsing and validation, provider payloads, and result normalisation.

Pure functions over bytes and dicts: nothing here does I/O, so every rule is unit-testable.
Input lines are provider-native (an OpenAI batch line or an Anthropic batch request); result
lines keep the provider's own body untouched and add batchd's fields around it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["openai", "anthropic"]
Status = Literal["succeeded", "errored", "expired", "canceled", "invalid"]

ANTHROPIC_ENDPOINT = "/v1/messages"

# The field each OpenAI batch endpoint cannot do without, besides `model`.
OPENAI_ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
    "/v1/moderations": "input",
}

MAX_CUSTOM_ID_CHARS = 512
RETRYABLE_ANTHROPIC_ERRORS = frozenset({"api_error", "overloaded_error", "rate_limit_error", "timeout_error"})


class LineError(ValueError):
    """A line that cannot be queued; the message is the `invalid` result's reason.

    `custom_id` is the line's own id when it could be read, so the result carries it.
    """

    def __init__(self, reason: str, custom_id: str | None = None) -> None:
        super().__init__(reason)
        self.custom_id = custom_id


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One valid request line, ready to queue."""

    kind: Kind
    custom_id: str
    endpoint: str
    model: str
    body: bytes  # the provider-native request body (OpenAI `body`, Anthropic `params`), as JSON


# Not frozen: one is made per result line, and a frozen dataclass takes about 5x as long to make.
@dataclass(slots=True)
class Outcome:
    """What the provider said about one request."""

    provider_custom_id: str
    status: Status
    response: Any
    error: Any
    usage: dict[str, int] | None
    retryable: bool


def parse_line(raw: bytes, line_number: int) -> ParsedLine:
    """Parse one input line (without its newline) or raise LineError with a clear reason."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # orjson refuses invalid UTF-8 too; say which it was
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise LineError(f"line is not valid UTF-8 (byte {bad.start})") from None
        raise LineError(f"line is not valid JSON: {exc}") from None
    if type(obj) is dict:
        # The usual line, checked in one pass (ingest parses every line: about a third of its
        # time); anything else takes the checks below, which say what is wrong.
        custom_id = obj.get("custom_id")
        body = obj.get("body")
        url = obj.get("url")
        if (
            type(custom_id) is str
            and 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS
            and type(body) is dict
            and type(url) is str
            and obj.get("method", "POST") == "POST"
        ):
            required = OPENAI_ENDPOINTS.get(url)
            model = body.get("model")
            if required is not None and required in body and type(model) is str and model.strip():
                return ParsedLine("openai", custom_id, url, model, orjson.dumps(body))
    elif not isinstance(obj, dict):
        raise LineError(f"line is a JSON {type(obj).__name__}, expected an object")
    custom_id = _custom_id(obj, line_number)
    try:
        if "params" in obj and "body" not in obj:
            return _parse_anthropic(obj, custom_id)
        if "body" in obj or "url" in obj:
            return _parse_openai(obj, custom_id)
        raise LineError(
            "unknown request shape: expected an OpenAI batch line (custom_id, method, url, body)"
            " or an Anthropic batch request (custom_id, params)"
        )
    except LineError as exc:
        raise LineError(str(exc), custom_id) from None


def _custom_id(obj: dict[str, Any], line_number: int) -> str:
    value = obj.get("custom_id")
    if value is None:
        return f"line-{line_number}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError("custom_id must be a string")
    text = str(value)
    if not text:
        raise LineError("custom_id must not be empty")
    if len(text) > MAX_CUSTOM_ID_CHARS:
        raise LineError(f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters")
    return text


def _model(body: dict[str, Any], where: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise LineError(f"{where}.model is missing or not a string")
    return model


def _parse_openai(obj: dict[str, Any], custom_id: str) -> ParsedLine:
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError(f"method must be POST, got {method!r}")
    url = obj.get("url")
    if not isinstance(url, str) or url not in OPENAI_ENDPOINTS:
        raise LineError(f"url {url!r} is not a batch endpoint (one of {', '.join(OPENAI_ENDPOINTS)})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("body is missing or not an object")
    model = _model(body, "body")
    required = OPENAI_ENDPOINTS[url]
    if required not in body:
        raise LineError(f"body.{required} is missing (required by {url})")
    return ParsedLine("openai", custom_id, url, model, orjson.dumps(body))


def _parse_anthropic(obj: dict[str, Any], custom_id: str) -> ParsedLine:
    params = obj.get("params")
    if not isinstance(params, dict):
        raise LineError("params is not an object")
    model = _model(params, "params")
    if not isinstance(params.get("messages"), list):
        raise LineError("params.messages is missing or not a list")
    return ParsedLine("anthropic", custom_id, ANTHROPIC_ENDPOINT, model, orjson.dumps(params))


INSTANCE_CHARS = 16
_CUSTOM_ID = re.compile(r"b([0-9a-f]{16})_([0-9a-f]{1,16})")
_LEGACY_CUSTOM_ID = re.compile(r"i([0-9a-f]{1,16})")


@dataclass(frozen=True, slots=True)
class CustomId:
    """What our own provider custom_id says: the item, and the database (instance) that sent it.

    `instance` is None for the legacy form `i<hex>` of batches submitted before instances were
    carried; such ids prove nothing about who sent them.
    """

    item_id: int
    instance: str | None


def instance_tag(instance: str) -> str:
    """The part of a database's instance id that goes into every custom_id it sends."""
    return instance[:INSTANCE_CHARS].lower()


def provider_custom_id(item_id: int, instance: str = "") -> str:
    """Our own short id for an item: `b<16 hex of instance>_<item hex>` (or legacy `i<hex>` without instance).

    Fits Anthropic's ^[a-zA-Z0-9_-]{1,64}$ and is stable across retries of the item, so a request
    keeps one id however many batches it goes through. Anthropic batches carry no metadata, so
    the instance in every id is what proves that a batch found at the provider is ours.
    """
    if not instance:
        return f"i{item_id:x}"
    return f"b{instance_tag(instance)}_{item_id:x}"


def parse_custom_id(custom_id: str) -> CustomId | None:
    """Read one of our custom_ids (either form); None for anything else."""
    match = _CUSTOM_ID.fullmatch(custom_id)
    if match:
        return CustomId(int(match.group(2), 16), match.group(1))
    match = _LEGACY_CUSTOM_ID.fullmatch(custom_id)
    if match:
        return CustomId(int(match.group(1), 16), None)
    return None


def item_id_from_custom_id(custom_id: str, instance: str | None = None) -> int | None:
    """The item id of one of our custom_ids; with `instance`, only if that database sent it.

    A legacy id carries no instance and is accepted (batches submitted before the upgrade).
    """
    parsed = parse_custom_id(custom_id)
    if parsed is None:
        return None
    if instance and parsed.instance is not None and parsed.instance != instance_tag(instance):
        return None
    return parsed.item_id


def item_id_reader(instance: str | None) -> Callable[[str], int | None]:
    """`item_id_from_custom_id` bound to one instance: its own ids are read with one precompiled match."""
    if not instance:
        return item_id_from_custom_id
    own = re.compile(rf"b{re.escape(instance_tag(instance))}_([0-9a-f]{{1,16}})").fullmatch

    def read(custom_id: str) -> int | None:
        match = own(custom_id)
        if match is not None:
            return int(match.group(1), 16)
        return item_id_from_custom_id(custom_id, instance)  # a legacy id, or another database's

    return read


def owned_by(custom_ids: Iterable[str], instance: str, items: Container[int]) -> bool:
    """True when every id was sent by `instance` and names an item of `items` (the batch's own).

    The proof of ownership of an Anthropic batch found by reconciliation: legacy ids, another
    database's ids or ids of items outside the batch make it somebody else's.
    """
    tag = instance_tag(instance)
    seen = False
    for custom_id in custom_ids:
        parsed = parse_custom_id(custom_id)
        if parsed is None or parsed.instance != tag or parsed.item_id not in items:
            return False
        seen = True
    return seen


def openai_request_line(item_id: int, endpoint: str, body: bytes, instance: str = "") -> bytes:
    """One line of an OpenAI batch input file (with its newline)."""
    return b'{"custom_id":"%s","method":"POST","url":"%s","body":%s}\n' % (
        provider_custom_id(item_id, instance).encode(),
        endpoint.encode(),
        body,
    )


def anthropic_request(item_id: int, params: bytes, instance: str = "") -> bytes:
    """One element of an Anthropic create body's `requests` list, as JSON."""
    return b'{"custom_id":"%s","params":%s}' % (provider_custom_id(item_id, instance).encode(), params)


_ANTHROPIC_HEAD = b'","params":'
_REQUEST_TAIL = b"}\n"


def _request_prefix(instance: str) -> bytes:
    """What every request line starts with, up to its item id in hex (see provider_custom_id)."""
    return f'{{"custom_id":"{provider_custom_id(0, instance)[:-1]}'.encode()


def _openai_head(endpoint: str) -> bytes:
    return b'","method":"POST","url":"%s","body":' % endpoint.encode()


def request_pieces(kind: Kind, rows: Iterable[tuple[int, str, bytes]], instance: str = "") -> list[bytes]:
    """The request lines for (item id, endpoint, body) rows, as pieces whose concatenation is the lines.

    Byte for byte `openai_request_line` (or `anthropic_request` and a newline) per row, but each body
    goes out as it is stored instead of being copied into a line of its own first.
    """
    prefix = _request_prefix(instance)
    pieces: list[bytes] = []
    append = pieces.append
    if kind == "openai":
        heads: dict[str, bytes] = {}
        for item_id, endpoint, body in rows:
            head = heads.get(endpoint)
            if head is None:
                head = heads[endpoint] = _openai_head(endpoint)
            append(b"%s%x%s" % (prefix, item_id, head))
            append(body)
            append(_REQUEST_TAIL)
    else:
        for item_id, _endpoint, body in rows:
            append(b"%s%x%s" % (prefix, item_id, _ANTHROPIC_HEAD))
            append(body)
            append(_REQUEST_TAIL)
    return pieces


def request_lines_size(
    kind: Kind, requests: int, body_bytes: int, id_hex_digits: int, endpoint: str, instance: str = ""
) -> int:
    """The exact length of request_pieces' lines for `requests` rows of one endpoint, from the sums
    of their body lengths and of their item ids' hex digits (what the store can add up without
    reading a body)."""
    head = _openai_head(endpoint) if kind == "openai" else _ANTHROPIC_HEAD
    return requests * (len(_request_prefix(instance)) + len(head) + len(_REQUEST_TAIL)) + id_hex_digits + body_bytes


def usage_of(kind: Kind, body: Any) -> dict[str, int] | None:
    """Token counts from a provider response body, in one vocabulary for both providers.

    `input_tokens` is every input token, cached or not; `cached_input_tokens` (cache reads) and,
    for Anthropic, `cache_creation_input_tokens` (cache writes) say how many of them were which.
    """
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    if kind == "anthropic":
        # Anthropic counts cache reads and writes apart from input_tokens; we count all input together.
        cached = int(usage.get("cache_read_input_tokens") or 0)
        writes = int(usage.get("cache_creation_input_tokens") or 0)
        return {
            "input_tokens": int(usage.get("input_tokens") or 0) + cached + writes,
            "output_tokens": int(usage.get("output_tokens") or 0),
            "cached_input_tokens": cached,
            "cache_creation_input_tokens": writes,
        }
    if "prompt_tokens" in usage:  # chat completions, completions, embeddings
        details = usage.get("prompt_tokens_details")
        return {
            "input_tokens": _count(usage.get("prompt_tokens")),
            "output_tokens": _count(usage.get("completion_tokens")),
            "cached_input_tokens": _count(details.get("cached_tokens")) if details else 0,
        }
    details = usage.get("input_tokens_details")
    return {  # responses
        "input_tokens": _count(usage.get("input_tokens")),
        "output_tokens": _count(usage.get("output_tokens")),
        "cached_input_tokens": _count(details.get("cached_tokens")) if details else 0,
    }


def _count(value: Any) -> int:
    """A token count as an int (absent or null: 0); the int a provider sends is taken as it is."""
    return value if type(value) is int else int(value or 0)


def openai_outcome(line: dict[str, Any], embed: bool = False) -> Outcome:
    """Classify one line of an OpenAI output or error file.

    With `embed` (a whole result file being read) a succeeded answer's response is kept as its JSON
    (an orjson.Fragment, written into the result line as it is) instead of a tree of dicts: a chunk
    of thousands of outcomes then holds no containers for the garbage collector to traverse again
    and again, which cost a collection more than its parsing did.
    """
    custom_id = str(line.get("custom_id"))
    response = line.get("response")
    error = line.get("error")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        if code == "batch_expired":
            return Outcome(custom_id, "expired", None, error, None, True)
        if code in ("batch_cancelled", "batch_canceled"):
            return Outcome(custom_id, "canceled", None, error, None, True)
        return Outcome(custom_id, "errored", None, error, None, True)
    if not isinstance(response, dict):
        return Outcome(custom_id, "errored", None, {"message": "result line has no response"}, None, True)
    status_code = _count(response.get("status_code"))
    body = response.get("body")
    if status_code == 200:
        usage = usage_of("openai", body)
        return Outcome(custom_id, "succeeded", _embedded(body) if embed else body, None, usage, False)
    detail = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
    failure = {"status_code": status_code, **(detail if isinstance(detail, dict) else {"message": detail})}
    retryable = status_code == 429 or status_code >= 500 or status_code in (408, 409)
    return Outcome(custom_id, "errored", None, failure, None, retryable)


def openai_file_outcome(line: dict[str, Any]) -> Outcome:
    """openai_outcome for a line of a downloaded result file (the response embedded as JSON)."""
    return openai_outcome(line, embed=True)


def _embedded(value: Any) -> Any:
    """`value` as JSON to embed in a result line unchanged (orjson.Fragment); None stays None."""
    return None if value is None else orjson.Fragment(orjson.dumps(value))


def anthropic_outcome(line: dict[str, Any], embed: bool = False) -> Outcome:
    """Classify one line of an Anthropic results stream (`embed`: see openai_outcome)."""
    custom_id = str(line.get("custom_id"))
    result = line.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message")
        usage = usage_of("anthropic", message)
        return Outcome(custom_id, "succeeded", _embedded(message) if embed else message, None, usage, False)
    if kind == "expired":
        return Outcome(custom_id, "expired", None, None, None, True)
    if kind == "canceled":
        return Outcome(custom_id, "canceled", None, None, None, True)
    error = result.get("error")
    inner = error.get("error") if isinstance(error, dict) else None
    error_type = inner.get("type") if isinstance(inner, dict) else None
    return Outcome(custom_id, "errored", None, error, None, error_type in RETRYABLE_ANTHROPIC_ERRORS)


def anthropic_file_outcome(line: dict[str, Any]) -> Outcome:
    """anthropic_outcome for a line of a downloaded results stream (the message embedded as JSON)."""
    return anthropic_outcome(line, embed=True)


def result_line(
    *,
    custom_id: str,
    status: Status,
    line: int,
    response: Any = None,
    error: Any = None,
    provider: str | None = None,
    model: str | None = None,
    batch_id: str | None = None,
    usage: dict[str, int] | None = None,
    cost: Any = None,
    via: str | None = None,
) -> bytes:
    """One line of a results file (without newline), fields as documented in the README.

    `via` is how the answer was served ("batch", or "realtime" for the deadline fallback); None
    for a result no provider gave (an invalid line, a request cancelled before it was sent).
    """
    return orjson.dumps(
        {
            "custom_id": custom_id,
            "status": status,
            "response": response,
            "error": error,
            "provider": provider,
            "model": model,
            "batch_id": batch_id,
            "usage": usage,
            "cost": cost,
            "via": via,
            "line": line,
        }
    )


def invalid_result(custom_id: str, line: int, reason: str) -> bytes:
    return result_line(custom_id=custom_id, status="invalid", line=line, error={"message": reason})
