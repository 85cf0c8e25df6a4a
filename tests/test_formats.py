"""Unit tests: input line validation and result classification."""

from __future__ import annotations

import orjson
import pytest

from batchd.formats import (
    Kind,
    LineError,
    anthropic_outcome,
    anthropic_request,
    item_id_from_custom_id,
    item_id_reader,
    openai_outcome,
    openai_request_line,
    parse_line,
    provider_custom_id,
    request_lines_size,
    request_pieces,
)


def line(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_openai_line_is_parsed() -> None:
    parsed = parse_line(
        line(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": []},
            }
        ),
        1,
    )
    assert (parsed.kind, parsed.custom_id, parsed.endpoint, parsed.model) == (
        "openai",
        "a",
        "/v1/chat/completions",
        "gpt-4o-mini",
    )
    assert orjson.loads(parsed.body) == {"model": "gpt-4o-mini", "messages": []}


def test_anthropic_line_is_parsed_and_custom_id_defaults_to_line_number() -> None:
    parsed = parse_line(line({"params": {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}}), 7)
    assert (parsed.kind, parsed.custom_id, parsed.model) == ("anthropic", "line-7", "claude-haiku-4-5")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON list, expected an object"),
        (b'"text"', "JSON str, expected an object"),
        (line({"custom_id": "x", "foo": 1}), "unknown request shape"),
        (line({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": []}}), "body.model is missing"),
        (line({"custom_id": "x", "url": "/v1/chat/completions", "body": {"model": "m"}}), "body.messages is missing"),
        (line({"custom_id": "x", "url": "/v1/images", "body": {"model": "m"}}), "is not a batch endpoint"),
        (line({"custom_id": "x", "url": ["/v1/embeddings"], "body": {"model": "m"}}), "is not a batch endpoint"),
        (line({"custom_id": "x", "url": {"a": 1}, "body": {"model": "m", "input": "x"}}), "is not a batch endpoint"),
        (line({"custom_id": "x", "url": "/v1/moderations", "body": {"model": "m"}, "method": 1}), "must be POST"),
        (line({"custom_id": 7, "url": "/v1/moderations", "body": {"model": " "}}), "body.model is missing"),
        (line({"custom_id": "x", "method": "GET", "url": "/v1/embeddings", "body": {}}), "method must be POST"),
        (line({"custom_id": "x", "params": {"max_tokens": 1, "messages": []}}), "params.model is missing"),
        (line({"custom_id": "x", "params": {"model": "claude"}}), "params.messages is missing"),
        (line({"custom_id": "x", "params": "nope"}), "params is not an object"),
        (line({"custom_id": "", "params": {"model": "c", "messages": []}}), "custom_id must not be empty"),
        (line({"custom_id": ["a"], "params": {"model": "c", "messages": []}}), "custom_id must be a string"),
        (line({"custom_id": "x" * 600, "params": {"model": "c", "messages": []}}), "longer than 512"),
    ],
)
def test_bad_lines_have_clear_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(LineError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        parse_line(raw, 1)


def test_provider_custom_ids_round_trip_and_fit_anthropic_pattern() -> None:
    for item_id in (1, 255, 10**12):
        custom_id = provider_custom_id(item_id)
        assert item_id_from_custom_id(custom_id) == item_id
        assert len(custom_id) <= 64 and custom_id.replace("_", "").replace("-", "").isalnum()
    assert item_id_from_custom_id("user-id") is None


def test_openai_request_line_is_valid_json() -> None:
    raw = openai_request_line(42, "/v1/embeddings", b'{"model":"m","input":"x"}')
    assert raw.endswith(b"\n")
    assert orjson.loads(raw) == {
        "custom_id": "i2a",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": "x"},
    }


def test_openai_outcomes_are_classified() -> None:
    ok = openai_outcome(
        {
            "custom_id": "i1",
            "response": {
                "status_code": 200,
                "body": {"usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}},
            },
            "error": None,
        }
    )
    assert (ok.status, ok.retryable, ok.usage) == (
        "succeeded",
        False,
        {"input_tokens": 10, "output_tokens": 3, "cached_input_tokens": 0},
    )
    bad = openai_outcome(
        {
            "custom_id": "i2",
            "response": {"status_code": 400, "body": {"error": {"message": "bad", "type": "invalid_request_error"}}},
            "error": None,
        }
    )
    assert (bad.status, bad.retryable, bad.error["status_code"]) == ("errored", False, 400)
    server = openai_outcome(
        {
            "custom_id": "i3",
            "response": {"status_code": 500, "body": {"error": {"message": "oops", "type": "server_error"}}},
            "error": None,
        }
    )
    assert (server.status, server.retryable) == ("errored", True)
    expired = openai_outcome(
        {"custom_id": "i4", "response": None, "error": {"code": "batch_expired", "message": "late"}}
    )
    assert (expired.status, expired.retryable) == ("expired", True)


def test_anthropic_outcomes_are_classified() -> None:
    ok = anthropic_outcome(
        {
            "custom_id": "i1",
            "result": {
                "type": "succeeded",
                "message": {"usage": {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 1}},
            },
        }
    )
    assert ok.status == "succeeded" and ok.usage == {
        "input_tokens": 6,
        "output_tokens": 2,
        "cached_input_tokens": 1,
        "cache_creation_input_tokens": 0,
    }
    invalid = anthropic_outcome(
        {
            "custom_id": "i2",
            "result": {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
                },
            },
        }
    )
    assert (invalid.status, invalid.retryable) == ("errored", False)
    overloaded = anthropic_outcome(
        {
            "custom_id": "i3",
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "api_error", "message": "boom"}},
            },
        }
    )
    assert overloaded.retryable
    for kind in ("expired", "canceled"):
        outcome = anthropic_outcome({"custom_id": "i4", "result": {"type": kind}})
        assert (outcome.status, outcome.retryable) == (kind, True)


