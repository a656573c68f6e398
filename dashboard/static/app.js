// Visita footfall page: polls the gateway's JSON API every 2 s and redraws.
// No framework and nothing from the internet (stores are often offline). Every value from the
// API is written with textContent, never as HTML: zone names come from a config file.
"use strict";

const REFRESH_MS = 2000;
const TIMEOUT_MS = 4000; // a hung gateway must turn into "offline", not a frozen page
const STALE_MS = 10000; // answering, but the figures have not moved for this long: say so
const INSIDE_LIMIT = 20; // visits still inside listed, newest first
const FINISHED_LIMIT = 10; // and the latest finished ones, listed even when a big store has many more inside
const PATH_SHOWN = 3; // zones shown in a visit's path before it is shortened

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ formatting

let timeZone; // the store's, once the gateway has said which; the tablet's until then
let clockFmt = null;
let dayFmt = null;
let isoDayFmt = null; // a time's store-local day, as YYYY-MM-DD
let today = ""; // the store-local day of the figures shown (the API's `day`)

function setTimeZone(tz) {
  if (tz === timeZone && clockFmt !== null) return;
  const opts = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };
  const isoOpts = { year: "numeric", month: "2-digit", day: "2-digit" };
  try {
    clockFmt = new Intl.DateTimeFormat(undefined, { ...opts, timeZone: tz });
    dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "short", day: "numeric", month: "short", timeZone: "UTC" });
    isoDayFmt = new Intl.DateTimeFormat("en-US", { ...isoOpts, timeZone: tz });
    timeZone = tz;
  } catch (err) {
    clockFmt = new Intl.DateTimeFormat(undefined, opts); // unknown zone on an old tablet: local time
    dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "short", day: "numeric", month: "short" });
    isoDayFmt = new Intl.DateTimeFormat("en-US", isoOpts);
    timeZone = tz;
  }
}
setTimeZone(undefined);

/** HH:MM:SS of a UNIX time in seconds, in the store's time zone. */
function hhmmss(ts) {
  return clockFmt.format(new Date(ts * 1000));
}

/** HH:MM of a UNIX time in seconds, in the store's time zone. */
function hhmm(ts) {
  return hhmmss(ts).slice(0, 5);
}

/** "Thu 28 May" from a YYYY-MM-DD day. */
function dayLabel(day) {
  const d = new Date(`${day}T12:00:00Z`);
  return Number.isNaN(d.getTime()) ? day : dayFmt.format(d);
}

/** The store-local day of a UNIX time in seconds, as YYYY-MM-DD. */
function localDay(ts) {
  const part = Object.fromEntries(isoDayFmt.formatToParts(new Date(ts * 1000)).map((p) => [p.type, p.value]));
  return `${part.year}-${part.month}-${part.day}`;
}

/** HH:MM of a UNIX time in seconds, with its day in front when that is not the day shown ("Wed 27 May 20:54"). */
function when(ts) {
  const day = localDay(ts);
  return today === "" || day === today ? hhmm(ts) : `${dayLabel(day)} ${hhmm(ts)}`;
}

