"""Doctor's judgements and output, without I/O: ICE addresses, codecs, skew, exit status."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.access.tokens import Kind, generate
from agent.cli.doctor import exit_status, render
from agent.config import Config, RtspSection
from agent.doctor.cameras import judge_codec
from agent.doctor.local import Daemon, Interface, judge_ice, judge_rtsp
from agent.doctor.model import Report, Status, result
from agent.doctor.relay import judge_skew
from agent.rtsp.protocol import SERVER_NAME

LAN = Interface("eth0", ["192.168.1.20", "fd00::20"])
LO = Interface("lo", ["127.0.0.1", "::1"])
DOCKER = Interface("docker0", ["172.17.0.1"])
WIFI = Interface("wlan0", ["192.168.7.3"])


@pytest.mark.parametrize(("configured", "nics", "status", "words"), [
    (None, [LO, LAN], Status.OK, "192.168.1.20, fd00::20"),
    (None, [LO], Status.FAIL, "no address but loopback"),
    (None, [LO, LAN, DOCKER], Status.WARN, "docker0"),
    (None, [LO, LAN, WIFI], Status.INFO, "pin the one it reaches"),
    (["192.168.1.20"], [LO, LAN, DOCKER], Status.OK, "configured"),
    (["10.9.9.9"], [LO, LAN], Status.FAIL, "10.9.9.9 is not an address of this machine"),
    ([], [LO, LAN], Status.FAIL, "no address"),  # webrtc.interfaces named an empty interface
])
def test_ice(configured: list[str] | None, nics: list[Interface], status: Status,
             words: str) -> None:
    got, finding, fix = judge_ice(configured, nics)
    assert got is status
    assert words in finding
    assert (fix is not None) == (status in (Status.WARN, Status.FAIL))
    if fix:
        assert "webrtc.host_addresses" in fix


@pytest.mark.parametrize(("codec", "status"), [
    ("h264", Status.OK), ("hevc", Status.WARN), ("mjpeg", Status.FAIL), (None, Status.FAIL),
])
def test_codec(codec: str | None, status: Status) -> None:
    r = judge_codec("camera door", codec, "the camera's stream")
    assert r.status is status
    if codec == "h264":  # which viewers play it
        assert all(w in r.finding for w in ("WebRTC (all browsers)", "HLS", "RTSP"))
    if status is Status.WARN:  # H.265: a warning with the fix, not a failure
        assert all(w in r.finding for w in ("RTSP", "HLS (Safari", "Chrome 136+", "501"))
        assert r.fix and "substream to H.264" in r.fix and "send_path" in r.fix


@pytest.mark.parametrize(("skew", "status", "words"), [
    (0.2, Status.OK, "within"), (-29.0, Status.OK, "within"),
    (31.0, Status.WARN, "31 s ahead of"), (-120.0, Status.WARN, "120 s behind"),
])
def test_skew(skew: float, status: Status, words: str) -> None:
    r = judge_skew(skew, "its welcome")
    assert r.status is status and words in r.finding
    assert (r.fix is not None) == (status is Status.WARN)


def test_results_never_carry_secrets() -> None:
    token = generate(Kind.PUBLISHER).text
    r = result("camera door", "rtsp", Status.FAIL,
               "rtsp://admin:hunter2@10.0.0.5/s refused", f"token {token} was sent")
    assert "hunter2" not in r.finding and token not in (r.fix or "")
    assert "10.0.0.5/s" in r.finding


def test_exit_status_and_rendering() -> None:
    ok = result("agent", "disk", Status.OK, "9 GB free")
    warn = result("camera door", "codec", Status.WARN, "H.265", "use H.264")
    fail = result("camera door", "tcp", Status.FAIL, "refused", "check the port")
    assert exit_status(Report("c.yaml", [ok, warn])) == 0
    assert exit_status(Report("c.yaml", [ok, warn, fail])) == 1
    assert exit_status(Report("c.yaml", [fail], config_error=True)) == 2
    text = render(Report("c.yaml", [ok, warn, fail]))
    lines = text.splitlines()
    assert lines.index("camera door") > lines.index("agent")
    assert any(line.split()[:2] == ["fail", "tcp"] for line in lines)
    assert any("fix: check the port" in line for line in lines)
    assert "fix: use H.264" in text
    assert lines[-1] == "1 ok, 1 warn, 1 fail: a check failed"


def test_rtsp_port_judged_free_ours_taken_or_off() -> None:
    config = Config()
    running, stopped = Daemon(True, {"agent_id": config.agent.id}), Daemon(False)
    assert judge_rtsp(config, running, SERVER_NAME, None).status is Status.OK
    other = judge_rtsp(config, running, "GStreamer RTSP server", None)
    assert other.status is Status.WARN and "GStreamer" in other.finding
    assert judge_rtsp(config, running, None, None).status is Status.WARN
    assert judge_rtsp(config, stopped, None, (True, "free")).status is Status.OK
    taken = judge_rtsp(config, stopped, None, (False, "another program already listens on it"))
    assert taken.status is Status.FAIL and "rtsp.listen" in (taken.fix or "")
    off = replace(config, rtsp=RtspSection(enabled=False))
    assert judge_rtsp(off, stopped, None, None).status is Status.INFO
