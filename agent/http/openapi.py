"""The OpenAPI 3.0 document of the agent's HTTP API, served at ``/api/v1/openapi.json``.

Written by hand next to the handlers it describes; tests fuzz the running agent from it.
"""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.access.model import MAX_SESSIONS_CAP
from agent.media.hub import CameraState

_ERROR = {"type": "object", "required": ["error", "message"],
          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_NUMBER = {"type": "number"}
_NULLABLE_STR = {"type": "string", "nullable": True}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_TIME = {"type": "string", "format": "date-time", "description": "UTC, e.g. 2026-12-01T00:00:00Z"}
_NULLABLE_TIME = {**_TIME, "nullable": True}
_PROTOCOLS = ["webrtc", "rtsp", "hls", "snapshot"]
#: What parse_duration accepts: 30m, 1h, 1d, 1w, 1h30m… (at most 100 years).
_DURATION = {"type": "string", "maxLength": 32, "pattern": "^([0-9]+[smhdw])+$"}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_TOKEN = {
    "type": "object",
    "required": ["id", "display", "kind", "scope", "protocols", "permission", "status",
                 "created_at", "created_by", "expires_at", "label", "origin", "revoked_at",
                 "replaced_by", "replaces", "last_used_at", "max_sessions"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9A-Za-z]{12}$"},
        "display": {"type": "string"},
        "kind": {"type": "string", "enum": ["access", "publisher", "admin"]},
        "scope": {"type": "string", "pattern": "^(camera|host|account):"},
        "protocols": {"type": "array", "minItems": 1,
                      "items": {"type": "string", "enum": [*_PROTOCOLS, "all"]}},
        "permission": {"type": "string", "enum": ["read", "publish"], "nullable": True},
        "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
        "created_at": _TIME, "created_by": _NULLABLE_STR,
        "expires_at": _NULLABLE_TIME, "label": {"type": "string"},
        "origin": {"type": "string", "enum": ["local", "relay"]},
        "revoked_at": _NULLABLE_TIME, "replaced_by": _NULLABLE_STR, "replaces": _NULLABLE_STR,
        "last_used_at": _NULLABLE_TIME,
        "max_sessions": {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS_CAP,
                         "nullable": True, "description": "live sessions at once; null: no cap"},
    },
}
_RECEPTION = {
    "type": "object", "nullable": True,
    "description": "the viewer's latest RTCP receiver report (WebRTC on the agent's send "
                   "path; null for other protocols, or before the first report)",
    "required": ["loss_fraction", "packets_lost", "jitter_ms", "rtt_ms", "retransmitted",
                 "keyframe_requests"],
    "properties": {
        "loss_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "packets_lost": {"type": "integer"},
        "jitter_ms": {"type": "number"}, "rtt_ms": _NULLABLE_NUMBER,
        "retransmitted": {"type": "integer", "description": "packets resent after NACKs"},
        "keyframe_requests": {"type": "integer", "description": "PLI/FIR answered"},
    },
}
_SESSION = _object(
    ["id", "token_id", "camera", "protocol", "peer_ip", "started_at", "duration_s",
     "bytes_sent", "connecting", "reception"],
    id={"type": "string"}, token_id={"type": "string"}, camera=_NULLABLE_STR,
    protocol={"type": "string", "enum": _PROTOCOLS}, peer_ip=_NULLABLE_STR,
    started_at=_TIME, duration_s={"type": "number"}, bytes_sent={"type": "integer"},
    connecting={"type": "boolean", "description": "WebRTC handshake still in progress"},
    reception=_RECEPTION)
_MAX_SESSIONS = {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS_CAP, "nullable": True,
                 "description": "live sessions at once over every protocol; null: no cap"}
