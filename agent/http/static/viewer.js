// TheRelay Agent viewer: lists the cameras an access token may see and plays them over WHEP,
// falling back to LL-HLS (our own small MSE player, or the browser's native HLS) when WebRTC
// shows no picture. The token comes from the URL fragment (#token=…, never sent to the server
// in a URL) or the paste box, and travels only in Authorization headers.
"use strict";

const state = { token: null, sessions: new Map(), protocols: ["all"], hlsMode: null };
// read by the browser tests
window.__viewer = { cameras: {}, frames: {}, sessions: {}, pcs: {}, transport: {}, hls: {},
                   hlsFailures: {} };

const TITLES = {
  missing: "No access token",
  malformed: "This is not an access token",
  corrupted: "The token was damaged in copying",
  unknown: "This agent does not accept the token",
  wrong_kind: "This is not an access token",
  revoked: "The token was revoked",
  expired: "The token has expired",
  scope_mismatch: "The token does not cover this camera",
  protocol_not_allowed: "The token does not allow live video",
  rate_limited: "Too many failed attempts",
  camera_offline: "Camera offline",
  unsupported_codec: "Camera format not supported",
  unknown_camera: "No such camera",
};

function $(id) { return document.getElementById(id); }

function notice(text) { $("notice").textContent = text || ""; }

async function explain(response) {
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  const code = body.error || `http_${response.status}`;
  // The agent's message says what happened and what to do; the title is the fallback.
  return { code, text: body.message || TITLES[code] || `Error ${response.status}.` };
}

