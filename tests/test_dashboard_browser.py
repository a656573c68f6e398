"""The footfall page in a real browser: Debian's Chromium driven by Playwright, against the real product.

The gateway is `visita run --sim` in a subprocess (the simulated store at 60x, no broker); the page is
read the way a person reads it, through its data-testid elements, and compared with the JSON API.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from conftest import VISITA, Broker, free_port, self_signed_cert
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
MAC = re.compile(r"(?i)\b(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}\b")
DWELL = re.compile(r"^(\d+ s|\d+ min \d+ s|\d+ h \d+ min)$")
CLOCK = re.compile(r"^\d\d:\d\d$")  # a time today
DATED = re.compile(r"^\D.*\d.* \d\d:\d\d$")  # a time on another day: "Tue, Dec 1 20:54"

# Everything the page shows, read in one go so that no redraw can fall between two figures.
READ_PAGE = """() => {
  const text = (id) => document.querySelector(`[data-testid="${id}"]`).textContent.trim();
  return {
    as_of: Number(document.querySelector('[data-testid="as-of"]').dataset.ts),
    occupancy: text("occupancy"),
    entries_last_hour: text("entries-last-hour"),
    visitors_today: text("visitors-today"),
    passbys_today: text("passbys-today"),
    mean_dwell: text("mean-dwell"),
    zones: [...document.querySelectorAll('[data-testid="zones"] [data-zone]')].map((li) => ({
      id: li.dataset.zone,
      name: li.querySelector(".zone-name").textContent,
      count: li.querySelector(".zone-count").textContent,
    })),
  };
}"""


def number(shown: str) -> int:
    """A figure as the page shows it ("1,234") as an int; fails on a placeholder."""
    assert re.fullmatch(r"\d[\d,.\u202f\u00a0 ]*", shown), f"not a number: {shown!r}"
    return int(re.sub(r"\D", "", shown))


@dataclass
class Product:
    """`visita run --sim` on a free port, and what it printed."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    tls: ssl.SSLContext | None = None

    def get(self, path: str) -> Any:
        """GET from the running gateway; the decoded JSON."""
        with urllib.request.urlopen(self.base + path, timeout=5, context=self.tls) as r:
            return json.load(r)

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def product(tmp_path: Path) -> Iterator[Product]:
    """The real gateway over the simulated store, answering /healthz."""
    yield from run_product(tmp_path, "60")


