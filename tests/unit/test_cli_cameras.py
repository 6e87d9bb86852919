"""`discover` and `cameras list|adopt|remove` without a network: discovery switched off, the
sightings cache filled by hand (the namespace tests in tests/integration/test_discovery.py
cover the real peers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.access.db import db_path
from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.discovery.adopted import AdoptedCameras
from agent.discovery.catalog import Sighting, short_id
from tests.conftest import write_secret

GARAGE = Sighting("Garage._rtsp._tcp.local.", methods=["mdns"], name="Garage",
                  addresses=["192.0.2.80"], mdns=["Garage._rtsp._tcp.local."],
                  rtsp_urls=["rtsp://192.0.2.80:554/live"])


@pytest.fixture
def cli(run_cli, monkeypatch: pytest.MonkeyPatch, state_dir: Path):
    monkeypatch.setenv("THERELAY_DISCOVERY_ONVIF", "false")  # nothing leaves the machine
    monkeypatch.setenv("THERELAY_DISCOVERY_MDNS", "false")
    store = TokenStore(db_path(state_dir), Site("site1", "acme"), 10, lambda: ())
    AdoptedCameras(store, state_dir).remember([(GARAGE.identity, GARAGE.to_dict())])
    store.close()
    return run_cli


def test_list_shows_the_config_cameras(cli) -> None:
    result = cli("cameras", "list", "--json")
    assert result.code == 0
    assert json.loads(result.out)["cameras"][0] == {
        "id": "demo", "name": "Test pattern", "from": "config", "source": "testsrc://",
        "username": None}


def test_discover_with_nothing_to_look_with_says_so(cli) -> None:
    result = cli("discover")
    assert result.code == 0 and "no camera answered" in result.out
    assert cli("discover", "--timeout", "0").code == 2


def test_adopt_from_the_cache_then_token_then_remove(cli, state_dir: Path) -> None:
    secret = state_dir.parent / "garage.password"
    write_secret(secret, "pw-garage\n")
    result = cli("cameras", "adopt", short_id(GARAGE.identity), "--user", "viewer",
                 "--password-file", str(secret))
    assert result.code == 0, result.err
    assert "as camera 'garage'" in result.out and "pw-garage" not in result.out
    stored = state_dir / "camera-credentials" / "garage"
    assert stored.read_text() == "pw-garage"  # trimmed like every secret file

    listed = json.loads(cli("cameras", "list", "--json").out)["cameras"]
    assert listed[1]["id"] == "garage" and listed[1]["from"] == "adopted (mdns)"
    assert listed[1]["source"] == "rtsp://192.0.2.80:554/live"

    # the adopted camera is a camera like any other for tokens
    assert cli("token", "create", "--camera", "garage", "--json").code == 0

    again = cli("cameras", "adopt", "192.0.2.80")
    assert again.code == 2 and "already adopted as 'garage'" in again.err

    assert cli("cameras", "remove", "garage").code == 0
    assert not stored.exists()
    assert cli("cameras", "remove", "garage").code == 1


def test_move_and_allow_basic(cli, state_dir: Path) -> None:
    """The installer confirms a move: the URL keeps port and path, the password goes by
    Digest only from then on, until Basic is allowed for the camera."""
    assert cli("cameras", "adopt", short_id(GARAGE.identity)).code == 0
    listed = json.loads(cli("cameras", "list", "--json").out)["cameras"]
    assert listed[1]["rtsp_auth"] == "auto" and listed[1]["move_held"] is None

    assert cli("cameras", "move", "garage", "192.0.2.81").code == 0
    garage = json.loads(cli("cameras", "list", "--json").out)["cameras"][1]
    assert garage["source"] == "rtsp://192.0.2.81:554/live"
    assert garage["rtsp_auth"] == "digest"
    assert cli("cameras", "allow-basic", "garage", "yes").code == 0
    assert json.loads(cli("cameras", "list", "--json").out)["cameras"][1]["rtsp_auth"] == "basic"

    stays = cli("cameras", "move", "garage", "192.0.2.81")  # where it is: a dismissal
    assert stays.code == 0 and "dismissed" in stays.out
    bad = cli("cameras", "move", "garage", "camera.local")
    assert bad.code == 2 and "not an IP address" in bad.err
    assert cli("cameras", "move", "nope", "192.0.2.9").code == 1
    events = json.loads(cli("audit", "--json", "--camera", "garage").out)
    assert {"camera.moved", "camera.rtsp_basic", "camera.move_dismissed"} <= {
        e["event"] for e in events}


@pytest.mark.parametrize(("args", "message"), [
    (["cameras", "adopt", "d0000000"], "no discovered camera 'd0000000'"),
    (["cameras", "adopt", "192.0.2.80", "--profile", "sub"], "--profile applies to ONVIF"),
    (["cameras", "adopt", "192.0.2.80", "--password-file", "x"], "--password-file needs --user"),
    (["cameras", "adopt", "192.0.2.80", "--id", "demo"], "already used in the config file"),
    (["cameras", "adopt", "192.0.2.80", "--id", "no spaces"], "must be 1-64"),
    (["cameras", "remove", "demo"], "built-in test pattern"),
])
def test_mistakes_are_explained_and_change_nothing(cli, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.code == 2 and message in result.err
    assert len(json.loads(cli("cameras", "list", "--json").out)["cameras"]) == 1
