"""The dashboard's HTTP surface (R-22): signing in with the token, the session cookie, the data route's
query, the static assets and the page's security headers. What the page draws in a browser is
tests/test_dashboard_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from functions.calling import channels
from functions.insight import dashboard
from functions.records import leads, spend

TOKEN = "test-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATIC = Path(dashboard.__file__).parent / "static"


def cookie_of(response) -> str:
    """The `name=value` pair of the session cookie a response sets."""
    return response.headers["Set-Cookie"].split(";")[0]


def sign_in(client, query: str = "") -> str:
    response = client.http.get(f"/dashboard?token={TOKEN}" + (f"&{query}" if query else ""))
    assert response.status_code == 303
    return cookie_of(response)


def attributes(response) -> dict[str, str]:
    parts = [p.strip() for p in response.headers["Set-Cookie"].split(";")]
    return {k.lower(): v for k, _, v in (p.partition("=") for p in parts[1:])}


# --- signing in -----------------------------------------------------------------------------------------

def test_token_is_exchanged_for_a_cookie_and_dropped_from_the_address(client):
    response = client.http.get(f"/dashboard?token={TOKEN}&from=2026-11-01&to=2026-11-14&offer_id=101")
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location == "dashboard?from=2026-11-01&to=2026-11-14&offer_id=101"  # relative: keeps a stage prefix
    assert TOKEN not in location and TOKEN not in response.headers["Set-Cookie"]
    attrs = attributes(response)
    assert {"httponly", "samesite", "max-age", "path"} <= attrs.keys()
    assert attrs["samesite"] == "Strict" and attrs["path"] == "/dashboard"
    assert 0 < int(attrs["max-age"]) <= 3600
    assert "secure" not in attrs  # plain http (chalice local): a Secure cookie would never come back
    assert response.headers["Cache-Control"] == "no-store"


def test_cookie_is_secure_over_https(client):
    response = client.http.get(f"/dashboard?token={TOKEN}", headers={"X-Forwarded-Proto": "https"})
    assert "secure" in attributes(response)
    assert response.headers["Location"] == "dashboard"


def test_cookie_opens_the_page_with_a_csp_that_forbids_other_sites(client):
    page = client.http.get("/dashboard", headers={"Cookie": f"other=1; {sign_in(client)}"})
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert '<script src="dashboard/assets/dashboard.js"' in page.body.decode()
    assert "Set-Cookie" not in page.headers  # the session is not extended behind the owner's back


def test_bearer_opens_the_page_and_sets_the_cookie_for_its_fetches(client):
    page = client.http.get("/dashboard", headers=AUTH)
    assert page.status_code == 200
    assert page.headers["Set-Cookie"].startswith("cb_dashboard=")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Cookie": "cb_dashboard=forged"},
                                     {"Cookie": "cb_dashboard=v1.99999999999.0000"}, {"Cookie": "x" * 20000}])
def test_without_a_valid_token_or_cookie_nothing_is_shown(client, headers):
    for path in ("/dashboard", "/dashboard/data"):
        response = client.http.get(path, headers=headers)
        assert response.status_code == 401, path
        assert response.json_body["field"] == "token"
        assert "Set-Cookie" not in response.headers


def test_wrong_token_in_the_address_is_401_and_sets_no_cookie(client):
    response = client.http.get("/dashboard?token=wrong")
    assert response.status_code == 401
    assert response.json_body["field"] == "token"
    assert "Set-Cookie" not in response.headers


def test_cookie_expires(client, monkeypatch):
    cookie = sign_in(client)
    now = dashboard._now()
    monkeypatch.setattr(dashboard, "_now", lambda: now + dashboard.SESSION_SECONDS + 1)
    assert client.http.get("/dashboard", headers={"Cookie": cookie}).status_code == 401


def test_rotating_the_api_token_ends_every_session(client, monkeypatch):
    cookie = sign_in(client)
    monkeypatch.setenv("CALLBRIDGE_API_TOKEN", "rotated-token")
    assert client.http.get("/dashboard", headers={"Cookie": cookie}).status_code == 401


def test_a_tampered_expiry_is_refused(client):
    name, _, value = sign_in(client).partition("=")
    _, expiry, mac = value.split(".")
    forged = f"{name}=v1.{int(expiry) + 86400}.{mac}"
    assert client.http.get("/dashboard/data", headers={"Cookie": forged}).status_code == 401


# --- the query ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "status", "field"), [
    ("from=yesterday", 400, "from"),
    ("from=2026-13-01", 400, "from"),
    ("to=2026-02-30", 400, "to"),
    ("from=0001-01-01", 400, "from"),  # would overflow the date arithmetic: a 400, never a 500
    ("to=9999-12-31", 400, "to"),
    ("from=2026-11-10&to=2026-11-01", 400, "to"),
    ("from=2026-01-01&to=2026-12-31", 400, "from"),
    ("offer_id=abc", 400, "offer_id"),
    ("offer_id=-1", 400, "offer_id"),
    ("offer_id=" + "9" * 40, 400, "offer_id"),
    ("offer_id=999", 422, "offer_id"),
    ("limit=5", 400, "limit"),
    ("from=%3Cscript%3E", 400, "from"),
])
def test_hostile_query_is_a_4xx_naming_the_parameter(client, query, status, field):
    cookie = sign_in(client)
    for path in ("/dashboard/data", "/dashboard"):
        response = client.http.get(f"{path}?{query}", headers={"Cookie": cookie})
        assert response.status_code == status, (path, response.body)
        assert response.json_body["field"] == field


def test_hostile_query_with_the_token_sets_no_cookie(client):
    response = client.http.get(f"/dashboard?token={TOKEN}&from=nonsense")
    assert response.status_code == 400 and response.json_body["field"] == "from"
    assert "Set-Cookie" not in response.headers


# --- the data -------------------------------------------------------------------------------------------

def test_data_shows_the_months_spend_and_channels_in_use(client):
    spend.add(1234.5)
    assert channels.acquire("Beeline_Main", 5, "call-a#1") is not None
    assert channels.acquire("Beeline_Main", 5, "call-b#1") is not None
    response = client.http.get("/dashboard/data?from=2026-11-01&to=2026-11-14", headers={"Cookie": sign_in(client)})
    assert response.status_code == 200, response.body
    data = response.json_body
    assert data["budget"] == {"month": spend.month(), "spent_rub": 1234.5, "monthly_rub": 5000.0, "share": 0.2469,
                              "thresholds": [0.8, 1.0], "timezone": "Europe/Moscow"}
    assert data["channels"] == {"provider": "Beeline_Main", "limit": 5, "busy": 2, "alert_ratio": 0.8}
    assert [d["day"] for d in data["summary"]["days"]][:2] == ["2026-11-01", "2026-11-02"]
    assert len(data["summary"]["days"]) == 14
    assert {o["id"] for o in data["offers"]} == {101, 102}
    assert response.headers["Cache-Control"] == "no-store"


def test_data_carries_the_report_of_the_chosen_offer(client):
    assert leads.create({"lead_id": "L-dash", "offer_id": 102, "source": "tilda", "phone": "+79991112233",
                         "state": "received", "created_at": "2026-11-02T09:00:00Z"})
    cookie = {"Cookie": sign_in(client)}
    data = client.http.get("/dashboard/data?from=2026-11-01&to=2026-11-03&offer_id=102", headers=cookie).json_body
    assert data["offer_id"] == 102 and data["summary"]["offer_id"] == 102
    assert [d["leads"] for d in data["summary"]["days"]] == [0, 1, 0]
    other = client.http.get("/dashboard/data?from=2026-11-01&to=2026-11-03&offer_id=101", headers=cookie).json_body
    assert other["summary"]["total"]["leads"] == 0


def test_data_defaults_to_the_last_two_weeks(client):
    data = client.http.get("/dashboard/data", headers=AUTH).json_body
    assert len(data["summary"]["days"]) == dashboard.DEFAULT_DAYS
    assert data["to"] == dashboard._today().isoformat()
    assert data["offer_id"] is None


# --- the assets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content_type"), [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                                                   ("favicon.svg", "image/svg+xml")])
def test_assets_are_served_from_the_package(client, name, content_type):
    response = client.http.get(f"/dashboard/assets/{name}")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(content_type)
    assert response.body == (STATIC / name).read_bytes()
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("name", ["dashboard.html", "..%2Fdashboard.py", "%2E%2E%2F%2E%2E%2Fapp.py", "nope.js"])
def test_no_other_file_is_served(client, name):
    response = client.http.get(f"/dashboard/assets/{name}")
    assert response.status_code == 404
    assert response.json_body["field"] == "name"


def test_the_page_refers_to_no_other_site():
    # The CSP blocks it in the browser; this keeps the files from trying. The SVG namespace is a name only.
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8").replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text and "url(" not in text, path.name