function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  // #…&hls=native or &hls=mse forces the HLS path (troubleshooting; docs/viewing.md)
  state.hlsMode = params.get("hls");
  return params.get("token");
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${state.token}` }, options.headers || {});
  return fetch(path, Object.assign({}, options, { headers }));
}

async function loadCameras() {
  notice("");
  const response = await api("/api/v1/cameras");
  if (!response.ok) {
    const why = await explain(response);
    notice(why.text);
    window.__viewer.error = why.code;
    $("token-form").hidden = false;
    return;
  }
  const data = await response.json();
  const t = data.token;
  state.protocols = t.protocols || ["all"];
  $("who").textContent = `agent ${data.agent_id} · token ${t.id} · scope ${t.scope}` +
    (t.expires_at ? ` · expires ${new Date(t.expires_at * 1000).toLocaleString()}` : "");
  $("cameras").replaceChildren();
  if (!data.cameras.length) notice("This token covers no camera on this agent.");
  for (const camera of data.cameras) addCamera(camera);
}

function addCamera(camera) {
  const figure = document.createElement("figure");
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true; video.controls = true;
  video.setAttribute("aria-label", `Live video of ${camera.name}`);
  const caption = document.createElement("figcaption");
  const name = document.createElement("strong");
  name.textContent = camera.name;
  const status = document.createElement("span");
  status.className = "state";
  status.setAttribute("role", "status");
  caption.append(name, status);
  figure.append(video, caption);
  $("cameras").append(figure);
  const view = { camera, video, status, retry: null, transport: "webrtc" };
  window.__viewer.frames[camera.id] = 0;
  countFrames(view);
  if (!allows("webrtc") && allows("hls") && hlsServed(camera)) {
    startHls(view, "the token does not allow WebRTC");
  } else {
    play(view);
  }
}

function setState(view, text, isError) {
  view.status.textContent = text;
  view.status.classList.toggle("error", !!isError);
  window.__viewer.cameras[view.camera.id] = { text, error: !!isError };
}

function allows(protocol) {
  return state.protocols.includes("all") || state.protocols.includes(protocol);
}

function countFrames(view) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const tick = () => {
    window.__viewer.frames[view.camera.id] += 1;
    view.video.requestVideoFrameCallback(tick);
  };
  view.video.requestVideoFrameCallback(tick);
}

/** Has the <video> shown a frame since ``since`` (a frame count taken earlier)? */
function shownFrame(view, since) {
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    return window.__viewer.frames[view.camera.id] > since;
  }
  return view.video.readyState >= HTMLMediaElement.HAVE_CURRENT_DATA;
}

// Shorter than the agent's handshake deadline (sessions.handshake_timeout, 10 s by default)
// would be rude to slow networks; longer would leave a dead tile. Chromium itself reports
// "failed" only after about 30 s.
const GIVE_UP_MS = 10000;
// With HLS to fall back on, a WebRTC session that shows no frame this long after its answer
// is given up at once: on a LAN, ICE and the first frame (the agent replays the cached GOP)
// take well under a second, so 4 s without a picture means UDP is blocked, not slow.
const FALLBACK_MS = 4000;

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000); // send what we have: the agent answers with all of its own
  });
}

async function play(view) {
  clearTimeout(view.retry);
  if (view.transport !== "webrtc") return; // once on HLS, the tile stays there
  setState(view, "connecting…");
  const pc = new RTCPeerConnection({ iceServers: [] });
  window.__viewer.pcs[view.camera.id] = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.ontrack = (event) => { stream.addTrack(event.track); view.video.srcObject = stream; };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  let response;
  try {
    response = await api(`/whep/${encodeURIComponent(view.camera.id)}`, {
      method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
    });
  } catch (e) {
    pc.close();
    setState(view, "The agent cannot be reached.", true);
    view.retry = setTimeout(() => play(view), 5000);
    return;
  }
  if (response.status !== 201) {
    pc.close();
    const why = await explain(response);
    // WebRTC refused for this camera (an H.265 camera, a token without webrtc): HLS may play it.
    if ((why.code === "unsupported_codec" || why.code === "protocol_not_allowed") &&
        allows("hls") && hlsServed(view.camera)) {
      startHls(view, why.code === "unsupported_codec"
        ? "the camera's video cannot go over WebRTC" : "the token does not allow WebRTC");
      return;
    }
    setState(view, why.text, true);
    if (response.status === 503) {
      const wait = Number(response.headers.get("Retry-After") || "5");
      view.retry = setTimeout(() => play(view), wait * 1000);
    }
    return;
  }
  const location = response.headers.get("Location");
  state.sessions.set(view.camera.id, location);
  const opened = window.__viewer.sessions;
  opened[view.camera.id] = (opened[view.camera.id] || 0) + 1;
  const framesBefore = window.__viewer.frames[view.camera.id];
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  const canFallBack = allows("hls") && hlsServed(view.camera);
  const fallBack = () => {
    clearTimeout(view.giveUp);
    pc.onconnectionstatechange = null;
    pc.close();
    forget(view);
    startHls(view, "WebRTC could not connect");
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected") {
      if (!canFallBack) clearTimeout(view.giveUp);
      setState(view, "live");
    }
    if (["failed", "closed", "disconnected"].includes(pc.connectionState)) {
      if (canFallBack && !shownFrame(view, framesBefore)) fallBack();
      else ended(view, pc);
    }
  };
  // A session that cannot connect (ICE blocked by a firewall) is given up, and deleted on the
  // agent, rather than left to the agent's own handshake deadline: for HLS when the agent
  // serves it and the token allows it, otherwise for another WebRTC attempt.
  clearTimeout(view.giveUp);
  view.giveUp = canFallBack
    ? setTimeout(() => { if (!shownFrame(view, framesBefore)) fallBack(); }, FALLBACK_MS)
    : setTimeout(() => { if (pc.connectionState !== "connected") ended(view, pc); }, GIVE_UP_MS);
}

/** DELETE the camera's session on the agent (it frees its sockets at once). */
function forget(view) {
  const location = state.sessions.get(view.camera.id);
  if (!location) return;
  state.sessions.delete(view.camera.id);
  fetch(location, { method: "DELETE", keepalive: true,
                    headers: { Authorization: `Bearer ${state.token}` } }).catch(() => {});
}

/** Why did the stream stop? A revoked or expired token says so (returns the text to show);
 *  null when the token is still good (reconnect). */
async function tokenEnded() {
  let response = null;
  try { response = await api(`/api/v1/cameras`); } catch (e) { /* agent unreachable */ }
  if (response && !response.ok) return (await explain(response)).text;
  return null;
}

async function ended(view, pc) {
  if (view.ending) return;
  view.ending = true;
  clearTimeout(view.giveUp);
  pc.close();
  forget(view);
  // Ask the agent why: a revoked or expired token says so; otherwise reconnect.
  const why = await tokenEnded();
  view.ending = false;
  if (why) {
    setState(view, `Stream ended. ${why}`, true);
    return;
  }
  setState(view, "Stream interrupted; reconnecting…", true);
  view.retry = setTimeout(() => play(view), 2000);
}

// ---- HLS fallback -------------------------------------------------------------------------
// Used when WebRTC shows no picture (UDP blocked by guest Wi-Fi, a corporate LAN, a VPN), when
// WebRTC refuses the camera (H.265) or the token allows hls but not webrtc. Once on HLS a tile
// stays on HLS until the page is reloaded. Two paths (docs/viewing.md, "HLS fallback"):
//  - MSE: our own LL-HLS player below. The multivariant playlist is fetched with the token in
//    the Authorization header; every later URL carries only the agent's session id.
//  - native: the browser's own HLS (iPhone, which has no MediaSource), pointed at the variant
//    playlist's absolute URL, which carries no token either.

/** Is HLS served for this camera? The camera list says so with hls_url (an agent without
 *  HLS, or with it turned off, gives none: the page then stays on WebRTC). */
function hlsServed(camera) {
  return !!camera.hls_url;
}

function hlsPath(camera) {
  // Only the path of hls_url: the page stays on its own origin (CSP connect-src 'self').
  if (camera.hls_url) {
    const url = new URL(camera.hls_url, location.href);
    return url.pathname + url.search;
  }
  return `/hls/${encodeURIComponent(camera.id)}/index.m3u8`;
}

class HttpError extends Error {
  constructor(response) {
    super(`HTTP ${response.status}`);
    this.response = response;
    this.status = response.status;
  }
}

/** Parses the attribute list of an HLS tag: KEY=VALUE,KEY="quoted, value",… */
function hlsAttributes(text) {
  const attrs = {};
  const re = /([A-Z0-9-]+)=("[^"]*"|[^,]*)/g;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    attrs[m[1]] = m[2].startsWith('"') ? m[2].slice(1, -1) : m[2];
  }
  return attrs;
}

function hlsLines(text) {
  const lines = text.split(/\r?\n/).map((line) => line.trim()).filter(Boolean);
  if (lines[0] !== "#EXTM3U") throw new Error("the agent's answer is not an HLS playlist");
  return lines;
}

/** The first variant of a multivariant playlist: { url, codecs, resolution }. */
function parseMultivariant(text, base) {
  const lines = hlsLines(text);
  for (let i = 0; i < lines.length; i++) {
    if (!lines[i].startsWith("#EXT-X-STREAM-INF:")) continue;
    const attrs = hlsAttributes(lines[i].slice(lines[i].indexOf(":") + 1));
    const uri = lines.slice(i + 1).find((line) => !line.startsWith("#"));
    if (uri) return { url: new URL(uri, base).href, codecs: attrs.CODECS || "",
                      resolution: attrs.RESOLUTION || "" };
  }
  throw new Error("the HLS playlist names no stream");
}

/** A media playlist: its segments in order, each with its parts (the last may be open). */
function parseMedia(text, base) {
  const list = { first: 0, target: 2, partTarget: 0, holdBack: 0, partHoldBack: 0,
                 canBlock: false, map: null, segments: [], ended: false };
  let msn = 0; let duration = 0; let parts = []; let date = null;
  // the wall-clock time a segment starts (EXT-X-PROGRAM-DATE-TIME, or the one before + its
  // duration), for the latency figure the tests read; null without dates
  const dated = () => {
    const last = list.segments[list.segments.length - 1];
    return date !== null ? date : last && last.date !== null ? last.date + last.duration * 1000 : null;
  };
  for (const line of hlsLines(text)) {
    const value = line.slice(line.indexOf(":") + 1);
    if (line.startsWith("#EXT-X-MEDIA-SEQUENCE:")) { msn = Number(value); list.first = msn; }
    else if (line.startsWith("#EXT-X-PROGRAM-DATE-TIME:")) date = Date.parse(value) || null;
    else if (line.startsWith("#EXT-X-TARGETDURATION:")) list.target = Number(value);
    else if (line.startsWith("#EXT-X-PART-INF:")) {
      list.partTarget = Number(hlsAttributes(value)["PART-TARGET"]) || 0;
    } else if (line.startsWith("#EXT-X-SERVER-CONTROL:")) {
      const attrs = hlsAttributes(value);
      list.canBlock = attrs["CAN-BLOCK-RELOAD"] === "YES";
      list.holdBack = Number(attrs["HOLD-BACK"]) || 0;
      list.partHoldBack = Number(attrs["PART-HOLD-BACK"]) || 0;
    } else if (line.startsWith("#EXT-X-MAP:")) {
      list.map = new URL(hlsAttributes(value).URI, base).href;
    } else if (line.startsWith("#EXT-X-PART:")) {
      const attrs = hlsAttributes(value);
      parts.push({ url: new URL(attrs.URI, base).href, duration: Number(attrs.DURATION) || 0,
                   independent: attrs.INDEPENDENT === "YES" });
    } else if (line.startsWith("#EXTINF:")) duration = parseFloat(value) || 0;
    else if (line === "#EXT-X-ENDLIST") list.ended = true;
    else if (!line.startsWith("#")) {
      list.segments.push({ msn, url: new URL(line, base).href, duration, parts, complete: true,
                           date: dated() });
      msn += 1; duration = 0; parts = []; date = null;
    }
  }
  if (parts.length) {
    list.segments.push({ msn, url: null, parts, complete: false, date: dated(),
                         duration: parts.reduce((sum, part) => sum + part.duration, 0) });
  }
  return list;
}

/** Where to start: an independent part about PART-HOLD-BACK behind the live edge (RFC 8216bis
 *  says no closer), or a whole segment HOLD-BACK behind it when the playlist has no parts. */
function hlsStart(list) {
  const parts = [];
  for (const seg of list.segments) seg.parts.forEach((part, i) => parts.push({ msn: seg.msn, part: i, ...part }));
  if (parts.length) {
    const hold = list.partHoldBack || 3 * (list.partTarget || 1);
    let k = parts.length; let behind = 0;
    while (k > 0 && behind < hold) { k -= 1; behind += parts[k].duration; }
    while (k > 0 && !parts[k].independent) k -= 1;
    return { msn: parts[k].msn, part: parts[k].part };
  }
  const complete = list.segments.filter((seg) => seg.complete);
  if (!complete.length) return { msn: list.first, part: -1 };
  const hold = list.holdBack || 3 * list.target;
  let k = complete.length; let behind = 0;
  while (k > 0 && behind < hold) { k -= 1; behind += complete[k].duration; }
  return { msn: complete[k].msn, part: -1 };
}

/** What to do for position ``at`` ({msn, part}; part -1 = whole segments) in ``list``:
 *  {load: url, next} to fetch now; {wait: at} to reload the playlist until ``at`` appears
 *  (``at`` moved on past a finished segment); {behind: true} when ``at`` fell off the list. */
function hlsLocate(list, at) {
  for (;;) {
    const seg = list.segments.find((s) => s.msn === at.msn);
    if (!seg) return at.msn < list.first ? { behind: true } : { wait: at };
    if (at.part < 0) {
      return seg.complete ? { load: seg.url, next: { msn: at.msn + 1, part: -1 },
                              ends: seg.date !== null ? seg.date + seg.duration * 1000 : null }
        : { wait: at };
    }
    if (at.part < seg.parts.length) {
      const upTo = seg.parts.slice(0, at.part + 1).reduce((sum, part) => sum + part.duration, 0);
      return { load: seg.parts[at.part].url, next: { msn: at.msn, part: at.part + 1 },
               ends: seg.date !== null ? seg.date + upTo * 1000 : null };
    }
    if (!seg.complete) return { wait: at };
    if (!seg.parts.length) {
      // an older segment, listed without its parts: whole, if we are at its start
      return at.part === 0 ? { load: seg.url, next: { msn: at.msn + 1, part: 0 }, ends: null }
        : { behind: true };
    }
    at = { msn: at.msn + 1, part: 0 }; // every part of this segment was loaded
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); },
                           { once: true });
  });
}

/** Switch the tile to HLS for good: ``reason`` is said in the page. */
function startHls(view, reason) {
  clearTimeout(view.retry);
  clearTimeout(view.giveUp);
  view.transport = "hls";
  view.hlsReason = reason;
  view.hlsFailures = 0;
  window.__viewer.transport[view.camera.id] = "hls";
  setState(view, `Starting HLS (${reason})…`);
  runHls(view);
}

function hlsPlaying(view, path) {
  setState(view, `Playing over HLS (${view.hlsReason}): a few seconds behind live`);
  window.__viewer.hls[view.camera.id].playing = path;
  view.hlsFailures = 0;
}

/** Says "playing" once the video plays (again), for the path ``path``. */
function watchPlaying(run, path) {
  run.view.video.addEventListener("playing", () => hlsPlaying(run.view, path),
                                  { signal: run.abort.signal });
}

/** One HLS attempt: a new agent session (multivariant playlist), then MSE or native until it
 *  fails; failures are answered here (stop with a message, or a new attempt after a pause). */
async function runHls(view) {
  if (view.hls) view.hls.abort.abort();
  const run = { abort: new AbortController(), view };
  view.hls = run;
  const video = view.video;
  view.hlsAttempts = (view.hlsAttempts || 0) + 1;
  const info = { attempts: view.hlsAttempts, parts: 0, jumps: 0, playing: null };
  window.__viewer.hls[view.camera.id] = info;
  let inSession = false;
  try {
    const response = await fetch(hlsPath(view.camera), {
      headers: { Authorization: `Bearer ${state.token}` }, cache: "no-store",
      signal: run.abort.signal,
    });
    if (!response.ok) throw new HttpError(response);
    const variant = parseMultivariant(await response.text(), response.url);
    inSession = true;
    Object.assign(info, { codecs: variant.codecs, resolution: variant.resolution });
    video.srcObject = null;
    const path = hlsRoute(variant.codecs);
    info.path = path;
    if (path === "mse") await playMse(run, variant);
    else if (path === "native") await playNative(run, variant);
    else {
      const hevc = /^(hvc1|hev1)/.test(variant.codecs);
      setState(view, `This browser cannot play the camera's ${hevc ? "H.265 " : ""}video ` +
               `(${variant.codecs || "codec unknown"}): watch it over RTSP, or set the camera ` +
               "(or its substream) to H.264.", true);
    }
  } catch (error) {
    if (view.hls !== run) return; // replaced by a newer attempt
    run.abort.abort();
    await hlsFailed(view, error, inSession);
  }
}

