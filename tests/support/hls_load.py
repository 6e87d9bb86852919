"""Many blocking HLS playlist requests at once, from a process of their own (the tests' event
loop runs in debug mode, where opening 1,000 connections stalls it past its 0.25 s check).

    python -m tests.support.hls_load BASE CAMERA TOKEN SESSIONS REQUESTS

Opens SESSIONS HLS sessions with TOKEN, then sends REQUESTS blocking reloads of the segment
after the next one at once, spread over the sessions; prints {"statuses": {...}, "elapsed": s}.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter

import aiohttp


async def main(base: str, camera: str, token: str, sessions: int, requests: int) -> None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    # every connection first, then every request in one go: they arrive together
    streams = await asyncio.gather(*(asyncio.open_connection(host, int(port))
                                     for _ in range(requests)))
    async with aiohttp.ClientSession() as http:
        paths = []
        for _ in range(sessions):
            async with http.get(f"{base}/hls/{camera}/index.m3u8",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
                variant = (await r.text()).strip().splitlines()[-1]
                paths.append(f"/hls/{camera}/{variant}")
        while True:  # wait for a segment to begin: the one after it is then ~2 GOPs away
            async with http.get(base + paths[0]) as r:
                assert r.status == 200, await r.text()
                hint = re.search(r'PRELOAD-HINT:TYPE=PART,URI="part(\d+)\.(\d+)\.m4s"',
                                 await r.text())
            assert hint is not None
            if int(hint.group(2)) <= 1:
                break
            await asyncio.sleep(0.05)
        msn = int(hint.group(1)) + 1  # the segment after the running one: seconds away
        started = time.monotonic()
        for i, (_, writer) in enumerate(streams):
            writer.write(f"GET {paths[i % len(paths)]}?_HLS_msn={msn} HTTP/1.1\r\n"
                         f"Host: {host}\r\nConnection: close\r\n\r\n".encode())

        async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            line = await reader.readline()
            await reader.read()
            writer.close()
            return int(line.split()[1])

        statuses = Counter(await asyncio.gather(*(status(r, w) for r, w in streams)))
        print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()},
                          "elapsed": round(time.monotonic() - started, 3)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
