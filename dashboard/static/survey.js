// Visita site survey page: the installer taps where they stand with the survey tag, records, and applies the map.
// It talks to the installer endpoints (/api/v1/survey…) with the installer token, which it keeps in this tab's
// sessionStorage only. No framework and nothing from the internet; values from the API go in as text, never HTML.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 8000;
const TOKEN_KEY = "visita-installer-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const GRID_M = 0.5; // a tap is rounded to this: nobody stands more exactly than that

const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let plan = null; // GET /api/v1/survey/plan
let candidate = null; // [x, y] where the installer tapped, or typed
let status = null; // the last GET /api/v1/survey (or the answer of a change)
let busy = false; // a request that changes something is on its way: nothing else may start
let changes = 0; // counts changes, so that a poll sent before one cannot overwrite its answer
let pollTimer = null;
let pollFailed = false; // the message shown is the poll's "does not answer"
let shownSpots = ""; // the spots the list shows, so that it is rebuilt (and focus lost) only when they change

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
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
  pollFailed = false;
}

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

const pts = (list) => list.map(([x, y]) => `${x},${y}`).join(" ");
const where = (x, y) => `(${x}, ${y})`;

// ------------------------------------------------------------------ the plan

function drawPlan() {
  const root = $("plan");
  root.replaceChildren();
  const all = [
    ...plan.zones.flatMap((z) => z.polygon),
    ...plan.walls.flatMap((w) => w.points),
    ...plan.doors,
    ...plan.receivers.flatMap((r) => (r.position ? [r.position] : [])),
  ];
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
    const mark = svg("rect", { x: x - label / 2, y: y - label / 2, width: label, height: label, class: "plan-receiver" }, root);
    mark.dataset.receiver = r.id;
    const t = svg("text", { x: x + label * 0.8, y: y - label * 0.6, "font-size": label * 0.8, class: "plan-rx-label" }, root);
    t.textContent = r.id;
  }
  svg("g", { id: "plan-spots" }, root);
}

/** Where on the plan (metres) a click landed: the drawing's own transform, read at the time of the click. */
$("plan").addEventListener("click", (ev) => {
  const ctm = $("plan").getScreenCTM();
  if (!ctm || !plan) return;
  const p = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(ctm.inverse());
  candidate = [Math.round(p.x / GRID_M) * GRID_M, Math.round(p.y / GRID_M) * GRID_M];
  $("x").value = String(candidate[0]);
  $("y").value = String(candidate[1]);
  render();
});

/** Typed coordinates (a spot measured with a tape) are the candidate once both are numbers. */
for (const id of ["x", "y"]) {
  $(id).addEventListener("input", () => {
    const x = $("x").valueAsNumber;
    const y = $("y").valueAsNumber;
    candidate = Number.isFinite(x) && Number.isFinite(y) ? [x, y] : null;
    render();
  });
}

function heardBy(packets) {
  return Object.values(packets).filter((n) => n >= plan.min_packets).length;
}

const weak = (sp) => heardBy(sp.packets) < 3;

function drawSpots() {
  const g = $("plan-spots");
  if (!g) return;
  g.replaceChildren();
  const r = Number($("plan").dataset.size || 20) / 60;
  for (const sp of status ? status.spots : []) {
    const c = svg("circle", { cx: sp.x, cy: sp.y, r, class: weak(sp) ? "plan-spot weak" : "plan-spot" }, g);
    c.dataset.index = String(sp.index);
  }
  const run = status && status.running;
  if (run) svg("circle", { cx: run.x, cy: run.y, r: r * 1.4, class: "plan-spot running" }, g);
  if (candidate) svg("circle", { cx: candidate[0], cy: candidate[1], r: r * 1.2, class: "plan-candidate" }, g);
}

// ------------------------------------------------------------------ the lists and buttons

function packetsText(packets) {
  const heard = Object.entries(packets).sort(([a], [b]) => a.localeCompare(b));
  return heard.length ? heard.map(([rx, n]) => `${rx} ${n}`).join(", ") : "heard by no receiver yet";
}