function mseType(codecs) {
  return `video/mp4; codecs="${codecs}"`;
}

/** "mse", "native" or null. MSE first (see docs/viewing.md): our player keeps close to live
 *  and sees the agent's answers (a revoked token); native where MSE cannot take the codecs
 *  (an iPhone has no MediaSource) and the browser says it can decode them at all. */
function hlsRoute(codecs) {
  const probe = document.createElement("video");
  const native = probe.canPlayType("application/vnd.apple.mpegurl") !== "" &&
    (!codecs || probe.canPlayType(mseType(codecs)) !== "");
  const mse = "MediaSource" in window && (!codecs || MediaSource.isTypeSupported(mseType(codecs)));
  if (state.hlsMode === "native" && native) return "native";
  if (mse) return "mse";
  return native ? "native" : null;
}

/** Answer a failed attempt: stop with the agent's reason, or try again (a new session) after
 *  a pause that doubles with each failure in a row, up to 10 s. ``inSession``: the failure
 *  came after the multivariant playlist was granted. */
async function hlsFailed(view, error, inSession) {
  view.hlsFailures += 1;
  const failures = window.__viewer.hlsFailures;
  (failures[view.camera.id] = failures[view.camera.id] || []).push(
    error instanceof HttpError ? `HTTP ${error.status}` : String(error.message || error));
  const backoff = Math.min(1000 * 2 ** (view.hlsFailures - 1), 10000);
  const again = (text, ms) => {
    setState(view, text, true);
    view.retry = setTimeout(() => runHls(view), ms);
  };
  if (error instanceof HttpError) {
    const response = error.response;
    if (response.status === 401) {
      // The session or the token ended: a revoked or expired token stops, else a new session.
      const why = await tokenEnded();
      if (why) setState(view, `Stream ended. ${why}`, true);
      else again("Stream interrupted; reconnecting…", Math.min(backoff, 2000));
      return;
    }
    const why = await explain(response);
    if (response.status === 503 || response.status === 429) {
      const wait = Number(response.headers.get("Retry-After") || "5");
      again(why.text, Math.max(wait * 1000, backoff));
    } else if (response.status === 403 || !inSession) {
      setState(view, why.text, true); // not allowed, no such camera: retrying would not help
    } else {
      again("Stream interrupted; reconnecting…", backoff); // a part or session gone: anew
    }
    return;
  }
  if (error instanceof TypeError) setState(view, "The agent cannot be reached.", true);
  else setState(view, `HLS playback failed (${error.message || error}); retrying…`, true);
  view.retry = setTimeout(() => runHls(view), backoff);
}