def run_product(tmp_path: Path, speed: str, *extra: str, tls: ssl.SSLContext | None = None) -> Iterator[Product]:
    """`visita run --sim` at `speed` with `extra` arguments until the generator is closed (over HTTPS, trusting
    `tls`, when given)."""
    port = free_port()
    log = tmp_path / "visita.log"
    args = [*VISITA, "run", "--sim", "--speed", speed, "--mqtt", "off", "--dashboard", f"127.0.0.1:{port}", *extra]
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([*args, "--data-dir", str(tmp_path / "data")], stdout=out, stderr=out)
    p = Product(proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}", log, tls)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"visita run exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                health = p.get("/healthz")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"visita run did not answer /healthz within 20 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        assert set(health) == {"status", "store", "gateway", "version"} and health["status"] == "ok"
        yield p
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless; fails (never skips) when it is not installed."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
            "scripts/test.sh installs it"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watch:
    """What a page did: every request it made, console errors, uncaught exceptions."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        def on_request(r: Request) -> None:
            self.requests.append(r.url)

        def on_console(m: ConsoleMessage) -> None:
            if m.type == "error":
                self.console_errors.append(m.text)

        page.on("request", on_request)
        page.on("console", on_console)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def external(self) -> list[str]:
        """Requests to anything but the gateway on the loopback (data: URLs are not requests out)."""
        return [u for u in self.requests if urlsplit(u).scheme != "data" and urlsplit(u).hostname not in LOCAL_HOSTS]


def open_page(browser: Browser, product: Product, **context: Any) -> tuple[Page, Watch]:
    page = browser.new_page(**context)
    watch = Watch()
    watch.attach(page)
    page.goto(product.base + "/")
    return page, watch


def shown_footfall(page: Page) -> tuple[dict[str, Any], dict[str, Any]]:
    """A footfall response the page received and what the page showed for it."""
    for _ in range(5):
        with page.expect_response(lambda r: urlsplit(r.url).path == "/api/v1/footfall", timeout=10_000) as info:
            pass
        body: dict[str, Any] = info.value.json()
        page.wait_for_function(
            "ts => Number(document.querySelector('[data-testid=\"as-of\"]').dataset.ts) >= ts",
            arg=body["as_of"],
            timeout=5_000,
        )
        shown: dict[str, Any] = page.evaluate(READ_PAGE)
        if shown["as_of"] == body["as_of"]:
            return body, shown
    pytest.fail("the page never showed the footfall response it had just received")


def test_page_shows_the_live_figures_of_the_api(browser: Browser, product: Product) -> None:
    page, watch = open_page(browser, product, viewport={"width": 1280, "height": 800})
    conn = page.get_by_test_id("conn-state")
    expect(conn).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(conn).to_have_text("Live")
    expect(page.locator("main")).not_to_have_class(re.compile(r"\bstale\b"))

    # Wait for the simulated store to have had visitors, then compare figure by figure.
    deadline = time.monotonic() + 15
    while True:
        body, shown = shown_footfall(page)
        if body["visitors_today"] > 0 or time.monotonic() > deadline:
            break
    assert body["visitors_today"] > 0, "no visitor within 15 s at 60x"
    for key in ("occupancy", "entries_last_hour", "visitors_today", "passbys_today"):
        assert number(shown[key]) == body[key], (key, shown[key], body[key])
    # The average visit of the day, as the visit rows write a dwell.
    mean = body["mean_dwell_today_s"]
    if mean is None:
        assert body["left_today"] == 0 and shown["mean_dwell"] == "— (no visit ended yet today)", shown
    else:
        as_rows = f"{mean} s" if mean < 60 else f"{mean // 60} min {mean % 60} s"
        assert shown["mean_dwell"] == f"{as_rows} ({body['left_today']} ended)", (shown, body)
    assert shown["zones"] == [{"id": z["id"], "name": z["name"], "count": str(z["visitors"])} for z in body["zones"]]
    # The API asked directly afterwards has moved on from what the page showed, never back.
    later = product.get("/api/v1/footfall")
    assert later["as_of"] >= body["as_of"] and later["visitors_today"] >= body["visitors_today"]
    expect(page.get_by_test_id("as-of")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))

    # Recent visits: rows appear, read as a person would, and change within a few polls.
    rows = page.get_by_test_id("visit-row")
    expect(rows.first).to_be_visible(timeout=10_000)
    assert 0 < rows.count() <= 30
    first = page.get_by_test_id("visits").inner_text()
    deadline = time.monotonic() + 8  # four polls
    while page.get_by_test_id("visits").inner_text() == first:
        assert time.monotonic() < deadline, "the visits list did not change within four polls"
        time.sleep(0.25)
    cells = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="visit-row"]')].map((tr) =>
             ({id: tr.dataset.visit, cells: [...tr.cells].map((td) => td.textContent.trim())}))"""
    )
    known = {v["visit_id"][:6] for v in product.get("/api/v1/visits?limit=500")}
    for row in cells:
        started, short_id, who, dwell, path, status = row["cells"]
        assert CLOCK.match(started) or DATED.match(started), row
        assert short_id == f"#{row['id']}" and re.fullmatch(r"#[0-9a-f]{6}", short_id), row
        assert row["id"] in known, f"row {short_id} is not a visit the API knows"
        assert who in ("Member", "Anonymous", "Staff"), row
        assert (who == "Staff") == ("staff · not counted" in status), row
        assert DWELL.match(dwell), row
        stops = re.sub(r" · \d+ stops$", "", path).split(" → ")
        assert stops and set(stops) <= {z["name"] for z in body["zones"]} | {"…"}, row
        assert status.startswith(("inside", "left")), row

    # No broker configured (--mqtt off): nothing said about one.
    expect(page.get_by_test_id("uplink-state")).to_be_hidden()

    # Nothing identifying on the page, nothing fetched from anywhere but the gateway, no errors.
    html = page.content()
    assert "anon:" not in html and "member:" not in html and not MAC.search(html)
    assert watch.requests and not watch.external(), watch.external()
    assert not watch.console_errors, watch.console_errors
    assert not watch.page_errors, watch.page_errors
    page.close()


