"""The dashboard in a real browser (R-22): Debian's headless chromium, driven by Playwright for Python with
`executable_path` (no browser download), opens /dashboard on a seeded data set served over real HTTP, and
the charts must show the seeded numbers with their targets drawn in. The run saves a screenshot to
build/screenshots/dashboard.png (DASHBOARD_SCREENSHOT_DOCS=1 also writes docs/dashboard.png for the README).

The app is served by chalice's own local server (what `chalice local` runs) in a thread of this process,
so it shares the in-process moto of the `aws` fixture; the data are seeded through the records modules
that count things as they happen (a lead created, a call claimed and finished, its cost, an approved
order, a day's ad spend), the same calls the handlers make.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-api-token"
FROM, TO = "2026-11-20", "2026-11-26"
SCREENSHOT = ROOT / "build" / "screenshots" / "dashboard.png"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"

# Offer 101 (payout 900 RUB, Moscow). Per day: leads, calls placed, calls answered with their talk seconds,
# approved orders, ad spend, cost per call.
SEED = {
    "2026-11-20": {"leads": 6, "answered": [70, 85], "missed": 1, "approved": 1, "adspend": 250, "cost": 9.0},
    "2026-11-21": {"leads": 5, "answered": [75, 95, 100], "missed": 1, "approved": 2, "adspend": 500, "cost": 8.0},
    # 2026-11-22: nothing happened
    "2026-11-23": {"leads": 8, "answered": [30], "missed": 1, "approved": 1, "adspend": 600, "cost": 2.0},
    "2026-11-24": {"leads": 6, "answered": [65, 120], "missed": 0, "approved": 1, "adspend": 250, "cost": 10.0},
    "2026-11-25": {"leads": 4, "answered": [55], "missed": 1, "approved": 0, "adspend": 200, "cost": 6.0},
    "2026-11-26": {"leads": 6, "answered": [110, 70], "missed": 1, "approved": 1, "adspend": 400, "cost": 12.0},
}
OTHER_SPEND = 4053.0  # costs that belong to no call: the month at 82%, past the 80% alert threshold


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        message = "no chromium found (make test installs Debian's chromium as root: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    args = ["--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])  # root: no sandbox
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def served(aws):
    """The app over real HTTP on a free loopback port, as `chalice local` serves it."""
    from chalice.cli.factory import CLIFactory
    from chalice.local import ChaliceRequestHandler, CustomLocalChalice, LocalChalice, LocalDevServer

    import app as application

    class QuietHandler(ChaliceRequestHandler):
        def log_message(self, *args):  # the access log would show ?token=
            pass

    original = application.app.__class__
    # What chalice.local.create_local_server does: current_request per thread, for concurrent requests.
    CustomLocalChalice.__bases__ = (LocalChalice, original)
    application.app.__class__ = CustomLocalChalice
    config = CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name="test")
    server = LocalDevServer(application.app, config, "127.0.0.1", 0, handler_cls=QuietHandler)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.shutdown()
        server.server.server_close()
        thread.join(timeout=10)
        application.app.__class__ = original


def seed() -> None:
    from functions.calling import channels
    from functions.records import calls, daily, leads, spend

    for day, facts in SEED.items():
        lead_ids = []
        for n in range(facts["leads"]):
            lead_id = f"seed-{day}-{n}"
            created = f"{day}T09:{n:02d}:00Z"  # 12:xx Moscow: the same day in the offer's zone
            assert leads.create({"lead_id": lead_id, "offer_id": 101, "source": "tilda", "phone": f"+7999111{n:04d}",
                                 "state": "received", "created_at": created})
            lead_ids.append(lead_id)
        outcomes = [("answered", talk) for talk in facts["answered"]] + [("no_answer", 0)] * facts["missed"]
        for n, (outcome, talk) in enumerate(outcomes):
            call_id = calls.call_id_for(lead_ids[n], 1)
            dialing = f"{day}T09:{n:02d}:{15 + 10 * n:02d}Z"  # speed to lead 15 s, 25 s, 35 s, ...
            assert calls.claim(call_id, {"lead_id": lead_ids[n], "offer_id": 101, "phone": f"+7999111{n:04d}",
                                         "dialing_at": dialing, "direction": "outbound"})
            assert calls.finish(call_id, outcome, talk_seconds=talk, ended_at=f"{day}T09:{n + 10:02d}:00Z")
            if outcome == "answered":  # as the recording job leaves it
                key = f"recordings/{day.replace('-', '/')}/lead-{lead_ids[n]}/call-{call_id}.mp3"
                calls.update(call_id, recording_key=key, recording_state="stored")
            assert spend.add_call_cost(call_id, facts["cost"] / len(outcomes))
        for n in range(facts["approved"]):
            assert daily.order_approved(f"order-{day}-{n}", 101, day)
        daily.set_adspend(101, day, facts["adspend"])
    spend.add(OTHER_SPEND)
    assert channels.acquire("Beeline_Main", 5, "busy-call-1#x") is not None
    assert channels.acquire("Beeline_Main", 5, "busy-call-2#x") is not None


def test_dashboard_renders_the_seeded_numbers_in_chromium(browser, served, monkeypatch):
    from functions.insight import reports
    from functions.records import spend

    monkeypatch.setenv("RECORDING_LINK_SECRET", "test-link-secret")
    seed()
    expected = reports.summary(dt.date.fromisoformat(FROM), dt.date.fromisoformat(TO), 101)
    base = served
    context = browser.new_context(viewport={"width": 1360, "height": 900}, locale="ru-RU",
                                  timezone_id="Europe/Moscow")
    # Records every CSP violation the page would raise (an inline script or style, a foreign request).
    context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(f"{base}/dashboard?token={TOKEN}&from={FROM}&to={TO}&offer_id=101")
    assert page.url == f"{base}/dashboard?from={FROM}&to={TO}&offer_id=101"  # the token left the address bar
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    assert page.get_attribute("body", "data-ready") == "1", page.inner_text("#status")

    def bar(chart: str, day: str, series: str = "value"):
        return page.locator(f'svg[data-chart="{chart}"] rect.bar[data-day="{day}"][data-series="{series}"]')

    # One bar per day of the range in every chart; the seeded counts on their days, zeros elsewhere.
    assert page.locator('svg[data-chart="volume"] rect.bar[data-series="leads"]').count() == 7
    assert bar("volume", "2026-11-21", "leads").get_attribute("data-value") == "5"
    assert bar("volume", "2026-11-21", "calls").get_attribute("data-value") == "4"
    assert bar("volume", "2026-11-21", "answered").get_attribute("data-value") == "3"
    assert bar("volume", "2026-11-23", "leads").get_attribute("data-value") == "8"
    assert bar("volume", "2026-11-22", "leads").get_attribute("data-value") == "0"

    # The metrics per day, as the report computes them, each chart with its target line.
    day21 = next(r for r in expected["days"] if r["day"] == "2026-11-21")["metrics"]
    assert day21["calls_to_leads"]["value"] == pytest.approx(0.6)  # answered 3 of 5 leads
    assert day21["avg_talk_seconds"]["value"] == pytest.approx(90)
    for name, metric in day21.items():
        rendered = bar(name, "2026-11-21").get_attribute("data-value")
        assert float(rendered) == pytest.approx(float(metric["value"])), name
    row21 = next(r for r in expected["days"] if r["day"] == "2026-11-21")
    assert float(bar("speed_to_lead", "2026-11-21", "median").get_attribute("data-value")) == row21[
        "speed_to_lead_median_s"] == pytest.approx(30)  # first calls 15, 25, 35, 45 s after their forms
    assert float(bar("speed_to_lead", "2026-11-21", "p95").get_attribute("data-value")) == pytest.approx(
        row21["speed_to_lead_p95_s"])
    assert "met" in bar("calls_to_leads", "2026-11-21").get_attribute("class").split()
    assert "unmet" in bar("calls_to_leads", "2026-11-23").get_attribute("class").split()  # 1 / 8 = 12.5% < 20%
    def label(chart: str, day: str) -> str:
        return page.locator(f'svg[data-chart="{chart}"] text.value-label[data-day="{day}"]').text_content()

    assert label("calls_to_leads", "2026-11-21") == "60.0%"
    assert label("avg_talk_seconds", "2026-11-21") == "90 s"
    for name in ("calls_to_leads", "avg_talk_seconds", "approval_rate", "roas", "cpa_rub"):
        target = expected["total"]["metrics"][name]["target"]
        line = page.locator(f'svg[data-chart="{name}"] line.target[data-target]')
        assert line.count() == 1, name
        assert float(line.get_attribute("data-target")) == pytest.approx(float(target)), name
    assert page.locator('svg[data-chart="calls_to_leads"] text.target-label').text_content().endswith("20.0%")

    # Totals, the month's spend against the budget, channels in use.
    assert page.locator('.counts[data-count="leads"] b').inner_text() == "35"
    tile = page.locator('.tile[data-metric="calls_to_leads"]')
    assert float(tile.get_attribute("data-value")) == pytest.approx(11 / 35, abs=1e-4)
    budget = page.locator('svg[data-meter="budget"]')
    assert float(budget.get_attribute("data-value")) == pytest.approx(spend.spent()) == pytest.approx(4100.0)
    assert budget.get_attribute("data-limit") == "5000"
    assert page.locator('svg[data-meter="budget"] rect.meter.warn').count() == 1  # 82%: past the first threshold
    assert page.locator('svg[data-meter="budget"] line.tick').count() == 2  # the 80% and 100% alert thresholds
    channels = page.locator('svg[data-meter="channels"]')
    assert (channels.get_attribute("data-value"), channels.get_attribute("data-limit")) == ("2", "5")
    assert page.inner_text("#channels-text").startswith("2 из · of 5")

    # The last calls, newest first, with their outcome; phones masked (offer 101 is partial).
    rows = page.locator("#calls tbody tr[data-call]")
    assert rows.count() == 16
    assert rows.first.get_attribute("data-outcome") == "no_answer"  # 2026-11-26's last call ended last
    answered = page.locator('#calls tbody tr[data-outcome="answered"]')
    assert answered.count() == 11
    assert "отвечен · answered" in answered.first.inner_text()
    table = page.inner_text("#calls")
    assert "+79991110000" not in table and "***" in table
    # Answered calls link to the app's signed recording URL; the others have none.
    for listed in reports.recent_calls(20):
        link = page.locator(f'#calls tr[data-call="{listed["call_id"]}"] a')
        if listed["outcome"] == "answered":
            assert link.get_attribute("href") == listed["recording_url"] != ""
            assert link.get_attribute("rel") == "noopener noreferrer"
        else:
            assert link.count() == 0

    # Bilingual text, nothing fetched from another site, no script error, no CSP violation.
    assert "Последние звонки" in page.inner_text("body") and "last calls" in page.inner_text("body")
    assert all(url.startswith(base + "/") for url in requests), requests
    assert errors == []
    assert page.evaluate("window.__csp") == []

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    if os.environ.get("DASHBOARD_SCREENSHOT_DOCS"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)
    context.close()