function render() {
  drawSpots();
  $("candidate").textContent = candidate ? `${where(candidate[0], candidate[1])} m` : "tap the plan or type x and y";
  const run = status && status.running;
  $("record").disabled = busy || !candidate || Boolean(run);
  $("apply").disabled = busy || Boolean(run) || !status || status.spots.length === 0;
  for (const b of document.querySelectorAll("#spots button")) b.disabled = busy;
  if (!status) return;
  $("transmitter").textContent = status.transmitter;
  $("running").textContent = run
    ? `Recording at ${where(run.x, run.y)} in ${run.zone}: ${Math.ceil(run.seconds_left)} s left · ${packetsText(run.packets)}`
    : "";
  $("applied").textContent = status.applied ? `a map of ${status.applied.spots} spot(s), ${status.applied.file}` : "no survey map";
  const key = JSON.stringify(status.spots);
  if (key !== shownSpots) {
    shownSpots = key;
    renderSpots();
  }
}

function renderSpots() {
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
    text.textContent = `${where(sp.x, sp.y)} ${sp.zone}${weak(sp) ? " · weak: fewer than 3 receivers heard it well" : ""} · ${packetsText(sp.packets)}`;
    const drop = document.createElement("button");
    drop.type = "button";
    drop.className = "link";
    drop.disabled = busy;
    drop.textContent = "Discard";
    drop.setAttribute("aria-label", `Discard the spot at ${where(sp.x, sp.y)}`);
    drop.addEventListener("click", () => change("DELETE", `/api/v1/survey/spots/${sp.index}`, undefined, `Spot ${where(sp.x, sp.y)} discarded.`));
    li.append(text, " ", drop);
    list.appendChild(li);
  }
}

/** Take a status from the gateway; a spot that has just ended is said so. */
function take(next) {
  const was = status && status.running;
  status = next;
  if (was && !next.running) {
    const done = next.spots.find((sp) => sp.x === was.x && sp.y === was.y);
    if (done) say(`Spot ${where(done.x, done.y)} recorded: ${packetsText(done.packets)}.`, "ok");
  }
  render();
}

async function poll() {
  pollTimer = null;
  if (!busy) {
    const seen = changes;
    try {
      const next = await api("GET", "/api/v1/survey");
      if (seen === changes && !busy) {
        if (pollFailed) say("", "ok");
        take(next);
      }
    } catch (err) {
      failed(err, true);
    }
  }
  if (token && !$("survey").hidden) pollTimer = setTimeout(poll, POLL_MS); // one at a time, never piling up
}

/** A request that changes the survey; its answer is the new status (or the applied map). */
async function change(method, path, body, done) {
  if (busy) return; // a second tap while the first is on its way does nothing
  busy = true;
  changes += 1;
  render();
  try {
    const out = await api(method, path, body);
    say(typeof done === "function" ? done(out) : done, "ok");
    if (out && Array.isArray(out.spots)) status = out;
  } catch (err) {
    failed(err, false);
  } finally {
    busy = false;
    changes += 1;
    render();
  }
}

function failed(err, fromPoll) {
  if (err.code === 401 || err.code === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    lock();
  }
  say(err.message, "bad");
  pollFailed = fromPoll && err.code === 0;
}

// ------------------------------------------------------------------ unlocking

function lock() {
  clearTimeout(pollTimer);
  pollTimer = null;
  $("survey").hidden = true;
  $("unlock").hidden = false;
  $("token").focus();
}

async function unlock() {
  try {
    plan = await api("GET", "/api/v1/survey/plan");
    const first = await api("GET", "/api/v1/survey");
    sessionStorage.setItem(TOKEN_KEY, token);
    $("unlock").hidden = true;
    $("survey").hidden = false;
    drawPlan();
    shownSpots = "";
    status = null;
    take(first);
    say("", "ok");
    $("plan-title").focus();
    clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, POLL_MS);
  } catch (err) {
    failed(err, false);
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
