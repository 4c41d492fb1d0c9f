"""Reports against the seed's targets (R-22, seed §1.2 and §4.2): the summary, ad spend, the last calls.

Every figure comes from the per-offer day items of records/daily.py, which are counted as things
happen, so a report over a year reads at most 366 items per offer and never scans leads or calls.
The metrics, each per day and for the whole range, with the seed's absolute target:

| metric | value | target |
|---|---|---|
| `calls_to_leads` | answered calls ÷ leads: the share of leads that became a conversation | > 0.20 |
| `avg_talk_seconds` | talk seconds ÷ answered calls | > 60 |
| `approval_rate` | approved orders ÷ leads ("conversion to the target action") | > 0.10 |
| `roas` | approved revenue (payout) ÷ ad spend | > 3 |
| `cpa_rub` | (ad spend + telephony cost) ÷ approved orders | < the average payout ÷ 3 |

Ratios are fractions (0.2 = 20%). The seed gives CPA no absolute figure; the bound used is the CPA at
which ad spend alone would still leave ROAS at its target (payout ÷ 3). The seed's headline goals are
relative: an offer's optional `baseline` (its figures before callbridge) gives each metric its
`baseline`, its `change` (value ÷ baseline − 1) and, for calls-to-leads (+50%) and CPA (−20%), a `goal`
with `goal_met`. Baselines apply to a report of one offer (with several offers they would have to be
weighted and are left out).

Days are each offer's calendar day in its time zone; a report over all offers adds the offers' days
of the same date. Phones in the recent-calls feed are shown as the offer's `phone_visibility` says.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re

from functions.core import auth, config, links, safe_json
from functions.core.phones import show
from functions.core.replies import Reply, error
from functions.records import calls, daily

MAX_DAYS = 366
DEFAULT_DAYS = 30
MAX_RECENT = 100
TARGETS = {"calls_to_leads": 0.2, "avg_talk_seconds": 60.0, "approval_rate": 0.1, "roas": 3.0}
METRICS = ("calls_to_leads", "avg_talk_seconds", "approval_rate", "roas", "cpa_rub")
GOAL_FACTORS = {"calls_to_leads": 1.5, "cpa_rub": 0.8}  # seed §1.2: +50% calls-to-leads, -20% CPA
INT_FIELDS = ("leads", "calls", "answered", "talk_seconds", "calls_over_60s", "approved")
RUB_FIELDS = ("revenue_rub", "cost_rub", "adspend_rub")
ROW_FIELDS = (*INT_FIELDS, *RUB_FIELDS)
MAX_RUB = 1e9
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class BadParameter(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --- the summary ------------------------------------------------------------------------------------

def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _metric(name: str, value: float | None, target: float, op: str, baseline: float | None) -> dict:
    def holds(v, bound):
        if v is None or bound is None:
            return None
        return v > bound if op == ">" else v < bound

    goal = baseline * GOAL_FACTORS[name] if baseline is not None and name in GOAL_FACTORS else None
    change = value / baseline - 1 if value is not None and baseline else None
    rounded = None if value is None else round(value, 4)
    return {"value": rounded, "target": round(target, 4), "op": op, "met": holds(value, target),
            "baseline": baseline, "goal": None if goal is None else round(goal, 4),
            "change": None if change is None else round(change, 4), "goal_met": holds(value, goal)}


def _row(totals: dict, histogram: dict[int, int], baseline, payout_rub: float) -> dict:
    row = {k: int(totals.get(k, 0)) for k in INT_FIELDS}
    row.update({k: round(float(totals.get(k, 0)), 2) for k in RUB_FIELDS})
    row["speed_to_lead_median_s"] = daily.quantile(histogram, 0.5)
    row["speed_to_lead_p95_s"] = daily.quantile(histogram, 0.95)
    row["speed_to_lead_samples"] = sum(histogram.values())
    spent = row["adspend_rub"] + row["cost_rub"]
    average_payout = row["revenue_rub"] / row["approved"] if row["approved"] else payout_rub
    values = {
        "calls_to_leads": _ratio(row["answered"], row["leads"]),
        "avg_talk_seconds": _ratio(row["talk_seconds"], row["answered"]),
        "approval_rate": _ratio(row["approved"], row["leads"]),
        "roas": _ratio(row["revenue_rub"], row["adspend_rub"]),
        "cpa_rub": _ratio(spent, row["approved"]),
    }
    targets = {**TARGETS, "cpa_rub": average_payout / TARGETS["roas"]}
    row["metrics"] = {name: _metric(name, values[name], targets[name], "<" if name == "cpa_rub" else ">",
                                    getattr(baseline, name, None) if baseline else None) for name in METRICS}
    if values["cpa_rub"] is None and spent > 0:  # money spent and nothing approved: clearly not met
        row["metrics"]["cpa_rub"]["met"] = False
    return row


def _add(into: dict, row: dict, histogram: dict[int, int]) -> None:
    for name in ROW_FIELDS:
        into[name] = into.get(name, 0) + (row.get(name) or 0)
    for lower, count in row.get("speed_to_lead", {}).items():
        histogram[lower] = histogram.get(lower, 0) + count


def summary(from_day: dt.date, to_day: dt.date, offer_id: int | None = None) -> dict:
    """Per day (every day of the range, zeros where nothing happened) and in total: the counts, the
    speed to lead and the metrics with their targets. See the module docstring for the definitions."""
    if to_day < from_day:
        raise BadParameter("from", "from is after to")
    span = (to_day - from_day).days + 1
    if span > MAX_DAYS:
        raise BadParameter("to", f"the range may cover at most {MAX_DAYS} days, not {span}")
    cfg = config.load()
    if offer_id is not None:
        offer = cfg.offer(offer_id)
        if offer is None:
            raise BadParameter("offer_id", f"no offer with id {offer_id}")
        offers = [offer]
    else:
        offers = list(cfg.offers)
    baseline = offers[0].baseline if len(offers) == 1 else None
    payouts = [o.payout_rub for o in offers]
    payout = sum(payouts) / len(payouts)

    stored = [daily.days(o.id, from_day, to_day) for o in offers]
    days, total, total_histogram = [], {}, {}
    for n in range(span):
        day = (from_day + dt.timedelta(days=n)).isoformat()
        sums, histogram = {}, {}
        for per_offer in stored:
            if day in per_offer:
                _add(sums, per_offer[day], histogram)
                _add(total, per_offer[day], total_histogram)
        days.append({"day": day, **_row(sums, histogram, baseline, payout)})
    return {"from": from_day.isoformat(), "to": to_day.isoformat(), "offer_id": offer_id, "days": days,
            "total": _row(total, total_histogram, baseline, payout)}


# --- the recent-calls feed ------------------------------------------------------------------------------

def recent_calls(limit: int = 20) -> list[dict]:
    """The last `limit` finished calls (at most MAX_RECENT), newest first, phones as each offer shows
    them, with a recording link when the call's recording is stored."""
    cfg = config.load()
    found = []
    for item in daily.recent_calls(max(1, min(int(limit), MAX_RECENT))):
        offer = cfg.offer(item.get("offer_id")) if isinstance(item.get("offer_id"), int) else None
        phone = item.get("phone")
        recording_url = None
        if item.get("outcome") == "answered" and (calls.get(item["call_id"]) or {}).get("recording_key"):
            recording_url = links.recording_link(item["call_id"])
        found.append({
            "call_id": item["call_id"], "lead_id": item.get("lead_id"), "offer_id": item.get("offer_id"),
            "started_at": item.get("started_at"), "ended_at": item.get("ended_at"), "outcome": item.get("outcome"),
            "talk_seconds": int(item.get("talk_seconds") or 0), "direction": item.get("direction"),
            "phone": show(phone, offer.phone_visibility if offer else "partial") if phone else None,
            "recording_url": recording_url,
        })
    return found


