"""The WS-Discovery bookkeeping without sockets: which answers a probe keeps, how the listener
dedupes, rate-limits and bounds a flood, and how interfaces are chosen."""

from __future__ import annotations

import tracemalloc

import pytest

from agent.discovery.wsd import (
    MAX_SEEN_IDS,
    AnnouncementFilter,
    DiscoveryError,
    ProbeCollector,
    multicast_interfaces,
)
from agent.discovery.wsd_xml import Bye, Hello
from tests.unit.test_wsd_xml import _match, envelope, reply

PROBE_ID = "urn:uuid:probe-1"


def answer(uuid: str, *, message_id: str, xaddr: str = "", version: str = "1",
           relates_to: str = PROBE_ID) -> bytes:
    return reply(_match(uuid=uuid, xaddrs=xaddr, version=version),
                 message_id=message_id, relates_to=relates_to)


def hello(uuid: str, message_id: str) -> bytes:
    return envelope(_match(uuid=uuid).replace("d:ProbeMatch>", "d:Hello>"),
                    message_id=message_id, relates_to="")


def bye(uuid: str, message_id: str) -> bytes:
    body = (f"<d:Bye><a:EndpointReference><a:Address>{uuid}</a:Address>"
            "</a:EndpointReference></d:Bye>")
    return envelope(body, message_id=message_id, relates_to="")


# -- ProbeCollector ----------------------------------------------------------------------------


def test_collector_keeps_only_answers_to_its_own_probe() -> None:
    collector = ProbeCollector(PROBE_ID)
    assert collector.feed(answer("urn:uuid:a", message_id="m1"), "10.0.0.1")
    assert not collector.feed(answer("urn:uuid:b", message_id="m2",
                                     relates_to="urn:uuid:other"), "10.0.0.2")
    # Quotes our id somewhere but not as RelatesTo: still not an answer.
    sneaky = answer("urn:uuid:c", message_id=PROBE_ID, relates_to="urn:uuid:other")
    assert not collector.feed(sneaky, "10.0.0.3")
    assert not collector.feed(hello("urn:uuid:d", PROBE_ID), "10.0.0.4")
    assert [e.uuid for e in collector.endpoints()] == ["urn:uuid:a"]
    assert collector.dropped == 3


def test_collector_ignores_repeats_of_one_answer() -> None:
    collector = ProbeCollector(PROBE_ID)
    first = answer("urn:uuid:a", message_id="m1", xaddr="http://10.0.0.1/onvif")
    assert collector.feed(first, "10.0.0.1")
    assert not collector.feed(first, "10.0.0.1")  # SOAP-over-UDP repeats the same MessageID
    assert len(collector.endpoints()) == 1


def test_collector_merges_one_device_seen_on_two_interfaces() -> None:
    collector = ProbeCollector(PROBE_ID)
    collector.feed(answer("urn:uuid:a", message_id="m1", xaddr="http://10.0.0.1/onvif"),
                   "10.0.0.1")
    collector.feed(answer("urn:uuid:a", message_id="m2", xaddr="http://192.168.1.1/onvif",
                          version="3"), "192.168.1.1")
    (endpoint,) = collector.endpoints()
    assert endpoint.xaddrs == ("http://10.0.0.1/onvif", "http://192.168.1.1/onvif")
    assert endpoint.metadata_version == 3  # the newer metadata wins, XAddrs are kept from both


def test_collector_keeps_a_bounded_number_of_endpoints() -> None:
    collector = ProbeCollector(PROBE_ID, max_endpoints=5)
    for i in range(50):
        collector.feed(answer(f"urn:uuid:{i}", message_id=f"m{i}"), "10.0.0.1")
    assert [e.uuid for e in collector.endpoints()] == [f"urn:uuid:{i}" for i in range(5)]


# -- AnnouncementFilter ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_filter_passes_new_hello_and_bye_once() -> None:
    flt = AnnouncementFilter()
    got = flt.feed(hello("urn:uuid:a", "h1"), "10.0.0.1")
    assert isinstance(got, Hello) and got.endpoint.uuid == "urn:uuid:a"
    assert flt.feed(hello("urn:uuid:a", "h1"), "10.0.0.1") is None  # a repeat
    assert flt.feed(bye("urn:uuid:a", "b1"), "10.0.0.1") == Bye("b1", "urn:uuid:a", "10.0.0.1")
    assert flt.feed(answer("urn:uuid:x", message_id="p"), "10.0.0.1") is None  # not an announcement
    assert flt.feed(b"\x00" * 100, "10.0.0.1") is None
    assert flt.feed(b"Hello" * 20000, "10.0.0.1") is None
    stats = flt.stats
    assert (stats.received, stats.hellos, stats.byes, stats.duplicates) == (6, 1, 1, 1)
    assert (stats.garbage, stats.oversized) == (2, 1)


def test_filter_rate_limit_drops_a_burst_and_recovers() -> None:
    clock = FakeClock()
    flt = AnnouncementFilter(rate=10.0, burst=20, clock=clock)
    passed = [flt.feed(hello(f"urn:uuid:{i}", f"h{i}"), "10.0.0.1") for i in range(100)]
    assert sum(p is not None for p in passed) == 20
    assert flt.stats.rate_limited == 80
    clock.now += 1.0  # 10 more tokens
    passed = [flt.feed(hello(f"urn:uuid:n{i}", f"n{i}"), "10.0.0.1") for i in range(15)]
    assert sum(p is not None for p in passed) == 10


def test_filter_memory_is_bounded_under_a_flood() -> None:
    flt = AnnouncementFilter(rate=1e9, burst=10**9)
    first = hello("urn:uuid:0", "urn:uuid:h0")

    def flood(start: int, count: int) -> None:
        for i in range(start, start + count):
            flt.feed(hello(f"urn:uuid:{i}", f"urn:uuid:h{i}"), "10.0.0.1")

    tracemalloc.start()
    try:
        flood(0, 2 * MAX_SEEN_IDS)  # the table fills to its limit and starts forgetting
        filled, _ = tracemalloc.get_traced_memory()
        flood(2 * MAX_SEEN_IDS, 4 * MAX_SEEN_IDS)
        flooded, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = flooded - filled
    print(f"after {2 * MAX_SEEN_IDS} Hellos {filled / 1024:.0f} KiB traced; "
          f"{4 * MAX_SEEN_IDS} more grew it by {growth / 1024:.1f} KiB")
    assert flt.stats.hellos == 6 * MAX_SEEN_IDS
    assert flt.stats.tracked_ids == MAX_SEEN_IDS
    # Unbounded, 8192 more ids would keep ~1.4 MB (about 180 bytes each).
    assert growth < 64 * 1024
    # The oldest ids were forgotten: a very late repeat is delivered again (bounded memory
    # wins over perfect dedupe; a Hello twice is harmless to the catalog).
    assert flt.feed(first, "10.0.0.1") is not None


# -- interfaces --------------------------------------------------------------------------------


def test_explicit_loopback_by_name_and_address() -> None:
    assert "127.0.0.1" in multicast_interfaces(["lo"])
    assert multicast_interfaces(["127.0.0.1", "127.0.0.1"]) == ["127.0.0.1"]


@pytest.mark.parametrize(("names", "message"), [
    (["no-such-if0"], "no interface named 'no-such-if0'"),
    (["192.0.2.77"], "192.0.2.77 is not an IPv4 address of this machine"),
])
def test_unknown_interfaces_are_a_clear_error(names: list[str], message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        multicast_interfaces(names)