@pytest.mark.parametrize("instance", ["", "0123456789ABCDEF0123456789abcdef"])
def test_request_pieces_are_the_request_lines_byte_for_byte(instance: str) -> None:
    rows = [
        (1, "/v1/chat/completions", b'{"model":"m","messages":[]}'),
        (0xABC, "/v1/embeddings", b'{"model":"e","input":"x"}'),
        (2**40, "/v1/chat/completions", b"{}"),
    ]
    openai = b"".join(request_pieces("openai", rows, instance))
    assert openai == b"".join(openai_request_line(i, endpoint, body, instance) for i, endpoint, body in rows)
    anthropic = b"".join(request_pieces("anthropic", rows, instance))
    assert anthropic == b"".join(anthropic_request(i, body, instance) + b"\n" for i, _, body in rows)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("instance", ["", "0123456789ABCDEF0123456789abcdef"])
def test_request_lines_size_is_the_length_of_the_lines_to_the_byte(kind: Kind, instance: str) -> None:
    endpoint = "/v1/chat/completions"
    # Ids of one to sixteen hex digits, bodies with multi-byte UTF-8: the sums a store adds up.
    rows = [(1, endpoint, b'{"model":"m"}'), (0xFFFF, endpoint, '{"x":"é€"}'.encode()), (2**63, endpoint, b"{}")]
    body_bytes = sum(len(body) for _, _, body in rows)
    id_hex_digits = sum(len(f"{item_id:x}") for item_id, _, _ in rows)
    expected = len(b"".join(request_pieces(kind, rows, instance)))
    assert request_lines_size(kind, len(rows), body_bytes, id_hex_digits, endpoint, instance) == expected
    assert request_lines_size(kind, 0, 0, 0, endpoint, instance) == 0


def test_item_id_reader_reads_as_item_id_from_custom_id() -> None:
    instance, other = "ab" * 16, "cd" * 16
    ids = [
        provider_custom_id(7, instance),
        provider_custom_id(2**63, instance),
        provider_custom_id(7, other),
        provider_custom_id(9),  # legacy: no instance, accepted
        provider_custom_id(7, instance).upper(),
        provider_custom_id(7, instance) + "_1",
        "b" + "ab" * 8 + "_",
        "b" + "ab" * 8 + "_1_0",
        "someone-elses-id",
    ]
    for read_with in (instance, ""):
        read = item_id_reader(read_with)
        assert [read(c) for c in ids] == [item_id_from_custom_id(c, read_with) for c in ids]
    assert item_id_reader(instance)(provider_custom_id(7, other)) is None


def test_a_result_file_answer_is_embedded_byte_for_byte_as_the_parsed_one_would_be_written() -> None:
    """openai_file_outcome / anthropic_file_outcome keep the response as JSON, not as dicts; the
    result line written from it is exactly the one written from the parsed response."""
    from batchd.formats import anthropic_file_outcome, openai_file_outcome, result_line

    body = {"id": "c1", "choices": [{"message": {"content": 'hé \u2028 "q"'}}], "usage": {"prompt_tokens": 3}}
    openai_line = {"custom_id": "i1", "response": {"status_code": 200, "body": body}, "error": None}
    message = {"id": "m1", "content": [{"type": "text", "text": "x"}], "usage": {"input_tokens": 2}}
    anthropic_line = {"custom_id": "i2", "result": {"type": "succeeded", "message": message}}
    for parsed, embedded in (
        (openai_outcome(openai_line), openai_file_outcome(openai_line)),
        (anthropic_outcome(anthropic_line), anthropic_file_outcome(anthropic_line)),
    ):
        assert isinstance(embedded.response, orjson.Fragment)
        assert (embedded.status, embedded.usage, embedded.retryable) == (parsed.status, parsed.usage, False)
        assert result_line(custom_id="a", status="succeeded", line=1, response=embedded.response) == result_line(
            custom_id="a", status="succeeded", line=1, response=parsed.response
        )
    errored = {"custom_id": "i3", "response": {"status_code": 500, "body": {"error": {"message": "x"}}}}
    assert openai_file_outcome(errored) == openai_outcome(errored)
