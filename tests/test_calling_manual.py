"""Manual calls are whole (issue 8 item 6): POST /v1/calls gets its CRM order through the intake path
(or joins the number's lead and order), its write-back never waits for an order that cannot come, and
a call that will not be dialled is never shown "queued"."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, bodies, deliver, receive

from functions.calling import dnc
from functions.postcall import write_back
from functions.records import calls, leads, spend
from functions.tracking import tracker

AUTH = {"Authorization": "Bearer test-api-token", "Content-Type": "application/json"}
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    return {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox}


def post_call(client, phone: str, offer_id: int = 101, headers=AUTH):
    response = client.http.post("/v1/calls", body=json.dumps({"phone": phone, "offer_id": offer_id}),
                                headers=headers)
    assert response.status_code == 202
    return response.json_body


def read(client, call_id: str) -> dict:
    return client.http.get(f"/v1/calls/{call_id}", headers=AUTH).json_body


def call_log(crm, lead_id: str) -> str | None:
    order_id = leads.get(lead_id)["order_id"]
    [order] = [o for o in crm.orders() if o["id"] == order_id]
    return next((f["value"] for f in order["data"].get("stringFields", []) if f["field"] == "call_log"), None)


def test_a_manual_call_to_a_new_number_gets_its_order_through_the_intake_and_is_written_back(stack):
    call_id = post_call(stack["client"], "+79123456789")["call_id"]
    lead_id = read(stack["client"], call_id)["lead_id"]
    assert deliver("intake", "intake_worker") == [True]  # the order, as for a Tilda lead
    assert leads.get(lead_id)["order_id"] and len(stack["crm"].orders()) == 1
    [callback] = bodies(receive("callbacks"))  # only the manual call's: the intake adds no second callback
    assert callback["call_id"] == call_id and callback["manual"] is True
    from functions.calling import dialer

    assert dialer.process(callback) == "originated"
    assert tracker.finalize(call_id, "no_answer")
    assert deliver("recordings", "recording_worker") == [True]
    assert call_log(stack["crm"], lead_id).endswith("нет ответа")
    assert receive("recordings", dlq=True) == []


def test_a_manual_call_to_a_known_number_joins_its_lead_and_order(stack):
    body = urlencode({"Name": "Анна", "Phone": "+7 912 345 67 89", "tranid": "m:1", "formid": "form493249737"})
    stack["client"].http.post("/webhooks/tilda", body=body, headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
    assert deliver("intake", "intake_worker") == [True]
    tilda_lead = leads.lead_id_for("tilda", "tranid:m:1")
    receive("callbacks")  # the Tilda lead's own callback, not dialled in this test
    call_id = post_call(stack["client"], "+79123456789")["call_id"]
    assert read(stack["client"], call_id)["lead_id"] == tilda_lead
    assert receive("intake") == [] and len(stack["crm"].orders()) == 1  # no second order
    from functions.calling import dialer

    [callback] = bodies(receive("callbacks"))
    assert dialer.process(callback) == "originated"
    assert tracker.finalize(call_id, "busy")
    assert deliver("recordings", "recording_worker") == [True]
    assert call_log(stack["crm"], tilda_lead).endswith("занято")
    lead = leads.get(tilda_lead)
    assert lead["state"] not in ("done", "exhausted")  # a missed manual call leaves the lead's own retries be


def test_the_write_back_of_a_call_whose_lead_can_have_no_order_is_not_retried(aws):
    # A manual call's lead from before manual leads got orders: no order will ever exist.
    assert leads.create({"lead_id": "api-old", "source": "api", "state": "done", "offer_id": 101,
                         "phone": "+79123456789", "created_at": "2026-11-25T11:00:00Z"})
    assert calls.create({"call_id": "c-old", "lead_id": "api-old", "offer_id": 101, "attempt": 1, "manual": True,
                         "phone": "+79123456789", "state": "ended", "outcome": "busy",
                         "ended_at": "2026-11-25T11:01:00Z"})
    assert write_back.write_back("c-old") == "no_order"  # was a Transient for 16 deliveries, then the DLQ
    assert calls.get("c-old")["write_back_skipped"] == "no_crm_order"


def test_a_manual_call_to_a_do_not_call_number_is_never_shown_queued(stack):
    dnc.add("+79123456789", "asked not to be called")
    answer = post_call(stack["client"], "+79123456789")
    assert answer["status"] == "ended" and answer["outcome"] == "not_dialled" and answer["reason"] == "do_not_call"
    shown = read(stack["client"], answer["call_id"])
    assert shown["state"] == "ended" and shown["outcome"] == "not_dialled" and shown["reason"] == "do_not_call"
    assert receive("callbacks") == []


def test_a_manual_call_stopped_by_the_budget_is_never_shown_queued(stack, use_config):
    use_config(lambda doc: doc["budget"].update(manual_calls_at_limit=False))
    spend.add(5000.0)
    answer = post_call(stack["client"], "+79123456789")
    assert (answer["status"], answer["reason"]) == ("ended", "budget_exhausted")
    assert read(stack["client"], answer["call_id"])["outcome"] == "not_dialled"


def test_a_number_listed_after_the_post_ends_the_queued_call_with_the_reason(stack):
    call_id = post_call(stack["client"], "+79123456789")["call_id"]
    assert read(stack["client"], call_id)["state"] == "queued"
    dnc.add("+79123456789", "asked not to be called")
    assert deliver("callbacks", "callback_worker") == [True]
    shown = read(stack["client"], call_id)
    assert (shown["state"], shown["outcome"], shown["reason"]) == ("ended", "not_dialled", "do_not_call")
    assert stack["pbx"].calls() == []
