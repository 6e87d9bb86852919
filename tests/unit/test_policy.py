"""authorize(): every reason code, in checking order, and the failure limiter."""

from __future__ import annotations

import pytest

from agent.access import tokens
from agent.access.model import Action, Protocol, Scope, TokenRecord
from agent.access.policy import (
    FIX,
    HTTP_STATUS,
    AccessRequest,
    FailureLimiter,
    Reason,
    Site,
    authorize,
)
from agent.access.sessions import Admission, Refusal, Session, SessionLimits, SessionRegistry
from agent.access.tokens import Kind

NOW = 1_800_000_000.0
SITE = Site("site1", "acme")


def issue(
    kind: Kind = Kind.ACCESS, scope: str = "camera:cam1", **fields: object
) -> tuple[str, TokenRecord]:
    token = tokens.generate(kind)
    record = TokenRecord(
        id=token.public_id, kind=kind, scope=Scope.parse(scope),
        secret_hash=tokens.token_hash(token.text), last4=token.text[-4:],
        created_at=NOW - 100, **fields,  # type: ignore[arg-type]
    )
    return token.text, record


def decide(token, records, camera="cam1", protocol=Protocol.WEBRTC, ip="10.0.0.9",
           limiter=None, action=Action.VIEW):
    index = {r.id: r for r in records}
    protocol = protocol if action is Action.VIEW else None
    req = AccessRequest(token, camera, action, protocol, ip, NOW)
    return authorize(req, index, SITE, limiter)


def _forged(record: TokenRecord) -> str:
    """A well-formed token with the record's id but another secret."""
    return tokens.generate(record.kind, public_id=record.id).text


CASES = [
    # (name, builder → (presented token, records, request overrides), expected reason)
    ("missing none", lambda: (None, [], {}), Reason.MISSING),
    ("missing empty", lambda: ("", [], {}), Reason.MISSING),
    ("malformed", lambda: ("Bearer nonsense", [], {}), Reason.MALFORMED),
    ("corrupted", lambda: ((t := issue()[0])[:-1] + ("0" if t[-1] != "0" else "1"), [], {}),
     Reason.CORRUPTED),
    ("unknown", lambda: (issue()[0], [], {}), Reason.UNKNOWN),
    ("bad secret", lambda: ((r := issue()[1]) and _forged(r), [r], {}), Reason.BAD_SECRET),
    ("revoked but bad secret says bad_secret",
     lambda: ((r := issue(revoked_at=NOW - 1)[1]) and _forged(r), [r], {}), Reason.BAD_SECRET),
    ("admin token for viewing", lambda: ((x := issue(Kind.ADMIN, "host:site1"))[0], [x[1]], {}),
     Reason.WRONG_KIND),
    ("publisher token for viewing",
     lambda: ((x := issue(Kind.PUBLISHER, "host:site1"))[0], [x[1]], {}), Reason.WRONG_KIND),
    ("relay publisher token (not in the store) for viewing",
     lambda: (issue(Kind.PUBLISHER, "host:site1")[0], [], {}), Reason.WRONG_KIND),
    ("unknown access token for the admin api",
     lambda: (issue()[0], [], {"action": Action.ADMIN, "camera": None}), Reason.WRONG_KIND),
    ("access token for admin api",
     lambda: ((x := issue(Kind.ACCESS, "host:site1"))[0], [x[1]], {"action": Action.ADMIN,
                                                                    "camera": None}),
     Reason.WRONG_KIND),
    ("revoked", lambda: ((x := issue(revoked_at=NOW - 1))[0], [x[1]], {}), Reason.REVOKED),
    ("revoked beats expired",
     lambda: ((x := issue(revoked_at=NOW - 1, expires_at=NOW - 1))[0], [x[1]], {}),
     Reason.REVOKED),
    ("expired", lambda: ((x := issue(expires_at=NOW - 1))[0], [x[1]], {}), Reason.EXPIRED),
    ("expires exactly now", lambda: ((x := issue(expires_at=NOW))[0], [x[1]], {}),
     Reason.EXPIRED),
    ("expires later", lambda: ((x := issue(expires_at=NOW + 1))[0], [x[1]], {}),
     Reason.GRANTED),
    ("cam1 never grants cam10", lambda: ((x := issue())[0], [x[1]], {"camera": "cam10"}),
     Reason.SCOPE_MISMATCH),
    ("cam10 never grants cam1",
     lambda: ((x := issue(scope="camera:cam10"))[0], [x[1]], {"camera": "cam1"}),
     Reason.SCOPE_MISMATCH),
    ("camera token for no camera", lambda: ((x := issue())[0], [x[1]], {"camera": None}),
     Reason.SCOPE_MISMATCH),
    ("other host", lambda: ((x := issue(scope="host:site10"))[0], [x[1]], {}),
     Reason.SCOPE_MISMATCH),
    ("other account", lambda: ((x := issue(scope="account:acme2"))[0], [x[1]], {}),
     Reason.SCOPE_MISMATCH),
    ("protocol not allowed",
     lambda: ((x := issue(protocols=frozenset({Protocol.SNAPSHOT})))[0], [x[1]], {}),
     Reason.PROTOCOL_NOT_ALLOWED),
    ("scope checked before protocol",
     lambda: ((x := issue(protocols=frozenset({Protocol.SNAPSHOT})))[0], [x[1]],
              {"camera": "cam2"}), Reason.SCOPE_MISMATCH),
    ("camera scope", lambda: ((x := issue())[0], [x[1]], {}), Reason.GRANTED),
    ("host scope", lambda: ((x := issue(scope="host:site1"))[0], [x[1]], {"camera": "any"}),
     Reason.GRANTED),
    ("account scope",
     lambda: ((x := issue(scope="account:acme"))[0], [x[1]], {"camera": "any"}),
     Reason.GRANTED),
    ("allowed protocol",
     lambda: ((x := issue(protocols=frozenset({Protocol.SNAPSHOT, Protocol.WEBRTC})))[0],
              [x[1]], {}), Reason.GRANTED),
    ("listing: any access token, whatever its protocols and scope",
     lambda: ((x := issue(protocols=frozenset({Protocol.SNAPSHOT})))[0], [x[1]],
              {"action": Action.LIST, "camera": None}), Reason.GRANTED),
    ("admin token for listing",
     lambda: ((x := issue(Kind.ADMIN, "host:site1"))[0], [x[1]],
              {"action": Action.LIST, "camera": None}), Reason.WRONG_KIND),
    ("admin token for admin api",
     lambda: ((x := issue(Kind.ADMIN, "host:site1"))[0], [x[1]],
              {"action": Action.ADMIN, "camera": None}), Reason.GRANTED),
]


