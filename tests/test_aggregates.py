"""The per-offer day aggregates (functions/records/daily.py) are exact under duplicates and retries:
duplicate and concurrent Tilda posts, redelivered SQS callbacks, an originate retried after it never
reached Beeline, every Beeline event twice and out of order, reconciler passes, repeated approvals.
Everything is driven through the public surface (the webhooks, the queues' handlers, the routes) and
read back through GET /v1/reports/summary."""

from __future__ import annotations

import datetime as dt
import json
import threading
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, EventSink, deliver, receive

from functions.core import resources, times
from functions.providers.beeline import client as beeline
from functions.records import calls, daily, leads

SECRET = "test-beeline-secret"
FORM = "application/x-www-form-urlencoded"
AUTH = {"Authorization": "Bearer test-api-token"}


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    sink = EventSink()
    beeline.default_client().subscribe(sink.url, 3600)
    yield {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox, "sink": sink}
    sink.server.shutdown()


def tilda(client, phone: str, tranid: str, formid: str = "form493249737"):
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": tranid, "formid": formid})
    return client.http.post("/webhooks/tilda", body=body, headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})


def total(client, offer_id: int = 101) -> dict:
    """The report's total over yesterday..tomorrow (a test run may straddle the offer's midnight)."""
    today = daily.today(offer_id)
    query = urlencode({"from": (today - dt.timedelta(days=1)).isoformat(),
                       "to": (today + dt.timedelta(days=1)).isoformat(), "offer_id": offer_id})
    response = client.http.get(f"/v1/reports/summary?{query}", headers=AUTH)
    assert response.status_code == 200, response.body
    return json.loads(response.body)["total"]


def peek(kind: str) -> dict:
    """The one visible message's body, left visible for the handler."""
    [message] = receive(kind)
    resources.client("sqs").change_message_visibility(
        QueueUrl=resources.queue_url(kind), ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    return json.loads(message["Body"])


def post_event(client, body: bytes):
    response = client.http.post(f"/webhooks/beeline/{SECRET}", body=body,
                                headers={"Content-Type": "application/xml; charset=UTF-8"})
    assert response.status_code == 200


def test_duplicate_and_concurrent_tilda_posts_count_one_lead(stack):
    client = stack["client"]
    for _ in range(3):  # Tilda's own retries
        assert tilda(client, "+79991112233", "dup:1").status_code == 200
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(tilda(client, "+79991112244", "dup:2").status_code))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    row = total(client)
    assert row["leads"] == 2 and row["calls"] == 0
    assert total(client, 102)["leads"] == 0  # the other offer's day is its own


def test_a_call_counted_once_through_redeliveries_duplicate_events_and_reconciler_passes(stack):
    import app
    from infra.local.runner import LambdaContext, schedule_event

    client = stack["client"]
    assert tilda(client, "+79991115555", "life:1").status_code == 200
    lead_id = leads.lead_id_for("tilda", "tranid:life:1")
    assert deliver("intake", "intake_worker") == [True]
    # The form arrived 300 s before the dial: speed to lead is measured from the lead's created_at.
    leads.update(lead_id, created_at=times.iso(times.utcnow() - dt.timedelta(seconds=300), "milliseconds"))
    callback = peek("callbacks")
    before = len(stack["sink"].bodies)
    assert deliver("callbacks", "callback_worker") == [True]
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("callbacks"), MessageBody=json.dumps(callback))
    assert deliver("callbacks", "callback_worker") == [True]  # the redelivered copy: a duplicate, no call
    assert stack["pbx"].wait_idle(10)
    events = stack["sink"].bodies[before:]
    assert len(events) == 4
    # Every event three times, the first time in reverse: the release comes first and ends the call, and
    # each later new event re-derives the ended call and finishes it again (a no-op that must count nothing).
    for body in [*reversed(events), *events, *events]:
        post_event(client, body)
    for _ in range(2):
        app.call_reconciler(schedule_event("call_reconciler", "us-east-1"), LambdaContext("call_reconciler"))

    call = calls.get(calls.call_id_for(lead_id, 1))
    assert call["outcome"] == "answered" and call["talk_seconds"] == 75
    row = total(client)
    assert {k: row[k] for k in ("leads", "calls", "answered", "talk_seconds", "calls_over_60s", "cost_rub")} == {
        "leads": 1, "calls": 1, "answered": 1, "talk_seconds": 75, "calls_over_60s": 1, "cost_rub": 4.0}
    assert row["speed_to_lead_samples"] == 1
    assert 300 <= row["speed_to_lead_median_s"] < 305 and row["speed_to_lead_p95_s"] == row["speed_to_lead_median_s"]
    feed = json.loads(client.http.get("/v1/reports/calls", headers=AUTH).body)["calls"]
    assert [(c["call_id"], c["outcome"], c["talk_seconds"]) for c in feed] == [(call["call_id"], "answered", 75)]
    assert feed[0]["phone"] == "+7 999 ***-**-55"  # offer 101 shows phones partially


