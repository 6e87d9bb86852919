"""The viewer page's LL-HLS player logic, run in headless Chromium on playlists as the agent
writes them: parsing, where playback starts, and which part comes next.

The page's HLS section (``viewer.js`` from "---- HLS fallback" to the pagehide handler) is
loaded into a blank page (a ``data:`` URL: no network at all) and its functions are called
directly. The end-to-end behaviour (fallback, playing, revocation) is in
test_browser_hls.py; this covers the positions a short run rarely reaches (a segment that
ends with fewer parts than asked for, a viewer that fell off the playlist, a playlist
without parts).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.support.browser import ROOT, chromium_available

pytestmark = pytest.mark.skipif(not chromium_available(), reason="Debian's chromium is needed")

SCRIPT = ROOT / "agent" / "http" / "static" / "viewer.js"
BASE = "http://192.0.2.1:8800/hls/door/s/SID/live.m3u8"

# As agent/hls/segmenter.py writes it: two complete segments without parts, a complete one
# with its parts (the last shorter), a preload hint.
LIVE = """#EXTM3U
#EXT-X-VERSION:9
#EXT-X-TARGETDURATION:2
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.500
#EXT-X-PART-INF:PART-TARGET=0.500
#EXT-X-MEDIA-SEQUENCE:7
#EXT-X-MAP:URI="init.mp4"
#EXT-X-PROGRAM-DATE-TIME:2026-12-02T12:40:09.150Z
#EXTINF:2.00000,
seg7.m4s
#EXT-X-PROGRAM-DATE-TIME:2026-12-02T12:40:11.148Z
#EXTINF:2.00000,
seg8.m4s
#EXT-X-PROGRAM-DATE-TIME:2026-12-02T12:40:13.151Z
#EXT-X-PART:DURATION=0.46667,URI="part9.0.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.46667,URI="part9.1.m4s"
#EXT-X-PART:DURATION=0.46667,URI="part9.2.m4s"
#EXT-X-PART:DURATION=0.46667,URI="part9.3.m4s"
#EXT-X-PART:DURATION=0.13333,URI="part9.4.m4s"
#EXTINF:2.00000,
seg9.m4s
#EXT-X-PART:DURATION=0.50000,URI="part10.0.m4s",INDEPENDENT=YES
#EXT-X-PART:DURATION=0.50000,URI="part10.1.m4s"
#EXT-X-PRELOAD-HINT:TYPE=PART,URI="part10.2.m4s"
"""

# A plain live playlist: whole segments only, no blocking reload.
PLAIN = """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-TARGETDURATION:2
#EXT-X-MEDIA-SEQUENCE:3
#EXT-X-MAP:URI="init.mp4"
#EXTINF:2.0,
seg3.m4s
#EXTINF:2.0,
seg4.m4s
#EXTINF:2.0,
seg5.m4s
#EXTINF:2.0,
seg6.m4s
#EXTINF:2.0,
seg7.m4s
"""

MULTIVARIANT = """#EXTM3U
#EXT-X-VERSION:9
#EXT-X-INDEPENDENT-SEGMENTS
#EXT-X-STREAM-INF:BANDWIDTH=2000000,CODECS="avc1.42c016",RESOLUTION=640x360,FRAME-RATE=15.000
s/SID/live.m3u8
"""

PROBE = """() => {
  const live = parseMedia(LIVE, BASE);
  const plain = parseMedia(PLAIN, BASE);
  const at = (msn, part) => ({ msn, part });
  const locate = (list, msn, part) => hlsLocate(list, at(msn, part));
  let error = null;
  try { parseMedia("<html>not a playlist</html>", BASE); } catch (e) { error = e.message; }
  return {
    variant: parseMultivariant(MULTIVARIANT, "http://192.0.2.1:8800/hls/door/index.m3u8"),
    live: { first: live.first, canBlock: live.canBlock, partHoldBack: live.partHoldBack,
            partTarget: live.partTarget, map: live.map,
            segments: live.segments.map(s => ({ msn: s.msn, complete: s.complete, url: s.url,
                                                 parts: s.parts.length, date: s.date })) },
    start: hlsStart(live),
    plainStart: hlsStart(plain),
    steps: {
      part: locate(live, 9, 2),
      lastPart: locate(live, 9, 4),
      pastEnd: locate(live, 9, 5),
      open: locate(live, 10, 1),
      openNext: locate(live, 10, 2),
      wholeOld: locate(live, 8, 0),
      midOld: locate(live, 8, 3),
      fellOff: locate(live, 5, 0),
      plainSegment: locate(plain, 6, -1),
      plainNext: locate(plain, 8, -1),
    },
    error,
  };
}"""


def _run(probe: str) -> Any:
    source = SCRIPT.read_text(encoding="utf-8")
    section = source[source.index("// ---- HLS fallback"):
                     source.index('window.addEventListener("pagehide"')]
    constants = "".join(f"const {name} = {json.dumps(value)};\n" for name, value in (
        ("LIVE", LIVE), ("PLAIN", PLAIN), ("MULTIVARIANT", MULTIVARIANT), ("BASE", BASE)))
    page = f"<!doctype html><script>{constants}{section}</script>"
    url = "data:text/html;base64," + base64.b64encode(page.encode()).decode()
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.browser_driver", url, "--result", probe,
         "--timeout", "10"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"], report
    assert not report["page_errors"], report["page_errors"]
    return report["result"]


def test_the_player_follows_the_agents_playlists() -> None:
    result = _run(PROBE)
    assert result["variant"] == {"url": BASE, "codecs": "avc1.42c016",
                                 "resolution": "640x360"}
    live = result["live"]
    assert live["first"] == 7 and live["canBlock"] is True
    assert live["partHoldBack"] == 1.5 and live["partTarget"] == 0.5
    assert live["map"] == BASE.replace("live.m3u8", "init.mp4")
    assert [(s["msn"], s["complete"], s["parts"]) for s in live["segments"]] == [
        (7, True, 0), (8, True, 0), (9, True, 5), (10, False, 2)]
    assert live["segments"][3]["url"] is None
    # dates: as written, and the open segment's from the one before plus its duration
    dates = [s["date"] for s in live["segments"]]
    written = datetime(2026, 12, 2, 12, 40, 13, 151000, tzinfo=UTC).timestamp() * 1000
    assert dates[2] == written and dates[3] == dates[2] + 2000
    # Start: PART-HOLD-BACK (1.5 s) back from the newest part is part 9.3; the nearest
    # independent part at or before it is 9.0.
    assert result["start"] == {"msn": 9, "part": 0}
    # No parts: whole segments, 3 target durations (6 s) back from the end.
    assert result["plainStart"] == {"msn": 5, "part": -1}
    steps = result["steps"]
    part9 = BASE.replace("live.m3u8", "part9.{}.m4s")
    assert steps["part"]["load"] == part9.format(2)
    assert steps["part"]["next"] == {"msn": 9, "part": 3}
    assert steps["part"]["ends"] == pytest.approx(dates[2] + 3 * 466.67)  # wall clock
    assert steps["lastPart"]["load"] == part9.format(4)
    assert steps["lastPart"]["next"] == {"msn": 9, "part": 5}
    # past a complete segment's last part: the next segment's first (RFC 8216bis)
    assert steps["pastEnd"]["load"] == BASE.replace("live.m3u8", "part10.0.m4s")
    assert steps["pastEnd"]["next"] == {"msn": 10, "part": 1}
    assert steps["open"]["load"] == BASE.replace("live.m3u8", "part10.1.m4s")
    assert steps["openNext"] == {"wait": {"msn": 10, "part": 2}}  # blocking reload for it
    # a segment listed without parts: whole from its start, else we fell behind
    assert steps["wholeOld"] == {"load": BASE.replace("live.m3u8", "seg8.m4s"),
                                 "next": {"msn": 9, "part": 0}, "ends": None}
    assert steps["midOld"] == {"behind": True}
    assert steps["fellOff"] == {"behind": True}
    assert steps["plainSegment"]["load"] == BASE.replace("live.m3u8", "seg6.m4s")
    assert steps["plainSegment"]["next"] == {"msn": 7, "part": -1}
    assert steps["plainNext"] == {"wait": {"msn": 8, "part": -1}}
    assert result["error"] == "the agent's answer is not an HLS playlist"
