"""The camera hub: one upstream pull per camera, fanned out to every consumer.

The pull runs in its own thread (PyAV blocks) and starts when the first consumer arrives;
it stops ``idle_grace`` seconds after the last one left, unless the camera is ``always_on``.
Packets cross to the event loop in batches (one ``call_soon_threadsafe`` per batch); the loop
keeps the GOP cache and offers each packet to every consumer's bounded queue. A camera that fails is
retried with backoff and jitter while its viewers stay connected; their picture resumes at
the first keyframe after the camera returns.
"""

from __future__ import annotations

import asyncio
import enum
import resource
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog

from agent.errors import AgentError, SourceError
from agent.media.audio import webrtc_audio_codec
from agent.media.consumer import VIDEO_CLOCK, Consumer
from agent.media.rtp import Packetizer, audio_packetizer, video_packetizer
from agent.media.sources import LoopSource, Source, rtsp_login
from agent.media.stream import PULLED_CODECS, VIDEO_CODECS, MediaPacket, StreamInfo
from agent.retry import FailureLog, backoff

log = structlog.get_logger(__name__)

GOP_CACHE_MAX_PACKETS = 600
GOP_CACHE_MAX_BYTES = 16 * 1024 * 1024
UNSUPPORTED_RETRY = 60.0
#: Seconds between reads of a stream nobody consumes (see _LoopStream).
BATCH_INTERVAL = 0.25


class CameraState(enum.StrEnum):
    IDLE = "idle"  # no viewer: not pulling
    CONNECTING = "connecting"
    ONLINE = "online"
    OFFLINE = "offline"  # the camera cannot be reached; retried with backoff
    UNSUPPORTED = "unsupported"  # reached, but its video cannot be served (e.g. MJPEG)


