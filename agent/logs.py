"""Structured logging: JSON in production, readable on a terminal, secrets always redacted.

Both structlog and standard-library loggers (aiohttp's access log among them) go through the
same processors, so the redaction below applies to every line the agent writes.
"""

from __future__ import annotations

import logging
import re
import sys
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
        foreign_pre_chain=[_stdlib_message, *shared],
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
