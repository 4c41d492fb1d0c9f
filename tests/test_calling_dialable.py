"""Only dialable numbers are dialled (issue 8 item 1, R-5), and nothing after the claim leaks a
channel or an operator (the dialer through the callbacks queue, against the strict sandboxes)."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, deliver, receive

from functions.calling import channels, dialer
from functions.core import store
from functions.providers.beeline import client as beeline
from functions.records import calls, leads

FORM = "application/x-www-form-urlencoded"
AUTH = {"Authorization": "Bearer test-api-token", "Content-Type": "application/json"}
PROVIDER = "Beeline_Main"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    return {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox}


def tilda_lead(stack, phone: str, n: int = 0) -> str:
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"d:{n}", "formid": "form493249737"})
    assert stack["client"].http.post("/webhooks/tilda", body=body,
                                     headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    return leads.lead_id_for("tilda", f"tranid:d:{n}")


def call_log(crm, lead_id: str) -> str | None:
    order_id = leads.get(lead_id)["order_id"]
    [order] = [o for o in crm.orders() if o["id"] == order_id]
    return next((f["value"] for f in order["data"].get("stringFields", []) if f["field"] == "call_log"), None)


def operator_holder(pattern: str = "200") -> str | None:
    return (store.get({"pk": "OPERATORS", "sk": pattern}) or {}).get("busy_call")


@pytest.mark.parametrize("phone", ["+1 212 736 5000", "+49 30 123456", "+380 44 123 4567"])
def test_a_foreign_number_becomes_an_order_but_is_never_dialled_and_says_why(stack, phone):
    lead_id = tilda_lead(stack, phone)
    assert leads.get(lead_id)["order_id"]  # it still reached the CRM
    assert deliver("callbacks", "callback_worker") == [True]
    assert stack["pbx"].calls() == []  # +1 212 736 5000 was dialled as the Russian 212 736 50 00
    assert channels.busy(PROVIDER, 5) == 0 and operator_holder() is None  # nothing taken, nothing held
    lead = leads.get(lead_id)
    assert lead["state"] == "not_dialable" and lead["finished_reason"] == "number outside +7"
    # The API says why.
    call_id = calls.call_id_for(lead_id, 1)
    assert lead["last_call_id"] == call_id
    shown = stack["client"].http.get(f"/v1/calls/{call_id}", headers=AUTH).json_body
    assert shown["state"] == "ended" and shown["outcome"] == "not_dialled"
    assert shown["reason"] == "number outside +7" and shown["operator"] is None
    # So does the CRM's call log, through the write-back job.
    assert deliver("recordings", "recording_worker") == [True]
    assert call_log(stack["crm"], lead_id).endswith("не звонили: номер вне +7, автодозвон невозможен")
    # A redelivered callback changes nothing.
    assert dialer.process({"lead_id": lead_id, "attempt": 1, "due_at": lead["created_at"]}) == "duplicate"
    assert receive("recordings") == [] and stack["pbx"].calls() == []


def test_the_configuration_can_narrow_the_dialable_regions(stack, use_config):
    use_config(lambda doc: doc["provider"].update(dialable_regions=["RU"]))
    lead_id = tilda_lead(stack, "+7 700 123 4567")  # Kazakhstan shares +7
    assert deliver("callbacks", "callback_worker") == [True]
    assert stack["pbx"].calls() == []
    assert leads.get(lead_id)["finished_reason"] == "number in KZ, outside provider.dialable_regions"


def test_an_unknown_dialable_region_is_a_config_error_naming_the_key(use_config):
    from functions.core import config

    with pytest.raises(config.ConfigError, match=r"provider\.dialable_regions\.0"):
        use_config(lambda doc: doc["provider"].update(dialable_regions=["US"]))
        config.load()


@pytest.mark.parametrize("phone", ["+1 212 736 5000", "+49 30 123456"])
def test_a_manual_call_to_a_number_the_provider_cannot_dial_is_a_422_naming_phone(client, phone):
    response = client.http.post("/v1/calls", body=json.dumps({"phone": phone, "offer_id": 101}), headers=AUTH)
    assert response.status_code == 422 and response.json_body["field"] == "phone"
    assert "outside +7" in response.json_body["error"]
    assert receive("callbacks") == [] and receive("intake") == []


def test_a_failure_between_the_lease_and_the_claim_gives_the_lease_back(stack, monkeypatch):
    lead_id = tilda_lead(stack, "+7 999 111 2233")

    def broken(*args, **kwargs):
        raise RuntimeError("DynamoDB throttled")

    monkeypatch.setattr(calls, "claim", broken)
    assert deliver("callbacks", "callback_worker") == [False]
    assert channels.busy(PROVIDER, 5) == 0 and operator_holder() is None
    assert calls.get(calls.call_id_for(lead_id, 1)) is None


def test_a_failure_after_the_claim_gives_everything_back_and_the_retry_dials_once(stack, monkeypatch):
    from functions.core import queues

    monkeypatch.setattr(queues, "backoff_seconds", lambda n: 0)
    lead_id = tilda_lead(stack, "+7 999 111 2233")
    real_update = leads.update
    failures = [RuntimeError("DynamoDB throttled")]

    def flaky(lead_id_, **changes):
        if changes.get("state") == "dialing" and failures:
            raise failures.pop()
        return real_update(lead_id_, **changes)

    monkeypatch.setattr(leads, "update", flaky)
    assert deliver("callbacks", "callback_worker") == [False]
    call_id = calls.call_id_for(lead_id, 1)
    assert calls.get(call_id)["state"] == "queued" and calls.open_calls() == []
    assert channels.busy(PROVIDER, 5) == 0 and operator_holder() is None and stack["pbx"].calls() == []
    assert deliver("callbacks", "callback_worker") == [True]
    assert len(stack["pbx"].calls()) == 1 and calls.get(call_id)["state"] != "queued"


def test_an_unexpected_error_inside_the_originate_is_never_dialled_twice(stack, monkeypatch):
    lead_id = tilda_lead(stack, "+7 999 111 2233")

    def broken(self, pattern, digits):
        raise RuntimeError("decoding the answer failed")  # sent or not: nobody can tell

    monkeypatch.setattr(beeline.BeelineClient, "originate", broken)
    [message] = receive("callbacks")
    body = json.loads(message["Body"])
    assert dialer.process(body) == "uncertain"
    assert dialer.process(body) == "duplicate"
    call = calls.get(calls.call_id_for(lead_id, 1))
    assert call["state"] == "dialing" and call["originate_uncertain"] is True
    assert calls.open_calls() == [call["call_id"]]  # the reconciler settles it and frees what it holds