_PATCH_TOKEN = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "description": "Only the fields given change. The scope cannot change (create a new "
                   "token or rotate); ttl and expires_at exclude each other.",
    "properties": {
        "label": {"type": "string", "maxLength": 200},
        "ttl": {**_DURATION, "description": "expires this long from now (at most 100 years)"},
        "expires_at": {"type": "string", "format": "date-time", "nullable": True,
                       "description": "ISO 8601, in the future, before 9999-01-01; null: "
                                      "never expires"},
        "protocols": {"type": "array", "uniqueItems": True,
                      "items": {"type": "string", "enum": _PROTOCOLS},
                      "description": "[] allows all"},
        "max_sessions": _MAX_SESSIONS,
    },
}
_NEW_TOKEN = {"allOf": [{"$ref": "#/components/schemas/Token"},
                        {"type": "object", "required": ["token"],
                         "properties": {"token": {
                             "type": "string",
                             "pattern": "^tr[ak]_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}$"}}}]}
_COUNTS = _object(["granted", "denied"], granted=_INT, denied=_INT)
_USAGE = _object(
    ["token_id", "last_used_at", "per_hour", "uses", "denied", "per_day", "per_protocol",
     "ips"],
    token_id=_STR,
    last_used_at={**_NULLABLE_NUMBER, "description": "epoch seconds"},
    per_hour={"type": "array", "description": "the last week, oldest first",
              "items": _object(["hour", "granted", "denied"], hour=_INT, granted=_INT,
                               denied=_INT)},
    uses=_INT, denied=_INT,
    per_day={"type": "array", "items": _object(["day", "granted", "denied"], day=_INT,
                                               granted=_INT, denied=_INT)},
    per_protocol={"type": "object", "additionalProperties": _COUNTS},
    ips={"type": "array", "items": _object(["ip", "count", "last_seen"], ip=_STR, count=_INT,
                                           last_seen={**_NUMBER,
                                                      "description": "epoch seconds"})},
)
_AUDIT_ENTRY = _object(
    ["seq", "ts", "event", "token_id", "camera", "protocol", "peer_ip", "actor", "result",
     "reason", "detail", "prev_hash", "hash"],
    seq={"type": "integer", "minimum": 1}, ts={**_NUMBER, "description": "epoch seconds"},
    event=_STR, token_id=_NULLABLE_STR, camera=_NULLABLE_STR, protocol=_NULLABLE_STR,
    peer_ip=_NULLABLE_STR, actor=_NULLABLE_STR,
    result={"type": "string", "enum": ["granted", "denied"], "nullable": True},
    reason=_NULLABLE_STR, detail={"type": "object"},
    prev_hash={"type": "string", "pattern": "^[0-9a-f]{64}$"},
    hash={"type": "string", "pattern": "^[0-9a-f]{64}$"},
)
_CAMERA = _object(
    ["id", "name", "source", "always_on", "state", "viewers"],
    id=_STR, name=_STR, source={**_STR, "description": "secrets redacted"},
    always_on={"type": "boolean"},
    state={"type": "string", "enum": [s.value for s in CameraState]},
    error=_NULLABLE_STR, since={**_NUMBER, "description": "epoch seconds"},
    codec=_NULLABLE_STR, width={"type": "integer", "nullable": True},
    height={"type": "integer", "nullable": True}, fps=_NULLABLE_NUMBER,
    bitrate_kbps=_NULLABLE_NUMBER, audio=_NULLABLE_STR,
    viewers=_object(_PROTOCOLS, **dict.fromkeys(_PROTOCOLS, _INT)),
    held_move={**_NULLABLE_STR, "description": "an announced move of this adopted camera "
               "that discovery did not follow, for the installer to confirm"},
)
_HOST = _object(
    ["id", "account_id", "version", "uptime_s", "cameras", "cameras_online", "sessions", "tls",
     "rtsp_port"],
    id=_STR, account_id=_STR, version=_STR, uptime_s={"type": "number", "minimum": 0},
    cameras=_INT, cameras_online=_INT, sessions=_INT,
    rtsp_port={"type": "integer", "nullable": True,
               "description": "the RTSP server's port; null when RTSP is off"},
    tls={**_object(["fingerprint_sha256", "spki_sha256", "not_after", "self_signed", "names"],
                   fingerprint_sha256={"type": "string",
                                       "pattern": "^([0-9A-F]{2}:){31}[0-9A-F]{2}$"},
                   spki_sha256=_STR, not_after=_TIME, self_signed={"type": "boolean"},
                   names={"type": "array", "items": _STR}),
         "nullable": True, "description": "the HTTPS certificate to compare; null: plain HTTP"},
)


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid request", 401: "Missing, invalid, expired or revoked token",
            403: "Not an admin token", 404: "Not found",
            409: "Refused (limit, state, read-only relay token)",
            413: "Body too large", 415: "The body is not JSON (Content-Type: application/json)",
            429: "Too many failed attempts"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