// A request of the session that has no answer this long is given up (a Wi-Fi that dropped
// without a reset would otherwise hold it for ever). The agent answers a blocking reload
// within 3 target durations (6 s by default).
const REQUEST_MS = 15000;

async function hlsGet(run, url, kind) {
  const request = new AbortController();
  const abort = () => request.abort();
  run.abort.signal.addEventListener("abort", abort, { once: true });
  const timer = setTimeout(abort, REQUEST_MS);
  try {
    const response = await fetch(url, { cache: "no-store", signal: request.signal });
    if (!response.ok) throw new HttpError(response);
    return await (kind === "text" ? response.text() : response.arrayBuffer());
  } catch (error) {
    if (request.signal.aborted && !run.abort.signal.aborted) {
      throw new TypeError("the agent did not answer in time");
    }
    throw error;
  } finally {
    clearTimeout(timer);
    run.abort.signal.removeEventListener("abort", abort);
  }
}

async function mediaPlaylist(run, url, at) {
  let target = url;
  if (at) {
    const query = new URL(url);
    query.searchParams.set("_HLS_msn", String(at.msn));
    if (at.part >= 0) query.searchParams.set("_HLS_part", String(at.part));
    target = query.href;
  }
  return parseMedia(await hlsGet(run, target, "text"), url);
}

