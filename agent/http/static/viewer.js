// TheRelay Agent viewer: lists the cameras an access token may see and plays them over WHEP.
// The token comes from the URL fragment (#token=…, never sent to the server in a URL) or
// the paste box, and travels only in Authorization headers.
"use strict";

const state = { token: null, sessions: new Map() };
window.__viewer = { cameras: {}, frames: {}, sessions: {}, pcs: {} }; // read by the browser tests

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
  const view = { camera, video, status, retry: null };
  window.__viewer.frames[camera.id] = 0;
  countFrames(view);
  play(view);
}

function setState(view, text, isError) {
  view.status.textContent = text;
  view.status.classList.toggle("error", !!isError);
  window.__viewer.cameras[view.camera.id] = { text, error: !!isError };
}

function countFrames(view) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const tick = () => {
    window.__viewer.frames[view.camera.id] += 1;
    view.video.requestVideoFrameCallback(tick);
  };
  view.video.requestVideoFrameCallback(tick);
}

// Shorter than the agent's handshake deadline (sessions.handshake_timeout, 10 s by default)
// would be rude to slow networks; longer would leave a dead tile. Chromium itself reports
// "failed" only after about 30 s.
const GIVE_UP_MS = 10000;

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
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected") {
      clearTimeout(view.giveUp);
      setState(view, "live");
    }
    if (["failed", "closed", "disconnected"].includes(pc.connectionState)) ended(view, pc);
  };
  // A session that cannot connect (ICE blocked by a firewall) is given up, and deleted on the
  // agent, rather than left to the agent's own handshake deadline.
  clearTimeout(view.giveUp);
  view.giveUp = setTimeout(() => {
    if (pc.connectionState !== "connected") ended(view, pc);
  }, GIVE_UP_MS);
}

/** DELETE the camera's session on the agent (it frees its sockets at once). */
function forget(view) {
  const location = state.sessions.get(view.camera.id);
  if (!location) return;
  state.sessions.delete(view.camera.id);
  fetch(location, { method: "DELETE", keepalive: true,
                    headers: { Authorization: `Bearer ${state.token}` } }).catch(() => {});
}

async function ended(view, pc) {
  if (view.ending) return;
  view.ending = true;
  clearTimeout(view.giveUp);
  pc.close();
  forget(view);
  // Ask the agent why: a revoked or expired token says so; otherwise reconnect.
  let response = null;
  try { response = await api(`/api/v1/cameras`); } catch (e) { /* agent unreachable */ }
  view.ending = false;
  if (response && !response.ok) {
    const why = await explain(response);
    setState(view, `Stream ended. ${why.text}`, true);
    return;
  }
  setState(view, "Stream interrupted; reconnecting…", true);
  view.retry = setTimeout(() => play(view), 2000);
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
