"""POST /v1/calls and GET /v1/calls/{id} (R-13) through the Chalice test client."""

from __future__ import annotations

import json

import pytest
from conftest import deliver

AUTH = {"Authorization": "Bearer test-api-token", "Content-Type": "application/json"}


def post(client, body, headers=AUTH):
    return client.http.post("/v1/calls", body=body if isinstance(body, str) else json.dumps(body), headers=headers)


@pytest.mark.parametrize("headers", [{"Content-Type": "application/json"},
                                     {"Content-Type": "application/json", "Authorization": "Bearer nope"},
                                     {"Content-Type": "application/json", "Authorization": "test-api-token"}])
def test_bad_or_missing_token_is_401(client, headers):
    response = post(client, {"phone": "+79123456789", "offer_id": 101}, headers)
    assert response.status_code == 401 and response.json_body["field"] == "Authorization"
    assert client.http.get("/v1/calls/x", headers=headers).status_code == 401


@pytest.mark.parametrize("body,status,field", [
    ("not json", 400, "body"),
    ("[]", 400, "body"),
    ({"offer_id": 101}, 422, "phone"),
    ({"phone": "12345", "offer_id": 101}, 422, "phone"),
    ({"phone": "+79123456789"}, 422, "offer_id"),
    ({"phone": "+79123456789", "offer_id": "abc"}, 422, "offer_id"),
    ({"phone": "+79123456789", "offer_id": True}, 422, "offer_id"),
    ({"phone": "+79123456789", "offer_id": 999}, 422, "offer_id"),
])
def test_bad_bodies_name_the_field(client, body, status, field):
    response = post(client, body)
    assert response.status_code == status and response.json_body["field"] == field


def test_manual_call_is_queued_then_dialled_and_readable(client, salesrender_sandbox, beeline_sandbox):
    response = post(client, {"phone": "+79123456789", "offer_id": 101})
    assert response.status_code == 202
    call_id = response.json_body["call_id"]
    assert response.json_body["status"] == "queued"

    before = client.http.get(f"/v1/calls/{call_id}", headers=AUTH).json_body
    assert before["state"] == "queued" and before["outcome"] is None and before["operator"] is None
    assert before["phone"] == "+7 912 ***-**-89"  # offer 101 shows phones partially
    assert before["created_at"]

    assert deliver("callbacks", "callback_worker") == [True]
    [originate] = beeline_sandbox.calls()
    assert originate["phone"] == "9123456789"
    after = client.http.get(f"/v1/calls/{call_id}", headers=AUTH).json_body
    assert after["state"] != "queued" and after["operator"] == originate["pattern"]
    assert set(after) == {"call_id", "lead_id", "phone", "operator", "state", "outcome", "created_at",
                          "answered_at", "ended_at", "talk_seconds", "cost_rub", "recording_url", "reason"}
    assert after["reason"] is None


def test_full_visibility_offer_shows_the_whole_number(client):
    call_id = post(client, {"phone": "8 912 345 67 89", "offer_id": 102}).json_body["call_id"]
    assert client.http.get(f"/v1/calls/{call_id}", headers=AUTH).json_body["phone"] == "+79123456789"


def test_idempotency_key_returns_the_same_call(client):
    headers = {**AUTH, "Idempotency-Key": "crm-click-42"}
    first = post(client, {"phone": "+79123456789", "offer_id": 101}, headers).json_body["call_id"]
    second = post(client, {"phone": "+79123456789", "offer_id": 101}, headers).json_body["call_id"]
    other = post(client, {"phone": "+79123456789", "offer_id": 101}).json_body["call_id"]
    assert first == second != other


def test_unknown_call_is_404(client):
    response = client.http.get("/v1/calls/does-not-exist", headers=AUTH)
    assert response.status_code == 404 and response.json_body["field"] == "call_id"