function appendTo(buffer, data, signal) {
  return new Promise((resolve, reject) => {
    const done = () => { cleanup(); signal.aborted ? reject(signal.reason) : resolve(); };
    const fail = () => { cleanup(); reject(new Error("the browser could not decode the video")); };
    const cleanup = () => {
      buffer.removeEventListener("updateend", done);
      buffer.removeEventListener("error", fail);
    };
    buffer.addEventListener("updateend", done);
    buffer.addEventListener("error", fail);
    try { buffer.appendBuffer(data); } catch (error) { cleanup(); reject(error); }
  });
}

function removeFrom(buffer, end, signal) {
  return new Promise((resolve, reject) => {
    const done = () => {
      buffer.removeEventListener("updateend", done);
      signal.aborted ? reject(signal.reason) : resolve();
    };
    buffer.addEventListener("updateend", done);
    try { buffer.remove(0, end); }
    catch (error) { buffer.removeEventListener("updateend", done); reject(error); }
  });
}

// How far behind the newest buffered picture the MSE player plays, and how much it keeps.
const BEHIND_S = 1.5; // at least one ~1 s part in hand, so the next one can arrive in time
const TOO_FAR_S = 4; // behind by more than BEHIND_S + this: jump forward
const KEEP_S = 8; // seconds kept behind the playhead (seeking back a little)
const PAUSED_KEEP_S = 20; // paused by the user: at most this much kept ahead