@dataclass(frozen=True)
class CameraStatus:
    """What an installer (and the API) sees of a camera."""

    state: CameraState = CameraState.IDLE
    error: str | None = None
    since: float = field(default_factory=time.time)
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate_kbps: float | None = None
    audio: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CameraHub:
    """One camera: its pull thread, its GOP cache, its consumers and its status."""

    def __init__(
        self,
        camera_id: str,
        open_source: Callable[[], Source],
        *,
        idle_grace: float,
        always_on: bool,
        gop_cache: bool,
        queue_packets: int,
        reconnect_max: float,
        camera_timeout: float = 5.0,
    ) -> None:
        self.camera_id = camera_id
        self._open_source = open_source
        self._idle_grace = idle_grace
        self._always_on = always_on
        self._gop_cache_on = gop_cache
        self._queue_packets = queue_packets
        self._reconnect_max = reconnect_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumers: set[Consumer] = set()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._gop: list[tuple[int, MediaPacket]] = []
        self._gop_bytes = 0
        self._epoch = 0
        self._keyframe_waiters: list[asyncio.Future[None]] = []
        self._ready: asyncio.Event | None = None
        self.info: StreamInfo | None = None
        self.status = CameraStatus()
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._window_frames = 0
        self.received_bytes = 0  # video bytes from the camera since start (for /metrics)
        self.connections = 0  # upstream connections opened so far (one pull per camera)
        self._stops = 0
        self._pulling = False  # a pull thread runs (perhaps told to stop, not yet out)
        self._pulling_lock = threading.Lock()
        #: Once an RTP consumer came, every packet is packetized once here, for all of them.
        self._rtp_on = False
        self._video_rtp: Packetizer | None = None
        self._audio_rtp: Packetizer | None = None
        #: Packets from the pull thread waiting for the loop (see _post).
        self._inbox: list[tuple[int, MediaPacket]] = []
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
        #: The stream read on the loop (see _watch), while one is.
        self._loop_stream: _LoopStream | None = None
        #: A camera silent this long is offline (media.camera_timeout).
        self._camera_timeout = camera_timeout
        #: Asks the camera itself for a keyframe (an adopted ONVIF camera), or None.
        self.keyframe_source: Callable[[], object] | None = None

    # -- consumers (event loop) ---------------------------------------------------------

    def start(self) -> None:
        """Start pulling now (always_on cameras, or the first consumer)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        with self._pulling_lock:
            if self._pulling and not self._stop.is_set():
                return
            self._loop = asyncio.get_running_loop()
            self._set_status(state=CameraState.CONNECTING, error=None)
            if self._pulling:
                # Told to stop but still in an open or a read: take it back rather than start
                # a second pull (one thread, one connection per camera, whatever the requests).
                self._stop.clear()
                return
            self._pulling = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(self._stop,),
                                        name=f"camera-{self.camera_id}", daemon=True)
        self._thread.start()

    def subscribe(self, video: bool = True, rtp: bool = False) -> Consumer:
        """A new consumer; video consumers start from the cached GOP. ``rtp``: its packets
        come with their RTP payloads (``MediaPacket.rtp``), made once for every consumer."""
        self.start()
        if self._loop_stream is not None:  # read what is buffered first: a current GOP
            self._loop_stream.set_live(True)
        if rtp and not self._rtp_on:
            self._rtp_on = True
            self._make_packetizers()
            self._gop = [(e, self._packetized(p)) for e, p in self._gop]
        replay = list(self._gop) if video and self._gop_cache_on else []
        clock = VIDEO_CLOCK if video else self._audio_clock()
        consumer = Consumer(video, self._queue_packets, replay, self._epoch, clock)
        self._consumers.add(consumer)
        return consumer

    def replay(self, consumer: Consumer) -> None:
        """Restart ``consumer`` from the cached GOP's keyframe (or the next keyframe)."""
        if self._gop and self._gop_cache_on:
            consumer.replay(list(self._gop))

    def keyframe_wanted(self, consumer: Consumer) -> None:
        """A viewer lost the picture (PLI/FIR): it restarts from the cached GOP now, and the
        camera, when it can be asked, sends a keyframe soon (rate-limited by the asker)."""
        self.replay(consumer)
        if self.keyframe_source is not None:
            self.keyframe_source()

    def unsubscribe(self, consumer: Consumer) -> None:
        consumer.close()
        self._consumers.discard(consumer)
        if not self._consumers and self._loop_stream is not None:
            self._loop_stream.set_live(False)
        if not self._consumers and not self._always_on and self._loop is not None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self._loop.call_later(self._idle_grace, self.stop)

    async def ready(self, timeout: float) -> bool:
        """Wait (bounded) until the camera is online; False if it is not by then."""
        if self.status.state is CameraState.ONLINE and self.info is not None:
            return True
        if self.status.state is CameraState.UNSUPPORTED:
            return False
        if self._ready is None:
            self._ready = asyncio.Event()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return self.status.state is CameraState.ONLINE

    @property
    def viewers(self) -> int:
        """Consumers of video: one per viewer or relay session (audio rides along)."""
        return sum(1 for c in self._consumers if c.video)

    async def keyframe(self, timeout: float) -> tuple[MediaPacket, StreamInfo] | None:
        """The latest keyframe (starting the pull for a moment if needed), or None."""
        if not self._gop:
            holder = self.subscribe()
            try:
                waiter = asyncio.get_running_loop().create_future()
                self._keyframe_waiters.append(waiter)
                await asyncio.wait_for(waiter, timeout)  # also woken when the camera fails
            except TimeoutError:
                return None
            finally:
                self.unsubscribe(holder)
        if not self._gop or self.info is None:
            return None
        return self._gop[0][1], self.info

    def stop(self) -> None:
        """Stop pulling; consumers stay registered (they get nothing until a restart)."""
        self._idle_timer = None
        if self._consumers and self._thread is not None:
            return  # someone subscribed again during the grace period
        self._stop.set()
        self._stops += 1  # a pull taken back by start() reconnects (fresh status and epoch)
        if self._loop_stream is not None:  # streaming on the loop: it ends now
            self._loop_stream.finish()
        self._gop.clear()
        self._gop_bytes = 0
        if self.status.state is not CameraState.UNSUPPORTED:
            self._set_status(state=CameraState.IDLE, error=None, bitrate_kbps=None, fps=None)

    async def close(self) -> None:
        for consumer in self._consumers:
            consumer.close()
        self._consumers.clear()
        thread = self._thread
        self.stop()
        self._thread = None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)

    def _make_packetizers(self) -> None:
        info = self.info
        self._video_rtp = video_packetizer(info) if info is not None else None
        name = webrtc_audio_codec(info.audio.codec) if info and info.audio else None
        self._audio_rtp = audio_packetizer(name) if name else None

    def _packetized(self, packet: MediaPacket) -> MediaPacket:
        if packet.rtp is not None:
            return packet
        packetizer = self._video_rtp if packet.video else self._audio_rtp
        if packetizer is None:
            return packet
        return packet._replace(rtp=packetizer.packetize(packet))

    def webrtc_refusal(self) -> str | None:
        """Why no WebRTC peer can take this camera's video, or None (H.264; H.265 for the
        peers that offer it: agent/webrtc/h265.py decides)."""
        if self.info is None or self.info.codec in VIDEO_CODECS:
            return None
        return (f"the camera sends {self.info.codec.upper()} video, which WebRTC viewers "
                "cannot play: watch it over RTSP, or set the camera (or its substream) to H.264")

    def _audio_clock(self) -> int:
        codec = self.info.audio.codec if self.info and self.info.audio else None
        return 8000 if codec in ("pcm_mulaw", "pcm_alaw") else 48_000

    # -- from the pull thread, on the loop -----------------------------------------------

    def _deliver(self, epoch: int, packet: MediaPacket) -> None:
        if epoch != self._epoch:
            return  # a packet from a pull that has since been replaced
        if self._rtp_on:
            packet = self._packetized(packet)
        if packet.video:
            self._cache(epoch, packet)
            self._measure(packet)
        for consumer in tuple(self._consumers):  # a sink may end its own viewer
            if consumer.video == packet.video:
                consumer.offer(epoch, packet)

    def _cache(self, epoch: int, packet: MediaPacket) -> None:
        if packet.keyframe:
            self._gop = [(epoch, packet)]
            self._gop_bytes = len(packet.data)
            for waiter in self._keyframe_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._keyframe_waiters.clear()
        elif self._gop:
            self._gop.append((epoch, packet))
            self._gop_bytes += len(packet.data)
            if len(self._gop) > GOP_CACHE_MAX_PACKETS or self._gop_bytes > GOP_CACHE_MAX_BYTES:
                self._gop.clear()  # a camera with a huge GOP: no replay rather than no memory
                self._gop_bytes = 0

    def _measure(self, packet: MediaPacket) -> None:
        self._window_bytes += len(packet.data)
        self.received_bytes += len(packet.data)
        self._window_frames += 1
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= 5.0:
            self.status = replace(
                self.status, bitrate_kbps=round(self._window_bytes * 8 / elapsed / 1000, 1),
                fps=round(self._window_frames / elapsed, 1))
            self._window_start, self._window_bytes, self._window_frames = now, 0, 0

    def _online(self, epoch: int, info: StreamInfo) -> None:
        self._epoch = epoch
        self.info = info
        self._gop.clear()
        self._gop_bytes = 0
        self._window_start, self._window_bytes, self._window_frames = time.monotonic(), 0, 0
        if self._rtp_on:
            self._make_packetizers()
        log.info("camera_online", camera=self.camera_id, codec=info.codec,
                 size=f"{info.width}x{info.height}")
        audio = webrtc_audio_codec(info.audio.codec) if info.audio else None
        self._set_status(state=CameraState.ONLINE, error=None, codec=info.codec, width=info.width,
                         height=info.height, fps=info.fps, audio=audio)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Whoever waits for the camera learns at once that it is online, failed or unusable."""
        if self._ready is not None:
            self._ready.set()
            self._ready = None
        if self.status.state is not CameraState.ONLINE:
            for waiter in self._keyframe_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._keyframe_waiters.clear()

    def _set_status(self, **changes: Any) -> None:
        self.status = replace(self.status, since=time.time(), **changes)

    # -- the pull thread -----------------------------------------------------------------

    def _pull(self, stop: threading.Event) -> None:
        try:
            self._pull_until(stop)
        finally:  # whatever ended it, the next start() starts a new pull
            with self._pulling_lock:
                self._pulling = False

    def _pull_until(self, stop: threading.Event) -> None:
        assert self._loop is not None
        loop = self._loop
        failures = FailureLog(log, "camera_unavailable", camera=self.camera_id)
        delays = backoff(1.0, self._reconnect_max)
        while True:
            with self._pulling_lock:  # start() sees either a running pull or none
                if stop.is_set():
                    self._pulling = False
                    return
            source: Source | None = None
            try:
                stops = self._stops
                source = self._open_source()
                info = source.open()
                self.connections += 1
                if info.codec not in PULLED_CODECS:
                    loop.call_soon_threadsafe(self._unsupported, info)
                    stop.wait(UNSUPPORTED_RETRY)
                    continue
                epoch = self._epoch + 1
                loop.call_soon_threadsafe(self._online, epoch, info)
                failures.recovered("camera_recovered")
                delays = backoff(1.0, self._reconnect_max)
                if isinstance(source, LoopSource) and source.loop_ready:
                    self._stream_on_loop(loop, source, epoch, stop)
                else:
                    while not stop.is_set() and self._stops == stops:
                        self._post(loop, epoch, source.read())
            except AgentError as exc:  # SourceError, or a camera secret that cannot be read
                failures.failed(str(exc))
                loop.call_soon_threadsafe(self._set_status_if_running, stop, str(exc))
                stop.wait(next(delays))
            except RuntimeError:  # the event loop closed under us: the agent is stopping
                return
            finally:
                if source is not None:
                    source.close()

    def _stream_on_loop(self, loop: asyncio.AbstractEventLoop, source: LoopSource, epoch: int,
                        stop: threading.Event) -> None:
        """Hand the open stream to the event loop and wait until it ends there (a failure,
        a silent camera, or stop()); the thread then closes the source and goes on as after
        any read: reconnect, or return when stopped."""
        ended = threading.Event()
        failure: list[str] = []
        loop.call_soon_threadsafe(self._watch, source, epoch, stop, ended, failure)
        ended.wait()
        if failure:
            raise SourceError(failure[0])

    def _watch(self, source: LoopSource, epoch: int, stop: threading.Event,
               ended: threading.Event, failure: list[str]) -> None:
        """On the loop: read the open stream until it ends (see :class:`_LoopStream`)."""
        if stop.is_set():
            ended.set()
            return
        assert self._loop is not None
        stream = self._loop_stream = _LoopStream(self, self._loop, source, epoch, ended,
                                                 failure)
        stream.start(live=bool(self._consumers))

    def _post(self, loop: asyncio.AbstractEventLoop, epoch: int, packet: MediaPacket) -> None:
        """Hand a packet to the loop: one wake-up per batch, not per packet (waking the loop
        costs a write to its self-pipe and a callback; packets that arrive while it is busy
        ride along with the batch already scheduled)."""
        with self._inbox_lock:
            self._inbox.append((epoch, packet))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            batch, self._inbox = self._inbox, []
            self._drain_scheduled = False
        for epoch, packet in batch:
            self._deliver(epoch, packet)

    def _set_status_if_running(self, stop: threading.Event, error: str) -> None:
        if not stop.is_set():
            self._set_status(state=CameraState.OFFLINE, error=error)
            self._wake_waiters()

    def _unsupported(self, info: StreamInfo) -> None:
        self.info = info
        message = (f"the camera sends {info.codec.upper()} video, which the agent cannot "
                   "serve: set the camera (or its substream) to H.264")
        self._set_status(state=CameraState.UNSUPPORTED, error=message, codec=info.codec,
                         width=info.width, height=info.height)
        self._wake_waiters()
        log.warning("camera_unsupported_codec", camera=self.camera_id, codec=info.codec)


#: Watched streams read on bursts (one wake-up each, per burst) that wake the loop more often
#: than this a second together are read on one shared timer every READ_TICK seconds instead.
TICK_ABOVE = 130.0
READ_TICK = 0.010


class _Reads:
    """One timer for every camera stream read on an event loop.

    A wake-up of the loop costs tens to hundreds of microseconds on a small machine whatever
    it does (docs/field-notes.md), so the streams share them:

    - streams nobody consumes are read every ``BATCH_INTERVAL``, all at the same wake-up;
    - watched streams are read when their socket is readable: one wake-up per burst, about
      one per frame, and streams whose bursts come together share it. When their wake-ups
      are counted above ``TICK_ABOVE`` a second (e.g. four independent cameras at 30 fps),
      they are all read every ``READ_TICK`` instead: 100 wake-ups a second whatever the
      number of cameras, a frame delayed by at most ``READ_TICK``. Back to bursts when the
      watched streams' frame rate falls well below what it was (viewers or cameras left);
    - every watched stream's silence check (once a second) rides on the same timer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._streams: set[_LoopStream] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.ticking = False
        self._ticking_fps = 0.0  # the watched streams' frame rate when ticking began
        self._bursts = 0  # wake-ups for bursts since _counted (while not ticking)
        self._slept = -1  # the loop thread's voluntary context switches at the last burst
        self._counted = loop.time()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Reads:
        reads = _READS.get(loop)
        if reads is None:
            reads = _READS[loop] = cls(loop)
        return reads

    def add(self, stream: _LoopStream) -> None:
        self._streams.add(stream)
        self.changed()

    def remove(self, stream: _LoopStream) -> None:
        self._streams.discard(stream)
        self.changed()

    def burst(self) -> None:
        """A watched stream's socket woke the loop. Counted once per wake-up, i.e. if the
        loop's thread has slept since the last burst, however many streams were readable in
        it: what the shared timer would save. (Bursts told apart by time would take two
        wake-ups 0.3 ms apart for one: a camera writes its frame's packets apart, and the
        frames of several cameras fall that close now and then.)"""
        slept = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        if slept != self._slept:
            self._bursts += 1
            self._slept = slept

    def changed(self) -> None:
        """A stream came, went, or went live or quiet: tick or not, and when to wake."""
        if self.ticking and self._watched_fps() < self._ticking_fps * 0.7:
            self._follow(False)
        self._arm(self._loop.time())

    def _watched_fps(self) -> float:
        return sum(s.frame_rate() for s in self._streams if s.live)

    def _follow(self, ticking: bool) -> None:
        self.ticking = ticking
        self._ticking_fps = self._watched_fps()
        self._bursts, self._counted = 0, self._loop.time()
        log.info("camera_reads_shared" if ticking else "camera_reads_per_burst",
                 frames_per_second=round(self._ticking_fps, 1))
        for stream in list(self._streams):
            stream.follow(ticking)

    def _count(self, now: float) -> None:
        """Wake-ups for bursts over the last second or more: many, and ticking pays."""
        elapsed = now - self._counted
        if elapsed < 1.0:
            return
        rate, self._bursts, self._counted = self._bursts / elapsed, 0, now
        if rate > TICK_ABOVE:
            self._follow(True)

    def _arm(self, now: float) -> None:
        due = [s.due() for s in self._streams]
        if self.ticking:
            due.append(now + READ_TICK)
        when = min(due, default=None)
        if self._timer is not None:
            if when is not None and abs(self._timer.when() - when) < READ_TICK / 2:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        for stream in list(self._streams):
            stream.on_timer(now, self.ticking)
        if not self.ticking:
            self._count(now)
        self._arm(now)