# --- HTTP: GET /v1/reports/summary, GET /v1/reports/calls, PUT /v1/adspend ---------------------------------

def _date(value, field: str) -> dt.date:
    if not isinstance(value, str) or not _DAY.fullmatch(value):
        raise BadParameter(field, f"{field} must be a date yyyy-mm-dd")
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise BadParameter(field, f"{field}: {value} is not a calendar date") from None
    if not 2000 <= day.year <= 2100:
        raise BadParameter(field, f"{field} must be between 2000-01-01 and 2100-12-31")
    return day


def _offer_id(value, field: str = "offer_id") -> int:
    if isinstance(value, str) and re.fullmatch(r"\d{1,12}", value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadParameter(field, f"{field} must be an integer")
    if config.load().offer(value) is None:
        raise BadParameter(field, f"no offer with id {value}")
    return value


def _range(query: dict) -> tuple[dt.date, dt.date, int | None]:
    offer_id = _offer_id(query["offer_id"]) if query.get("offer_id") not in (None, "") else None
    to_day = _date(query["to"], "to") if query.get("to") else daily.today(offer_id)
    from_day = _date(query["from"], "from") if query.get("from") else to_day - dt.timedelta(days=DEFAULT_DAYS - 1)
    return from_day, to_day, offer_id


def csv_text(report: dict) -> str:
    """The summary as CSV: a header row, a row per day, then the total (day "total")."""
    metric_columns = [f"{m}_{part}" if part else m for m in METRICS
                      for part in ("", "target", "met", "baseline", "goal", "change")]
    header = ["day", *ROW_FIELDS, "speed_to_lead_median_s", "speed_to_lead_p95_s", *metric_columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in [*report["days"], {**report["total"], "day": "total"}]:
        cells = [row["day"], *(row[k] for k in ROW_FIELDS), row["speed_to_lead_median_s"], row["speed_to_lead_p95_s"]]
        for name in METRICS:
            m = row["metrics"][name]
            cells += [m["value"], m["target"], m["met"], m["baseline"], m["goal"], m["change"]]
        writer.writerow(["" if c is None else str(c).lower() if isinstance(c, bool) else c for c in cells])
    return out.getvalue()


def summary_reply(query: dict, headers: dict[str, str]) -> Reply:
    """`GET /v1/reports/summary?from=&to=&offer_id=&format=json|csv`; `headers` with lower-case names."""
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    fmt = query.get("format") or "json"
    if fmt not in ("json", "csv"):
        return error(400, "format", "format must be json or csv")
    try:
        report = summary(*_range(query))
    except BadParameter as exc:
        return error(400, exc.field, str(exc))
    if fmt == "csv":
        name = f"callbridge-summary-{report['from']}-{report['to']}.csv"
        return Reply(200, csv_text(report), {"Content-Type": "text/csv; charset=utf-8",
                                             "Content-Disposition": f'attachment; filename="{name}"'})
    return Reply(200, report)


def calls_reply(query: dict, headers: dict[str, str]) -> Reply:
    """`GET /v1/reports/calls?limit=` (default 20, at most 100): `{"calls": [...]}`."""
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    raw = query.get("limit") or "20"
    if not re.fullmatch(r"\d{1,4}", raw) or not 1 <= int(raw) <= MAX_RECENT:
        return error(400, "limit", f"limit must be an integer from 1 to {MAX_RECENT}")
    return Reply(200, {"calls": recent_calls(int(raw))})


def put_adspend(body: bytes, headers: dict[str, str]) -> Reply:
    """`PUT /v1/adspend {"offer_id", "day", "rub"}`: sets the offer's ad spend of that day (a repeat sets
    the same figure again; a correction replaces it)."""
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    try:
        data = safe_json.loads(body or b"")
    except safe_json.BadJson as exc:
        return error(400, "body", f"body must be a JSON object: {exc}")
    if not isinstance(data, dict):
        return error(400, "body", "body must be a JSON object")
    unknown = sorted(set(data) - {"offer_id", "day", "rub"})
    if unknown:
        return error(422, str(unknown[0])[:100], "unknown field: the body has offer_id, day and rub")
    try:
        for field in ("offer_id", "day", "rub"):
            if field not in data:
                raise BadParameter(field, f"{field} is required")
        offer_id = _offer_id(data["offer_id"])
        day = _date(data["day"], "day")
        if day > daily.today(offer_id) + dt.timedelta(days=1):
            raise BadParameter("day", "day is in the future")
        rub = data["rub"]
        if isinstance(rub, bool) or not isinstance(rub, (int, float)) or not math.isfinite(rub) \
                or not 0 <= rub <= MAX_RUB:
            raise BadParameter("rub", f"rub must be a number from 0 to {MAX_RUB:.0f}")
    except BadParameter as exc:
        return error(422, exc.field, str(exc))
    return Reply(200, daily.set_adspend(offer_id, day, float(rub)))