def test_page_goes_offline_keeps_greyed_figures_and_recovers(browser: Browser, product: Product) -> None:
    page, watch = open_page(browser, product)
    conn = page.get_by_test_id("conn-state")
    main = page.locator("main")
    expect(conn).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(page.get_by_test_id("visit-row").first).to_be_visible(timeout=10_000)

    # A hung gateway (stopped, its socket still accepting): the page's request timeout turns it offline.
    os.kill(product.proc.pid, signal.SIGSTOP)
    expect(conn).to_have_attribute("data-state", "offline", timeout=9_000)
    expect(conn).to_contain_text("Offline since")
    expect(main).to_have_class(re.compile(r"\bstale\b"))
    figures = page.evaluate(READ_PAGE)
    number(figures["occupancy"])  # the last figures stay on screen, greyed, not blanked
    assert page.get_by_test_id("visit-row").count() > 0
    # Greyed out (after the fade): well below full opacity.
    page.wait_for_function(
        """() => Number(getComputedStyle(document.querySelector('[data-testid="occupancy"]').closest('p')).opacity)
                 < 0.6""",
        timeout=2_000,
    )

    # It answers again: the page recovers on its own.
    os.kill(product.proc.pid, signal.SIGCONT)
    expect(conn).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(main).not_to_have_class(re.compile(r"\bstale\b"))
    assert not watch.console_errors, watch.console_errors

    # Stopped for good (SIGTERM, as systemd stops it): offline, last figures kept.
    assert product.stop() == 0, product.log.read_text()[-2000:]
    expect(conn).to_have_attribute("data-state", "offline", timeout=6_000)
    expect(conn).to_contain_text(re.compile(r"Offline since \d\d:\d\d:\d\d"))
    expect(main).to_have_class(re.compile(r"\bstale\b"))
    number(page.evaluate(READ_PAGE)["visitors_today"])
    # Refused connections are logged by Chromium itself; anything else is an error of the page.
    assert all("ERR_CONNECTION_REFUSED" in m or "Failed to load resource" in m for m in watch.console_errors)
    assert not watch.page_errors, watch.page_errors
    assert not watch.external(), watch.external()
    page.close()


@pytest.mark.parametrize(("width", "height", "scheme"), [(390, 844, "light"), (800, 1280, "dark"), (1280, 800, "dark")])
def test_page_fits_phones_and_tablets_in_light_and_dark(
    browser: Browser, product: Product, width: int, height: int, scheme: str
) -> None:
    page, watch = open_page(browser, product, viewport={"width": width, "height": height}, color_scheme=scheme)
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(page.get_by_test_id("visit-row").first).to_be_visible(timeout=10_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "no sideways scrolling"
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    r, g, b = (int(c) for c in re.findall(r"\d+", background)[:3])
    assert (r + g + b < 150) == (scheme == "dark"), background
    # Every figure has a visible label a screen reader reads with it.
    for testid in ("occupancy", "entries-last-hour"):
        label = page.get_by_test_id(testid).locator("xpath=ancestor::article").get_attribute("aria-labelledby")
        assert label and page.locator(f"#{label}").inner_text().strip()
    assert page.get_by_role("status").get_attribute("aria-live") == "polite"
    assert not watch.console_errors and not watch.page_errors and not watch.external()
    page.close()


def test_api_page_renders_with_nothing_from_the_internet(browser: Browser, product: Product) -> None:
    """The footer's "API" link: Swagger UI renders the gateway's OpenAPI from the gateway's own files."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    watch = Watch()
    watch.attach(page)
    statuses: dict[str, int] = {}
    page.on("response", lambda r: statuses.__setitem__(r.url, r.status))
    page.goto(product.base + "/")
    page.get_by_role("link", name="API").click()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Visita gateway", timeout=10_000)
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/footfall")).to_be_visible()
    assert urlsplit(page.url).path == "/docs"
    assert not watch.external(), watch.external()
    assert {urlsplit(u).path for u in statuses} >= {"/docs", "/openapi.json"}
    assert all(code == 200 for code in statuses.values()), statuses
    assert not watch.console_errors and not watch.page_errors, (watch.console_errors, watch.page_errors)
    # Nothing on the page points out of the gateway either (a link followed later, a lazy image).
    html = page.content()
    assert not re.findall(r'(?:src|href)="(?:https?:)?//(?!127\.0\.0\.1[:/])', html)
    page.close()


def visit_rows(page: Page) -> list[dict[str, Any]]:
    """Every row of Recent visits: its short id and the text of each cell as shown (hidden cells as "")."""
    rows: list[dict[str, Any]] = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="visit-row"]')].map((tr) =>
             ({id: tr.dataset.visit, cells: [...tr.cells].map((td) => td.innerText.trim())}))"""
    )
    return rows


