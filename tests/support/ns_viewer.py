"""A WHEP viewer to run inside a test's network namespace (sockets belong to the namespace of
the process that opens them): ``python -m tests.support.ns_viewer BASE CAMERA MY_IP``, with
the access token in ``$VIEWER_TOKEN`` (never on a command line). Prints one JSON line:
``{"status": 201, "width": 640, "height": 360}`` (no size when no frame came)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.support.agent import WhepViewer


async def main(base: str, camera: str, address: str) -> dict[str, object]:
    viewer = WhepViewer(base, camera, os.environ["VIEWER_TOKEN"], audio=False,
                        host_address=address)
    try:
        status = await viewer.connect()
        if status != 201:
            return {"status": status, "body": viewer.body[:300]}
        frame = await viewer.frame(timeout=20)
        return {"status": status, "width": frame.width, "height": frame.height}
    finally:
        await viewer.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))), flush=True)
