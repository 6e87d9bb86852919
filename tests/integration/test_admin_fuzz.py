"""Property-based fuzz of the admin API from its OpenAPI document.

Schemathesis reads the document (``agent.http.openapi.document()``, which the daemon serves
at ``/api/v1/openapi.json``: checked below) and, for every operation, sends generated
requests (valid and invalid parameters and bodies) to a real daemon with an admin token.
Every answer must be a documented status (never a 5xx) whose body matches the documented
schema and content type. Half of the requests about one token name a fresh real token, so
that show, usage, revoke and rotate are fuzzed past the 404 too.

Random requests over the whole document seldom reach the values that matter most: a
duration or a time the validators accept but the store cannot keep (a 500, or a record that
made every later listing fail), a label that is not storable text. Two Hypothesis
properties aim at exactly the fields that reach the store.

The schema is loaded at import, not from the daemon through ``schemathesis.pytest.
from_fixture``: that lazy loader (schemathesis 4.32) sets ``request.node._nodeid``, which
pytest 9 no longer has.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.http import openapi
from tests.conftest import remember
from tests.support.agent import AgentProcess

SRC = "testsrc://?size=320x240&fps=15"
#: Examples per operation; ADMIN_FUZZ_EXAMPLES=500 for a longer run by hand.
MAX_EXAMPLES = int(os.environ.get("ADMIN_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    process = asyncio.run(AgentProcess.start(tmp_path_factory.mktemp("fuzz"), [
        {"id": "cam1", "source": SRC},
        {"id": "cam2", "source": SRC},
    ], tokens={"max_active": 100_000,
               # negative cases drop the Authorization header (401, documented): without a
               # wide budget the failure limiter would answer 429 to the rest of them
               "failed_attempts": {"burst": 100_000, "per_minute": 100_000}}))
    yield process
    assert asyncio.run(process.stop()) == 0  # and its log shows no traceback


@pytest.fixture(scope="module")
def admin_token(agent: AgentProcess) -> str:
    _, token = asyncio.run(agent.token("--admin", "--label", "fuzz"))
    return token


schema = schemathesis.openapi.from_dict(openapi.document())


def _fresh_token_id(agent: AgentProcess, admin_token: str) -> str:
    response = requests.post(f"{agent.base}/api/v1/admin/tokens", timeout=10,
                             json={"scope": "camera:cam1", "ttl": "1h", "label": "target"},
                             headers={"Authorization": f"Bearer {admin_token}"})
    remember(response.text)
    assert response.status_code == 201, response.text
    token_id: str = response.json()["id"]
    return token_id


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_admin_api_keeps_to_its_document(case: Any, agent: AgentProcess,
                                             admin_token: str) -> None:
    path_parameters = case.path_parameters or {}
    if "id" in path_parameters and zlib.crc32(repr(path_parameters).encode()) % 2:
        case.path_parameters = {**path_parameters, "id": _fresh_token_id(agent, admin_token)}
    response = case.call(base_url=agent.base, timeout=10,
                         headers={"Authorization": f"Bearer {admin_token}"})
    remember(response.text)  # create and rotate answer with new tokens
    case.validate_response(response, checks=CHECKS)


def test_the_served_document_is_the_one_in_the_code(agent: AgentProcess) -> None:
    served = requests.get(f"{agent.base}/api/v1/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.json() == openapi.document()


# -- the fields that reach the store --------------------------------------------------------

_DURATIONS = st.one_of(
    st.builds("{}{}".format, st.integers(0, 10**40), st.sampled_from("smhdw")),
    st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from("smhdw")), min_size=1,
             max_size=4).map(lambda parts: "".join(f"{n}{u}" for n, u in parts)),
    st.text(max_size=40),
)
_OFFSETS = st.one_of(st.just("Z"), st.just(""), st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(
    lambda m: f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"))
_TIMES = st.builds(lambda moment, offset: moment.isoformat() + offset,
                   st.datetimes(min_value=datetime(1, 1, 2),
                                max_value=datetime(9999, 12, 31) - timedelta(days=1)),
                   _OFFSETS)
#: Any text, often with a lone surrogate (valid JSON: "\ud800", but not storable text).
_TEXT = st.lists(st.sampled_from(["\ud800", "\udfff"]) | st.characters(),
                 max_size=220).map("".join)
_BODIES = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["access", "admin"]),
    "scope": st.sampled_from(["host", "account", "camera:cam1", "camera:cam2"]),
    "protocols": st.lists(st.sampled_from(["webrtc", "rtsp", "hls", "snapshot"]), max_size=2),
    "ttl": _DURATIONS,
    "expires_at": _TIMES,
    "label": _TEXT,
})


def _request(agent: AgentProcess, admin_token: str, method: str, path: str,
             body: Any = None) -> requests.Response:
    response = requests.request(method, f"{agent.base}/api/v1/admin{path}", json=body,
                                headers={"Authorization": f"Bearer {admin_token}"},
                                timeout=10)
    remember(response.text)
    return response


def _still_listed(agent: AgentProcess, admin_token: str, token_id: str) -> None:
    shown = _request(agent, admin_token, "GET", f"/tokens/{token_id}")
    assert shown.status_code == 200, shown.text
    listed = _request(agent, admin_token, "GET", "/tokens?scope=" + shown.json()["scope"])
    assert listed.status_code == 200, listed.text


@given(body=_BODIES)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_whatever_create_accepts_can_be_shown_and_listed(
        agent: AgentProcess, admin_token: str, body: dict[str, Any]) -> None:
    response = _request(agent, admin_token, "POST", "/tokens", body)
    assert response.status_code in (201, 400, 409), response.text
    if response.status_code == 201:
        _still_listed(agent, admin_token, response.json()["id"])


@given(grace=st.none() | _DURATIONS, ttl=st.none() | st.sampled_from(["1h", "1d"]))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_whatever_rotate_accepts_leaves_both_tokens_listable(
        agent: AgentProcess, admin_token: str, grace: str | None, ttl: str | None) -> None:
    made = _request(agent, admin_token, "POST", "/tokens", {"ttl": ttl})
    assert made.status_code == 201, made.text
    old = made.json()["id"]
    response = _request(agent, admin_token, "POST", f"/tokens/{old}/rotate", {"grace": grace})
    assert response.status_code in (201, 400), response.text
    if response.status_code == 201:
        _still_listed(agent, admin_token, response.json()["id"])
    _still_listed(agent, admin_token, old)


_PATCH_BODIES = st.fixed_dictionaries({}, optional={
    "label": _TEXT,
    "ttl": _DURATIONS,
    "expires_at": st.none() | _TIMES,
    "protocols": st.lists(st.sampled_from(["webrtc", "rtsp", "hls", "snapshot", "ftp"]),
                          max_size=3),
    "max_sessions": st.none() | st.integers(-2, 10**13) | st.floats() | st.booleans(),
    "scope": st.sampled_from(["host", "camera:cam2"]),
})


@given(body=_PATCH_BODIES)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_whatever_update_accepts_can_be_shown_and_listed_and_refusals_change_nothing(
        agent: AgentProcess, admin_token: str, body: dict[str, Any]) -> None:
    target = _fresh_token_id(agent, admin_token)
    before = _request(agent, admin_token, "GET", f"/tokens/{target}").json()
    response = _request(agent, admin_token, "PATCH", f"/tokens/{target}", body)
    assert response.status_code in (200, 400), response.text
    _still_listed(agent, admin_token, target)
    if response.status_code != 200:
        after = _request(agent, admin_token, "GET", f"/tokens/{target}").json()
        assert after == before  # nothing changed
        assert "scope" not in body or "create a new token" in response.json()["message"]