def test_recent_visits_count_inside_as_inside_now_does_and_label_staff(browser: Browser, product: Product) -> None:
    page, watch = open_page(browser, product, viewport={"width": 1280, "height": 800})
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    # The simulated store's staff are on shift from the start: listed, and said not to be counted.
    staff = page.locator('[data-testid="visit-row"]', has_text="Staff")
    expect(staff.first).to_be_visible(timeout=10_000)
    expect(staff.first).to_contain_text("staff · not counted")
    # The badge stays inside the table at a laptop's and a landscape tablet's widths: the Status cell wraps, and at
    # 1080 px and under the table gets the whole width, rather than the label running out of the card.
    for width in (1024, 1100, 1280):
        page.set_viewport_size({"width": width, "height": 800})
        badge = staff.first.locator(".badge-staff").bounding_box()
        table = page.locator(".table-wrap").bounding_box()
        assert badge is not None and table is not None
        assert badge["x"] + badge["width"] <= table["x"] + table["width"], (width, badge, table)
    # What the figures count, said on the page.
    expect(page.get_by_test_id("what-counts")).to_contain_text("people whose phone advertises over Bluetooth")
    for _ in range(3):  # the note and the figure come from one poll: equal at every redraw
        page.wait_for_timeout(2_000)
        occupancy, note = page.evaluate(
            """() => [document.querySelector('[data-testid="occupancy"]').textContent,
                      document.getElementById('visits-note').textContent]"""
        )
        assert note.startswith(f"{occupancy} inside · "), (occupancy, note)
        assert re.search(r"\b\d+ staff, not counted\b", note), note
    assert not watch.console_errors and not watch.page_errors and not watch.external()
    page.close()


