"""GET /v1/reports/summary, GET /v1/reports/calls and PUT /v1/adspend (functions/insight/reports.py): the
day-by-day figures against the seed's targets, the baseline's goals, CSV, the recent-calls feed with
phones masked per offer, and a clear 4xx naming the parameter for every bad input. The data are seeded
through the public records functions the events drive (leads.create, calls.claim/finish,
spend.add_call_cost, daily.order_approved), on fixed past days in each offer's time zone."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from urllib.parse import urlencode

import pytest

from functions.core import store
from functions.records import calls, daily, leads, spend

AUTH = {"Authorization": "Bearer test-api-token"}
JSON = {**AUTH, "Content-Type": "application/json"}


def lead(n: int, created_at: str, offer_id: int = 101) -> str:
    lead_id = f"rep-lead-{offer_id}-{n}"
    assert leads.create({"lead_id": lead_id, "source": "tilda", "offer_id": offer_id, "phone": f"+7999000{n:04d}",
                         "state": "received", "created_at": created_at})
    return lead_id


def call(lead_id: str, dialing_at: str, outcome: str, talk: int = 0, offer_id: int = 101, attempt: int = 1,
         ended_at: str | None = None, phone: str | None = None) -> str:
    call_id = calls.call_id_for(lead_id, attempt)
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": offer_id, "attempt": attempt,
                                 "phone": phone or (leads.get(lead_id) or {}).get("phone", "+79990000000"),
                                 "dialing_at": dialing_at, "created_at": dialing_at})
    assert calls.finish(call_id, outcome, talk_seconds=talk, ended_at=ended_at or dialing_at)
    if talk:
        assert spend.add_call_cost(call_id, -(-talk // 60) * 2.0)
    return call_id


@pytest.fixture
def seeded(aws):
    """Offer 101 (Moscow) on 2026-11-10: 10 leads, 6 calls (4 answered: 30, 70, 90, 130 s), 2 approved
    orders, 2000 RUB of ad spend. 2026-11-09 and 2026-11-11 have nothing."""
    lead_ids = [lead(n, f"2026-11-10T0{n % 10}:00:00.000Z") for n in range(10)]
    talks = {0: 30, 1: 70, 2: 90, 3: 130}
    for n in range(6):
        # dialled 120 s, 240 s, ... after the form: speed to lead 120..720 s
        dialing = f"2026-11-10T0{n}:{2 * (n + 1):02d}:00.000Z"
        call(lead_ids[n], dialing, "answered" if n in talks else "busy", talks.get(n, 0))
    assert daily.order_approved(7001, 101, "2026-11-10")
    assert daily.order_approved(7002, 101, "2026-11-10")
    daily.set_adspend(101, "2026-11-10", 2000)
    return lead_ids


def get(client, path: str, **query):
    return client.http.get(f"{path}?{urlencode(query)}" if query else path, headers=AUTH)


def summary(client, **query) -> dict:
    response = get(client, "/v1/reports/summary", **query)
    assert response.status_code == 200, response.body
    return json.loads(response.body)


def test_summary_per_day_and_in_total_with_the_seed_targets(client, seeded):
    report = summary(client, **{"from": "2026-11-09", "to": "2026-11-11", "offer_id": "101"})
    assert report["from"] == "2026-11-09" and report["to"] == "2026-11-11" and report["offer_id"] == 101
    assert [d["day"] for d in report["days"]] == ["2026-11-09", "2026-11-10", "2026-11-11"]
    empty, day, _ = report["days"]
    assert (empty["leads"], empty["calls"], empty["speed_to_lead_median_s"]) == (0, 0, None)
    assert empty["metrics"]["calls_to_leads"]["value"] is None and empty["metrics"]["calls_to_leads"]["met"] is None
    assert {k: day[k] for k in ("leads", "calls", "answered", "talk_seconds", "calls_over_60s", "approved",
                                "revenue_rub", "cost_rub", "adspend_rub")} == {
        "leads": 10, "calls": 6, "answered": 4, "talk_seconds": 320, "calls_over_60s": 3, "approved": 2,
        "revenue_rub": 1800.0, "cost_rub": 16.0, "adspend_rub": 2000.0}  # 1+2+2+3 started minutes x 2 RUB
    # speed to lead 120, 240, 360, 480, 600, 720 s: median (360+480)/2, p95 the nearest rank (the 6th)
    assert day["speed_to_lead_median_s"] == 420.0 and day["speed_to_lead_p95_s"] == 725.0  # 10 s bucket 720..730
    metrics = day["metrics"]
    assert metrics["calls_to_leads"] == {**metrics["calls_to_leads"], "value": 0.4, "target": 0.2, "op": ">",
                                         "met": True}
    assert metrics["avg_talk_seconds"]["value"] == 80.0 and metrics["avg_talk_seconds"]["met"] is True
    assert metrics["approval_rate"]["value"] == 0.2 and metrics["approval_rate"]["met"] is True
    assert metrics["roas"]["value"] == 0.9 and metrics["roas"]["target"] == 3.0 and metrics["roas"]["met"] is False
    assert metrics["cpa_rub"]["value"] == 1008.0 and metrics["cpa_rub"]["op"] == "<"  # (2000 + 16) / 2
    assert metrics["cpa_rub"]["target"] == 300.0 and metrics["cpa_rub"]["met"] is False  # payout 900 / ROAS 3
    assert {k: v for k, v in report["total"].items() if k != "metrics"} == {
        k: v for k, v in day.items() if k not in ("day", "metrics")}


def test_the_last_day_of_a_range_keeps_its_speed_to_lead_and_the_next_day_is_not_in_it(client, seeded):
    day = summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": "101"})["days"][0]
    assert (day["speed_to_lead_samples"], day["speed_to_lead_median_s"], day["speed_to_lead_p95_s"]) == (6, 420, 725)
    lead_id = lead(50, "2026-11-11T06:00:00.000Z")
    call(lead_id, "2026-11-11T06:00:09.000Z", "busy")  # the next day's own 9 s
    assert summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": "101"})["days"][0] == day
    assert summary(client, **{"from": "2026-11-11", "to": "2026-11-11", "offer_id": "101"})["days"][0][
        "speed_to_lead_median_s"] == 9.0


def test_a_backlogged_days_speeds_keep_its_day_item_small_and_its_percentiles_exact(client, aws):
    """A backlog spreads first calls over hundreds of 1 s buckets. The day item, which every lead, claim and
    call end writes in a transaction (a write unit per KB of it, twice), must not grow with them."""
    form = dt.datetime(2026, 11, 10, 6, tzinfo=dt.UTC)
    for n in range(120):  # first calls 300..419 s after their forms: 120 distinct buckets
        lead_id = lead(n, form.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        dialled = form + dt.timedelta(seconds=300 + n)
        call(lead_id, dialled.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "busy")
    item = store.get({"pk": "DAILY#101", "sk": "DAY#2026-11-10"})
    assert item["calls"] == 120 and len(json.dumps(item, default=str).encode()) < 1024
    day = summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": "101"})["days"][0]
    # 120 samples 300..419: the median the mean of the 60th and 61st (359, 360), p95 the 114th (413)
    assert (day["speed_to_lead_samples"], day["speed_to_lead_median_s"], day["speed_to_lead_p95_s"]) == (
        120, 359.5, 413.0)


def test_the_baseline_gives_the_change_against_the_seeds_relative_goals(client, seeded):
    metrics = summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": "101"})["total"]["metrics"]
    # config/local.yaml: offer 101's baseline calls_to_leads 0.14, cpa_rub 420, approval_rate 0.08, ...
    c2l = metrics["calls_to_leads"]
    assert (c2l["baseline"], c2l["goal"], c2l["goal_met"]) == (0.14, 0.21, True)  # +50%
    assert c2l["change"] == round(0.4 / 0.14 - 1, 4)
    cpa = metrics["cpa_rub"]
    assert (cpa["baseline"], cpa["goal"], cpa["goal_met"]) == (420.0, 336.0, False)  # -20%
    assert metrics["approval_rate"]["baseline"] == 0.08 and metrics["approval_rate"]["goal"] is None
    assert metrics["approval_rate"]["change"] == 1.5


def test_without_a_baseline_there_is_no_goal(client, seeded, use_config):
    use_config(lambda doc: doc["offers"][0].pop("baseline", None))
    metrics = summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": "101"})["total"]["metrics"]
    assert all(m["baseline"] is None and m["goal"] is None and m["change"] is None for m in metrics.values())
    assert metrics["calls_to_leads"]["met"] is True  # the absolute targets still apply


def test_days_are_each_offers_own_calendar_days(client, aws):
    # 21:30 UTC is 00:30 the next day in Moscow (offer 101) and 02:30 in Yekaterinburg (offer 102);
    # 20:30 UTC is still the 10th in Moscow but already the 11th in Yekaterinburg.
    lead(1, "2026-11-10T21:30:00.000Z", 101)
    lead(2, "2026-11-10T20:30:00.000Z", 101)
    lead(3, "2026-11-10T20:30:00.000Z", 102)
    both = summary(client, **{"from": "2026-11-10", "to": "2026-11-11"})
    assert both["offer_id"] is None
    assert [d["leads"] for d in both["days"]] == [1, 2] and both["total"]["leads"] == 3
    assert [d["leads"] for d in summary(client, **{"from": "2026-11-10", "to": "2026-11-11",
                                                   "offer_id": 102})["days"]] == [0, 1]


def test_csv_has_a_header_row_a_row_per_day_and_the_total(client, seeded):
    response = get(client, "/v1/reports/summary", **{"from": "2026-11-09", "to": "2026-11-11", "offer_id": 101,
                                                     "format": "csv"})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.body.decode() if isinstance(response.body, bytes)
                                           else response.body)))
    assert [r["day"] for r in rows] == ["2026-11-09", "2026-11-10", "2026-11-11", "total"]
    day = rows[1]
    assert (day["leads"], day["calls"], day["answered"], day["adspend_rub"]) == ("10", "6", "4", "2000.0")
    assert (day["calls_to_leads"], day["calls_to_leads_target"], day["calls_to_leads_met"]) == ("0.4", "0.2", "true")
    assert (day["roas"], day["roas_met"], day["cpa_rub_goal"]) == ("0.9", "false", "336.0")
    assert rows[0]["calls_to_leads"] == "" and rows[0]["calls_to_leads_met"] == ""


@pytest.mark.parametrize("query,field", [
    ({"from": "2026-11-31", "to": "2026-12-01"}, "from"),
    ({"from": "10.11.2026", "to": "2026-12-01"}, "from"),
    ({"from": "2026-11-01", "to": "tomorrow"}, "to"),
    ({"from": "2026-12-02", "to": "2026-12-01"}, "from"),
    ({"from": "2025-01-01", "to": "2026-12-01"}, "to"),  # more than 366 days
    ({"from": "1999-12-31", "to": "2000-01-01"}, "from"),
    ({"offer_id": "abc"}, "offer_id"),
    ({"offer_id": "999"}, "offer_id"),
    ({"format": "xml"}, "format"),
])
def test_bad_parameters_get_400_naming_them(client, query, field):
    response = get(client, "/v1/reports/summary", **query)
    assert response.status_code == 400
    assert json.loads(response.body)["field"] == field


def test_a_whole_year_is_allowed_and_the_default_is_the_last_30_days(client):
    assert len(summary(client, **{"from": "2025-12-02", "to": "2026-12-02"})["days"]) == 366
    report = summary(client)
    assert len(report["days"]) == 30 and report["to"] == daily.today(None).isoformat()


def test_reports_need_the_bearer_token(client):
    for path in ("/v1/reports/summary", "/v1/reports/calls"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.http.get(path, headers=headers)
            assert response.status_code == 401 and json.loads(response.body)["field"] == "Authorization"
    response = client.http.put("/v1/adspend", body=json.dumps({"offer_id": 101, "day": "2026-11-10", "rub": 1}),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 401


def test_recent_calls_newest_first_with_phones_as_each_offer_shows_them(client, aws, monkeypatch):
    monkeypatch.setenv("RECORDING_LINK_SECRET", "test-link-secret")
    first = call(lead(1, "2026-11-10T10:00:00.000Z", 101), "2026-11-10T10:05:00.000Z", "answered", 75,
                 ended_at="2026-11-10T10:07:00.000Z", phone="+79991234501")
    second = call(lead(2, "2026-11-10T10:00:00.000Z", 102), "2026-11-10T10:06:00.000Z", "no_answer", offer_id=102,
                  ended_at="2026-11-10T10:08:00.000Z", phone="+79991234502")
    calls.update(first, recording_key="recordings/2026/11/10/x.mp3")
    feed = json.loads(get(client, "/v1/reports/calls").body)["calls"]
    assert [c["call_id"] for c in feed] == [second, first]
    newest, older = feed
    assert newest["phone"] == "+79991234502" and newest["recording_url"] is None  # offer 102: full
    assert older["phone"] == "+7 999 ***-**-01"  # offer 101: partial
    assert older["recording_url"].startswith("http://127.0.0.1:8000/v1/recordings/" + first + "?sig=")
    assert {k: older[k] for k in ("lead_id", "offer_id", "started_at", "outcome", "talk_seconds")} == {
        "lead_id": "rep-lead-101-1", "offer_id": 101, "started_at": "2026-11-10T10:05:00.000Z",
        "outcome": "answered", "talk_seconds": 75}
    assert "+79991234501" not in json.dumps(feed)
    assert [c["call_id"] for c in json.loads(get(client, "/v1/reports/calls", limit="1").body)["calls"]] == [second]
    for bad in ("0", "101", "abc", "-1"):
        response = get(client, "/v1/reports/calls", limit=bad)
        assert response.status_code == 400 and json.loads(response.body)["field"] == "limit"


def test_the_feed_is_capped(aws, monkeypatch):
    monkeypatch.setattr(daily, "RECENT_CAP", 3)
    monkeypatch.setattr(daily, "TRIM_EVERY", 1)
    ids = [call(lead(n, "2026-11-10T10:00:00.000Z"), f"2026-11-10T10:0{n}:00.000Z", "busy") for n in range(5)]
    from functions.core import store

    assert [i["call_id"] for i in store.query(daily.RECENT_PK)] == ids[2:]


def test_the_feed_is_trimmed_now_and_then_and_read_only_up_to_its_cap(aws, monkeypatch):
    monkeypatch.setattr(daily, "RECENT_CAP", 3)
    ids = [call(lead(n, "2026-11-10T10:00:00.000Z"), f"2026-11-10T10:{n:02d}:00.000Z", "busy") for n in range(40)]
    from functions.core import store

    kept = [i["call_id"] for i in store.query(daily.RECENT_PK)]
    assert kept == ids[-len(kept):] and 3 <= len(kept) <= 3 + 2 * daily.TRIM_EVERY  # trimmed, newest kept
    assert [c["call_id"] for c in daily.recent_calls(limit=50)] == ids[:-4:-1]  # never more than the cap


@pytest.mark.parametrize("body,field,status", [
    (b"not json", "body", 400),
    (b"[1]", "body", 400),
    (json.dumps({"day": "2026-11-10", "rub": 1}).encode(), "offer_id", 422),
    (json.dumps({"offer_id": 999, "day": "2026-11-10", "rub": 1}).encode(), "offer_id", 422),
    (json.dumps({"offer_id": True, "day": "2026-11-10", "rub": 1}).encode(), "offer_id", 422),
    (json.dumps({"offer_id": 101, "rub": 1}).encode(), "day", 422),
    (json.dumps({"offer_id": 101, "day": "2026-02-30", "rub": 1}).encode(), "day", 422),
    (json.dumps({"offer_id": 101, "day": "2099-01-01", "rub": 1}).encode(), "day", 422),
    (json.dumps({"offer_id": 101, "day": "2026-11-10"}).encode(), "rub", 422),
    (json.dumps({"offer_id": 101, "day": "2026-11-10", "rub": -5}).encode(), "rub", 422),
    (json.dumps({"offer_id": 101, "day": "2026-11-10", "rub": "100"}).encode(), "rub", 422),
    (b'{"offer_id": 101, "day": "2026-11-10", "rub": 1e999}', "rub", 422),
    (json.dumps({"offer_id": 101, "day": "2026-11-10", "rub": 1, "usd": 2}).encode(), "usd", 422),
])
def test_bad_ad_spend_gets_a_4xx_naming_the_field(client, body, field, status):
    response = client.http.put("/v1/adspend", body=body, headers=JSON)
    assert response.status_code == status
    assert json.loads(response.body)["field"] == field


def test_ad_spend_is_set_and_corrected_not_added(client, aws):
    for rub in (1500, 1500, 1200.5):
        response = client.http.put("/v1/adspend", body=json.dumps({"offer_id": "102", "day": "2026-11-10",
                                                                   "rub": rub}), headers=JSON)
        assert response.status_code == 200
    assert json.loads(response.body) == {"offer_id": 102, "day": "2026-11-10", "rub": 1200.5}
    total = summary(client, **{"from": "2026-11-10", "to": "2026-11-10", "offer_id": 102})["total"]
    assert total["adspend_rub"] == 1200.5 and total["metrics"]["roas"]["value"] == 0.0