_READS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Reads] = (
    weakref.WeakKeyDictionary())


class _LoopStream:
    """A camera's open stream, read on the event loop (the agent's own RTSP client).

    While anyone consumes the camera, its socket is read whenever it is readable: one
    wake-up per burst of packets (about one per frame), no thread in between; with many
    cameras watched, on a shared timer instead (see :class:`_Reads`). While nobody does (an
    ``always_on`` camera keeping its GOP cache warm, or the idle grace), it is read every
    ``BATCH_INTERVAL`` instead: 30 wake-ups a second were most of an unwatched pull's CPU,
    and the socket's buffer holds a quarter of a second easily. A new consumer first takes
    everything buffered (the GOP cache is then current), then the stream goes live.
    """

    def __init__(self, hub: CameraHub, loop: asyncio.AbstractEventLoop, source: LoopSource,
                 epoch: int, ended: threading.Event, failure: list[str]) -> None:
        self._hub = hub
        self._loop = loop
        self._reads = _Reads.of(loop)
        self._source = source
        self._epoch = epoch
        self._ended = ended
        self._failure = failure
        self._fd = source.fileno()
        self.live = False
        self._reader = False  # registered for readability
        self._next = 0.0  # the next batch read (quiet) or silence check (live), loop time
        self._done = False

    def start(self, live: bool) -> None:
        self._read()  # what the open read ahead, and what came since
        if not self._done:
            self._reads.add(self)
            self.set_live(live, force=True)

    def set_live(self, live: bool, force: bool = False) -> None:
        if self._done or (live == self.live and not force):
            return
        self.live = live
        if live:
            self._read()
            if self._done:
                return
        self._next = self._loop.time() + (1.0 if live else BATCH_INTERVAL)
        self.follow(self._reads.ticking)
        self._reads.changed()

    def follow(self, ticking: bool) -> None:
        """Read on bursts (live, not ticking) or on the shared timer."""
        reader = self.live and not ticking and not self._done
        if reader == self._reader:
            return
        self._reader = reader
        if reader:  # what came since the last read makes it readable at once
            self._loop.add_reader(self._fd, self._readable)
        else:
            self._loop.remove_reader(self._fd)

    def frame_rate(self) -> float:
        return self._hub.status.fps or 25.0

    def due(self) -> float:
        return self._next

    def on_timer(self, now: float, ticking: bool) -> None:
        if self._done:
            return
        if self.live and ticking:
            self._read()
        # A little early rather than one more wake-up: the streams' times fall together.
        if not self._done and now >= self._next - (0.5 if self.live else BATCH_INTERVAL / 2):
            if not self.live:
                self._read()
            if not self._done:
                self._check(now)

    def _readable(self) -> None:
        self._reads.burst()
        self._read(drain=False)

    def _read(self, drain: bool = True) -> None:
        try:
            packets = self._source.read_available(drain)
        except AgentError as exc:
            self.finish(str(exc))
            return
        deliver, epoch = self._hub._deliver, self._epoch
        for packet in packets:
            deliver(epoch, packet)

    def _check(self, now: float) -> None:
        """A camera that stopped sending (its connection still open) is offline."""
        if self._source.silent_for() > self._hub._camera_timeout:
            self.finish(rtsp_login.TIMEOUT)
        else:
            self._next = now + (1.0 if self.live else BATCH_INTERVAL)

    def finish(self, reason: str | None = None) -> None:
        """End it (a failure's reason, or None when the hub stops): the pull thread closes
        the source and reconnects or returns."""
        if self._done:
            return
        self._done = True
        if self._reader:
            self._loop.remove_reader(self._fd)
            self._reader = False
        self._reads.remove(self)
        if self._hub._loop_stream is self:
            self._hub._loop_stream = None
        if reason is not None:
            self._failure.append(reason)
        self._ended.set()
