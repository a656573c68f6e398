// Visita site survey page: the installer taps where they stand with the survey tag, records, and applies the map.
// It talks to the installer endpoints (/api/v1/survey…) with the installer token, which it keeps in this tab's
// sessionStorage only. No framework and nothing from the internet; values from the API go in as text, never HTML.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 8000;
const TOKEN_KEY = "visita-installer-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const GRID_M = 0.5; // a tap is rounded to this: nobody stands more exactly than that
const HEARD_PACKETS = 5; // a receiver that heard this many packets of the tag at a spot counts as hearing it there

const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let candidate = null; // [x, y] where the installer tapped
let status = null; // the last GET /api/v1/survey
let busy = false; // a request that changes something is on its way
let pollTimer = null;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** One request to the gateway with the installer token; the decoded JSON, or ApiError with the gateway's words. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  const opts = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
  let r;
  try {
    r = await fetch(path, { ...opts, signal: ctrl.signal });
  } catch (err) {
    throw new ApiError(0, "the gateway does not answer: is it running? (systemctl status visita)");
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  try {
    data = await r.json();
  } catch (err) {
    data = null;
  }
  if (!r.ok) {
    const said = data && typeof data.message === "string" ? data.message : r.statusText;
    throw new ApiError(r.status, `${r.status}: ${said}`);
  }
  return data;
}

function say(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.dataset.kind = kind;
  m.className = `survey-message survey-${kind}`;
  m.hidden = !text;
}

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

const pts = (list) => list.map(([x, y]) => `${x},${y}`).join(" ");

// ------------------------------------------------------------------ the plan

function drawPlan(plan) {
  const root = $("plan");
  root.replaceChildren();
  const all = [...plan.zones.flatMap((z) => z.polygon), ...plan.receivers.flatMap((r) => (r.position ? [r.position] : []))];
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const pad = 1;
  const x0 = Math.min(...xs) - pad;
  const y0 = Math.min(...ys) - pad;
  const w = Math.max(...xs) - x0 + pad;
  const h = Math.max(...ys) - y0 + pad;
  root.setAttribute("viewBox", `${x0} ${y0} ${w} ${h}`);
  root.dataset.size = String(Math.max(w, h));
  const label = Math.max(w, h) / 45; // text and marks scale with the store
  const zones = svg("g", { class: "plan-zones" }, root);
  for (const z of plan.zones) {
    const poly = svg("polygon", { points: pts(z.polygon), class: z.outside ? "plan-zone outside" : "plan-zone" }, zones);
    poly.dataset.zone = z.id;
    const cx = z.polygon.reduce((s, p) => s + p[0], 0) / z.polygon.length;
    const cy = z.polygon.reduce((s, p) => s + p[1], 0) / z.polygon.length;
    const t = svg("text", { x: cx, y: cy, "font-size": label, class: "plan-label" }, zones);
    t.textContent = z.name || z.id;
  }
  for (const wall of plan.walls) svg("polyline", { points: pts(wall.points), class: "plan-wall", "stroke-width": label / 4 }, root);
  for (const [x, y] of plan.doors) svg("circle", { cx: x, cy: y, r: label * 0.6, class: "plan-door" }, root);
  for (const r of plan.receivers) {
    if (!r.position) continue;
    const [x, y] = r.position;
    svg("rect", { x: x - label / 2, y: y - label / 2, width: label, height: label, class: "plan-receiver" }, root);
    const t = svg("text", { x: x + label * 0.8, y: y - label * 0.6, "font-size": label * 0.8, class: "plan-rx-label" }, root);
    t.textContent = r.id;
  }
  svg("g", { id: "plan-spots" }, root);
  root.addEventListener("click", (ev) => {
    const ctm = root.getScreenCTM();
    if (!ctm) return;
    const p = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(ctm.inverse());
    candidate = [Math.round(p.x / GRID_M) * GRID_M, Math.round(p.y / GRID_M) * GRID_M];
    render();
  });
}

function heardBy(packets) {
  return Object.entries(packets).filter(([, n]) => n >= HEARD_PACKETS).length;
}

function drawSpots() {
  const g = $("plan-spots");
  if (!g) return;
  g.replaceChildren();
  const r = Number($("plan").dataset.size || 20) / 60;
  for (const sp of status ? status.spots : []) {
    const c = svg("circle", { cx: sp.x, cy: sp.y, r, class: heardBy(sp.packets) >= 3 ? "plan-spot" : "plan-spot weak" }, g);
    c.dataset.index = String(sp.index);
  }
  const run = status && status.running;
  if (run) svg("circle", { cx: run.x, cy: run.y, r: r * 1.4, class: "plan-spot running" }, g);
  if (candidate) svg("circle", { cx: candidate[0], cy: candidate[1], r: r * 1.2, class: "plan-candidate" }, g);
}

