"""Deterministic response bodies for every batch endpoint, and per-request validation errors.

Everything here is a pure function of the request body: the same request always yields the same
ids, text and usage (timestamps aside).

Token heuristic (documented so tests and benchmarks can predict usage):
- input tokens = ceil(characters of text content / 4), plus 4 per chat message and 3 per request;
  embeddings count ceil(chars / 4) per string input (at least 1), or the length of a token array;
- output tokens = 8 + (first hash byte % 56), capped by the request's max-token parameter
  (a capped answer ends with finish_reason "length" / stop_reason "max_tokens").
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import orjson

_WORDS = ["batch", "token", "queue", "model", "reply", "line", "spool", "answer", "half", "price", "sink", "retry"]
_NON_TEXT_KEYS = frozenset({"role", "type", "cache_control", "id", "tool_use_id", "detail", "format"})
_MODERATION_CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]
OPENAI_SERVER_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": None,
}


class RequestRejected(Exception):
    """The endpoint would reject this request (becomes an error line / errored result)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error body for this rejection."""
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        return {"error": error}


def digest(value: Any) -> bytes:
    """Stable hash of a JSON value (keys sorted)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).digest()


def text_chars(value: Any) -> int:
    """Characters of text in a JSON value, skipping structural keys such as ``role``."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(text_chars(v) for k, v in value.items() if k not in _NON_TEXT_KEYS)
    return 0


def _tok(chars: int) -> int:
    return math.ceil(chars / 4)


def messages_tokens(messages: Any, *extra: Any) -> int:
    """Input tokens of a chat-style request."""
    items = messages if isinstance(messages, list) else [messages]
    return sum(_tok(text_chars(m)) + 4 for m in items) + sum(_tok(text_chars(e)) for e in extra) + 3


def embedding_items(value: Any) -> list[Any]:
    """Split an embeddings/moderations/completions input into its items."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return value
    return [value]


def estimate_input_tokens(endpoint: str, body: Any) -> int:
    """Input tokens of one OpenAI request body, by the heuristic above."""
    if not isinstance(body, dict):
        return 0
    if endpoint == "/v1/chat/completions":
        return messages_tokens(body.get("messages", []))
    if endpoint == "/v1/responses":
        return messages_tokens(body.get("input", []), body.get("instructions"))
    items = embedding_items(body.get("prompt" if endpoint == "/v1/completions" else "input", ""))
    return sum(len(i) if isinstance(i, list) else max(1, _tok(text_chars(i))) for i in items)


def _output(h: bytes, cap: Any) -> tuple[str, int, bool]:
    """Deterministic answer text, its token count, and whether the cap truncated it."""
    natural = 8 + h[0] % 56
    n = min(natural, cap) if isinstance(cap, int) and cap > 0 else natural
    return " ".join(_WORDS[(h[i % 32] + i) % len(_WORDS)] for i in range(n)), n, n < natural


def _require(body: dict[str, Any], name: str) -> None:
    if name not in body:
        raise RequestRejected(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def _minimum(body: dict[str, Any], name: str, low: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestRejected(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    if value < low:
        message = f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value} instead."
        raise RequestRejected(message, name, "integer_below_min_value")


def _usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


# Each builder gets (body, hash of body, input tokens, created) and returns (200 body, output tokens).
_Built = tuple[dict[str, Any], int]


def _chat(body: dict[str, Any], h: bytes, tokens_in: int, created: int) -> _Built:
    _require(body, "messages")
    if not isinstance(body["messages"], list) or not body["messages"]:
        raise RequestRejected("Invalid 'messages': expected a non-empty array.", "messages", "empty_array")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _minimum(body, name, 1)
    text, out, cut = _output(h, body.get("max_completion_tokens", body.get("max_tokens")))
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    choice = {"message": message, "logprobs": None, "finish_reason": "length" if cut else "stop"}
    n = min(body.get("n") or 1, 8)
    choices = [{"index": i, **choice} for i in range(n)]
    result = {"id": f"chatcmpl-{h.hex()[:24]}", "object": "chat.completion", "created": created}
    return {**result, "model": body["model"], "choices": choices, "usage": _usage(tokens_in, out * n)}, out * n


def _completion(body: dict[str, Any], h: bytes, tokens_in: int, created: int) -> _Built:
    _require(body, "prompt")
    _minimum(body, "max_tokens", 0)
    text, out, cut = _output(h, body.get("max_tokens", 16))
    choice = {"text": text, "logprobs": None, "finish_reason": "length" if cut else "stop"}
    choices = [{"index": i, **choice} for i in range(len(embedding_items(body["prompt"])))]
    out *= len(choices)
    result = {"id": f"cmpl-{h.hex()[:24]}", "object": "text_completion", "created": created}
    return {**result, "model": body["model"], "choices": choices, "usage": _usage(tokens_in, out)}, out


def _response(body: dict[str, Any], h: bytes, tokens_in: int, created: int) -> _Built:
    _require(body, "input")
    _minimum(body, "max_output_tokens", 16)
    text, out, cut = _output(h, body.get("max_output_tokens"))
    status = "incomplete" if cut else "completed"
    content = [{"type": "output_text", "text": text, "annotations": []}]
    message = {"type": "message", "id": f"msg_{h.hex()[:24]}", "status": status, "role": "assistant"}
    usage = {
        "input_tokens": tokens_in,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": tokens_in + out,
    }
    response = {
        "id": f"resp_{h.hex()[:24]}",
        "object": "response",
        "created_at": created,
        "status": status,
        "model": body["model"],
        "output": [{**message, "content": content}],
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }
    return response, out


def _embedding(body: dict[str, Any], h: bytes, tokens_in: int, created: int) -> _Built:
    _require(body, "input")
    _minimum(body, "dimensions", 1)
    dims = min(body.get("dimensions") or 8, 64)
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(item, dims)}
        for i, item in enumerate(embedding_items(body["input"]))
    ]
    usage = {"prompt_tokens": tokens_in, "total_tokens": tokens_in}
    return {"object": "list", "data": data, "model": body["model"], "usage": usage}, 0


