"""The agent's mDNS side as a process of its own, for tests run inside a network namespace.

Sockets belong to the namespace of the process that opens them, so integration tests start
this module with ``ip netns exec <agent ns> python -m tests.support.mdns_agent ...``. It
browses with ``MdnsBrowser`` and optionally announces with ``AgentAdvertiser``, and speaks
JSON lines: events on stdout, commands on stdin (``services``, ``unadvertise``, ``quit``);
``--browse-once N`` runs the one-shot ``browse()`` instead and prints what it found.
The event loop runs in debug mode; a callback slower than 100 ms is reported as a ``slow``
event (the parent test fails on it, as tests/conftest.py does in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
from typing import Any

from agent import logs
from agent.discovery.mdns import (
    AgentAdvertiser,
    MdnsBrowser,
    MdnsService,
    browse,
    open_zeroconf,
)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def as_dict(service: MdnsService) -> dict[str, Any]:
    return {"instance": service.instance, "service_type": service.service_type,
            "name": service.name, "host": service.host, "addresses": list(service.addresses),
            "port": service.port, "txt": dict(service.txt), "rtsp_url": service.rtsp_url}


class _Slow(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " took " in message:
            emit("slow", message=message[:500])


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    logging.getLogger("asyncio").addHandler(_Slow(logging.WARNING))

    if args.browse_once:
        found = await browse(args.types, args.browse_once, interfaces=args.interface)
        emit("browsed", services=[as_dict(s) for s in found])
        return

    zc = open_zeroconf(args.interface)
    browser = MdnsBrowser(zc, args.types, lambda kind, svc: emit("change", kind=kind,
                                                                 service=as_dict(svc)),
                          max_services=args.max_services)
    await browser.start()
    advertiser: AgentAdvertiser | None = None
    if args.advertise_port:
        advertiser = AgentAdvertiser(zc, args.agent_id, "0.1.0-test", args.advertise_port,
                                     args.advertise_address)
        await advertiser.start()
        emit("advertised", instance=advertiser.instance)
    emit("ready")

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "services":
            services = browser.services
            emit("services", count=len(services), dropped=browser.dropped,
                 names=sorted(services)[:20],
                 max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        elif line == "unadvertise" and advertiser is not None:
            await advertiser.stop()
            emit("unadvertised")
        elif line == "quit":
            break
    await browser.stop()
    if advertiser is not None:
        await advertiser.stop()
    await zc.async_close()
    emit("bye")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--interface", action="append", required=True)
    parser.add_argument("--types", nargs="+", default=["_rtsp._tcp.local."])
    parser.add_argument("--max-services", type=int, default=1024)
    parser.add_argument("--agent-id", default="site1")
    parser.add_argument("--advertise-port", type=int, default=0)
    parser.add_argument("--advertise-address", action="append", default=[])
    parser.add_argument("--browse-once", type=float, default=0.0, help="browse() for N seconds")
    logs.configure(fmt="json", level="debug" if "--debug" in sys.argv else "info")
    asyncio.run(main(parser.parse_args([a for a in sys.argv[1:] if a != "--debug"])))
