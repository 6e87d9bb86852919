"""The rules that keep announcements and RTSP challenges from taking a camera's password."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.config import load
from agent.discovery import trust
from agent.discovery.adopted import AdoptedCamera, rtsp_auth_rule
from agent.errors import ConfigError
from agent.media.sources import rtsp_login
from agent.media.sources.rtsp_login import AuthDowngradeError, Challenge, send_credentials

LAN = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("10.0.0.0/30")]


@pytest.mark.parametrize(("host", "home"), [
    ("192.168.1.64", "192.168.1.0/24"),  # on one of our interfaces' networks
    ("10.0.0.2", "10.0.0.0/30"),
    ("172.16.5.9", "172.16.5.0/24"),  # routed: its /24
    ("2001:db8::7", "2001:db8::/64"),
    ("camera.local", None),  # a name can resolve anywhere: no home
])
def test_home_network(host: str, home: str | None) -> None:
    assert trust.home_network(host, LAN) == home


def test_allowed_networks_default_to_home_and_names_never_match() -> None:
    home = trust.allowed_networks([], "10.0.0.0/30")
    assert trust.in_networks("10.0.0.2", home)
    assert not trust.in_networks("10.0.0.5", home)
    assert not trust.in_networks("camera.local", home)
    assert not trust.in_networks(None, home)
    wide = trust.allowed_networks(["10.0.0.0/8", "fd00::/8"], "10.0.0.0/30")
    assert trust.in_networks("10.9.9.9", wide) and trust.in_networks("[fd00::1]", wide)
    assert trust.allowed_networks([], None) == []  # nothing known: nowhere


@pytest.mark.parametrize(("recorded", "seen", "same"), [
    (("S1", "88"), ("S1", "88"), True),
    (("S1", None), ("S1", "99"), True),  # only what was recorded must match
    (("S1", "88"), ("S2", "88"), False),
    (("S1", "88"), ("S1", "89"), False),
    (("S1", "88"), (None, None), False),
    ((None, None), ("S1", "88"), False),  # nothing recorded proves nothing
])
def test_same_device(recorded: tuple[str | None, str | None],
                     seen: tuple[str | None, str | None], same: bool) -> None:
    assert trust.same_device(trust.Identity(*recorded), trust.Identity(*seen)) is same


def test_follow_networks_are_validated(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("discovery:\n  follow_networks: ['192.168.1.0/24', 'lan']\n")
    with pytest.raises(ConfigError) as caught:
        load(config, environ={})
    assert "discovery.follow_networks[1]: 'lan' is not a network" in str(caught.value)
    config.write_text("cameras:\n  - {id: a, source: 'rtsp://192.0.2.1/x', rtsp_auth: clear}\n")
    with pytest.raises(ConfigError) as caught:
        load(config, environ={})
    assert ("cameras[0].rtsp_auth: must be one of auto, digest, basic, got text 'clear'"
            in str(caught.value))


DIGEST = Challenge(401, frozenset({"digest", "basic"}))
BASIC = Challenge(401, frozenset({"basic"}))
OPEN = Challenge(200, frozenset())
ODD = Challenge(401, frozenset({"negotiate"}))


@pytest.mark.parametrize(("rule", "before", "challenge", "send"), [
    ("auto", None, DIGEST, True),
    ("auto", None, BASIC, True),  # a camera that never asked for Digest
    ("auto", "basic", BASIC, True),
    ("digest", None, DIGEST, True),
    ("basic", "digest", BASIC, True),  # the installer allowed it
    ("auto", None, OPEN, True),  # may still ask at SETUP
    ("digest", None, OPEN, False),  # then it would get Basic: no credentials at all
    ("auto", "digest", OPEN, False),
    ("auto", None, ODD, False),  # nothing FFmpeg could answer safely
])
def test_when_ffmpeg_gets_the_credentials(rule: str, before: str | None,
                                         challenge: Challenge, send: bool) -> None:
    assert send_credentials(rule, before, challenge, "192.0.2.9") is send


@pytest.mark.parametrize(("rule", "before", "why"), [
    ("digest", None, "it moved since adoption"),
    ("auto", "digest", "it used Digest before"),
])
def test_a_basic_only_challenge_where_digest_is_due_is_refused(rule: str, before: str | None,
                                                               why: str) -> None:
    with pytest.raises(AuthDowngradeError) as caught:
        send_credentials(rule, before, BASIC, "192.0.2.9")
    assert why in str(caught.value) and "password was not sent" in str(caught.value)


def test_memory_never_forgets_digest() -> None:
    memory = rtsp_login.Memory()
    memory.note("cam", "basic")
    assert memory.get("cam") == "basic"
    memory.note("cam", "digest")
    memory.note("cam", "basic")  # the downgrade itself must not erase the record
    memory.note("cam", "none")
    assert memory.get("cam") == "digest"


@pytest.mark.parametrize(("fields", "rule"), [
    ({}, "auto"),
    ({"rtsp_auth": "digest"}, "digest"),
    ({"moved": True}, "digest"),
    ({"moved": True, "allow_basic": True}, "basic"),
    ({"rtsp_auth": "basic"}, "auto"),
])
def test_adopted_camera_rule(fields: dict[str, object], rule: str) -> None:
    camera = AdoptedCamera(id="c", identity="u", method="onvif", source="rtsp://192.0.2.1/",
                           **fields)  # type: ignore[arg-type]
    assert rtsp_auth_rule(camera) == rule