/** Keep the playhead near the live edge: start, skip gaps, catch up after a stall. */
function followLive(run) {
  const video = run.view.video;
  const ranges = video.buffered;
  if (!ranges.length) return;
  const end = ranges.end(ranges.length - 1);
  const start = ranges.start(ranges.length - 1);
  const now = video.currentTime;
  const inRange = now >= start - 0.1;
  // (paused by the user: only when far behind, so that the buffer stays short)
  const tooFar = run.userPaused ? PAUSED_KEEP_S : BEHIND_S + TOO_FAR_S;
  if (!inRange || end - now > tooFar) {
    video.currentTime = Math.max(start, end - BEHIND_S);
    window.__viewer.hls[run.view.camera.id].jumps += 1;
  }
  if (video.paused && !run.userPaused) video.play().catch(() => {});
  // how far behind the camera (as the agent received it) the picture is, in seconds; only
  // meaningful when this device's clock agrees with the agent's (the tests: one machine)
  if (run.clock) {
    const shown = run.clock.wall - (run.clock.media - video.currentTime) * 1000;
    window.__viewer.hls[run.view.camera.id].latency = (Date.now() - shown) / 1000;
  }
}

async function playMse(run, variant) {
  const view = run.view; const video = view.video; const signal = run.abort.signal;
  const info = window.__viewer.hls[view.camera.id];
  const source = new MediaSource();
  const objectUrl = URL.createObjectURL(source);
  signal.addEventListener("abort", () => {
    URL.revokeObjectURL(objectUrl);
    if (video.src === objectUrl) { video.removeAttribute("src"); video.load(); }
  }, { once: true });
  await new Promise((resolve) => {
    source.addEventListener("sourceopen", resolve, { once: true });
    video.src = objectUrl;
  });
  const buffer = source.addSourceBuffer(mseType(variant.codecs || "avc1.42e01f"));
  // A pause the user asked for is kept (a stall for data does not fire "pause").
  video.addEventListener("pause", () => { run.userPaused = true; }, { signal });
  video.addEventListener("play", () => { run.userPaused = false; }, { signal });
  watchPlaying(run, "mse");
  const timer = setInterval(() => followLive(run), 1000);
  signal.addEventListener("abort", () => clearInterval(timer), { once: true });

  let list = await mediaPlaylist(run, variant.url, null);
  let at = hlsStart(list);
  let map = null;
  for (;;) {
    if (list.map !== map) { // the stream's initialization (again after a format change)
      await appendTo(buffer, await hlsGet(run, list.map, "bytes"), signal);
      map = list.map;
    }
    const found = hlsLocate(list, at);
    if (found.behind) { // we fell off the playlist: on to the live edge
      at = hlsStart(list);
      info.jumps += 1;
      continue;
    }
    if (found.wait) { // blocking reload: the agent answers once that part exists
      at = found.wait;
      if (list.ended) throw new Error("the stream ended");
      if (!list.canBlock) await sleep(1000 * (list.partTarget || list.target / 2), signal);
      list = await mediaPlaylist(run, variant.url, list.canBlock ? at : null);
      continue;
    }
    const data = await hlsGet(run, found.load, "bytes");
    try {
      await appendTo(buffer, data, signal);
    } catch (error) { // the browser's buffer is full (a long pause): drop the past, once
      if (error.name !== "QuotaExceededError") throw error;
      await removeFrom(buffer, Math.max(0, video.currentTime - 1), signal);
      await appendTo(buffer, data, signal);
    }
    info.parts += 1;
    at = found.next;
    if (found.ends !== null && video.buffered.length) { // media time -> wall clock
      run.clock = { media: video.buffered.end(video.buffered.length - 1), wall: found.ends };
    }
    followLive(run);
    const ranges = video.buffered;
    if (ranges.length && video.currentTime - ranges.start(0) > 2 * KEEP_S) {
      await removeFrom(buffer, video.currentTime - KEEP_S, signal);
    }
  }
}