def test_an_originate_that_never_reached_beeline_is_counted_once_when_it_is_retried(stack, monkeypatch):
    from functions.core import queues

    monkeypatch.setattr(queues, "backoff_seconds", lambda n: 0)
    client = stack["client"]
    assert tilda(client, "+79991116666", "retry:1").status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    stack["pbx"].add_fault(3, status=503, operation="call")  # the claim is taken back, the queue retries
    assert deliver("callbacks", "callback_worker") == [False]
    assert total(client)["calls"] == 0 and total(client)["speed_to_lead_samples"] == 0
    assert deliver("callbacks", "callback_worker") == [True]
    row = total(client)
    assert row["calls"] == 1 and row["speed_to_lead_samples"] == 1


def test_a_number_that_is_not_dialled_is_a_lead_but_no_call(stack):
    client = stack["client"]
    assert tilda(client, "+12127365000", "us:1").status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    assert deliver("callbacks", "callback_worker") == [True]
    assert calls.get(calls.call_id_for(leads.lead_id_for("tilda", "tranid:us:1"), 1))["outcome"] == "not_dialled"
    row = total(client)
    assert row["leads"] == 1 and row["calls"] == 0 and row["speed_to_lead_samples"] == 0
    assert json.loads(client.http.get("/v1/reports/calls", headers=AUTH).body)["calls"] == []


def test_an_order_approved_twice_counts_once_and_ad_spend_is_set_not_added(client):
    day = daily.today(101)
    assert daily.order_approved(5001, 101, day) is True
    assert daily.order_approved(5001, 101, day) is False  # the webhook again, or the dialer's CRM re-read
    assert daily.order_approved("5002", 101, day.isoformat(), payout=1000) is True
    for bad in ({"order_id": ""}, {"order_id": "x" * 300}, {"offer_id": "101"}, {"day": "2026-02-30"},
                {"payout": -1}):
        with pytest.raises(ValueError):
            daily.order_approved(**{"order_id": 5003, "offer_id": 101, "day": day, **bad})
    for _ in range(2):
        body = json.dumps({"offer_id": 101, "day": day.isoformat(), "rub": 950})
        response = client.http.put("/v1/adspend", body=body, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 200 and json.loads(response.body) == {
            "offer_id": 101, "day": day.isoformat(), "rub": 950.0}
    row = total(client)
    assert row["approved"] == 2 and row["revenue_rub"] == 1900.0 and row["adspend_rub"] == 950.0
    assert row["metrics"]["roas"]["value"] == 2.0


def test_a_transaction_cancelled_by_a_conflict_is_tried_again(stack, monkeypatch):
    """DynamoDB cancels a transaction that meets another on the hot day item; botocore does not retry
    that, records/daily.py does (nothing of a cancelled transaction was applied)."""
    from botocore.exceptions import ClientError

    dynamodb = resources.client("dynamodb")
    real, failures = dynamodb.transact_write_items, []

    def conflicting(**kwargs):
        if not failures:
            failures.append(1)
            raise ClientError({"Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
                               "CancellationReasons": [{"Code": "None"}, {"Code": "TransactionConflict"}]},
                              "TransactWriteItems")
        return real(**kwargs)

    monkeypatch.setattr(dynamodb, "transact_write_items", conflicting)
    monkeypatch.setattr(daily.time, "sleep", lambda s: None)
    assert tilda(stack["client"], "+79991117777", "conflict:1").status_code == 200
    assert failures == [1]
    assert leads.get(leads.lead_id_for("tilda", "tranid:conflict:1")) is not None
    assert total(stack["client"])["leads"] == 1


def test_a_cancelled_transaction_leaves_every_item_as_it_was(aws):
    """The local moto patch (infra/local/moto_transactions.py) rolls back the items a failed transaction
    touched, as DynamoDB does, without copying the table."""
    table = resources.table()
    table.put_item(Item={"pk": "A", "sk": "X", "n": 5})
    table.put_item(Item={"pk": "B", "sk": "X"})
    key = daily.tx_count(101, "2026-11-10", {"leads": 1})
    assert daily.write(daily.tx_update({"pk": "A", "sk": "X"}, add={"n": 1}), key,
                       also=daily.tx_put({"pk": "B", "sk": "X"}, {}, new=True), also_put=True) == {2}
    assert table.get_item(Key={"pk": "A", "sk": "X"})["Item"]["n"] == 5
    assert daily.days(101, "2026-11-10", "2026-11-10") == {}
