"""Hostile and broken "cameras" on one TCP port, run as a process (also inside a namespace)::

    python -m tests.support.rtsp_trap MODE HOST PORT

Modes:
    basic       an attacker's RTSP listener: every request gets ``401`` with
                ``WWW-Authenticate: Basic`` (the challenge FFmpeg answers with the password
                in clear); every Authorization header received is reported
    junk        after the first bytes, streams interleaved-looking binary frames forever
    silent      accepts, reads, never answers
    sdp-junk    answers OPTIONS and DESCRIBE (an H.264 SDP) like a camera, then streams junk
                forever once SETUP comes (FFmpeg's open never completes on its own)

Prints ``{"listening": port}`` once, then one JSON line per connection
(``{"connection": n}``) and per request (``{"request": "METHOD", "authorization": ...}``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

JUNK = b"$\x00\x00\x40" + bytes(range(64))
SDP = (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=trap\r\nt=0 0\r\nm=video 0 RTP/AVP 96\r\n"
       b"a=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1;"
       b"sprop-parameter-sets=Z0LAHtkDxWhAAAADAEAAAA8jxYuS,aMuMsg==\r\na=control:track1\r\n")


def emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, int, str | None] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    text = head.decode("latin-1")
    method = text.split(" ", 1)[0]
    found = re.search(r"(?im)^cseq:\s*(\d+)", text)
    cseq = int(found[1]) if found else 0
    auth = re.search(r"(?im)^authorization:\s*(.*)$", text)
    emit({"request": method, "authorization": auth[1].strip() if auth else None})
    return method, cseq, auth[1].strip() if auth else None


async def junk_forever(writer: asyncio.StreamWriter) -> None:
    while True:
        writer.write(JUNK * 64)
        await writer.drain()
        await asyncio.sleep(0.001)


async def serve(mode: str, host: str, port: int) -> None:
    count = 0

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        emit({"connection": count})
        try:
            while True:
                got = await read_request(reader)
                if got is None:
                    return
                method, cseq, _ = got
                if mode == "basic":
                    writer.write(f"RTSP/1.0 401 Unauthorized\r\nCSeq: {cseq}\r\nWWW-Authenticate:"
                                 f' Basic realm="camera"\r\n\r\n'.encode())
                elif mode == "junk":
                    await junk_forever(writer)
                elif mode == "silent":
                    await asyncio.sleep(3600)
                elif method == "OPTIONS":
                    writer.write(f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, "
                                 "SETUP, PLAY, TEARDOWN\r\n\r\n".encode())
                elif method == "DESCRIBE":
                    writer.write(f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nContent-Type: "
                                 f"application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n"
                                 .encode() + SDP)
                else:
                    await junk_forever(writer)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(client, host, port)
    emit({"listening": server.sockets[0].getsockname()[1]})
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
