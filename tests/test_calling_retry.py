"""The next attempt's callback is sent before its once-only flag (issue 8 item 5): a crash in between
loses nothing, and a second send never dials twice."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, deliver, receive

from functions.calling import retry_policy, schedule
from functions.records import calls, leads

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def ended_first_attempt(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    """A lead whose first call was dialled and ended busy; the retry policy not asked yet."""
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    body = urlencode({"Name": "Анна", "Phone": "+7 999 111 2233", "tranid": "r:1", "formid": "form493249737"})
    client.http.post("/webhooks/tilda", body=body, headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
    assert deliver("intake", "intake_worker") == [True]
    assert deliver("callbacks", "callback_worker") == [True]
    lead_id = leads.lead_id_for("tilda", "tranid:r:1")
    call_id = calls.call_id_for(lead_id, 1)
    assert calls.finish(call_id, "busy")
    return {"lead_id": lead_id, "call_id": call_id, "pbx": beeline_sandbox}


def _sent_callbacks(sent: list) -> list[dict]:
    return [json.loads(p["MessageBody"]) for p in sent if p["QueueUrl"].endswith("callbacks")]


@pytest.fixture
def sent(aws):
    from functions.core import resources

    captured: list[dict] = []
    resources.client("sqs").meta.events.register(
        "provide-client-params.sqs.SendMessage", lambda params, **_: captured.append(dict(params)))
    return captured


def test_a_crash_before_the_retry_is_sent_leaves_it_to_the_next_ask(ended_first_attempt, monkeypatch, sent):
    call_id = ended_first_attempt["call_id"]
    real = schedule.schedule

    def crash(*args, **kwargs):
        raise RuntimeError("Lambda timed out")

    monkeypatch.setattr(schedule, "schedule", crash)
    sent.clear()
    with pytest.raises(RuntimeError):
        retry_policy.on_outcome(call_id)
    monkeypatch.setattr(schedule, "schedule", real)
    assert "retry_2_at" not in leads.get(ended_first_attempt["lead_id"])  # nothing claims it was sent
    # The reconciler (or the redelivered event) asks again: the retry goes out.
    assert retry_policy.on_outcome(call_id) == "retry_scheduled"
    [retry] = _sent_callbacks(sent)
    assert retry["attempt"] == 2 and retry["reason"] == "busy"
    assert retry_policy.on_outcome(call_id) == "already_scheduled"


def test_a_crash_after_the_send_sends_it_twice_and_the_dialer_dials_once(ended_first_attempt, monkeypatch, sent):
    call_id, lead_id = ended_first_attempt["call_id"], ended_first_attempt["lead_id"]
    real_update = leads.update
    crashes = [RuntimeError("Lambda timed out")]

    def crash_on_flag(lead_id_, **changes):
        if changes.get("only_if_missing") == "retry_2_at" and crashes:
            raise crashes.pop()
        return real_update(lead_id_, **changes)

    monkeypatch.setattr(leads, "update", crash_on_flag)
    sent.clear()
    with pytest.raises(RuntimeError):
        retry_policy.on_outcome(call_id)
    assert retry_policy.on_outcome(call_id) == "retry_scheduled"
    retries = _sent_callbacks(sent)
    assert [r["attempt"] for r in retries] == [2, 2]
    # Both copies come due at once: one call to the customer.
    for retry in retries:
        retry["due_at"] = leads.get(lead_id)["created_at"]
    from functions.calling import dialer

    receive("callbacks")  # the delayed copies are replaced by due ones
    assert sorted(dialer.process(r) for r in retries) == ["duplicate", "originated"]
    assert len(ended_first_attempt["pbx"].calls()) == 2  # attempt 1 and attempt 2, once each