@pytest.mark.parametrize(("name", "build", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reason(name, build, expected) -> None:
    token, records, overrides = build()
    decision = decide(token, records, **overrides)
    assert decision.reason is expected, name
    assert decision.granted is (expected is Reason.GRANTED)
    assert decision.http_status == HTTP_STATUS[expected]
    if expected in (Reason.MISSING, Reason.MALFORMED, Reason.CORRUPTED):
        assert decision.token_id is None
    else:
        assert decision.token_id == tokens.parse(token).public_id  # type: ignore[union-attr]
    if expected in (Reason.UNKNOWN, Reason.BAD_SECRET) or "not in the store" in name:
        assert decision.record is None  # nothing about the record is revealed


def test_every_reason_has_a_status_and_a_fix() -> None:
    assert set(HTTP_STATUS) == set(Reason) == set(FIX)
    assert all(FIX[r] for r in Reason)


def test_unknown_and_known_ids_cost_one_hash_comparison_each(monkeypatch) -> None:
    import hmac

    calls = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    token, record = issue()
    decide(token, [record])
    decide(issue()[0], [record])  # unknown id
    assert len(calls) == 2


class TestLimiter:
    def test_failures_beyond_the_burst_are_rate_limited(self) -> None:
        limiter = FailureLimiter(burst=3, per_minute=60)
        reasons = [decide("junk", [], limiter=limiter).reason for _ in range(5)]
        assert reasons == [Reason.MALFORMED] * 3 + [Reason.RATE_LIMITED] * 2
        limited = decide("junk", [], limiter=limiter)
        assert limited.detail == "malformed" and limited.http_status == 429

    def test_a_valid_token_is_never_limited(self) -> None:
        limiter = FailureLimiter(burst=1, per_minute=1)
        token, record = issue()
        for _ in range(3):
            decide("junk", [record], limiter=limiter)
        assert decide(token, [record], limiter=limiter).granted

    def test_limits_are_per_ip_not_per_token_id(self) -> None:
        limiter = FailureLimiter(burst=2, per_minute=1)
        _, record = issue()
        forged = _forged(record)
        for _ in range(3):
            decide(forged, [record], ip="10.0.0.66", limiter=limiter)
        again = decide(forged, [record], ip="10.0.0.66", limiter=limiter)
        assert again.reason is Reason.RATE_LIMITED
        # Another address presenting the same (public) id is judged on its own merits.
        assert decide(forged, [record], ip="10.0.0.7", limiter=limiter).reason is Reason.BAD_SECRET

    def test_bucket_refills_over_time(self) -> None:
        limiter = FailureLimiter(burst=1, per_minute=60)
        assert limiter.consume("ip", NOW)
        assert not limiter.consume("ip", NOW + 0.5)
        assert limiter.consume("ip", NOW + 1.6)

    def test_memory_is_bounded(self) -> None:
        limiter = FailureLimiter(burst=1, per_minute=1, max_ips=10)
        for i in range(100):
            limiter.consume(f"10.0.{i}.1", NOW)
        assert len(limiter._buckets) == 10
        # The oldest were forgotten: their budget is fresh again.
        assert limiter.consume("10.0.0.1", NOW)

    def test_requests_without_an_address_are_not_limited(self) -> None:
        limiter = FailureLimiter(burst=1, per_minute=1)
        assert [decide("junk", [], ip=None, limiter=limiter).reason for _ in range(3)] == [
            Reason.MALFORMED] * 3

    def test_rejects_nonsense_settings(self) -> None:
        with pytest.raises(ValueError):
            FailureLimiter(burst=0, per_minute=1)



def test_a_request_names_its_protocol_only_when_it_views() -> None:
    with pytest.raises(ValueError, match="protocol"):
        AccessRequest("t", "cam1", Action.VIEW, None, "10.0.0.9", NOW)
    with pytest.raises(ValueError, match="protocol"):
        AccessRequest("t", None, Action.ADMIN, Protocol.WEBRTC, "10.0.0.9", NOW)


@pytest.mark.parametrize(("action", "protocol", "recorded"), [
    (Action.VIEW, Protocol.RTSP, "rtsp"), (Action.VIEW, Protocol.SNAPSHOT, "snapshot"),
    (Action.LIST, None, "api"), (Action.ADMIN, None, "admin")])
def test_the_audit_and_usage_record_what_earlier_releases_did(action, protocol, recorded) -> None:
    """Existing audit rows and usage counters say 'api' and 'admin': new ones must too."""
    req = AccessRequest("t", None, action, protocol, "10.0.0.9", NOW)
    assert req.recorded_protocol == recorded


# -- session admission (agent/access/sessions.py) -------------------------------------------

def _session(sid: str, ip: str, pending: bool = False) -> Session:
    return Session(sid, "tok", "cam1", "webrtc", ip, 0.0, lambda _r: None, pending=pending)


def test_admission_caps_overall_per_address_and_pending() -> None:
    reg = SessionRegistry(SessionLimits(max_total=6, max_per_ip=4, max_pending_per_ip=2))
    held = [reg.admit("10.0.0.1"), reg.admit("10.0.0.1")]
    assert all(isinstance(a, Admission) for a in held)
    refused = reg.admit("10.0.0.1")  # two still connecting from this address
    assert isinstance(refused, Refusal) and refused.status == 429
    assert refused.code == "too_many_pending_sessions" and refused.retry_after > 0
    for i, admission in enumerate(held):
        assert isinstance(admission, Admission)
        reg.add(_session(f"s{i}", "10.0.0.1", pending=True), admission=admission)
    assert isinstance(reg.admit("10.0.0.1"), Refusal)  # the sessions themselves are pending
    reg.connected("s0")
    reg.connected("s1")
    for i in range(2, 4):
        admission = reg.admit("10.0.0.1")
        assert isinstance(admission, Admission)
        reg.add(_session(f"s{i}", "10.0.0.1"), admission=admission)
    per_ip = reg.admit("10.0.0.1")
    assert isinstance(per_ip, Refusal) and per_ip.code == "too_many_sessions_from_address"
    other = [reg.admit("10.0.0.2"), reg.admit("10.0.0.2")]
    full = reg.admit("10.0.0.3")
    assert isinstance(full, Refusal) and full.status == 503 and full.code == "too_many_sessions"
    for admission in other:
        assert isinstance(admission, Admission)
        admission.release()
        admission.release()  # idempotent
    assert isinstance(reg.admit("10.0.0.3"), Admission)
    reg.remove("s3")
    assert isinstance(reg.admit("10.0.0.1"), Admission)