/** The browser's own HLS, given the variant URL (no token in it). It tells the page only
 *  "error" (after its own retries) and nothing of HTTP statuses, so the page also reads the
 *  variant playlist itself every CHECK_MS (the agent answers 401 once the session or token
 *  ended) and treats a stall of STALL_MS as a failure. */
const STALL_MS = 6000;
const NATIVE_MIN_SEGMENTS = 3;
const CHECK_MS = 2000;

async function playNative(run, variant) {
  const view = run.view; const video = view.video; const signal = run.abort.signal;
  // A camera just started has few complete segments; Chromium's native player fails on a
  // live playlist of one ("DEMUXER_ERROR_COULD_NOT_PARSE", docs/field-notes.md), so the page
  // waits for NATIVE_MIN_SEGMENTS with blocking reloads (one segment each) first.
  let list = await mediaPlaylist(run, variant.url, null);
  for (;;) {
    const complete = list.segments.filter((seg) => seg.complete);
    if (complete.length >= NATIVE_MIN_SEGMENTS) break;
    const next = complete.length ? complete[complete.length - 1].msn + 1 : list.first;
    list = await mediaPlaylist(run, variant.url, { msn: next, part: -1 });
  }
  return new Promise((resolve, reject) => {
    signal.addEventListener("abort", () => {
      video.removeAttribute("src"); video.load(); reject(signal.reason);
    }, { once: true });
    video.addEventListener("error", () => {
      const code = video.error ? video.error.code : 0;
      const message = video.error && video.error.message ? `: ${video.error.message}` : "";
      reject(code === MediaError.MEDIA_ERR_SRC_NOT_SUPPORTED || code === MediaError.MEDIA_ERR_DECODE
        ? new Error(`the browser could not decode the video${message}`)
        : new TypeError("network error"));
    }, { signal });
    let last = -1; let since = Date.now();
    const stalls = setInterval(() => {
      if (video.currentTime !== last || video.paused) { last = video.currentTime; since = Date.now(); }
      else if (Date.now() - since > STALL_MS) reject(new Error("the stream stalled"));
    }, 1000);
    const checks = setInterval(() => {
      fetch(variant.url, { cache: "no-store", signal }).then((response) => {
        if (!response.ok) reject(new HttpError(response));
      }, () => {}); // unreachable: the stall check answers that
    }, CHECK_MS);
    signal.addEventListener("abort", () => { clearInterval(stalls); clearInterval(checks); },
                           { once: true });
    watchPlaying(run, "native");
    video.src = variant.url;
    video.play().catch(() => {});
  }).catch(async (error) => {
    // A stall or an error may be the agent's 401: ask whether the token ended.
    if (!(error instanceof HttpError) && !signal.aborted && (await tokenEnded())) {
      throw new HttpError(new Response(null, { status: 401 }));
    }
    throw error;
  });
}

window.addEventListener("pagehide", () => {
  for (const location of state.sessions.values()) {
    fetch(location, { method: "DELETE", keepalive: true,
                      headers: { Authorization: `Bearer ${state.token}` } }).catch(() => {});
  }
  state.sessions.clear();
});

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  $("token-input").value = "";
  history.replaceState(null, "", `#token=${encodeURIComponent(state.token)}`);
  loadCameras();
});

state.token = tokenFromFragment();
if (state.token) loadCameras();
else { $("token-form").hidden = false; notice("Paste your access token to watch."); }
