// Visita footfall page: polls the gateway's JSON API every 2 s and redraws.
// No framework and nothing from the internet (stores are often offline). Every value from the
// API is written with textContent, never as HTML: zone names come from a config file.
"use strict";

const REFRESH_MS = 2000;
const TIMEOUT_MS = 4000; // a hung gateway must turn into "not answering", not a frozen page
const VISITS_LIMIT = 30;

const $ = (id) => document.getElementById(id);

function pad2(n) {
  return String(n).padStart(2, "0");
}

/** Local HH:MM of a UNIX time in seconds. */
function hhmm(ts) {
  const d = new Date(ts * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
}

/** Local HH:MM:SS of a UNIX time in seconds. */
function hhmmss(ts) {
  const d = new Date(ts * 1000);
  return `${hhmm(ts)}:${pad2(d.getSeconds())}`;
}

/** "42 s", "7 min 12 s", "1 h 3 min". */
function dwell(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(n) {
  return Number(n).toLocaleString();
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store", signal: AbortSignal.timeout(TIMEOUT_MS) });
  if (!response.ok) throw new Error(`HTTP ${response.status} from ${url}`);
  return response.json();
}

// ------------------------------------------------------------------ connection state

let lastOk = null; // wall-clock ms of the last successful refresh

function setConn(state, text) {
  const box = $("conn-state");
  box.className = `conn conn-${state}`;
  box.dataset.state = state;
  box.querySelector(".conn-text").textContent = text;
  $("main").classList.toggle("stale", state !== "ok");
}

// ------------------------------------------------------------------ rendering

function renderFootfall(f) {
  $("store").textContent = f.store;
  $("occupancy").textContent = fmt(f.occupancy);
  $("entries-last-hour").textContent = fmt(f.entries_last_hour);
  $("visitors-today").textContent = fmt(f.visitors_today);
  $("passbys-today").textContent = fmt(f.passbys_today);
  $("staff-today").textContent = fmt(f.staff_today);
  $("day").textContent = f.day;

  const seen = f.visitors_today + f.passbys_today;
  const share = seen > 0 ? (100 * f.visitors_today) / seen : 0;
  const bar = $("today-bar");
  bar.querySelector(".ratio-visitor").style.width = `${seen > 0 ? share : 0}%`;
  bar.querySelector(".ratio-passby").style.width = `${seen > 0 ? 100 - share : 0}%`;
  bar.setAttribute(
    "aria-label",
    seen > 0 ? `${f.visitors_today} visitors and ${f.passbys_today} passers-by today` : "Nobody seen yet today",
  );
  $("capture").textContent = seen > 0 ? `${Math.round(share)}% of people seen came in` : "nobody seen yet today";

  const asOf = $("as-of");
  const d = new Date(f.as_of * 1000);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  asOf.textContent = sameDay ? hhmmss(f.as_of) : `${f.day} ${hhmmss(f.as_of)}`;
  asOf.dateTime = d.toISOString();

  renderZones(f);
}

function renderZones(f) {
  const list = $("zones");
  const ids = Object.keys(f.zones);
  const max = Math.max(1, ...ids.map((z) => f.zones[z]));
  $("zones-note").hidden = f.resolution !== "presence";
  const items = ids.map((id) => {
    const n = f.zones[id];
    const li = el("li", n === 0 ? "zone zone-empty" : "zone");
    li.dataset.zone = id;
    li.append(el("span", "zone-name", f.zone_names[id] || id));
    const track = el("span", "zone-track");
    track.setAttribute("aria-hidden", "true");
    const fill = el("span", "zone-fill");
    fill.style.width = `${(100 * n) / max}%`;
    track.append(fill);
    li.append(track, el("span", "zone-count", fmt(n)));
    return li;
  });
  if (items.length === 0) items.push(el("li", "empty", "No zones in the store plan"));
  list.replaceChildren(...items);
}

const KIND = { member: "Member", anonymous: "Anonymous" };

function renderVisits(visits, zoneNames) {
  // Open visits first (the API already orders them so; keep it true whatever it sends).
  const rows = [...visits.filter((v) => v.open), ...visits.filter((v) => !v.open)];
  const body = $("visits");
  const name = (z) => zoneNames[z] || z;
  const trs = rows.map((v) => {
    const tr = el("tr", v.open ? "visit open" : "visit");
    tr.dataset.testid = "visit-row";
    tr.dataset.visit = v.visit_id;

    const started = el("td", "time");
    const t = el("time", "", hhmm(v.started));
    t.dateTime = new Date(v.started * 1000).toISOString();
    started.append(t);

    const who = el("td", `who who-${v.subject_kind}`, KIND[v.subject_kind] || v.subject_kind);
    const dw = el("td", "num dwell", dwell(v.dwell_s));
    const path = el("td", "path", v.path.map(name).join(" → "));

    const type = el("td", "type");
    if (v.open) type.append(el("span", "badge badge-inside", "inside"));
    type.append(el("span", `badge badge-${v.classification}`, v.classification));

    tr.append(started, who, dw, path, type);
    return tr;
  });
  if (trs.length === 0) {
    const tr = el("tr", "empty");
    const td = el("td", "", "No visits yet today");
    td.colSpan = 5;
    tr.append(td);
    trs.push(tr);
  }
  body.replaceChildren(...trs);
  const inside = rows.filter((v) => v.open).length;
  $("visits-note").textContent = `${inside} open · ${rows.length - inside} finished · newest ${VISITS_LIMIT} at most`;
}

// ------------------------------------------------------------------ polling

async function refresh() {
  try {
    const [footfall, visits] = await Promise.all([
      getJSON("/api/v1/footfall"),
      getJSON(`/api/v1/visits?limit=${VISITS_LIMIT}`),
    ]);
    renderFootfall(footfall);
    renderVisits(visits, footfall.zone_names);
    lastOk = Date.now();
    setConn("ok", "Live");
  } catch (err) {
    const since = lastOk === null ? "" : ` since ${hhmmss(lastOk / 1000)}`;
    const answered = err instanceof Error && err.message.startsWith("HTTP ");
    setConn("down", answered ? `Gateway error (${err.message.split(" from")[0]})` : `Gateway not answering${since}`);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
