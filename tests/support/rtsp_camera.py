# mypy: ignore-errors
"""A real RTSP camera for tests: Debian's GStreamer RTSP server, run by Debian's python3.

Run it with the system interpreter (it needs python3-gi and gir1.2-gst-rtsp-server-1.0,
which the project venv cannot see)::

    /usr/bin/python3 tests/support/rtsp_camera.py --port 8554 [--path /stream]
        [--width 640 --height 360 --fps 30 --gop 60] [--bitrate 1000]
        [--user U --password-file F] [--audio none|pcmu|aac] [--pattern smpte|ball]
        [--address 127.0.0.1] [--codec h264|h265]

It serves one live, shared H.264 stream (``--codec h265``: x265enc H.265; all clients see
the same encoder, and join mid-GOP like on a real camera) and prints, flushed, one line per
event on stdout:

    READY rtsp://127.0.0.1:8554/stream   once the socket is bound and listening
    CLIENT_CONNECTED <n>                 a client connected; n = clients connected now
    CLIENT_CLOSED <n>                    a client's connection closed; n = clients left
    STOPPED total=<t>                    on SIGTERM/SIGINT; t = connections ever accepted

``--port 0`` binds a free port; the READY line then names it. Everything else (GStreamer
warnings, errors) goes to stderr. Exit status: 0 after SIGTERM/SIGINT, 2 on bad arguments
or a missing GStreamer element, 3 if the address cannot be bound.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

VIDEO_ELEMENTS = ("videotestsrc", "videoconvert", "x264enc", "h264parse", "rtph264pay")
H265_ELEMENTS = ("videotestsrc", "videoconvert", "x265enc", "h265parse", "rtph265pay")
AUDIO_ELEMENTS = {
    "pcmu": ("audiotestsrc", "audioconvert", "audioresample", "mulawenc", "rtppcmupay"),
    "aac": ("audiotestsrc", "audioconvert", "audioresample", "aacparse", "rtpmp4gpay"),
}
AAC_ENCODERS = ("avenc_aac", "voaacenc", "fdkaacenc")


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fail(status: int, message: str) -> None:
    sys.stderr.write(f"rtsp_camera: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--path", default="/stream", help="mount point (default /stream)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--gop", type=int, default=None, help="key-int-max in frames (default 2 s)")
    p.add_argument("--bitrate", type=int, default=1000, help="video bitrate in kbit/s")
    p.add_argument("--user", default=None, help="require Basic auth as this user")
    p.add_argument("--auth", choices=("basic", "digest"), default="basic",
                   help="how --user must authenticate (RFC 2617 Basic, or Digest)")
    p.add_argument("--password-file", default=None, help="file holding the password")
    p.add_argument("--audio", choices=("none", "pcmu", "aac"), default="none")
    p.add_argument("--codec", choices=("h264", "h265"), default="h264")
    p.add_argument(
        "--frame",
        choices=("x264", "one-nal"),
        default="x264",
        help="H.264 frames as x264 makes them for low latency (an access unit delimiter, then "
             "a slice per encoder thread: each an RTP packet, written apart), or one slice "
             "and nothing else (a small frame is one RTP packet, one write)",
    )
    p.add_argument("--session-timeout", type=int, default=None,
                   help="seconds a session lives without a keepalive (default: the server's 60)")
    p.add_argument(
        "--pattern",
        choices=("smpte", "ball"),
        default="smpte",
        help="smpte scrolls sideways (cheap); ball costs ~3x more CPU to draw",
    )
    args = p.parse_args(argv)
    if not args.path.startswith("/"):
        args.path = "/" + args.path
    if args.gop is None:
        args.gop = 2 * args.fps
    if (args.user is None) != (args.password_file is None):
        p.error("--user and --password-file go together")
    for name in ("width", "height", "fps", "gop", "bitrate"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if not 0 <= args.port <= 65535:
        p.error("--port must be 0..65535")
    return args


def first_available(names: tuple[str, ...]) -> str | None:
    for name in names:
        if Gst.ElementFactory.find(name) is not None:
            return name
    return None


def launch_description(args: argparse.Namespace) -> str:
    elements = VIDEO_ELEMENTS if args.codec == "h264" else H265_ELEMENTS
    missing = [e for e in elements if Gst.ElementFactory.find(e) is None]
    if args.audio != "none":
        missing += [e for e in AUDIO_ELEMENTS[args.audio] if Gst.ElementFactory.find(e) is None]
    aac_encoder = first_available(AAC_ENCODERS) if args.audio == "aac" else None
    if args.audio == "aac" and aac_encoder is None:
        missing.append("/".join(AAC_ENCODERS))
    if missing:
        fail(2, "missing GStreamer elements: " + ", ".join(missing))

    # smpte scrolls sideways, the ball moves: consecutive frames always differ. Drawing the
    # ball costs ~3x more CPU than the scrolling bars (46 % vs 12 % of a core at 1080p30).
    motion = "pattern=ball" if args.pattern == "ball" else "pattern=smpte horizontal-speed=2"
    # format=I420 and the constrained-baseline caps matter: left free, videotestsrc and
    # Debian's x264enc negotiate Y444_10LE, i.e. High 4:4:4 10-bit H.264 that browsers and
    # most decoders cannot play. Cameras send 8-bit 4:2:0.
    video = (
        f"videotestsrc is-live=true {motion} "
        f"! video/x-raw,format=I420,width={args.width},height={args.height},"
        f"framerate={args.fps}/1 "
        "! videoconvert "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.gop} "
        f"bitrate={args.bitrate} {'aud=false threads=1 ' if args.frame == 'one-nal' else ''}"
        "! video/x-h264,profile=constrained-baseline "
        "! h264parse config-interval=-1 "
        "! rtph264pay name=pay0 pt=96"
    )
    if args.codec == "h265":  # 8-bit 4:2:0 Main profile, as H.265 cameras send
        video = (
            f"videotestsrc is-live=true {motion} "
            f"! video/x-raw,format=I420,width={args.width},height={args.height},"
            f"framerate={args.fps}/1 "
            f"! x265enc tune=zerolatency speed-preset=ultrafast key-int-max={args.gop} "
            f"bitrate={args.bitrate} "
            "! h265parse config-interval=-1 "
            "! rtph265pay name=pay0 pt=96"
        )
    if args.audio == "pcmu":
        audio = (
            " audiotestsrc is-live=true wave=sine freq=440 volume=0.2 "
            "! audioconvert ! audioresample ! audio/x-raw,rate=8000,channels=1 "
            "! mulawenc ! rtppcmupay name=pay1 pt=0"
        )
    elif args.audio == "aac":
        audio = (
            " audiotestsrc is-live=true wave=sine freq=440 volume=0.2 "
            "! audioconvert ! audioresample ! audio/x-raw,rate=48000,channels=1 "
            f"! {aac_encoder} bitrate=64000 ! aacparse ! rtpmp4gpay name=pay1 pt=97"
        )
    else:
        audio = ""
    return f"( {video}{audio} )"


def make_auth(factory: GstRtspServer.RTSPMediaFactory, user: str, password: str,
              method: str = "basic"):
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string("media.factory.role", "viewer")
    if method == "digest":
        gi.require_version("GstRtsp", "1.0")
        from gi.repository import GstRtsp

        auth.add_digest(user, password, token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
    else:
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_permission_for_role("viewer", "media.factory.access", True)
    permissions.add_permission_for_role("viewer", "media.factory.construct", True)
    factory.set_permissions(permissions)
    return auth


class ClientCounter:
    """Counts RTSP connections: server 'client-connected', client 'closed'."""

    def __init__(self) -> None:
        # Keep each client's wrapper alive while it is open: a freed PyGObject wrapper's id()
        # is reused by the next client's, which would then be taken for the same client.
        self.open: dict[int, GstRtspServer.RTSPClient] = {}
        self.total = 0

    def on_client_connected(self, _server, client) -> None:
        key = id(client)
        if key in self.open:
            return
        self.open[key] = client
        self.total += 1
        client.connect("closed", self.on_client_closed)
        emit(f"CLIENT_CONNECTED {len(self.open)}")

    def on_client_closed(self, client) -> None:
        key = id(client)
        if key not in self.open:
            return
        del self.open[key]
        emit(f"CLIENT_CLOSED {len(self.open)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    password = None
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as exc:
            fail(2, f"cannot read --password-file: {exc}")

    Gst.init(None)
    description = launch_description(args)

    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(description)
    factory.set_shared(True)
    # A live videotestsrc looks seekable to gst-rtsp-server, and FFmpeg sends
    # "Range: npt=0.000-" on every PLAY: without this, each new client would rewind the
    # shared pipeline for every client already watching. CLOCK_AND_OFFSET makes it live-only.
    factory.set_publish_clock_mode(GstRtspServer.RTSPPublishClockMode.CLOCK_AND_OFFSET)
    if args.user is not None:
        server.set_auth(make_auth(factory, args.user, password, args.auth))
    server.get_mount_points().add_factory(args.path, factory)

    counter = ClientCounter()
    server.connect("client-connected", counter.on_client_connected)
    if args.session_timeout is not None:
        # As a camera does: a session nobody keeps alive expires (the pool is swept each
        # second; gst-rtsp-server leaves the sweeping to the application).
        def short_sessions(_server, client) -> None:
            client.connect("new-session",
                           lambda _client, session: session.set_timeout(args.session_timeout))

        server.connect("client-connected", short_sessions)
        pool = server.get_session_pool()
        GLib.timeout_add_seconds(1, lambda: pool.cleanup() >= 0)

    loop = GLib.MainLoop()

    def quit_loop() -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, quit_loop)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, quit_loop)

    try:
        source_id = server.attach(None)
    except GLib.Error as exc:
        fail(3, f"cannot listen on {args.address}:{args.port}: {exc.message}")
    if not source_id:
        fail(3, f"cannot listen on {args.address}:{args.port}")
    port = server.get_bound_port()
    host = f"[{args.address}]" if ":" in args.address else args.address
    emit(f"READY rtsp://{host}:{port}{args.path}")

    loop.run()

    GLib.source_remove(source_id)
    emit(f"STOPPED total={counter.total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
