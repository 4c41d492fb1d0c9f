"""Speed to lead does not wait for the CRM (issue 8, item 3; R-8, R-7).

The first callback is due the offer's delay after the form arrived, whether or not SalesRender has
the order by then; with SalesRender failing every request the lead is still called, and its order
lands once when SalesRender is back. A short run of CRM errors costs seconds: the first retries come
within seconds, then back off, for a window of hours.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import deliver, post_lead

from functions.core import queues, resources, times
from functions.records import leads

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def sent(aws):
    """Every SendMessage and ChangeMessageVisibility as it goes on the wire."""
    calls = {"send": [], "visibility": []}
    events = resources.client("sqs").meta.events
    events.register("provide-client-params.sqs.SendMessage", lambda params, **_: calls["send"].append(dict(params)))
    events.register("provide-client-params.sqs.ChangeMessageVisibility",
                    lambda params, **_: calls["visibility"].append(dict(params)))
    return calls


def callbacks_sent(sent) -> list[dict]:
    return [{**json.loads(p["MessageBody"]), "DelaySeconds": p["DelaySeconds"]} for p in sent["send"]
            if p["QueueUrl"] == resources.queue_url("callbacks")]




def test_the_first_callback_is_due_after_the_form_even_while_the_crm_fails(client, salesrender_sandbox, sent):
    salesrender_sandbox.add_fault(1000, status=503)  # every request
    lead_id = post_lead(client)
    assert deliver("intake", "intake_worker") == [False]  # the order is retried...
    [callback] = callbacks_sent(sent)  # ...the call is not held back
    lead = leads.get(lead_id)
    assert "order_id" not in lead and lead["state"] == "callback_scheduled"
    form_arrived = times.parse(lead["created_at"]).replace(microsecond=0)
    assert times.parse(callback["due_at"]) == form_arrived + dt.timedelta(seconds=300)
    assert (callback["lead_id"], callback["attempt"], callback["reason"]) == (lead_id, 1, "new_lead")


def test_the_delay_counts_from_the_form_not_from_the_order(client, salesrender_sandbox, sent):
    lead_id = post_lead(client)
    form_arrived = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=240)
    leads.update(lead_id, created_at=times.iso(form_arrived))  # the worker runs four minutes after the form
    assert deliver("intake", "intake_worker") == [True]
    [callback] = callbacks_sent(sent)
    assert times.parse(callback["due_at"]) == form_arrived + dt.timedelta(seconds=300)
    assert callback["DelaySeconds"] <= 61  # what is left of the 300 s, not 300 s more


def test_a_lead_is_called_during_a_crm_outage_and_its_order_lands_once_after(
        client, salesrender_sandbox, beeline_sandbox, monkeypatch, sent):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    salesrender_sandbox.add_fault(1000, status=500)
    lead_id = post_lead(client)
    assert deliver("intake", "intake_worker") == [False]
    assert deliver("callbacks", "callback_worker") == [True]
    [call] = beeline_sandbox.calls()  # called on time, without the CRM
    assert call["phone"] == "9991112233"
    assert not any("ordersFetcher" in r["operation"] for r in salesrender_sandbox.requests_log())
    assert deliver("intake", "intake_worker") == [False]  # still down

    salesrender_sandbox.reset()  # SalesRender is back
    assert deliver("intake", "intake_worker") == [True]
    queues.send("intake", {"lead_id": lead_id})  # a duplicate message changes nothing
    assert deliver("intake", "intake_worker") == [True]
    [order] = salesrender_sandbox.orders()
    assert leads.get(lead_id)["order_id"] == order["id"]
    assert [c["reason"] for c in callbacks_sent(sent)] == ["new_lead"]  # the first callback went out once


def test_a_short_run_of_crm_errors_costs_seconds(client, salesrender_sandbox, sent):
    post_lead(client)
    salesrender_sandbox.add_fault(3, status=502, operation="addOrder")
    retries = []
    for _ in range(3):
        assert deliver("intake", "intake_worker") == [False]
        backoff = sent["visibility"][-1]
        retries.append(backoff["VisibilityTimeout"])
        resources.client("sqs").change_message_visibility(  # skip the wait (moto would honour it)
            QueueUrl=backoff["QueueUrl"], ReceiptHandle=backoff["ReceiptHandle"], VisibilityTimeout=0)
    assert sum(retries) <= 30  # deliveries 2, 3, 4 (the test's peek was 1): about 4 + 8 + 16 s
    assert deliver("intake", "intake_worker") == [True]
    assert len(salesrender_sandbox.orders()) == 1


def test_retries_start_within_seconds_then_back_off_for_hours():
    first = [queues.backoff_seconds(n) for n in (1, 2, 3)]
    assert all(1 <= s <= 8 for s in first) and first[0] <= 2
    nominal = [min(queues.BACKOFF_CAP_SECONDS, queues.BACKOFF_BASE_SECONDS * 2 ** (n - 1))
               for n in range(1, queues.MAX_RECEIVES)]
    assert nominal == sorted(nominal) and nominal[-1] == 900
    assert sum(nominal) >= 2.7 * 3600  # the documented window is kept
    assert sum(nominal) * 0.8 > 2 * 3600  # even with the most jitter
    assert queues.MAX_RECEIVES < 25  # the template's maxReceiveCount stays the net under it
    assert all(1 <= queues.backoff_seconds(n) <= 900 for n in range(1, 100))
