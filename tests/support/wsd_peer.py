"""WS-Discovery peers for tests, each run as a process inside a test network namespace.

Sockets belong to the namespace of the process that creates them, so every side runs as
``python -m tests.support.wsd_peer MODE ...`` through ``NetnsPair.popen``. Each prints one
JSON object per line on stdout::

    publish NAME HARDWARE XADDR [UUID]
                                  the WSDiscovery package's ThreadedWSPublishing (a real
                                  third-party responder) publishes a dn:NetworkVideoTransmitter;
                                  prints {"published": uuid}; on a "stop" line in stdin it
                                  stops (sending Bye) and prints {"stopped": uuid}
    probe TIMEOUT [IFACE...]      agent.discovery.wsd.probe; prints {"endpoints": [...]} or
                                  {"error": message}
    listen [IFACE...]             agent.discovery.wsd.WsdListener; prints {"listening": [...]},
                                  then {"hello": {...}} / {"bye": uuid} per announcement and,
                                  on a "stats" line in stdin, {"stats": {..., "peak_kib": n}}
    flood GROUP COUNT UUID        blasts COUNT Hello / garbage datagrams at GROUP:3702, then
                                  repeats a valid Hello for UUID until killed
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import threading
import time
import tracemalloc
import uuid
from typing import Any


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def publish(name: str, hardware: str, xaddr: str, endpoint: str | None = None) -> None:
    from wsdiscovery import threaded  # type: ignore[import-untyped]
    from wsdiscovery.publishing import ThreadedWSPublishing  # type: ignore[import-untyped]
    from wsdiscovery.qname import QName  # type: ignore[import-untyped]
    from wsdiscovery.scope import Scope  # type: ignore[import-untyped]

    class NoIPv6(threaded.NetworkingThreadIPv6):  # type: ignore[misc]
        # Field notes: the package's IPv6 thread crashed on these machines. An OSError here is
        # what its start-up code catches to run IPv4 only.
        def __init__(self, observer: Any) -> None:
            raise OSError("IPv6 disabled for tests")

    threaded.NetworkingThreadIPv6 = NoIPv6
    publisher = ThreadedWSPublishing()
    publisher.start()
    if endpoint is not None:  # the same camera again, at another address
        publisher.uuid = endpoint
    types = [QName("http://www.onvif.org/ver10/network/wsdl", "NetworkVideoTransmitter", "dn")]
    scopes = [Scope(f"onvif://www.onvif.org/name/{name}"),
              Scope(f"onvif://www.onvif.org/hardware/{hardware}")]
    publisher.publishService(types=types, scopes=scopes, xAddrs=[xaddr])
    emit({"published": publisher.uuid})
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    # ThreadedWSPublishing.stop() resolves to ThreadedNetworking.stop (first in its MRO),
    # which ends the threads without a Bye: say Bye first. The networking thread sends what
    # is queued before it exits.
    publisher.clearLocalServices()
    publisher.stop()
    emit({"stopped": publisher.uuid})


async def run_probe(timeout: float, interfaces: list[str]) -> None:
    from agent.discovery.wsd import DiscoveryError, probe  # imported by main(), off the loop

    try:
        found = await probe(timeout, interfaces=interfaces or None)
    except DiscoveryError as exc:
        emit({"error": str(exc)})
        return
    emit({"endpoints": [dataclasses.asdict(e) for e in found]})


async def run_listener(interfaces: list[str]) -> None:
    from agent.discovery.wsd import DiscoveryError, WsdListener  # imported by main()

    tracemalloc.start()
    listener = WsdListener(
        lambda e: emit({"hello": dataclasses.asdict(e)}), lambda u: emit({"bye": u}),
        interfaces=interfaces or None,
    )
    try:
        await listener.start()
    except DiscoveryError as exc:
        emit({"error": str(exc)})
        return
    emit({"listening": listener.joined})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            break
        if line.strip() == "stats":
            _, peak = tracemalloc.get_traced_memory()
            emit({"stats": {**dataclasses.asdict(listener.stats), "peak_kib": peak // 1024,
                            "cpu_s": round(time.process_time(), 2)}})
    await listener.stop()


def flood(group: str, count: int, good_uuid: str) -> None:
    from tests.unit.test_wsd_xml import _match, envelope

    def hello(device: str, message_id: str) -> bytes:
        return envelope(_match(uuid=device, scopes="onvif://www.onvif.org/name/Flood")
                        .replace("d:ProbeMatch>", "d:Hello>"),
                        message_id=message_id, relates_to="")

    garbage = [b"Hello" * 200, b"<Bye>" + b"\xff" * 900, b"\x00" * 1400,
               hello("urn:uuid:broken", "x")[:-30], b"<!DOCTYPE x [<!ENTITY a 'Hello'>]><x>&a;</x>"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    target = (group, 3702)
    sent = 0
    for i in range(count):
        data = hello(f"urn:uuid:flood-{i}", f"urn:uuid:{uuid.uuid4()}") if i % 2 else \
            garbage[i % len(garbage)]
        try:
            sock.sendto(data, target)
            sent += 1
        except OSError:
            pass  # the send buffer is full: that is a flood
        if i % 50 == 49:
            # Unpaced, the receiver's kernel buffer overflows and drops nearly everything
            # before the listener sees it; paced, the listener itself takes the blow.
            time.sleep(0.002)
    emit({"flooded": sent})
    # A real device repeats its Hello; this one repeats until the test has seen it.
    while True:
        sock.sendto(hello(good_uuid, f"urn:uuid:{uuid.uuid4()}"), target)
        time.sleep(0.2)


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode in ("probe", "listen"):
        # Importing takes ~0.5 s: do it before the event loop runs, not inside a callback
        # (the tests run asyncio in debug mode, which reports any step over 100 ms).
        import agent.discovery.wsd  # noqa: F401
    if mode == "publish":
        publish(*args)
    elif mode == "probe":
        asyncio.run(run_probe(float(args[0]), args[1:]))
    elif mode == "listen":
        asyncio.run(run_listener(args))
    elif mode == "flood":
        flood(args[0], int(args[1]), args[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    threading.current_thread().name = "wsd_peer"
    main(sys.argv[1:])
