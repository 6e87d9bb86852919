"""`cameras adopt` of an ONVIF camera whose main stream is H.265 (the Dahua fixture: Profile000
H.265 1920x1080 listed first, Profile001 H.264 704x576): the H.264 profile is taken and the
output says why; an explicit --profile still wins. A real ONVIF device (tests/support/
onvif_device.py, a subprocess on loopback) answers; the sighting is put in the cache by hand
(discovery is off: nothing leaves the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.discovery.adopted import AdoptedCameras
from agent.discovery.catalog import Sighting, short_id
from agent.discovery.scan import adopt_choice
from agent.state.database import StateDB
from agent.state.db import db_path
from tests.conftest import write_secret
from tests.support.netns import free_port

USER = "installer"
PASSWORD = "c0rrect-h0rse"  # a camera password, not a token
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dahua(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    password_file = tmp_path / "camera.password"
    write_secret(password_file, PASSWORD + "\n")
    closed = free_port()  # the stream host: nothing listens (adopt's RTSP question fails fast)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.onvif_device", "--model", "dahua",
         "--port", str(free_port()), "--user", USER, "--password-file", str(password_file),
         "--stream-host", f"127.0.0.1:{closed}"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY "), line
        yield line.split()[1], password_file
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.fixture
def cli(run_cli, monkeypatch: pytest.MonkeyPatch, state_dir: Path,
        dahua: tuple[str, Path]):
    monkeypatch.setenv("THERELAY_DISCOVERY_ONVIF", "false")
    monkeypatch.setenv("THERELAY_DISCOVERY_MDNS", "false")
    xaddr, _ = dahua
    sighting = Sighting("urn:uuid:dahua-1", methods=["onvif"], name="Gate",
                        addresses=["127.0.0.1"], xaddrs=[xaddr])
    store = TokenStore(StateDB(db_path(state_dir)), Site("site1", "acme"), 10, lambda: ())
    AdoptedCameras(store.db, state_dir).remember([(sighting.identity, sighting.to_dict())])
    store.close()
    return run_cli


def test_adopt_takes_the_h264_profile_over_a_first_and_larger_h265_one(
        cli, dahua: tuple[str, Path]) -> None:
    _, password_file = dahua
    result = cli("cameras", "adopt", short_id("urn:uuid:dahua-1"), "--user", USER,
                 "--password-file", str(password_file), "--id", "gate")
    assert result.code == 0, result.err
    assert "subtype=1" in result.out  # Profile001, the H.264 substream
    assert ("profile 'Profile001' (H.264) chosen over 'Profile000' (H.265): browsers play "
            "H.264 over WebRTC") in result.out
    assert "--profile Profile000" in result.out and PASSWORD not in result.out


def test_an_explicit_profile_still_wins_and_json_says_nothing_to_note(
        cli, dahua: tuple[str, Path]) -> None:
    _, password_file = dahua
    result = cli("cameras", "adopt", short_id("urn:uuid:dahua-1"), "--user", USER,
                 "--password-file", str(password_file), "--id", "gate", "--profile",
                 "Profile000", "--json")
    assert result.code == 0, result.err
    adopted = json.loads(result.out)["adopted"]
    assert "subtype=0" in adopted["source"] and adopted["profile"] == "Profile000"
    assert adopted["profile_note"] is None


def test_discover_lists_which_profile_adopt_takes_and_why() -> None:
    profiles = [
        {"token": "Profile000", "name": "Profile000", "encoding": "H265", "width": 1920,
         "height": 1080, "fps": 1.0, "bitrate_kbps": 1536, "stream_uri": "rtsp://a/0",
         "snapshot_uri": None},
        {"token": "Profile001", "name": "Profile001", "encoding": "H264", "width": 704,
         "height": 576, "fps": 15.0, "bitrate_kbps": 512, "stream_uri": "rtsp://a/1",
         "snapshot_uri": None},
    ]
    token, note = adopt_choice(profiles) or ("", None)
    assert token == "Profile001" and note is not None and "chosen over 'Profile000'" in note
    only_h265 = adopt_choice(profiles[:1])
    assert only_h265 is not None and only_h265[0] == "Profile000"
    assert "no H.264 stream" in (only_h265[1] or "") and "Chrome 136+" in (only_h265[1] or "")
    assert adopt_choice([{**profiles[0], "encoding": "JPEG"}]) is None
