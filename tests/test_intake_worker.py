"""The intake worker through its SQS handler (Lambda-shaped events from real moto messages) against
the strict SalesRender sandbox: one order per lead, the callback with the right delay, retries with
backoff, poison leads in the DLQ with their reason, and the DLQ replay (R-7, R-8)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, bodies, deliver, post_lead, receive

from functions.core import queues, replay_dlq, resources, times
from functions.records import leads
from infra.local.runner import LambdaContext

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def sent(aws):
    """Every SendMessage as it goes on the wire: (queue url, params)."""
    calls = []

    def capture(params, **_):
        calls.append(dict(params))

    resources.client("sqs").meta.events.register("provide-client-params.sqs.SendMessage", capture)
    return calls




@pytest.fixture
def no_backoff(monkeypatch):
    """Failed messages come back at once instead of after 30 s+, so a test can redeliver them."""
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)


def redeliver(times=1):
    results = []
    for _ in range(times):
        results += deliver("intake", "intake_worker")
    return results


def test_lead_becomes_one_order_and_one_callback_after_the_offer_delay(client, salesrender_sandbox, sent):
    lead_id = post_lead(client)
    assert redeliver() == [True]

    [order] = salesrender_sandbox.orders()
    data = order["orderData"]
    assert data["phoneFields"] == [{"field": "phone", "value": "+79991112233"}]
    assert data["humanNameFields"] == [{"field": "name", "value": {"firstName": "Анна", "lastName": ""}}]
    assert data["emailFields"] == [{"field": "email", "value": "anna@example.com"}]
    assert "Перезвоните" in data["stringFields"][0]["value"]
    assert order["projectId"] == "1" and order["statusId"] == "1"
    assert order["cart"]["items"] == [{"itemId": 1, "variation": 1, "quantity": 1, "price": 199000}]
    assert order["source"]["refererUri"] == f"https://drops.example.ru/?utm_source=vk&callbridge_lead={lead_id}"
    assert data["stringFields"][0]["value"].endswith(f"\ncallbridge lead: {lead_id}")  # found by it after a lost answer

    lead = leads.get(lead_id)
    assert lead["order_id"] == order["id"] and lead["state"] == "callback_scheduled"
    [callback] = [p for p in sent if p["QueueUrl"] == resources.queue_url("callbacks")]
    assert callback["DelaySeconds"] == 300  # offer 101's delay
    body = json.loads(callback["MessageBody"])
    assert body["lead_id"] == lead_id and body["attempt"] == 1 and body["reason"] == "new_lead"
    due = dt.datetime.fromisoformat(body["due_at"].replace("Z", "+00:00"))
    assert due == dt.datetime.fromisoformat(lead["created_at"].replace("Z", "+00:00")).replace(microsecond=0) \
        + dt.timedelta(seconds=300)  # after the form arrived
    assert receive("callbacks") == []  # moto honours the delay: not visible yet


def test_callback_delay_override_makes_the_callback_visible_at_once(client, salesrender_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    lead_id = post_lead(client)
    redeliver()
    [callback] = bodies(receive("callbacks"))
    assert callback["lead_id"] == lead_id and callback["attempt"] == 1


def test_delay_beyond_sqs_limit_is_sent_as_a_hop_with_the_true_due_time(client, salesrender_sandbox, monkeypatch,
                                                                          sent):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "3600")
    post_lead(client)
    redeliver()
    [callback] = [p for p in sent if p["QueueUrl"] == resources.queue_url("callbacks")]
    assert callback["DelaySeconds"] == 900
    due = dt.datetime.fromisoformat(json.loads(callback["MessageBody"])["due_at"].replace("Z", "+00:00"))
    assert 3590 <= (due - dt.datetime.now(dt.UTC)).total_seconds() <= 3601


def test_cart_maps_skus_to_catalogue_items_and_lists_the_rest(client, salesrender_sandbox):
    post_lead(client, "tilda_cart_urlencoded.txt")
    redeliver()
    [order] = salesrender_sandbox.orders()
    assert order["projectId"] == "2"
    assert order["cart"]["items"] == [{"itemId": 7, "variation": 1, "quantity": 1, "price": 499000}]
    assert "Ремешок × 2 — 500 ₽" in order["orderData"]["stringFields"][0]["value"]


def test_duplicate_intake_messages_create_one_order_and_one_callback(client, salesrender_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    lead_id = post_lead(client)
    for _ in range(2):
        queues.send("intake", {"lead_id": lead_id})
    assert redeliver() == [True, True, True]
    assert len(salesrender_sandbox.orders()) == 1
    assert len(receive("callbacks")) == 1


def test_concurrent_workers_on_one_lead_create_one_order(client, salesrender_sandbox, no_backoff):
    from functions.intake import order_worker

    lead_id = post_lead(client)
    salesrender_sandbox.add_fault(1, delay_seconds=1.0, operation="addOrder")  # the first is slow
    outcomes = []

    def work():
        try:
            order_worker.process({"lead_id": lead_id}, LambdaContext("callbridge-test-intake_worker"))
            outcomes.append("done")
        except queues.Transient:
            outcomes.append("retry later")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(salesrender_sandbox.orders()) == 1
    assert "done" in outcomes and set(outcomes) <= {"done", "retry later"}
    order_worker.process({"lead_id": lead_id})  # a later retry gets the stored order back
    assert len(salesrender_sandbox.orders()) == 1


def test_a_new_lead_costs_one_read_and_two_writes_of_its_item(client, salesrender_sandbox, dynamodb_requests):
    """Issue 9: the lead read once; the callback's flag and the order's attempt marker in one write, the order
    id in the other; the order's link; the idempotency record's put and update. Six requests in all."""
    lead_id = post_lead(client)
    dynamodb_requests.clear()
    assert redeliver() == [True]
    sent = list(dynamodb_requests)
    lead = leads.get(lead_id)
    assert lead["callback_scheduled_at"] and lead["order_attempted_at"] and lead["order_id"]
    assert sorted(op for op, pk in sent if pk == f"LEAD#{lead_id}") == ["GetItem", "UpdateItem", "UpdateItem"]
    assert len(sent) <= 6, sent


def test_a_copy_that_finds_the_callback_flagged_still_marks_the_order_attempt(client, salesrender_sandbox,
                                                                              monkeypatch):
    """The attempt marker rides on the callback's flag only when that write is this copy's: read before another
    copy flagged the callback (and the dialer moved the lead on), this one marks the attempt on its own."""
    from functions.intake import order_worker

    lead_id = post_lead(client)
    stale, real_get = leads.get(lead_id), leads.get
    leads.update(lead_id, callback_scheduled_at=times.now_iso(), state="dialing")  # since this copy's read
    reads = iter([stale])
    monkeypatch.setattr(leads, "get", lambda some_id: next(reads, None) or real_get(some_id))
    order_worker.process({"lead_id": lead_id})
    lead = real_get(lead_id)
    assert lead["state"] == "dialing"  # the refused flag did not move the lead back
    assert lead["order_attempted_at"] and lead["order_id"]
    assert len(salesrender_sandbox.orders()) == 1


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 502}, {"graphql_error": "ERR_ORDER_LOCKED"},
                                   {"delay_seconds": 0}])
def test_transient_failure_is_retried_with_backoff_then_succeeds(client, salesrender_sandbox, monkeypatch, fault):
    visibility = []
    monkeypatch.setattr(queues, "backoff_seconds", lambda n: visibility.append(n) or 0)
    lead_id = post_lead(client)
    if fault.get("delay_seconds") == 0:  # SalesRender unreachable
        monkeypatch.setenv("SALESRENDER_API_URL", "http://127.0.0.1:9/companies/1/CRM")
        from functions.providers.salesrender import client as salesrender

        salesrender.default_client.cache_clear()
        assert redeliver() == [False]
        monkeypatch.setenv("SALESRENDER_API_URL", salesrender_sandbox.api_url)
        salesrender.default_client.cache_clear()
    else:
        # addOrder is not retried inline on a 5xx (it may have landed): the worker retries it.
        salesrender_sandbox.add_fault(1, operation="addOrder", **fault)
        assert redeliver() == [False]
    assert visibility == [2]  # backoff asked for by receive count (the test's peek was receive 1)
    assert leads.get(lead_id)["last_error"]
    assert redeliver() == [True]
    assert len(salesrender_sandbox.orders()) == 1


def test_poison_lead_goes_to_the_dlq_with_its_reason_and_replays_after_the_fix(client, salesrender_sandbox,
                                                                                  use_config, capsys):
    use_config(lambda doc: doc["offers"][0]["salesrender"].update(status_id="99"))
    lead_id = post_lead(client)
    assert redeliver() == [True]  # acknowledged: retrying cannot help
    assert salesrender_sandbox.orders() == []
    lead = leads.get(lead_id)
    assert lead["order_state"] == "failed" and "ERR_ORDER_STATUS_NOT_FOUND" in lead["error"]
    assert lead["last_error"] == lead["error"] and lead["last_error_at"] and lead["order_failed_at"]
    assert lead["state"] == "callback_scheduled"  # still called on time: the order follows after the fix
    [parked] = receive("intake", dlq=True)
    assert json.loads(parked["Body"]) == {"lead_id": lead_id}
    assert "ERR_ORDER_STATUS_NOT_FOUND" in parked["MessageAttributes"]["reason"]["StringValue"]
    resources.client("sqs").change_message_visibility(QueueUrl=resources.queue_url("intake", dlq=True),
                                                      ReceiptHandle=parked["ReceiptHandle"], VisibilityTimeout=0)

    use_config(lambda doc: None)  # the status id is fixed
    assert replay_dlq.main(["intake"]) == 0
    assert "ERR_ORDER_STATUS_NOT_FOUND" in capsys.readouterr().out
    assert redeliver() == [True]
    assert len(salesrender_sandbox.orders()) == 1
    assert leads.get(lead_id)["order_state"] == "created"
    assert receive("intake", dlq=True) == []


def test_a_lead_that_keeps_failing_is_parked_after_the_last_try(client, salesrender_sandbox, monkeypatch, no_backoff):
    monkeypatch.setattr(queues, "MAX_RECEIVES", 3)  # the test's peek was receive 1
    post_lead(client)
    salesrender_sandbox.add_fault(100, status=500, operation="addOrder")
    assert redeliver() == [False]
    assert redeliver() == [True]
    [parked] = receive("intake", dlq=True)
    assert parked["MessageAttributes"]["code"]["StringValue"] == "exhausted"
    assert "HTTP 500" in parked["MessageAttributes"]["reason"]["StringValue"]


@pytest.mark.parametrize("body", ["not json", "[1]", json.dumps({"lead_id": 5}), json.dumps({"lead_id": "nope"})])
def test_malformed_or_unknown_messages_are_parked_not_retried(aws, body):
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("intake"), MessageBody=body)
    assert deliver("intake", "intake_worker") == [True]
    [parked] = receive("intake", dlq=True)
    assert parked["Body"] == body and parked["MessageAttributes"]["reason"]["StringValue"]


def test_backoff_rides_out_an_hour_long_outage():
    schedule = [queues.BACKOFF_CAP_SECONDS and min(queues.BACKOFF_CAP_SECONDS,
                                                   queues.BACKOFF_BASE_SECONDS * 2 ** (n - 1))
                for n in range(1, queues.MAX_RECEIVES)]
    assert sum(schedule) * 0.8 > 2 * 3600  # even with full jitter: two hours of retries
    assert all(0 < queues.backoff_seconds(n) <= 900 for n in range(1, 30))


def test_logs_hold_neither_the_phone_nor_the_key(client, salesrender_sandbox, log_output):
    post_lead(client)
    redeliver()
    out = log_output.getvalue()
    assert "+79991112233" not in out and "9991112233" not in out
    assert "+7 999 ***-**-33" in out
    assert TILDA_KEY not in out
    assert urlencode({"k": TILDA_KEY})[2:] not in out
