"""No secret reaches a log line, whichever logger, field or format carries it."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from agent import logs
from agent.access.tokens import Kind, generate


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_field_and_logger_is_redacted(fmt: str) -> None:
    access, publisher = generate(Kind.ACCESS), generate(Kind.PUBLISHER)
    out = io.StringIO()
    logs.configure(fmt, "debug", stream=out)
    log = structlog.get_logger("t")
    log.info("viewer", token=access.text, nested={"list": [publisher.text]})
    log.warning(f"request GET /whep/cam1?token={access.text[:40]}&x=1")
    try:
        raise ValueError(f"bad token {access.text}")
    except ValueError:
        log.exception("failed")
    logging.getLogger("aiohttp.access").info(
        'GET /snapshot/cam1.jpg?token=%s HTTP/1.1 "Authorization: Bearer %s"',
        access.text, publisher.text)
    log.info("camera", source="rtsp://admin:hunter2@10.1.1.1/stream", header="Basic YWRtaW46eA==")
    text = out.getvalue()
    for secret in (access.text, publisher.text, access.text[17:40], "hunter2", "YWRtaW46eA=="):
        assert secret not in text
    assert f"tra_{access.public_id}…[redacted]" in text
    assert f"trp_{publisher.public_id}…[redacted]" in text
    assert "rtsp://[redacted]@10.1.1.1/stream" in text
    assert "token=[redacted]&x=1" in text
    assert "ValueError" in text  # the exception is still there, minus its secret
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["level"] for line in lines] == ["info", "warning", "error", "info", "info"]
        assert lines[3]["logger"] == "aiohttp.access"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /x?token=abc&y=2", "GET /x?token=[redacted]&y=2"),
        ("password=abc secret=def", "password=[redacted] secret=[redacted]"),
        ("Authorization: Bearer abc.def", "Authorization: Bearer [redacted]"),
        ("rtsp://u:p@h:554/s", "rtsp://[redacted]@h:554/s"),
        ("rtsp://h:554/s", "rtsp://h:554/s"),
        ("nothing to hide", "nothing to hide"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert logs.redact_text(text) == expected


def test_levels_filter() -> None:
    out = io.StringIO()
    logs.configure("json", "warning", stream=out)
    structlog.get_logger("t").info("quiet")
    structlog.get_logger("t").warning("loud")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]


@pytest.mark.parametrize("wrap", [
    "\x01{t}", "x{t}", "/whep/cam1{t}", "?a=%3D{t}", "q=x%3D{t}&y", "path/%2F{t}",
    "{pct}", "abc{pct}def", "_{t}_",
])
def test_glued_and_percent_encoded_tokens_are_redacted(wrap: str) -> None:
    """No word boundary is needed in front of a token, and %5F stands for its underscores."""
    token = generate(Kind.ACCESS).text
    pct = token.replace("_", "%5F")
    text = logs.redact_text(wrap.format(t=token, pct=pct))
    assert token[17:] not in text
    assert token[17:40] not in text
    assert "[redacted]" in text


@pytest.mark.parametrize("text", ["x_token=abc&y=1", "a?b%26token%3Dabc", "TOKEN=abc"])
def test_query_secrets_need_no_boundary(text: str) -> None:
    assert "abc" not in logs.redact_text(text)


def test_malformed_requests_are_sampled_short_lines_without_traceback() -> None:
    """aiohttp logs each unparsable request with a traceback holding the request line: a
    client sending 1,000 of them must leave a few short lines, not 1,000 tracebacks."""
    token = generate(Kind.ACCESS).text
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    server = logging.getLogger("aiohttp.server")
    for _ in range(1000):
        try:
            raise ValueError("Got more than 8190 bytes when reading: /whep/" + "a" * 8000 + token)
        except ValueError:
            server.exception("Error handling request from %s", "10.0.0.9")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == logs.MALFORMED_PER_WINDOW
    assert all(line["event"] == "malformed_request" and line["level"] == "warning"
               for line in lines)
    assert all("exception" not in line and len(line["problem"]) <= 200 for line in lines)
    assert len(out.getvalue()) < 2000
    assert token[17:] not in out.getvalue()


def test_the_sampler_reports_what_it_dropped() -> None:
    now = [0.0]
    sampler = logs.MalformedRequestSampler(clock=lambda: now[0])
    record = lambda: logging.LogRecord("aiohttp.server", logging.ERROR, "", 0,  # noqa: E731
                                       "Error handling request", None, None)
    assert [sampler.filter(record()) for _ in range(8)] == [True] * 5 + [False] * 3
    now[0] = logs.MALFORMED_WINDOW
    kept = record()
    assert sampler.filter(kept) and kept.__dict__["not_logged_before"] == 3
    other = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "something else",
                              None, None)
    assert sampler.filter(other) and other.levelno == logging.ERROR