// ------------------------------------------------------------------ the lists and buttons

const where = (x, y) => `(${x}, ${y})`;

function render() {
  drawSpots();
  $("candidate").textContent = candidate ? `${where(candidate[0], candidate[1])} m` : "tap the plan";
  const run = status && status.running;
  $("record").disabled = busy || !candidate || Boolean(run);
  $("apply").disabled = busy || Boolean(run) || !status || status.spots.length === 0;
  if (!status) return;
  $("transmitter").textContent = status.transmitter;
  $("running").textContent = run
    ? `Recording at ${where(run.x, run.y)} in ${run.zone}: ${Math.ceil(run.seconds_left)} s left · ${packetsText(run.packets)}`
    : "";
  $("applied").textContent = status.applied ? `a map of ${status.applied.spots} spot(s), ${status.applied.file}` : "no survey map";
  const list = $("spots");
  list.replaceChildren();
  if (status.spots.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "None yet: stand at a spot, tap it on the plan and record.";
    list.appendChild(li);
  }
  for (const sp of status.spots) {
    const li = document.createElement("li");
    li.dataset.index = String(sp.index);
    const text = document.createElement("span");
    text.textContent = `${where(sp.x, sp.y)} ${sp.zone} · ${packetsText(sp.packets)}`;
    const drop = document.createElement("button");
    drop.type = "button";
    drop.className = "link";
    drop.textContent = "Discard";
    drop.setAttribute("aria-label", `Discard the spot at ${where(sp.x, sp.y)}`);
    drop.addEventListener("click", () => change("DELETE", `/api/v1/survey/spots/${sp.index}`, undefined, "Spot discarded."));
    li.append(text, " ", drop);
    list.appendChild(li);
  }
}

function packetsText(packets) {
  const heard = Object.entries(packets).sort(([a], [b]) => a.localeCompare(b));
  return heard.length ? heard.map(([rx, n]) => `${rx} ${n}`).join(", ") : "heard by no receiver yet";
}

async function refresh() {
  try {
    status = await api("GET", "/api/v1/survey");
    render();
  } catch (err) {
    failed(err);
  }
}

/** A request that changes the survey; its answer is the new status (or the applied map). */
async function change(method, path, body, done) {
  busy = true;
  render();
  try {
    const out = await api(method, path, body);
    if (out && Array.isArray(out.spots)) status = out;
    say(typeof done === "function" ? done(out) : done, "ok");
    await refresh();
  } catch (err) {
    failed(err);
  } finally {
    busy = false;
    render();
  }
}

function failed(err) {
  if (err.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    lock();
  }
  say(err.message, "bad");
}

// ------------------------------------------------------------------ unlocking

function lock() {
  clearInterval(pollTimer);
  pollTimer = null;
  $("survey").hidden = true;
  $("unlock").hidden = false;
}

async function unlock() {
  try {
    const plan = await api("GET", "/api/v1/survey/plan");
    status = await api("GET", "/api/v1/survey");
    sessionStorage.setItem(TOKEN_KEY, token);
    $("unlock").hidden = true;
    $("survey").hidden = false;
    drawPlan(plan);
    render();
    say("", "ok");
    clearInterval(pollTimer);
    pollTimer = setInterval(refresh, POLL_MS);
  } catch (err) {
    failed(err);
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  unlock();
});

$("record").addEventListener("click", () => {
  if (!candidate) return;
  const [x, y] = candidate;
  const seconds = Number($("seconds").value);
  change("POST", "/api/v1/survey/spots", { x, y, seconds }, `Recording at ${where(x, y)} for ${seconds} s: stay there, turn slowly.`);
});

$("apply").addEventListener("click", () => {
  change("POST", "/api/v1/survey/apply", undefined, (out) => {
    const used = Object.entries(out.receivers).map(([rx, n]) => `${rx} ${n}`).join(", ");
    return `A map of ${out.spots} spot(s) is saved to ${out.file} and in use (spots per receiver: ${used}).`;
  });
});

fetch("/healthz", { cache: "no-store" })
  .then((r) => r.json())
  .then((h) => {
    $("store").textContent = h.store;
    $("gateway").textContent = h.gateway;
    $("version").textContent = h.version;
  })
  .catch(() => say("the gateway does not answer: is it running? (systemctl status visita)", "bad"));

if (token) unlock();
