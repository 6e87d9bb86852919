"""The discovery catalog (merging what WS-Discovery and mDNS saw) and the adopted-camera store."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.access.audit import verify
from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.discovery.adopted import MAX_SIGHTINGS, AdoptedCamera, AdoptedCameras
from agent.discovery.catalog import Sighting, camera_id_for, find, host_of, merge, short_id
from agent.errors import NotFoundError, UsageError
from agent.state.database import StateDB
from agent.state.db import db_path


@dataclass(frozen=True)
class Ep:
    uuid: str
    xaddrs: tuple[str, ...]
    source: str
    name: str | None = None
    hardware: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class Svc:
    instance: str
    addresses: tuple[str, ...]
    rtsp_url: str | None
    service_type: str = "_rtsp._tcp.local."
    name: str = field(default="")


HIK = Ep("urn:uuid:hik-1", ("http://192.168.1.64/onvif/device_service",), "192.168.1.64",
         name="Front door", hardware="DS-2CD2043G2")


def test_a_camera_found_both_ways_is_one_entry_with_the_onvif_identity() -> None:
    svc = Svc("Front door._rtsp._tcp.local.", ("192.168.1.64",), "rtsp://192.168.1.64:554/")
    (entry,) = merge([HIK], [svc])
    assert entry.identity == "urn:uuid:hik-1"
    assert entry.methods == ["onvif", "mdns"]
    assert entry.mdns == ["Front door._rtsp._tcp.local."]
    assert entry.rtsp_urls == ["rtsp://192.168.1.64:554/"]
    assert entry.addresses == ["192.168.1.64"]


def test_an_mdns_only_camera_is_known_by_its_smallest_instance_name() -> None:
    axis = Svc("AXIS M3106._axis-video._tcp.local.", ("192.168.1.70",),
               "rtsp://192.168.1.70:554/axis-media/media.amp", "_axis-video._tcp.local.",
               "AXIS M3106")
    rtsp = Svc("AXIS M3106._rtsp._tcp.local.", ("192.168.1.70",), "rtsp://192.168.1.70:554/")
    for order in ([axis, rtsp], [rtsp, axis]):
        (entry,) = merge([], order)
        assert entry.identity == "AXIS M3106._axis-video._tcp.local."
        assert entry.methods == ["mdns"]
        assert len(entry.rtsp_urls) == 2


def test_different_cameras_stay_apart_and_are_listed_by_name() -> None:
    other = Ep("urn:uuid:dahua-2", ("http://192.168.1.65/onvif/device_service",),
               "192.168.1.65", name="Back yard")
    lone = Svc("Garage._rtsp._tcp.local.", ("192.168.1.80",), "rtsp://192.168.1.80/", name="Garage")
    entries = merge([HIK, other], [lone])
    assert [e.name for e in entries] == ["Back yard", "Front door", "Garage"]


def test_the_same_endpoint_on_two_interfaces_merges_its_addresses() -> None:
    again = Ep("urn:uuid:hik-1", ("http://10.0.0.64/onvif/device_service",), "10.0.0.64")
    (entry,) = merge([HIK, again], [])
    assert entry.xaddrs == [HIK.xaddrs[0], again.xaddrs[0]]
    assert entry.addresses == ["192.168.1.64", "10.0.0.64"]


@pytest.mark.parametrize("wanted", [short_id("urn:uuid:hik-1"), "urn:uuid:hik-1",
                                    "192.168.1.64"])
def test_find_accepts_what_an_installer_may_type(wanted: str) -> None:
    (entry,) = merge([HIK], [])
    assert find([entry], wanted) is entry
    assert find([entry], "d0000000") is None


def test_short_ids_are_stable_and_distinct() -> None:
    assert short_id("urn:uuid:a") == short_id("urn:uuid:a")
    assert short_id("urn:uuid:a") != short_id("urn:uuid:b")
    assert len(short_id("x")) == 8 and short_id("x").startswith("d")


@pytest.mark.parametrize(("name", "taken", "expected"), [
    ("Front door", [], "front-door"),
    ("Front door", ["front-door"], "front-door-2"),
    ("Front door", ["front-door", "front-door-2"], "front-door-3"),
    ("Кухня / 1", [], "1"),
    (None, [], f"cam-{short_id('urn:uuid:x')[1:]}"),
    ("   ", [], f"cam-{short_id('urn:uuid:x')[1:]}"),
    ("A" * 100, [], "a" * 56),
])
def test_camera_ids_come_from_the_name(name: str | None, taken: list[str],
                                       expected: str) -> None:
    assert camera_id_for(Sighting("urn:uuid:x", name=name), taken) == expected


def test_sightings_survive_a_round_trip_through_json_and_ignore_unknown_keys() -> None:
    (entry,) = merge([HIK], [])
    data = {**entry.to_dict(), "from_a_newer_agent": 1}
    assert Sighting.from_dict(data) == entry


@pytest.mark.parametrize(("url", "host"), [
    ("http://192.168.1.64/onvif/device_service", "192.168.1.64"),
    ("http://[fe80::1]:8080/x", "fe80::1"),
    ("http://[broken/x", None),
])
def test_host_of(url: str, host: str | None) -> None:
    assert host_of(url) == host


# -- the adopted-camera store -----------------------------------------------------------------


@pytest.fixture
def adopted(tmp_path: Path):
    store = TokenStore(StateDB(db_path(tmp_path)), Site("site1", "acme"), 10, lambda: ())
    yield AdoptedCameras(store.db, tmp_path)
    store.close()


DOOR = AdoptedCamera(id="door", identity="urn:uuid:hik-1", method="onvif",
                     source="rtsp://192.168.1.64:554/Streaming/Channels/101", name="Front door",
                     username="admin", xaddr="http://192.168.1.64/onvif/device_service")


def test_adopting_keeps_the_password_in_a_private_file_and_audits(adopted: AdoptedCameras,
                                                                   tmp_path: Path) -> None:
    adopted.add(DOOR, "pw-123", taken=["demo"], actor="cli", now=100.0)
    (camera,) = adopted.all()
    assert camera.id == "door" and camera.adopted_at == 100.0
    secret = adopted.password_file("door")
    assert secret.read_text() == "pw-123"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert adopted.credentials.stat().st_mode & 0o777 == 0o700
    config = adopted.config(camera)
    assert config.password_file == secret and config.username == "admin"
    assert "pw-123" not in repr(config)
    conn = sqlite3.connect(db_path(tmp_path))
    assert "pw-123" not in "".join(str(r) for r in conn.execute("SELECT * FROM adopted_cameras"))
    events = [r[0] for r in conn.execute("SELECT event FROM audit ORDER BY seq")]
    assert events == ["camera.adopted"]
    conn.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"id": "demo"}, "already used in the config file"),
    ({"id": "bad id!"}, "must be 1-64"),
    ({"identity": "urn:uuid:other"}, "already adopted"),
    ({"id": "door2"}, "already adopted as 'door'"),
])
def test_adoption_refuses_clashes_and_changes_nothing(adopted: AdoptedCameras,
                                                      change: dict[str, str],
                                                      message: str) -> None:
    adopted.add(DOOR, "pw", taken=["demo"], actor="cli", now=1.0)
    before = adopted.signature()
    with pytest.raises(UsageError, match=message):
        adopted.add(AdoptedCamera(**{**DOOR.__dict__, **change}), "other", taken=["demo"],
                    actor="cli", now=2.0)
    assert adopted.signature() == before
    assert adopted.password_file("door").read_text() == "pw"


def test_a_failed_password_write_leaves_no_row(adopted: AdoptedCameras, tmp_path: Path) -> None:
    adopted.credentials.write_text("not a directory")  # mkdir will fail
    with pytest.raises(OSError):
        adopted.add(DOOR, "pw", taken=[], actor="cli", now=1.0)
    assert adopted.all() == []


def test_move_and_remove(adopted: AdoptedCameras) -> None:
    adopted.add(DOOR, "pw", taken=[], actor="cli", now=1.0)
    before = adopted.signature()
    adopted.moved("door", "rtsp://192.168.1.99:554/Streaming/Channels/101",
                  "http://192.168.1.99/onvif/device_service", now=5.0,
                  detail={"from": "192.168.1.64", "to": "192.168.1.99"})
    assert adopted.signature() != before
    moved = adopted.by_identity("urn:uuid:hik-1")
    assert moved is not None and moved.source.startswith("rtsp://192.168.1.99")
    adopted.remove("door", actor="cli", now=6.0)
    assert adopted.all() == [] and not adopted.password_file("door").exists()
    with pytest.raises(NotFoundError):
        adopted.remove("door", actor="cli")
    with pytest.raises(NotFoundError):
        adopted.get("door")


def test_adopting_without_credentials_writes_no_file(adopted: AdoptedCameras) -> None:
    camera = AdoptedCamera(id="garage", identity="Garage._rtsp._tcp.local.", method="mdns",
                           source="rtsp://192.168.1.80/")
    adopted.add(camera, None, taken=[], actor="cli")
    assert not adopted.password_file("garage").exists()
    assert adopted.config(adopted.get("garage")).password_file is None


def test_the_audit_chain_stays_verifiable(adopted: AdoptedCameras, tmp_path: Path) -> None:
    adopted.add(DOOR, "pw", taken=[], actor="cli", now=1.0)
    adopted.moved("door", "rtsp://10.0.0.2/", None, now=2.0)
    adopted.remove("door", actor="cli", now=3.0)
    conn = sqlite3.connect(db_path(tmp_path))
    result = verify(conn)
    conn.close()
    assert result.ok and result.checked == 3


def test_the_sightings_cache_is_bounded(adopted: AdoptedCameras) -> None:
    adopted.remember(((f"id-{i}", {"identity": f"id-{i}"}) for i in range(MAX_SIGHTINGS + 10)),
                     now=1.0)
    adopted.remember([("newest", {"identity": "newest"})], now=2.0)
    cached = adopted.sightings()
    assert len(cached) == MAX_SIGHTINGS
    assert cached[0] == ({"identity": "newest"}, 2.0)