def _moderations(body: dict[str, Any], h: bytes, tokens_in: int, created: int) -> _Built:
    _require(body, "input")
    results = [_moderation(item) for item in embedding_items(body["input"])]
    return {"id": f"modr-{h.hex()[:24]}", "model": body["model"], "results": results}, 0


_BUILDERS = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/responses": _response,
    "/v1/embeddings": _embedding,
    "/v1/moderations": _moderations,
}
ENDPOINTS = tuple(_BUILDERS)


def openai_body(endpoint: str, body: Any, created: int | None = None) -> tuple[dict[str, Any], int, int]:
    """The endpoint's 200 body for one request, with (input_tokens, output_tokens).

    Raises RequestRejected where the real endpoint would answer 400.
    """
    if not isinstance(body, dict):
        raise RequestRejected("'body' must be a JSON object.", "body", "invalid_type")
    _require(body, "model")
    tokens_in = estimate_input_tokens(endpoint, body)
    created = int(time.time()) if created is None else created
    result, tokens_out = _BUILDERS[endpoint](body, digest(body), tokens_in, created)
    return result, tokens_in, tokens_out


def _vector(item: Any, dims: int) -> list[float]:
    raw = b"".join(hashlib.sha256(orjson.dumps(item) + bytes([k])).digest() for k in range(dims // 32 + 1))
    values = [(b - 127.5) / 127.5 for b in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _moderation(item: Any) -> dict[str, Any]:
    h = digest(item)
    return {
        "flagged": False,
        "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
        "category_applied_input_types": {name: ["text"] for name in _MODERATION_CATEGORIES},
        "category_scores": {name: h[i] / 255 / 1000 for i, name in enumerate(_MODERATION_CATEGORIES)},
    }


def anthropic_message(params: Any, legacy_sampling: bool) -> dict[str, Any]:
    """A succeeded Message for one batch request; raises RequestRejected like the real API would.

    ``legacy_sampling`` is True for API versions before 2026-10-21, which still accept
    temperature/top_p/top_k.
    """
    if not isinstance(params, dict):
        raise RequestRejected("params: Input should be a valid dictionary")
    for name in ("model", "max_tokens", "messages"):
        if name not in params:
            raise RequestRejected(f"{name}: Field required")
    max_tokens = params["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise RequestRejected("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise RequestRejected("max_tokens: Input should be greater than or equal to 1")
    if not isinstance(params["messages"], list):
        raise RequestRejected("messages: Input should be a valid list")
    if not legacy_sampling:
        for name in ("temperature", "top_p", "top_k"):
            if name in params:
                raise RequestRejected(f"{name}: Extra inputs are not permitted")
    h = digest(params)
    text, out, cut = _output(h, max_tokens)
    return {
        "id": f"msg_{h.hex()[:24]}",
        "type": "message",
        "role": "assistant",
        "model": str(params["model"]),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": messages_tokens(params["messages"], params.get("system")),
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "batch",
        },
    }
