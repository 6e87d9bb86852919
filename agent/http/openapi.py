"""The OpenAPI 3.0 document of the agent's HTTP API, served at ``/api/v1/openapi.json``.

Written by hand next to the handlers it describes; tests fuzz the running agent from it.
"""

from __future__ import annotations

from typing import Any

from agent import __version__

_ERROR = {"type": "object", "required": ["error", "message"],
          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
_NULLABLE_STR = {"type": "string", "nullable": True}
_TOKEN = {
    "type": "object",
    "required": ["id", "display", "kind", "scope", "protocols", "status", "created_at",
                 "origin", "label"],
    "properties": {
        "id": {"type": "string"}, "display": {"type": "string"},
        "kind": {"type": "string", "enum": ["access", "publisher", "admin"]},
        "scope": {"type": "string"},
        "protocols": {"type": "array", "items": {"type": "string"}},
        "permission": _NULLABLE_STR,
        "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
        "created_at": {"type": "string"}, "created_by": _NULLABLE_STR,
        "expires_at": _NULLABLE_STR, "label": {"type": "string"},
        "origin": {"type": "string", "enum": ["local", "relay"]},
        "revoked_at": _NULLABLE_STR, "replaced_by": _NULLABLE_STR, "replaces": _NULLABLE_STR,
        "last_used_at": _NULLABLE_STR,
    },
}
_NEW_TOKEN = {"allOf": [{"$ref": "#/components/schemas/Token"},
                        {"type": "object", "required": ["token"],
                         "properties": {"token": {"type": "string"}}}]}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid request", 401: "Missing, invalid, expired or revoked token",
            403: "Not an admin token", 404: "Not found", 409: "Refused (limit, state)",
            413: "Body too large", 429: "Too many failed attempts"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


_AUTH = (401, 403, 429)
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def document() -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "object"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "TheRelay Agent admin API", "version": __version__,
                 "description": "Authorize with an admin token: Authorization: Bearer trk_…"},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR, "Token": _TOKEN, "NewToken": _NEW_TOKEN},
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
                                      "description": "host, account or camera:<id>"},
                            "protocols": {"type": "array", "items": {
                                "type": "string",
                                "enum": ["webrtc", "rtsp", "hls", "snapshot"]}},
                            "ttl": {"type": "string", "description": "30m, 1h, 1d, 1w…"},
                            "expires_at": {"type": "string", "description": "ISO 8601"},
                            "label": {"type": "string", "maxLength": 200},
                        }}}}},
                    "responses": {"201": _json({"$ref": "#/components/schemas/NewToken"},
                                               "Created"),
                                  **_errors(400, *_AUTH, 409, 413)},
                },
            },
            "/api/v1/admin/tokens/{id}": {"get": {
                "summary": "One token", "parameters": [_ID],
                "responses": {"200": _json({"$ref": "#/components/schemas/Token"}),
                              **_errors(*_AUTH, 404)}}},
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
                        "grace": {"type": "string",
                                  "description": "how long the old token keeps working"},
                    }}}}},
                "responses": {"201": _json({"$ref": "#/components/schemas/NewToken"},
                                           "Created"),
                              **_errors(400, *_AUTH, 404, 409, 413)}}},
            "/api/v1/admin/tokens/{id}/usage": {"get": {
                "summary": "Last used, uses per hour and day, protocols, IP addresses",
                "parameters": [_ID],
                "responses": {"200": _json({"type": "object", "required": [
                    "token_id", "per_hour", "per_day", "per_protocol", "ips", "uses",
                    "denied"]}), **_errors(*_AUTH, 404)}}},
            "/api/v1/admin/usage/unused": {"get": {
                "summary": "Active tokens not used for a number of days",
                "parameters": [_query("days", {"type": "integer", "minimum": 1,
                                               "maximum": 3650}, "default 30")],
                "responses": {"200": _json({"type": "object", "required": ["days", "tokens"]}),
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
                    _query("since", {"type": "string"}, "ISO 8601"),
                    _query("until", {"type": "string"}, "ISO 8601"),
                    _query("after", {"type": "integer", "minimum": 0}, "last seq seen"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                           "page size (json)"),
                    _query("format", {"type": "string", "enum": ["json", "jsonl", "csv"]},
                           "json (default), or an export"),
                ],
                "responses": {"200": {"description": "Entries", "content": {
                    "application/json": {"schema": {"type": "object",
                                                    "required": ["entries", "next_after"]}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                    "text/csv": {"schema": {"type": "string"}}}},
                    **_errors(400, *_AUTH)}}},
            "/api/v1/admin/cameras": {"get": {
                "summary": "Cameras with status and viewers per protocol",
                "responses": {"200": _json({"type": "object", "required": ["cameras"],
                                            "properties": {"cameras": {"type": "array",
                                                                       "items": obj}}}),
                              **_errors(*_AUTH)}}},
            "/api/v1/admin/hosts": {"get": {
                "summary": "This agent",
                "responses": {"200": _json({"type": "object", "required": ["hosts"]}),
                              **_errors(*_AUTH)}}},
        },
    }
