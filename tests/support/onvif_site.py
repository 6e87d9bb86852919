"""An ONVIF camera on the camera side of a ``NetnsPair`` (its viewer namespace), made of real
peers: Debian's GStreamer RTSP server as the stream, the test ONVIF device replaying a
Hikvision's answers with WS-Security checks (onvif_device.py), and the `WSDiscovery`
package's publisher announcing it (wsd_peer.py). Used by the discovery tests and benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import write_secret
from tests.support.camera import RtspCamera
from tests.support.netns import NetnsPair, wait_for_output

PASSWORD = "s3cret-Camera-Pw"


class CameraSite:
    """One ONVIF camera at ``ip`` in the camera namespace: RTSP stream, ONVIF device, WS-D."""

    def __init__(self, pair: NetnsPair, tmp: Path, ip: str, endpoint: str | None = None):
        self.pair, self.ip = pair, ip
        creds = tmp / "creds"
        creds.mkdir(exist_ok=True)
        self.password_file = creds / "camera.password"
        write_secret(self.password_file, PASSWORD)
        self.rtsp = RtspCamera.start(8554, netns=pair.viewer_ns, address=ip,
                                     path="/Streaming/Channels/101", user="admin",
                                     password=PASSWORD, auth="digest", width=320, height=240,
                                     fps=15)
        self.onvif = pair.popen(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.onvif_device", "--model", "hikvision",
            "--host", ip, "--port", "8080", "--user", "admin",
            "--password-file", str(self.password_file), "--stream-host", f"{ip}:8554",
        ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.xaddr = wait_for_output(self.onvif, "READY", timeout=30).split("READY ")[-1].strip()
        self.wsd = pair.popen(pair.viewer_ns, [
            sys.executable, "-m", "tests.support.wsd_peer", "publish", "Front door",
            "DS-2CD2043G2-I", self.xaddr, *([endpoint] if endpoint else []),
        ], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        published = wait_for_output(self.wsd, "published", timeout=20)
        self.announced_at = time.time()  # just after the publisher's Hello went out
        self.uuid = json.loads(published.strip().splitlines()[-1])["published"]

    def close(self) -> None:
        assert self.wsd.stdin is not None
        self.wsd.stdin.write("stop\n")
        self.wsd.stdin.flush()
        try:
            self.wsd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.wsd.kill()
        self.onvif.terminate()
        self.onvif.wait(timeout=10)
        self.rtsp.close()
