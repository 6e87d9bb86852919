"""The relay link's rules (docs/relay-protocol.md v1.1) on the sans-I/O state machine.

Table-driven from the document: retry schedules and their reset (section 3), the rejection
line (3), heartbeat bounds (1.3), publish sessions and their terminal states (1.4, 2, 3),
ids and acks (1.2), inventory updates (1.3), and bad input of every message type (1.2).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.relay import messages
from agent.relay.messages import ProtocolError, SyncedTokens, TokensSync
from agent.relay.protocol import (
    HEARTBEAT_MAX,
    MAX_SESSIONS,
    AckReceived,
    Action,
    ApplyRevoke,
    ApplySync,
    Close,
    Closed,
    End,
    Failed,
    LinkState,
    Refused,
    RelayProtocol,
    Send,
    StartPublish,
    StopPublish,
)

AGENT = "nvr1"
H = "ab" * 32


def proto(cameras: tuple[str, ...] = ("door",), seed: int = 1) -> RelayProtocol:
    return RelayProtocol(AGENT, "1.0", lambda cid: cid in cameras, rng=random.Random(seed))


def text(kind: str, mid: str = "m1", **fields: Any) -> str:
    return json.dumps({"type": kind, "id": mid, "ts": 1.0, **fields})


def welcome(agent_id: str = AGENT, permission: str = "publish", **extra: Any) -> str:
    return text("welcome", "w1", ack="h", account_id="acme", agent_id=agent_id,
                permission=permission, token_scope="agent", ice_servers=[],
                server_time=1.0, **extra)


def connect(p: RelayProtocol, now: float = 0.0, **kw: Any) -> list[Action]:
    p.connecting()
    p.hello(None, [])
    return feed(p, welcome(**kw), now)


def feed(p: RelayProtocol, raw: str | bytes, now: float = 0.0) -> list[Action]:
    try:
        event = messages.parse(raw)
    except ProtocolError as exc:
        return p.protocol_error(exc)
    return p.handle(event, now)


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    return [a.message for a in actions if isinstance(a, Send)]


# -- section 3: retry schedule ----------------------------------------------------------------

ORDINARY = [(0.5, 1), (0.5, 2), (0.5, 4), (0.5, 8), (0.5, 16), (0.5, 32), (0.5, 60), (0.5, 60)]
REJECTED = [(15, 30), (15, 60), (15, 120), (15, 240), (15, 300), (15, 300)]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("end", "bounds", "rejected"), [
    (Failed("connection refused"), ORDINARY, False),
    (Refused(503), ORDINARY, False),
    (Refused(429), ORDINARY, False),
    (Closed(1000), ORDINARY, False),
    (Closed(4009), ORDINARY, False),
    (Closed(4008), ORDINARY, False),
    (Closed(None), ORDINARY, False),
    (Refused(401, "token_revoked"), REJECTED, True),
    (Refused(401), REJECTED, True),
    (Refused(403), REJECTED, True),
    (Refused(426, "version_unsupported"), REJECTED, True),
    (Closed(4001), REJECTED, True),
    (Closed(4003), REJECTED, True),
    (Closed(4006), REJECTED, True),
])
def test_each_kind_of_failure_follows_its_schedule(end: End, bounds: list[tuple[float, float]],
                                                  rejected: bool, seed: int) -> None:
    p = proto(seed=seed)
    for low, high in bounds:
        p.connecting()
        retry = p.connection_ended(end, 0.0)
        assert (p.state is LinkState.REJECTED) is rejected
        assert low <= retry.delay <= high, (retry.attempt, retry.delay)


@pytest.mark.parametrize(("lasted", "resets"), [(0.1, False), (29.9, False), (30.0, True),
                                                (600.0, True)])
def test_counts_restart_only_after_a_30_s_session(lasted: float, resets: bool) -> None:
    p = proto()
    for _ in range(6):  # the ceiling is now 32 s
        p.connecting()
        p.connection_ended(Closed(1000), 0.0)
    connect(p, now=100.0)
    retry = p.connection_ended(Closed(1000), 100.0 + lasted)
    assert (retry.attempt == 1) is resets
    if resets:
        assert retry.delay <= 1


def test_a_relay_closing_right_after_welcome_is_not_hammered() -> None:
    p = proto(seed=7)
    total = 0.0
    for _n in range(30):  # 1000 right after every welcome (the independent relay's case)
        connect(p, now=total)
        total += p.connection_ended(Closed(1000), total + 0.01).delay
    assert total > 300  # 30 reconnects take minutes, not the 33 s of a flat 1.1 s


# -- section 3: the rejection line -----------------------------------------------------------

def _levels(ends: list[End]) -> list[tuple[str, str, str | None]]:
    p = proto()
    with capture_logs() as logs:
        for end in ends:
            p.connecting()
            p.connection_ended(end, 0.0)
    return [(e["event"], e["log_level"], e.get("reason")) for e in logs
            if e["event"] in ("relay_rejected_agent", "relay_unavailable")]


@pytest.mark.parametrize(("ends", "expected"), [
    # the independent relay's finding: a restart, then 401 token_revoked
    ([Closed(1001), Refused(401, "token_revoked")],
     [("relay_unavailable", "warning", None), ("relay_rejected_agent", "error", "token_revoked")]),
    ([Closed(4009), Failed("x"), Refused(401, "token_revoked")],
     [("relay_unavailable", "warning", None), ("relay_unavailable", "warning", None),
      ("relay_rejected_agent", "error", "token_revoked")]),
    ([Refused(401, "token_revoked"), Refused(401, "token_revoked")],
     [("relay_rejected_agent", "error", "token_revoked"),
      ("relay_rejected_agent", "debug", "token_revoked")]),
    ([Refused(401, "token_revoked"), Refused(503), Refused(401, "token_revoked")],
     [("relay_rejected_agent", "error", "token_revoked"), ("relay_unavailable", "warning", None),
      ("relay_rejected_agent", "error", "token_revoked")]),
    ([Refused(401, "token_expired"), Closed(4003)],
     [("relay_rejected_agent", "error", "token_expired"),
      ("relay_rejected_agent", "error", "token_revoked")]),
    ([Refused(401)], [("relay_rejected_agent", "error", "token_invalid")]),
    ([Closed(4005, by_agent=False)], [("relay_rejected_agent", "error", "agent_not_allowed")]),
])
def test_a_rejection_is_said_whenever_it_is_news(ends: list[End],
                                                 expected: list[tuple[str, str, str]]) -> None:
    assert _levels(ends) == expected


def test_a_rejection_carries_a_fix_and_the_next_try() -> None:
    p = proto()
    with capture_logs() as logs:
        p.connecting()
        retry = p.connection_ended(Refused(401, "token_revoked", "revoked"), 0.0)
    (line,) = logs
    assert "TheRelay Dashboard" in line["fix"] and line["retry_in_s"] == round(retry.delay, 1)
    assert p.state == "rejected" and p.last_error == "token_revoked"


# -- 1.3: welcome ----------------------------------------------------------------------------

def test_a_welcome_naming_another_agent_is_closed_4005_and_a_rejection() -> None:
    p = proto()
    actions = connect(p, agent_id="someone-else")
    assert actions == [Close(4005, "agent_not_allowed")] and p.welcome is None
    with capture_logs() as logs:
        retry = p.connection_ended(Closed(4005, by_agent=True), 1.0)
    assert p.state is LinkState.REJECTED
    assert retry.reason == "agent_not_allowed" and retry.delay >= 15
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["relay_rejected_agent"]


@pytest.mark.parametrize(("given", "used"), [(None, 20.0), (20, 20.0), (5, 5.0), (7.5, 7.5),
                                             (1, 5.0), (0, 5.0), (-3, 5.0), (10_000, 120.0)])
def test_heartbeat_follows_welcome_within_bounds(given: float | None, used: float) -> None:
    p = proto()
    assert p.heartbeat_s == 20.0  # before welcome
    connect(p, **({} if given is None else {"heartbeat_s": given}))
    assert p.heartbeat_s == used <= HEARTBEAT_MAX


@pytest.mark.parametrize("first", [
    text("tokens.sync", full=True, cursor="c", tokens=[]),
    text("welcome", account_id="a"),  # a welcome without its fields
    text("ping"),
])
def test_anything_but_a_valid_welcome_first_is_4009(first: str) -> None:
    p = proto()
    p.connecting()
    p.hello(None, [])
    assert feed(p, first) == [Close(4009, "protocol_error")]


def test_no_welcome_closes_4009_and_says_so() -> None:
    p = proto()
    p.connecting()
    assert p.no_welcome() == [Close(4009, "no welcome")]
    with capture_logs() as logs:
        p.connection_ended(Closed(4009, by_agent=True), 10.0)
    assert p.state is LinkState.DISCONNECTED and "sent no welcome within 10 s" in logs[0]["error"]


def test_the_agents_own_1009_is_named_as_its_own() -> None:
    p = proto()
    connect(p)
    assert feed(p, text("publish", session_id="x" * (2 << 20), camera_id="door",
                        whip_url="u")) == [Close(1009, "message too big")]
    retry = p.connection_ended(Closed(1009, by_agent=True), 1.0)
    assert retry.reason == "the agent closed the connection (1009 message_too_big)"


# -- 1.4, 2, 3: publish sessions -------------------------------------------------------------

def publish(sid: str = "s1", camera: str = "door", mid: str = "p1") -> str:
    return text("publish", mid, session_id=sid, camera_id=camera, whip_url="http://w/s1")


@pytest.mark.parametrize(("permission", "camera", "code"), [
    ("read", "door", "read_only"), ("publish", "gone", "unknown_camera")])
def test_a_refused_publish_gets_an_ack_and_a_failed_status(permission: str, camera: str,
                                                           code: str) -> None:
    p = proto()
    connect(p, permission=permission)
    ack, status = sent(feed(p, publish(camera=camera)))
    assert (ack["type"], ack["ack"], ack["ok"], ack["error"]["code"]) == ("ack", "p1", False, code)
    assert (status["type"], status["state"], status["error"]["code"]) == (
        "publish.status", "failed", code)
    assert p.publish_state("s1", "stopped") == []  # failed is final


def test_a_publish_runs_and_its_repeat_changes_nothing() -> None:
    p = proto()
    connect(p)
    first = feed(p, publish())
    assert isinstance(first[1], StartPublish) and sent(first)[0]["ok"] is True
    assert feed(p, publish()) == [first[0]]  # the same id: the same answer, nothing started
    again = feed(p, publish(mid="p2"))  # another id for the running session: acked only
    assert [type(a) for a in again] == [Send] and sent(again)[0]["ok"] is True


def test_too_many_sessions_are_refused() -> None:
    p = proto()
    connect(p)
    for n in range(MAX_SESSIONS):
        assert isinstance(feed(p, publish(f"s{n}", mid=f"p{n}"))[1], StartPublish)
    ack, status = sent(feed(p, publish("one-more", mid="px")))
    assert ack["error"]["code"] == status["error"]["code"] == "too_many_sessions"


def test_unpublish_stops_a_running_session_and_is_acked_for_any() -> None:
    p = proto()
    connect(p)
    feed(p, publish())
    assert sent(p.publish_state("s1", "live"))[0]["state"] == "live"
    actions = feed(p, text("unpublish", "u1", session_id="s1"))
    assert sent(actions)[0]["ok"] is True and actions[1] == StopPublish("s1")
    assert sent(p.publish_state("s1", "stopped"))[0]["state"] == "stopped"
    assert p.publish_state("s1", "failed", ("ice_failed", "x")) == []  # one terminal state
    unknown = feed(p, text("unpublish", "u2", session_id="never"))
    assert [type(a) for a in unknown] == [Send] and sent(unknown)[0]["ok"] is True


def test_sessions_a_drop_ended_are_reported_stopped_after_the_next_welcome() -> None:
    p = proto()
    connect(p)
    feed(p, publish("s1", mid="p1"))
    feed(p, publish("s2", mid="p2"))
    p.publish_state("s1", "live")
    p.publish_state("s2", "failed", ("http_503", "no"))  # over before the drop: not repeated
    p.connection_ended(Closed(1001), 5.0)
    assert p.publish_state("s1", "live") == []  # a late report from a cancelled task
    (stopped,) = sent(connect(p, now=10.0))
    assert (stopped["session_id"], stopped["state"], stopped["error"]["code"]) == (
        "s1", "stopped", "channel_lost")
    p.connection_ended(Closed(1001), 11.0)
    (again,) = sent(connect(p, now=12.0))
    assert again == stopped  # repeated with the same id until acked (1.2)
    acked = feed(p, text("ack", "a1", ack=stopped["id"], ok=True))
    assert isinstance(acked[0], AckReceived) and acked[0].kind == "publish.status"
    p.connection_ended(Closed(1001), 13.0)
    assert sent(connect(p, now=14.0)) == []


# -- 1.2, 1.5: ids, acks, tokens -------------------------------------------------------------

def test_acks_for_unknown_ids_are_ignored_and_known_ones_delivered_once() -> None:
    p = proto()
    connect(p)
    assert feed(p, text("ack", "a1", ack="never-sent", ok=True)) == []
    usage = p.send(messages.envelope("usage", batch="b-1-2", events=[]))
    (got,) = feed(p, text("ack", "a2", ack=usage.message["id"], ok=True))
    assert isinstance(got, AckReceived) and got.kind == "usage"
    assert feed(p, text("ack", "a3", ack=usage.message["id"], ok=True)) == []


def test_tokens_sync_and_revoke_are_applied_then_acked_once() -> None:
    p = proto()
    connect(p)
    raw = text("tokens.sync", "t1", full=False, cursor="c-2", tokens=[])
    (apply,) = feed(p, raw)
    assert isinstance(apply, ApplySync)
    assert feed(p, raw) == []  # a repeat while it is being applied: ignored
    (ack,) = sent(p.sync_applied(apply.event))
    assert ack["cursor"] == "c-2" and ack["ok"] is True and "refused" not in ack
    assert sent(feed(p, raw)) == [ack]  # a repeat afterwards: the same answer
    # the ack is ready to carry per-token refusals
    other = TokensSync("t9", False, "c-3", SyncedTokens())
    assert sent(p.sync_applied(other, [{"id": "Ab3", "code": "x"}]))[0]["refused"] == [
        {"id": "Ab3", "code": "x"}]
    (revoke,) = feed(p, text("tokens.revoke", "r1", token_id="Ab3dE5gH7jK9", revoked_at=5))
    assert isinstance(revoke, ApplyRevoke)
    assert sent(p.revoke_applied(revoke.event))[0]["ack"] == "r1"


def test_a_failed_sync_is_acked_internal_and_may_come_again() -> None:
    p = proto()
    connect(p)
    raw = text("tokens.sync", "t1", full=True, cursor="c-2", tokens=[])
    (apply,) = feed(p, raw)
    assert isinstance(apply, ApplySync)
    assert sent(p.sync_failed(apply.event, "disk"))[0]["error"]["code"] == "internal"
    assert isinstance(feed(p, raw)[0], ApplySync)


def test_unknown_types_and_pings() -> None:
    p = proto()
    connect(p)
    (ack,) = sent(feed(p, text("brand.new", "n1")))
    assert ack["error"]["code"] == "unsupported"
    (pong,) = sent(feed(p, text("ping", "g1")))
    assert pong["type"] == "pong" and pong["ping"] == "g1"
    assert feed(p, text("pong", "g2", ping="x")) == []
    assert feed(p, welcome()) == [Close(4009, "protocol_error")]  # a second welcome
    assert feed(p, text("welcome", "w2")) == [Close(4009, "protocol_error")]  # even a bad one


# -- 1.3: inventory --------------------------------------------------------------------------

def cam(state: str = "online", fps: float | None = 15.0) -> dict[str, Any]:
    return {"id": "door", "name": "Door", "state": state, "error": None,
            "video": {"codec": "h264", "width": 320, "height": 240, "fps": fps},
            "audio": None}


@pytest.mark.parametrize(("then", "update"), [
    (cam(fps=15.2), None), (cam(fps=14.6), None), (cam(fps=15.9), None),
    (cam(fps=16.0), 16), (cam(fps=13.4), 13), (cam("offline", 15.0), 15),
    (cam("idle", None), None),
])
def test_fps_jitter_is_no_update(then: dict[str, Any], update: int | None) -> None:
    p = proto()
    (entry,) = p.hello(None, [cam(fps=15.04)])["cameras"]
    assert entry["video"]["fps"] == 15
    actions = sent(p.inventory([then]))
    if update is None and then["video"]["fps"] is not None:
        assert actions == []
    elif update is not None:
        assert actions[0]["cameras"][0]["video"]["fps"] == update
    else:
        assert actions[0]["cameras"][0]["video"]["fps"] is None
    assert sent(p.inventory([])) and sent(p.inventory([]))[0:] == []


# -- 1.2: bad input of every message type ----------------------------------------------------

VALID: dict[str, dict[str, Any]] = {
    "tokens.sync": {"full": True, "cursor": "c-1", "tokens": [
        {"id": "Ab3dE5gH7jK9", "kind": "access", "sha256": H, "last4": "99S2",
         "scope": "camera:door", "protocols": [], "expires_at": None, "revoked_at": None,
         "label": "x"}]},
    "tokens.revoke": {"token_id": "Ab3dE5gH7jK9", "revoked_at": 1.0},
    "publish": {"session_id": "s1", "camera_id": "door", "whip_url": "http://w/s1",
                "bearer": None},
    "unpublish": {"session_id": "s1"},
}
#: (type, field, missing is allowed)
FIELDS = [(kind, key, key in ("bearer", "revoked_at", "full"))
          for kind, fields in VALID.items() for key in fields]
LONG = "x" * 5000


@pytest.mark.parametrize(("kind", "key", "optional"), FIELDS)
@pytest.mark.parametrize("how", ["missing", "wrong type", "oversized"])
def test_every_field_of_every_acked_type(kind: str, key: str, optional: bool, how: str) -> None:
    p = proto()
    connect(p)
    fields = dict(VALID[kind])
    if how == "missing":
        del fields[key]
    elif how == "wrong type":
        fields[key] = {"a": 1} if not isinstance(fields[key], dict) else 7
    else:
        fields[key] = LONG if not isinstance(fields[key], list) else [LONG]
    actions = feed(p, text(kind, "bad1", **fields))
    numeric_or_flag = key in ("revoked_at", "full")
    if (how == "missing" and optional) or (how == "oversized" and numeric_or_flag):
        assert all(not isinstance(a, Close) for a in actions)  # accepted or 'invalid'
        return
    (ack,) = sent(actions)
    assert (ack["ack"], ack["ok"], ack["error"]["code"]) == ("bad1", False, "invalid")
    assert key in ack["error"]["message"] or "tokens[0]" in ack["error"]["message"]
    assert p.welcome is not None  # the connection stays


@pytest.mark.parametrize("key", ["account_id", "agent_id", "permission", "server_time",
                                 "ice_servers", "heartbeat_s"])
@pytest.mark.parametrize("how", ["missing", "wrong type", "oversized"])
def test_every_field_of_welcome(key: str, how: str) -> None:
    fields = json.loads(welcome(heartbeat_s=20))
    if how == "missing":
        del fields[key]
    elif how == "wrong type":
        fields[key] = "x" if key in ("server_time", "heartbeat_s") else 7
    else:
        fields[key] = LONG if key not in ("server_time", "heartbeat_s", "ice_servers") \
            else [{}] * 17 if key == "ice_servers" else 1e300
    p = proto()
    p.connecting()
    p.hello(None, [])
    actions = feed(p, json.dumps(fields))
    if (how == "missing" and key in ("ice_servers", "heartbeat_s")) \
            or (how == "oversized" and key in ("server_time", "heartbeat_s")):
        assert p.welcome is not None
        assert p.heartbeat_s <= HEARTBEAT_MAX
    else:
        assert actions == [Close(4009, "protocol_error")] and p.welcome is None


@pytest.mark.parametrize("raw", [
    text("ack", "a", ok=True), text("ack", "a", ack="x"), text("ack", "a", ack=7, ok=True),
    text("ack", "a", ack=LONG, ok=True), text("ping", "p", extra=LONG[:100]),
])
def test_bad_acks_and_pings_are_ignored(raw: str) -> None:
    p = proto()
    connect(p)
    assert all(not isinstance(a, Close) for a in feed(p, raw))


@pytest.mark.parametrize("raw", [
    b"\x00binary", "not json", "[1]", "", "{", '{"type": "ping"}', '{"id": "x"}',
    json.dumps({"type": 7, "id": "x"}), json.dumps({"type": "ping", "id": ""}),
    json.dumps({"type": "ping", "id": LONG}), json.dumps({"type": LONG, "id": "x"}),
    '{"type": "ping", "type": "pong", "id": "x"}',
    '{"type": "unpublish", "id": "x", "session_id": "a", "session_id": "b"}',
    '{"type": "tokens.sync", "id": "x", "cursor": "c", "tokens": [{"id": "a", "id": "b"}]}',
    '{"type": "ping", "id": "x"} trailing',
])
def test_broken_envelopes_close_4009(raw: str | bytes) -> None:
    p = proto()
    connect(p)
    assert feed(p, raw) == [Close(4009, "protocol_error")]


def test_a_big_tokens_sync_is_parsed_in_steps_and_others_are_limited() -> None:
    record = dict(VALID["tokens.sync"]["tokens"][0])
    tokens = [dict(record, id=f"T{n:011d}") for n in range(10_000)]
    raw = text("tokens.sync", "big", full=True, cursor="c-9", tokens=tokens)
    assert len(raw) > messages.MAX_MESSAGE
    steps, pauses = messages.parse_steps(raw), 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            event = done.value
            break
    assert isinstance(event, TokensSync) and len(event.tokens) == 10_000
    assert pauses >= 10_000 // messages.CHUNK
    bad = [*tokens[:5], dict(record, sha256="XX")]
    invalid = messages.parse(text("tokens.sync", "b", full=True, cursor="c", tokens=bad))
    assert isinstance(invalid, messages.Invalid) and "tokens[5]" in invalid.problem
    with pytest.raises(ProtocolError, match="larger than 1 MiB"):
        messages.parse(text("unpublish", "u", session_id="s", pad="x" * messages.MAX_MESSAGE))


def test_a_removed_camera_ends_its_sessions_and_refuses_new_ones() -> None:
    cameras = {"door", "yard"}
    p = RelayProtocol(AGENT, "1.0", lambda cid: cid in cameras, rng=random.Random(1))
    p.connecting()
    p.hello(None, [cam(), dict(cam(), id="yard")])
    feed(p, welcome())
    feed(p, publish("s1", camera="yard"))
    p.publish_state("s1", "live")
    cameras.discard("yard")
    update, stop = p.inventory([cam()])
    assert isinstance(update, Send) and update.message["removed"] == ["yard"]
    assert stop == StopPublish("s1", ("camera_removed", "camera 'yard' was removed from the "
                                                        "agent"))
    (status,) = sent(p.publish_state("s1", "stopped", stop.error))
    assert status["error"]["code"] == "camera_removed"
    assert p.inventory([cam()]) == []
    ack, failed = sent(feed(p, publish("s2", camera="yard", mid="p2")))
    assert ack["error"]["code"] == failed["error"]["code"] == "unknown_camera"


def test_a_silent_relay_is_closed_1011_and_said_so() -> None:
    p = proto()
    connect(p, heartbeat_s=5)
    assert p.heartbeat_lost() == [Close(1011, "keepalive ping timeout")]
    retry = p.connection_ended(Closed(1011, by_agent=True), 60.0)
    assert retry.reason == "no pong from the relay within 5 s" and p.state is LinkState.DISCONNECTED
