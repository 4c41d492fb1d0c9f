"""The owner's dashboard (R-22): `GET /dashboard`, one HTML page served by the app itself.

Design:
- **Sign-in.** The API token as `Authorization: Bearer` (curl), or once as `?token=` from a browser. The
  token is exchanged for a session cookie and a 303 to `dashboard` (relative, so an API Gateway stage
  prefix survives) without the token, so it does not stay in the address bar, the history or a Referer.
  The cookie is `v1.<expiry>.<HMAC-SHA256>` under a key derived from CALLBRIDGE_API_TOKEN: no session
  store, a rotated token ends every session, a forged or stale cookie is a 401. HttpOnly, SameSite=Strict,
  Secure when the request came over https, scoped to the dashboard's own path, SESSION_SECONDS long.
- **The page is static**: static/dashboard.html, .js and .css ship inside the package and are served by
  `/dashboard/assets/{name}` from a fixed list (no file-system path comes from a request). Its data come
  from the same-origin JSON route `/dashboard/data?from=&to=&offer_id=` that the cookie authorises, so no
  value is ever templated into HTML. The charts are inline SVG drawn by hand in static/dashboard.js (plain
  JS, no chart library, no build step); the Content-Security-Policy (`default-src 'self'`) forbids any
  request to another site and any inline script.
- **The numbers are other modules'**: insight/reports.py (the day-by-day summary and the last calls),
  records/spend.py (the budget month's spend), calling/channels.py (leases held now).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from urllib.parse import urlencode

from functions.core import auth, config, secrets, times
from functions.core.replies import Reply, error

COOKIE = "cb_dashboard"
SESSION_SECONDS = 3600
DEFAULT_DAYS = 14
MAX_DAYS = 92
RECENT_CALLS = 20
STATIC = Path(__file__).resolve().parent / "static"
# name -> content type; nothing outside this list is ever read from disk.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
QUERY = ("from", "to", "offer_id")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_OFFER_ID = re.compile(r"[0-9]{1,9}")
_PATH = re.compile(r"/[A-Za-z0-9/_.-]{0,200}")
_KEY_LABEL = b"callbridge dashboard session v1"


def _now() -> float:
    return time.time()


# --- the session cookie --------------------------------------------------------------------------------

def _key() -> bytes:
    # Derived, not the token itself: the cookie's MAC never reveals the API token, and rotating the token
    # invalidates every session.
    return hmac.new(secrets.get("CALLBRIDGE_API_TOKEN").encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(payload: str) -> str:
    return hmac.new(_key(), payload.encode(), hashlib.sha256).hexdigest()


def _session_value(now: float) -> str:
    payload = f"v1.{int(now) + SESSION_SECONDS}"
    return f"{payload}.{_mac(payload)}"


def _cookie_from(headers: dict[str, str]) -> str | None:
    for part in (headers.get("cookie") or "")[:8192].split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE:
            return value.strip().strip('"')
    return None


def _session_ok(headers: dict[str, str], now: float) -> bool:
    value = _cookie_from(headers)
    if not value or len(value) > 128:
        return False
    version, _, rest = value.partition(".")
    expiry, _, mac = rest.partition(".")
    if version != "v1" or not expiry.isdigit() or len(expiry) > 12:
        return False
    if not hmac.compare_digest(mac.encode(), _mac(f"v1.{expiry}").encode()):
        return False
    return int(expiry) > now


def _https(headers: dict[str, str]) -> bool:
    # API Gateway (and any proxy in front of chalice local) says how the browser came in.
    forwarded = (headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
    return forwarded == "https" or (os.environ.get("PUBLIC_BASE_URL") or "").lower().startswith("https://")


def _set_cookie(headers: dict[str, str], path: str, now: float) -> str:
    cookie_path = path if _PATH.fullmatch(path or "") and path.endswith("/dashboard") else "/"
    parts = [f"{COOKIE}={_session_value(now)}", f"Max-Age={SESSION_SECONDS}", f"Path={cookie_path}",
             "HttpOnly", "SameSite=Strict"]
    if _https(headers):
        parts.append("Secure")
    return "; ".join(parts)


def _authorised(headers: dict[str, str], now: float) -> bool:
    return _session_ok(headers, now) or auth.bearer_ok(headers)


# --- the query ------------------------------------------------------------------------------------------

def _today(offer_id: int | None = None) -> dt.date:
    """Today as the reports count days: in the offer's time zone, or the budget's for every offer."""
    from functions.records import daily

    return daily.today(offer_id)


def _date(query: dict, name: str) -> dt.date | Reply | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or not _DATE.fullmatch(raw):
        return error(400, name, f"{name}: not a date (YYYY-MM-DD)")
    try:
        day = dt.date.fromisoformat(raw)
    except ValueError:
        return error(400, name, f"{name}: not a date (YYYY-MM-DD)")
    if not 2000 <= day.year <= 2100:
        return error(400, name, f"{name}: out of range (years 2000-2100)")
    return day


def parse_query(query: dict, extra: tuple[str, ...] = ()) -> dict | Reply:
    """{"from", "to", "offer_id"} from the query string, or a 400/422 naming the parameter at fault.
    Default: the last DEFAULT_DAYS days up to today (in the offer's time zone, the budget's for every
    offer), every offer. `extra`: further names the route itself takes (the page's `token`)."""
    for name in query:
        if name not in QUERY and name not in extra:
            shown = name if len(name) <= 64 else name[:64] + "..."
            return error(400, shown, f"unknown query parameter {shown!r}: use from, to, offer_id")
    start, end = _date(query, "from"), _date(query, "to")
    for value in (start, end):
        if isinstance(value, Reply):
            return value
    offer_id = None
    raw = query.get("offer_id")
    if raw not in (None, ""):
        if not isinstance(raw, str) or not _OFFER_ID.fullmatch(raw):
            return error(400, "offer_id", "offer_id: not an offer id (digits)")
        offer_id = int(raw)
        if config.load().offer(offer_id) is None:
            return error(422, "offer_id", f"offer_id: no offer with id {offer_id}")
    if end is None:
        end = start + dt.timedelta(days=DEFAULT_DAYS - 1) if start else _today(offer_id)
    if start is None:
        start = end - dt.timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        return error(400, "to", "to: before from")
    if (end - start).days + 1 > MAX_DAYS:
        return error(400, "from", f"from: at most {MAX_DAYS} days from from to to")
    return {"from": start, "to": end, "offer_id": offer_id}


# --- the routes -----------------------------------------------------------------------------------------

def _unauthorised() -> Reply:
    return error(401, "token", "open /dashboard?token=<API token> (откройте /dashboard?token=<API-токен>)")


def page(query: dict, headers: dict[str, str], path: str = "/dashboard") -> Reply:
    """GET /dashboard. `headers` with lower-case names; `path` is the route's path as the browser sees it
    (with an API Gateway stage prefix), for the cookie's scope."""
    now = _now()
    token = query.get("token")
    if token is not None:
        if not secrets.matches("CALLBRIDGE_API_TOKEN", token):
            return error(401, "token", "wrong API token (неверный API-токен)")
        parsed = parse_query(query, extra=("token",))
        if isinstance(parsed, Reply):
            return parsed
        rest = {k: query[k] for k in QUERY if query.get(k)}
        location = "dashboard" + (f"?{urlencode(rest)}" if rest else "")
        return Reply(303, "", {"Location": location, "Set-Cookie": _set_cookie(headers, path, now),
                               "Cache-Control": "no-store", **SECURITY_HEADERS})
    session = _session_ok(headers, now)
    if not (session or auth.bearer_ok(headers)):
        return _unauthorised()
    parsed = parse_query(query)
    if isinstance(parsed, Reply):
        return parsed
    extra = {} if session else {"Set-Cookie": _set_cookie(headers, path, now)}  # Bearer: the page's fetches need it
    html = (STATIC / "dashboard.html").read_text(encoding="utf-8")
    return Reply(200, html, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
                             **SECURITY_HEADERS, **extra})