_AUTH = (401, 403, 429)
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "TheRelay Agent admin API", "version": __version__,
                 "description": "Authorize with an admin token in the header (never in the "
                                "URL): Authorization: Bearer trk_…. Same origin only: no "
                                "CORS. Request bodies are JSON."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR, "Token": _TOKEN, "NewToken": _NEW_TOKEN,
                        "Usage": _USAGE, "AuditEntry": _AUDIT_ENTRY, "Camera": _CAMERA,
                        "Host": _HOST, "TokenUpdate": _PATCH_TOKEN},
        },
        "paths": {
            "/api/v1/admin/tokens": {
                "get": {
                    "summary": "List tokens (never their secrets)",
                    "parameters": [
                        _query("kind", {"type": "string", "enum": ["access", "publisher",
                                                                   "admin"]}, "kind"),
                        _query("status", {"type": "string", "enum": ["active", "revoked",
                                                                     "expired"]}, "status"),
                        _query("scope", {"type": "string"}, "exact scope, e.g. camera:door"),
                    ],
                    "responses": {"200": _json({"type": "object", "required": ["tokens"],
                                                "properties": {"tokens": {
                                                    "type": "array",
                                                    "items": {"$ref": "#/components/schemas/Token"},
                                                }}}),
                                  **_errors(400, *_AUTH)},
                },
                "post": {
                    "summary": "Create a token; the response is the only time it is shown",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "kind": {"type": "string", "enum": ["access", "admin"]},
                            "scope": {"type": "string",
                                      "pattern": "^(host|account|camera:[A-Za-z0-9]"
                                                 "[A-Za-z0-9._-]{0,63})$",
                                      "description": "host, account or camera:<id>"},
                            "protocols": {"type": "array", "items": {
                                "type": "string", "enum": _PROTOCOLS}},
                            "ttl": {**_DURATION, "nullable": True,
                                    "description": "30m, 1h, 1d, 1w… (at most 100 years); "
                                                   "not with expires_at"},
                            "expires_at": {"type": "string", "format": "date-time",
                                           "nullable": True,
                                           "description": "ISO 8601, before 9999-01-01"},
                            "label": {"type": "string", "maxLength": 200},
                            "max_sessions": _MAX_SESSIONS,
                        }}}}},
                    "responses": {"201": _json({"$ref": "#/components/schemas/NewToken"},
                                               "Created"),
                                  **_errors(400, *_AUTH, 409, 413, 415)},
                },
            },
            "/api/v1/admin/tokens/{id}": {
                "get": {
                    "summary": "One token", "parameters": [_ID],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Token"}),
                                  **_errors(*_AUTH, 404)}},
                "patch": {
                    "summary": "Change label, expiry, protocols or session cap; a narrowing "
                               "ends the live sessions it no longer allows before the answer",
                    "parameters": [_ID],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/TokenUpdate"}}}},
                    "responses": {"200": _json({"$ref": "#/components/schemas/Token"}),
                                  **_errors(400, *_AUTH, 404, 409, 413)}},
            },
            "/api/v1/admin/tokens/{id}/revoke": {"post": {
                "summary": "Revoke at once: live sessions end before the answer",
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Token"}),
                              **_errors(*_AUTH, 404, 409)}}},
            "/api/v1/admin/tokens/{id}/rotate": {"post": {
                "summary": "Replace with a new token (same scope, protocols, lifetime)",
                "parameters": [_ID],
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        "grace": {**_DURATION, "nullable": True,
                                  "description": "how long the old token keeps working "
                                                 "(at most 100 years); none: revoked now"},
                    }}}}},
                "responses": {"201": _json({"$ref": "#/components/schemas/NewToken"},
                                           "Created"),
                              **_errors(400, *_AUTH, 404, 409, 413, 415)}}},
            "/api/v1/admin/tokens/{id}/usage": {"get": {
                "summary": "Last used, uses per hour and day, protocols, IP addresses",
                "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Usage"}),
                              **_errors(*_AUTH, 404)}}},
            "/api/v1/admin/usage/unused": {"get": {
                "summary": "Active tokens neither used nor created in a number of days",
                "parameters": [_query("days", {"type": "integer", "minimum": 1,
                                               "maximum": 3650}, "default 30")],
                "responses": {"200": _json(_object(
                    ["days", "tokens"], days={"type": "integer", "minimum": 1},
                    tokens={"type": "array", "items": {"$ref": "#/components/schemas/Token"}})),
                              **_errors(400, *_AUTH)}}},
            "/api/v1/admin/audit": {"get": {
                "summary": "The audit log, filtered, paginated, or exported",
                "parameters": [
                    _query("token", {"type": "string"}, "token id"),
                    _query("camera", {"type": "string"}, "camera id"),
                    _query("event", {"type": "string"}, "e.g. access.denied"),
                    _query("result", {"type": "string", "enum": ["granted", "denied"]},
                           "result"),
                    _query("reason", {"type": "string"}, "e.g. revoked"),
                    _query("ip", {"type": "string"}, "peer address"),
                    _query("since", {"type": "string", "format": "date-time"}, "ISO 8601"),
                    _query("until", {"type": "string", "format": "date-time"}, "ISO 8601"),
                    _query("after", {"type": "integer", "minimum": 0, "maximum": 2**62},
                           "last seq seen (oldest first)"),
                    _query("before", {"type": "integer", "minimum": 1, "maximum": 2**62},
                           "entries before this seq (newest first paging)"),
                    _query("order", {"type": "string", "enum": ["oldest", "newest"]},
                           "oldest first (default) or newest first (json)"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                           "page size (json)"),
                    _query("format", {"type": "string", "enum": ["json", "jsonl", "csv"]},
                           "json (default), or an export"),
                ],
                "responses": {"200": {"description": "Entries", "content": {
                    "application/json": {"schema": _object(
                        ["entries", "next_after", "next_before"],
                        entries={"type": "array",
                                 "items": {"$ref": "#/components/schemas/AuditEntry"}},
                        next_after={"type": "integer", "nullable": True,
                                    "description": "pass as after= for the next page"},
                        next_before={"type": "integer", "nullable": True,
                                     "description": "order=newest: pass as before= next"})},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                    "text/csv": {"schema": {"type": "string"}}}},
                    **_errors(400, *_AUTH)}}},
            "/api/v1/admin/cameras": {"get": {
                "summary": "Cameras with status and viewers per protocol",
                "responses": {"200": _json(_object(["cameras"], cameras={
                    "type": "array", "items": {"$ref": "#/components/schemas/Camera"}})),
                              **_errors(*_AUTH)}}},
            "/api/v1/admin/sessions": {"get": {
                "summary": "Live viewer sessions, with receiver-report figures for WebRTC",
                "parameters": [
                    _query("camera", {"type": "string", "maxLength": 200}, "only this camera"),
                    _query("token_id", {"type": "string", "maxLength": 200},
                           "only sessions under this token"),
                    _query("protocol", {"type": "string", "enum": _PROTOCOLS},
                           "only this protocol"),
                ],
                "responses": {"200": _json(_object(["sessions"], sessions={
                    "type": "array", "items": _SESSION})), **_errors(400, *_AUTH)}}},
            "/api/v1/admin/hosts": {"get": {
                "summary": "This agent",
                "responses": {"200": _json(_object(["hosts"], hosts={
                    "type": "array", "items": {"$ref": "#/components/schemas/Host"}})),
                              **_errors(*_AUTH)}}},
        },
    }
