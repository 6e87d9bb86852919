"""Structured logging: JSON in production, readable on a terminal, secrets always redacted.

Both structlog and standard-library loggers (aiohttp's access log among them) go through the
same processors, so the redaction below applies to every line the agent writes.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.access.tokens import redact as redact_tokens

# No word boundary before the name (``x_token=``, ``%26token=`` are names too); ``%3D`` is a
# percent-encoded ``=``.
_QUERY_TOKEN = re.compile(r"(?i)(token|password|passwd|secret)(=|%3D)[^&\s\"']*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")


def redact_text(text: str) -> str:
    """Remove tokens, ``token=`` query values, Authorization values and URL passwords."""
    text = redact_tokens(text)
    if "=" in text or "%" in text:
        text = _QUERY_TOKEN.sub(r"\1\2[redacted]", text)
    text = _BEARER.sub(r"\1 [redacted]", text)
    if "@" in text:
        text = _URL_USERINFO.sub(r"\1[redacted]@", text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact_text(str(value))


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every field (runs after exceptions are formatted)."""
    for key, value in list(event_dict.items()):
        if key != "exc_info":
            event_dict[key] = _redact_value(value)
    return event_dict


def _stdlib_message(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if record is not None and "event" not in event_dict:
        event_dict["event"] = record.getMessage()
    return event_dict


#: Malformed requests (bad HTTP from a scanner or an attacker) logged per window at most; the
#: rest are counted in the next line. Each line is one short message, never a traceback.
MALFORMED_PER_WINDOW = 5
MALFORMED_WINDOW = 60.0
MALFORMED_TEXT = 200


class MalformedRequestSampler(logging.Filter):
    """aiohttp logs every unparsable request at error level with a traceback (~1.5 kB, and
    the raw request line in it): one client could write gigabytes an hour. This keeps
    ``MALFORMED_PER_WINDOW`` short warnings per window and counts the others."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._window_start = -MALFORMED_WINDOW
        self._logged = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Error handling request"):
            return True
        now = self._clock()
        if now - self._window_start >= MALFORMED_WINDOW:
            self._window_start, self._logged = now, 0
        if self._logged >= MALFORMED_PER_WINDOW:
            self._dropped += 1
            return False
        self._logged += 1
        exc = record.exc_info[1] if record.exc_info else None
        problem = (f"{type(exc).__name__}: {exc}" if exc is not None else "unknown")
        problem = " ".join(problem.split())[:MALFORMED_TEXT]
        record.msg, record.args = "malformed_request", None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.__dict__["problem"] = problem
        if self._dropped:
            record.__dict__["not_logged_before"] = self._dropped
            self._dropped = 0
        return True


def _record_extras(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if record is not None:
        for key in ("problem", "not_logged_before"):
            if key in record.__dict__:
                event_dict[key] = record.__dict__[key]
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up logging once for the process. ``fmt``: json | console | auto (tty → console)."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_stdlib_message, _record_extras, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioice/aiortc log every ICE check at info level; zeep and onvif every SOAP exchange
    for chatty in ("aioice", "aiortc", "zeep", "onvif", "zeroconf"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    server = logging.getLogger("aiohttp.server")
    for old in [f for f in server.filters if isinstance(f, MalformedRequestSampler)]:
        server.removeFilter(old)
    server.addFilter(MalformedRequestSampler())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