def _plain(value):
    """JSON-ready: DynamoDB's Decimals as int/float, dates as ISO text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


def snapshot(start: dt.date, end: dt.date, offer_id: int | None) -> dict:
    """Everything the page draws, as one JSON object."""
    from functions.calling import channels
    from functions.insight import reports
    from functions.records import spend

    cfg = config.load()
    month = spend.month()
    spent = spend.spent(month)
    budget = cfg.budget.monthly_rub
    return _plain({
        "from": start.isoformat(), "to": end.isoformat(), "offer_id": offer_id,
        "offers": [{"id": o.id, "name": o.name} for o in cfg.offers],
        "summary": reports.summary(start, end, offer_id),
        "budget": {"month": month, "spent_rub": round(spent, 2), "monthly_rub": budget,
                   "share": round(spent / budget, 4), "thresholds": list(cfg.budget.alert_thresholds),
                   "timezone": cfg.budget.timezone},
        "channels": {"provider": cfg.provider.name, "limit": cfg.provider.channel_limit,
                     "busy": channels.busy(cfg.provider.name, cfg.provider.channel_limit),
                     "alert_ratio": getattr(cfg.provider, "channel_alert_ratio", 0.8)},
        "calls": reports.recent_calls(RECENT_CALLS),
        "generated_at": times.now_iso(),
    })


def data(query: dict, headers: dict[str, str]) -> Reply:
    """GET /dashboard/data: the page's numbers (session cookie or Bearer)."""
    if not _authorised(headers, _now()):
        return _unauthorised()
    parsed = parse_query(query)
    if isinstance(parsed, Reply):
        return parsed
    body = snapshot(parsed["from"], parsed["to"], parsed["offer_id"])
    return Reply(200, body, {"Cache-Control": "no-store", **SECURITY_HEADERS})


def asset(name: str) -> Reply:
    """GET /dashboard/assets/{name}: the page's script and style sheet (public: they hold no data)."""
    content_type = ASSETS.get(name)
    if content_type is None:
        return error(404, "name", "no such dashboard asset")
    body = (STATIC / name).read_text(encoding="utf-8")
    return Reply(200, body, {"Content-Type": content_type, "Cache-Control": "no-cache", **SECURITY_HEADERS})