@contextmanager
def rewritten_inside_visits(
    browser: Browser, product: Product, rewrite: Callable[[list[Any]], list[Any]]
) -> Iterator[Page]:
    """The page, with every /api/v1/visits?state=inside answer from the gateway passed through `rewrite`."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})

    def handle(route: Route) -> None:
        try:
            body = route.fetch().json()
        except PlaywrightError:  # the gateway has stopped at the end of the test
            route.abort()
            return
        route.fulfill(json=rewrite(body))

    page.route(re.compile(r"/api/v1/visits\?.*state=inside"), handle)
    try:
        page.goto(product.base + "/")
        yield page
    finally:
        page.unroute_all(behavior="ignoreErrors")
        page.close()


def test_a_busy_store_lists_newest_inside_and_its_latest_finished_visits(browser: Browser, product: Product) -> None:
    def busy(body: list[Any]) -> list[Any]:
        # More people inside than the page lists: the gateway answers as many as the page asks for (20).
        return [dict(body[i % len(body)], visit_id=f"{i:06x}{'0' * 18}") for i in range(20)] if body else body

    with rewritten_inside_visits(browser, product, busy) as page:
        # After 20 or so simulated minutes visitors leave; their visits are listed under the 20 inside.
        expect(page.locator('[data-testid="visit-row"]', has_text="left").first).to_be_visible(timeout=40_000)
        note = page.locator("#visits-note")
        expect(note).to_contain_text(re.compile(r"^\d+ inside · newest 20 listed · .*last \d+ finished$"))
        assert page.locator('[data-testid="visit-row"]', has_text="inside").count() == 20


def test_a_visit_from_an_earlier_day_shows_its_date(browser: Browser, product: Product) -> None:
    def earlier(visit_id: str) -> bool:
        return visit_id[0] in "01234567"  # about half the visits, the same ones at every poll

    def two_days_older(body: list[Any]) -> list[Any]:
        # As if they had started two days before, as a night shift's staff or a phone left in the store can.
        return [dict(v, started=v["started"] - 2 * 86_400) if earlier(v["visit_id"]) else v for v in body]

    with rewritten_inside_visits(browser, product, two_days_older) as page:
        expect(page.get_by_test_id("visit-row").nth(5)).to_be_visible(timeout=10_000)
        f = product.get("/api/v1/footfall")
        rows = [r for r in visit_rows(page) if r["cells"][5].startswith("inside")]
    assert any(earlier(r["id"]) for r in rows) and not all(earlier(r["id"]) for r in rows), rows
    for row in rows:
        if not earlier(row["id"]):
            assert CLOCK.match(row["cells"][0]), row  # today's: the time alone
            continue
        assert DATED.match(row["cells"][0]), row
        day = datetime.fromtimestamp(f["as_of"] - 2 * 86_400, ZoneInfo(f["timezone"])).day
        assert re.search(rf"\b{day}\b", row["cells"][0]), (day, row)


@pytest.fixture
def one_receiver(tmp_path: Path) -> Iterator[Product]:
    """The gateway over the small shop: one receiver, so presence only."""
    yield from run_product(tmp_path, "60", "--scenario", "small-shop")


def test_one_receiver_shows_inside_without_zones_or_paths(browser: Browser, one_receiver: Product) -> None:
    page, watch = open_page(browser, one_receiver, viewport={"width": 1280, "height": 800})
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(page.get_by_test_id("visit-row").first).to_be_visible(timeout=10_000)
    f = one_receiver.get("/api/v1/footfall")
    assert f["resolution"] == "presence" and len(f["zones"]) == 2
    zone_names = [z["name"] for z in f["zones"]]

    # One figure for the whole store, and the card says why.
    expect(page.get_by_test_id("zones-note")).to_be_visible()
    expect(page.get_by_test_id("zones-note")).to_have_text("one receiver: zones are not told apart")
    zones = page.get_by_test_id("zones")
    expect(zones.locator("li")).to_have_count(1)
    expect(zones.locator(".zone-name")).to_have_text("Inside")
    occupancy, inside = page.evaluate(
        """() => [document.querySelector('[data-testid="occupancy"]').textContent,
                  document.querySelector('[data-testid="zones"] .zone-count').textContent]"""
    )
    assert inside == occupancy
    # No visit is given a path of zones.
    expect(page.locator("#visits-table th.path")).to_be_hidden()
    shown = page.get_by_test_id("visits").inner_text() + zones.inner_text()
    assert not [n for n in zone_names if n in shown], shown
    assert page.evaluate(
        """() => [...document.querySelectorAll('#visits td.path')].every((td) => !td.checkVisibility())"""
    )
    assert not watch.console_errors and not watch.page_errors and not watch.external()
    page.close()


@pytest.fixture
def broker_down(tmp_path: Path) -> Iterator[Product]:
    """The gateway with a broker that never answers (nothing listens on its port)."""
    yield from run_product(tmp_path, "60", "--mqtt", f"mqtt://127.0.0.1:{free_port()}")


def test_broker_down_says_events_wait_in_the_outbox(browser: Browser, broker_down: Product) -> None:
    page, watch = open_page(browser, broker_down, viewport={"width": 1280, "height": 800})
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(page.get_by_test_id("conn-state")).to_have_text("Live")  # the figures are live all the same
    uplink = page.get_by_test_id("uplink-state")
    expect(uplink).to_be_visible(timeout=10_000)
    expect(uplink).to_have_text(re.compile(r"^\s*MQTT broker unreachable · [1-9][\d,]* events? in the outbox\s*$"))
    status = broker_down.get("/api/v1/status")
    assert status["uplink"]["connected"] is False and status["uplink"]["last_error"]
    queued = number(uplink.inner_text().split("·")[1].split()[0])
    assert 0 < queued <= status["store"]["outbox_depth"]  # the outbox only grows while the broker is away
    assert not watch.console_errors and not watch.page_errors and not watch.external()
    page.close()


@pytest.fixture
def broker_refusing(tmp_path: Path) -> Iterator[Product]:
    """The gateway with a broker that takes the connection but refuses every publish (an ACL that only allows
    reading: what a wrong ACL does; MQTT 5 says so, which the uplink reports as `refusing`)."""
    acl = tmp_path / "acl"
    acl.write_text("topic read visita/#\n")
    broker = Broker(tmp_path / "broker", free_port(), ["allow_anonymous true", f"acl_file {acl}"])
    broker.start()
    try:
        yield from run_product(tmp_path, "60", "--mqtt", broker.url)
    finally:
        broker.stop()


def test_a_broker_refusing_events_is_said_on_the_page(browser: Browser, broker_refusing: Product) -> None:
    page, watch = open_page(browser, broker_refusing, viewport={"width": 1280, "height": 800})
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    uplink = page.get_by_test_id("uplink-state")
    expect(uplink).to_be_visible(timeout=15_000)
    expect(uplink).to_have_text(
        re.compile(r"^\s*MQTT broker refuses our events \(check its ACL\) · [1-9][\d,]* events? in the outbox\s*$")
    )
    status = broker_refusing.get("/api/v1/status")
    assert status["uplink"]["connected"] is True and status["uplink"]["refusing"] is True, status["uplink"]
    assert not watch.console_errors and not watch.page_errors and not watch.external()
    page.close()


@pytest.mark.parametrize("width", [375, 768, 1366])
def test_header_and_cards_line_up(browser: Browser, product: Product, width: int) -> None:
    page, _ = open_page(browser, product, viewport={"width": width, "height": 900})
    expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "ok", timeout=10_000)
    box = page.evaluate(
        """() => Object.fromEntries(['.brand h1', '#conn-state', '.top', '.kpis', '.kpis > .card'].map((sel) =>
             [sel, [...document.querySelectorAll(sel)].map((e) => e.getBoundingClientRect().toJSON())]))"""
    )
    (title,), (conn,), (top,), (kpis,) = box[".brand h1"], box["#conn-state"], box[".top"], box[".kpis"]
    if width < 640:  # a phone: the header is one column, aligned on its left edge
        assert abs(conn["left"] - title["left"]) < 2, (conn, title)
    else:  # beside or below the title, on the right edge (within the header's padding)
        assert top["right"] - conn["right"] < 48, (conn, top)
    # Every row of cards is full: the last card of each row ends where the row does.
    rows: dict[int, list[dict[str, float]]] = {}
    for card in box[".kpis > .card"]:
        rows.setdefault(round(card["top"]), []).append(card)
    for cards in rows.values():
        assert abs(max(c["right"] for c in cards) - kpis["right"]) < 2, (width, rows)
    page.close()


SURVEY_TOKEN = "installer-token-for-the-survey-page-0123"


def _survey_config(tmp_path: Path, tls: str = "") -> Path:
    """A config with an installer token and the entrance iBeacon (at 14, 4) as the survey tag; `tls`: more lines of
    [dashboard]."""
    from firmware_sim.scenario import beacon_subject_id, load_scenario

    token = tmp_path / "installer-token"
    token.write_text(SURVEY_TOKEN + "\n")
    token.chmod(0o600)
    tag = beacon_subject_id(load_scenario("default").beacons[0])
    cfg = tmp_path / "visita.toml"
    cfg.write_text(f'[dashboard]\ninstaller_token_file = "{token}"\n{tls}\n[survey]\ntransmitter = "{tag}"\n')
    return cfg


@pytest.fixture
def surveying(tmp_path: Path) -> Iterator[Product]:
    """The gateway with an installer token and the entrance iBeacon (at 14, 4) as the survey tag."""
    yield from run_product(tmp_path, "10", "--config", str(_survey_config(tmp_path)))


def test_survey_page_works_over_https(browser: Browser, tmp_path: Path) -> None:
    """The installer's token crosses the shop's network only over HTTPS (docs/install.md): the page works there."""
    cert, key = self_signed_cert(tmp_path)
    cfg = _survey_config(tmp_path, f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    gen = run_product(tmp_path, "10", "--config", str(cfg), tls=ssl.create_default_context(cafile=str(cert)))
    gw = next(gen)
    try:
        assert gw.base.startswith("https://") and gw.get("/healthz")["status"] == "ok"
        page = browser.new_page(viewport={"width": 1024, "height": 768}, ignore_https_errors=True)  # self-signed
        watch = Watch()
        watch.attach(page)
        page.goto(gw.base + "/survey")
        page.get_by_test_id("token").fill(SURVEY_TOKEN)
        page.get_by_test_id("unlock").click()
        expect(page.get_by_test_id("plan")).to_be_visible()
        page.get_by_test_id("seconds").select_option("5")
        page.get_by_test_id("x").fill("14")
        page.get_by_test_id("y").fill("4")
        page.get_by_test_id("record").click()
        expect(page.get_by_test_id("message")).to_contain_text("Spot (14, 4) recorded", timeout=15_000)
        assert all(urlsplit(u).scheme == "https" for u in watch.requests if urlsplit(u).scheme != "data"), (
            watch.requests
        )
        assert watch.external() == [] and watch.page_errors == [] and watch.console_errors == [], watch
        page.close()
    finally:
        gen.close()


def tap_plan(page: Page, x: float, y: float) -> None:
    """A real click on the plan where the point (x, y) m is drawn (the mapping is checked on its own, below)."""
    sx, sy = page.evaluate(
        """([x, y]) => {
          const svg = document.querySelector('[data-testid="plan"]');
          const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM());
          return [p.x, p.y];
        }""",
        [x, y],
    )
    page.mouse.click(sx, sy)


def spot_texts(page: Page) -> list[str]:
    return [t.strip() for t in page.locator('[data-testid="spots"] li[data-index] span').all_inner_texts()]


def test_survey_page_records_spots_where_the_installer_taps_and_applies_the_map(
    browser: Browser, surveying: Product
) -> None:
    page = browser.new_page(viewport={"width": 1024, "height": 768})
    watch = Watch()
    watch.attach(page)
    response = page.goto(surveying.base + "/survey")
    assert response is not None and "default-src 'none'" in response.headers["content-security-policy"]

    # A wrong token: the gateway's refusal is shown, and the survey stays closed.
    page.get_by_test_id("token").fill("not-the-installer-token")
    page.get_by_test_id("unlock").click()
    expect(page.get_by_test_id("message")).to_contain_text("401: missing or wrong installer token")
    expect(page.get_by_test_id("plan")).to_be_hidden()

    page.get_by_test_id("token").fill(SURVEY_TOKEN)
    page.get_by_test_id("unlock").click()
    expect(page.get_by_test_id("plan")).to_be_visible()
    req = urllib.request.Request(surveying.base + "/api/v1/survey/plan")
    req.add_header("Authorization", f"Bearer {SURVEY_TOKEN}")
    with urllib.request.urlopen(req, timeout=5) as r:
        plan = json.load(r)
    drawn = page.evaluate("() => [...document.querySelectorAll('[data-zone]')].map((p) => p.dataset.zone)")
    assert drawn == [z["id"] for z in plan["zones"]], "the page drew other zones than the plan's"
    expect(page.get_by_test_id("spots")).to_contain_text("None yet")

    # Tapping the middle of a receiver's mark, as laid out on the screen, names that receiver's position: on a
    # tablet, and again on a phone after the page has reflowed.
    for viewport in ({"width": 1024, "height": 768}, {"width": 390, "height": 844}, {"width": 1024, "height": 768}):
        page.set_viewport_size(viewport)
        for rx in plan["receivers"][:3]:
            box = page.locator(f'[data-receiver="{rx["id"]}"]').bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            x, y = (round(v * 2) / 2 for v in rx["position"])
            expect(page.get_by_test_id("candidate")).to_have_text(f"({x:g}, {y:g}) m")
            expect(page.get_by_test_id("x")).to_have_value(f"{x:g}")
            expect(page.get_by_test_id("y")).to_have_value(f"{y:g}")

    # Coordinates typed in (a spot measured with a tape) are the spot as well, marked on the plan; half of them is none.
    page.get_by_test_id("x").fill("20.3")
    page.get_by_test_id("y").fill("6")
    expect(page.get_by_test_id("candidate")).to_have_text("(20.3, 6) m")
    mark = page.locator(".plan-candidate")
    assert (mark.get_attribute("cx"), mark.get_attribute("cy")) == ("20.3", "6")
    expect(page.get_by_test_id("record")).to_be_enabled()
    page.get_by_test_id("y").fill("")
    expect(page.get_by_test_id("candidate")).to_have_text("tap the plan or type x and y")
    expect(page.get_by_test_id("record")).to_be_disabled()
    expect(page.locator(".plan-candidate")).to_have_count(0)

    # Tap where the tag is (the second spot typed) and record 5 s (at 10x, half a second): the spot appears with
    # what each receiver heard.
    page.get_by_test_id("seconds").select_option("5")
    for n, (x, y) in enumerate([(14.0, 4.0), (18.0, 8.0)], start=1):
        if n == 1:
            tap_plan(page, x, y)
        else:
            page.get_by_test_id("x").fill(f"{x:g}")
            page.get_by_test_id("y").fill(f"{y:g}")
        expect(page.get_by_test_id("candidate")).to_have_text(f"({x:g}, {y:g}) m")
        page.get_by_test_id("record").click()
        expect(page.locator('[data-testid="spots"] li[data-index]')).to_have_count(n, timeout=15_000)
        expect(page.get_by_test_id("message")).to_contain_text(f"Spot ({x:g}, {y:g}) recorded")
    texts = spot_texts(page)
    assert texts[0].startswith("(14, 4) entrance") and texts[1].startswith("(18, 8)"), texts
    heard = [int(n) for n in re.findall(r"rx-[a-z]+ (\d+)", texts[0])]
    assert len(heard) >= 3 and sum(heard) > 5 * len(heard), texts[0]

    # A tap on the sidewalk: the gateway refuses the spot and the page says why.
    tap_plan(page, 14.0, -1.5)
    page.get_by_test_id("record").click()
    expect(page.get_by_test_id("message")).to_contain_text("lies in no inside zone")

    page.get_by_test_id("apply").click()
    expect(page.get_by_test_id("message")).to_contain_text("A map of 2 spot(s) is saved to")
    expect(page.get_by_test_id("applied")).to_contain_text("a map of 2 spot(s)")

    # A double tap on Discard discards that one spot, not the next one too.
    page.locator('[data-testid="spots"] li[data-index="0"] button').dblclick()
    expect(page.locator('[data-testid="spots"] li[data-index]')).to_have_count(1)
    page.wait_for_timeout(1500)  # a second poll: still one spot, and the right one
    assert [t.split(" ")[:2] for t in spot_texts(page)] == [["(18,", "8)"]], spot_texts(page)

    # A reload keeps the tab's token: the survey opens again without asking.
    page.reload()
    expect(page.get_by_test_id("plan")).to_be_visible()
    expect(page.get_by_test_id("token")).to_be_hidden()

    assert watch.external() == [] and watch.page_errors == [], (watch.external(), watch.page_errors)
    # The browser logs the two refusals above (the wrong token, the sidewalk spot), and nothing else.
    logged = watch.console_errors
    assert len(logged) == 2 and sorted(re.findall(r"status of (\d+)", " ".join(logged))) == ["401", "422"], logged
    page.close()