/** "42 s", "4 min 12 s", "1 h 3 min". */
function dwell(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function fmt(n) {
  return Number(n).toLocaleString();
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ fetching

class HttpError extends Error {}

async function getJSON(url) {
  // AbortController + setTimeout rather than AbortSignal.timeout: store tablets are often not new.
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
  try {
    const response = await fetch(url, { cache: "no-store", signal: ctrl.signal });
    if (!response.ok) throw new HttpError(`HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------ connection state

let downSince = null; // wall-clock ms of the first failure in a row
let lastAsOf = null; // the data time shown
let asOfMovedAt = null; // wall-clock ms when the data time last moved

function setConn(state, text) {
  const box = $("conn-state");
  if (box.dataset.state !== state) box.className = `conn conn-${state}`;
  box.dataset.state = state;
  const span = box.querySelector(".conn-text");
  if (span.textContent !== text) span.textContent = text; // unchanged text: nothing re-announced
  $("main").classList.toggle("stale", state !== "ok");
}

function wallClock(ms) {
  return hhmmss(ms / 1000);
}

// ------------------------------------------------------------------ rendering

function renderFootfall(f) {
  setTimeZone(f.timezone);
  $("store").textContent = f.store;
  $("gateway").textContent = f.gateway;
  $("occupancy").textContent = fmt(f.occupancy);
  $("entries-last-hour").textContent = fmt(f.entries_last_hour);
  $("visitors-today").textContent = fmt(f.visitors_today);
  $("passbys-today").textContent = fmt(f.passbys_today);
  $("staff-today").textContent = fmt(f.staff_today);
  // The mean dwell of the visits that ended today: "—" until one has.
  $("mean-dwell").textContent =
    f.mean_dwell_today_s === null ? "— (no visit ended yet today)" : `${dwell(f.mean_dwell_today_s)} (${fmt(f.left_today)} ended)`;
  $("day").textContent = f.day ? `· ${dayLabel(f.day)}` : "";
  today = f.day;

  const seen = f.visitors_today + f.passbys_today;
  const share = seen > 0 ? (100 * f.visitors_today) / seen : 0;
  const bar = $("today-bar");
  bar.querySelector(".ratio-visitor").style.width = `${share}%`;
  bar.querySelector(".ratio-passby").style.width = `${seen > 0 ? 100 - share : 0}%`;
  bar.setAttribute(
    "aria-label",
    seen > 0 ? `${f.visitors_today} came in and ${f.passbys_today} passed by today` : "Nobody seen yet today",
  );
  $("capture").textContent = seen > 0 ? `${Math.round(share)}% of people seen came in` : "nobody seen yet today";

  const asOf = $("as-of");
  asOf.dataset.ts = String(f.as_of);
  if (f.as_of > 0) {
    asOf.textContent = hhmmss(f.as_of);
    asOf.dateTime = new Date(f.as_of * 1000).toISOString();
  } else {
    asOf.textContent = "no data yet";
  }

  renderZones(f);
}

/** True when the gateway tells only inside from outside (one receiver): it knows no zones. */
function presenceOnly(f) {
  return f.resolution === "presence";
}

function zoneItem(name, visitors, max) {
  const li = el("li", visitors === 0 ? "zone zone-empty" : "zone");
  li.append(el("span", "zone-name", name));
  const track = el("span", "zone-track");
  track.setAttribute("aria-hidden", "true");
  const fill = el("span", "zone-fill");
  fill.style.width = `${(100 * visitors) / max}%`;
  track.append(fill);
  const count = el("span", "zone-count", fmt(visitors));
  count.setAttribute("aria-label", `${visitors} ${visitors === 1 ? "visitor" : "visitors"}`);
  li.append(track, count);
  return li;
}

function renderZones(f) {
  const presence = presenceOnly(f);
  $("zones-title").textContent = presence ? "Inside the store" : "Inside now, by zone";
  $("zones-note").hidden = !presence;
  let items;
  if (presence) {
    // One receiver hears everyone inside alike: its zone's count is the whole store, not a place in it.
    items = [zoneItem("Inside", f.occupancy, Math.max(1, f.occupancy))];
  } else {
    const max = Math.max(1, ...f.zones.map((z) => z.visitors));
    items = f.zones.map((z) => {
      const li = zoneItem(z.name, z.visitors, max);
      li.dataset.zone = z.id;
      return li;
    });
    if (items.length === 0) items.push(el("li", "empty", "No zones in the store plan"));
  }
  $("zones").replaceChildren(...items);
}

const KIND = { member: "Member", anonymous: "Anonymous" };
const STAFF = "staff";

/** The zones of a path as "Entrance → … → Bakery → Checkout": the first and the last two. */
function pathParts(path, name) {
  const names = path.map(name);
  if (names.length <= PATH_SHOWN) return names;
  return [names[0], "…", ...names.slice(-(PATH_SHOWN - 1))];
}

function renderVisits(inside, finished, f) {
  const names = Object.fromEntries(f.zones.map((z) => [z.id, z.name]));
  const name = (id) => names[id] || id;
  const presence = presenceOnly(f);
  $("visits-table").classList.toggle("presence", presence); // no Path column: the zones are not told apart
  const rows = [...inside, ...finished];
  const trs = rows.map((v) => {
    const tr = el("tr", v.open ? "visit open" : "visit");
    tr.dataset.testid = "visit-row";
    tr.dataset.visit = v.visit_id.slice(0, 6);

    const started = el("td", "time");
    started.dataset.label = "Started";
    const t = el("time", "", when(v.started));
    t.dateTime = new Date(v.started * 1000).toISOString();
    started.append(t);

    const id = el("td", "vid", `#${v.visit_id.slice(0, 6)}`);
    id.dataset.label = "Visit";
    const staff = v.classification === STAFF;
    const who = el("td", `who who-${staff ? STAFF : v.subject_kind}`, staff ? "Staff" : KIND[v.subject_kind] || "Unknown");
    who.dataset.label = "Who";
    const dw = el("td", "num dwell", dwell(v.dwell_s));
    dw.dataset.label = "Dwell";
    const path = el("td", "path");
    path.dataset.label = "Path";
    pathParts(v.path, name).forEach((part, i) => {
      if (i > 0) path.append(" → ");
      path.append(el("span", "stop", part)); // a zone name never breaks across lines
    });
    if (v.path.length === 0) path.textContent = "—";
    if (v.path.length > PATH_SHOWN) path.append(el("span", "stops", ` · ${v.path.length} stops`));

    const state = el("td", "state");
    state.dataset.label = "Status";
    if (v.open) state.append(el("span", "badge badge-inside", "inside"));
    else if (v.ended !== null) state.append(el("span", "left", `left ${when(v.ended)}`));
    if (staff) state.append(el("span", "badge badge-staff", "staff · not counted"));
    else if (v.classification !== "visitor") state.append(el("span", `badge badge-${v.classification}`, v.classification));

    tr.append(started, id, who, dw, path, state);
    return tr;
  });
  if (trs.length === 0) {
    const tr = el("tr", "empty");
    const td = el("td", "", "No visits yet");
    td.colSpan = 6;
    tr.append(td);
    trs.push(tr);
  }
  $("visits").replaceChildren(...trs);
  // "Inside" is the figure of "Inside now" (visitors; staff are not counted), whatever the list could hold.
  const parts = [`${fmt(f.occupancy)} inside`];
  if (inside.length >= INSIDE_LIMIT) parts.push(`newest ${inside.length} listed`);
  const staffInside = inside.filter((v) => v.classification === STAFF).length;
  if (staffInside > 0) parts.push(`${staffInside} staff, not counted`);
  parts.push(finished.length > 0 ? `last ${finished.length} finished` : "none finished yet");
  $("visits-note").textContent = parts.join(" · ");
}

function renderUplink(status) {
  // The broker connection: shown only while it is down, or up but refusing our events (an ACL); nothing with MQTT
  // off (the uplink then reports no state).
  const up = status.uplink;
  const box = $("uplink-state");
  box.hidden = up.connected !== false && up.refusing !== true;
  if (box.hidden) return;
  const queued = status.store && Number.isFinite(status.store.outbox_depth) ? status.store.outbox_depth : null;
  const what = up.connected !== false
    ? "MQTT broker refuses our events (check its ACL)"
    : up.last_error ? "MQTT broker unreachable" : "Connecting to the MQTT broker";
  const kept = queued === null ? "events kept in the outbox" : `${fmt(queued)} ${queued === 1 ? "event" : "events"} in the outbox`;
  box.querySelector(".uplink-text").textContent = `${what} · ${kept}`;
  box.title = up.last_error || "";
}

// ------------------------------------------------------------------ polling

async function refresh() {
  try {
    const [footfall, inside, finished, status] = await Promise.all([
      getJSON("/api/v1/footfall"),
      getJSON(`/api/v1/visits?state=inside&limit=${INSIDE_LIMIT}`),
      getJSON(`/api/v1/visits?state=finished&limit=${FINISHED_LIMIT}`),
      getJSON("/api/v1/status"),
    ]);
    if ($("version").textContent === "") {
      getJSON("/healthz").then((h) => ($("version").textContent = h.version), () => {});
    }
    renderFootfall(footfall);
    renderVisits(inside, finished, footfall);
    renderUplink(status);
    const now = Date.now();
    downSince = null;
    if (footfall.as_of !== lastAsOf) {
      lastAsOf = footfall.as_of;
      asOfMovedAt = now;
    }
    if (footfall.as_of <= 0) {
      setConn("wait", "Connected · waiting for the first data");
    } else if (now - asOfMovedAt > STALE_MS) {
      setConn("stale", `Stale · no new data since ${wallClock(asOfMovedAt)}`);
    } else {
      setConn("ok", "Live");
    }
  } catch (err) {
    downSince = downSince ?? Date.now();
    const since = wallClock(downSince);
    if (err instanceof HttpError) {
      setConn("error", `Gateway error (${err.message}) since ${since}`);
    } else {
      setConn("offline", `Offline since ${since} · gateway not answering`);
    }
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
