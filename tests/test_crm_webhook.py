"""The SalesRender order webhook (R-21) through its route, against the strict SalesRender sandbox: every
nesting of the trigger's body, the order re-read by id, callbacks cancelled when the order leaves
PROCESSING, orders from outside callbridge adopted once, duplicates changing nothing, unknown orders
acknowledged, hostile bodies a 4xx naming the field, and an unreachable CRM losing nothing."""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, bodies, deliver, post_lead, receive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functions.core import queues, resources
from functions.records import calls, leads
from functions.records import orders as order_links

SECRET = "test-salesrender-webhook-secret"
FORM = "application/x-www-form-urlencoded"
APPROVED, CANCELED = "2", "3"


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch):
    monkeypatch.setenv("SALESRENDER_WEBHOOK_SECRET", SECRET)


@pytest.fixture
def now_callbacks(monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")


def hook(client, body, secret=SECRET, content_type="application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return client.http.post(f"/webhooks/salesrender/{secret}", body=raw, headers={"Content-Type": content_type})


def lead_with_order(client, sandbox) -> tuple[str, str]:
    lead_id = post_lead(client)
    assert deliver("intake", "intake_worker") == [True]
    order_id = leads.get(lead_id)["order_id"]
    return lead_id, order_id


def crm_order(sandbox, phone="+79995554433", referer="https://cpa.example/?subid=CPA-77&utm_source=cpa", project="1"):
    """An order made in the CRM (by a manager, an import, a CPA network): nothing of callbridge on it."""
    return sandbox.create_crm_order({
        "projectId": project, "statusId": "1",
        "orderData": {"phoneFields": [{"field": "phone", "value": phone}],
                      "humanNameFields": [{"field": "name", "value": {"firstName": "Ольга", "lastName": "К"}}]},
        "source": {"refererUri": referer}})["id"]


def order_reads(sandbox) -> list:
    return [r for r in sandbox.requests_log() if r["operation"] == ["ordersFetcher"]]


def test_wrong_secret_is_404_and_reads_nothing(client, salesrender_sandbox):
    response = hook(client, {"data": {"ordersFetcher": {"orders": [{"id": "1"}]}}}, secret="wrong")
    assert response.status_code == 404
    assert salesrender_sandbox.requests_log() == []


@pytest.mark.parametrize("shape", ["ordersFetcher", "data", "orders", "order"])
def test_every_nesting_of_the_trigger_reads_the_order_again(client, salesrender_sandbox, now_callbacks, shape):
    _lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    before = len(order_reads(salesrender_sandbox))
    response = hook(client, salesrender_sandbox.webhook_body(order_id, shape))
    assert response.status_code == 200
    assert json.loads(response.body)["orders"] == {order_id: "closed"}
    [read] = order_reads(salesrender_sandbox)[before:]
    assert read["variables"] == {"ids": [order_id]}  # by id: the body is a hint, the CRM the truth


@pytest.mark.parametrize("body", [{"data": {"order": {"id": "ID"}}}, [{"id": "ID"}], {"order": {"id": "ID"}},
                                  {"data": {"orders": [{"id": "ID"}]}}, {"id": "ID", "status": {"group": "SPAM"}}])
def test_other_nestings_are_accepted_too(client, salesrender_sandbox, body):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, CANCELED)
    response = hook(client, json.loads(json.dumps(body).replace('"ID"', json.dumps(order_id))))
    assert response.status_code == 200
    lead = leads.get(lead_id)
    # The status in the body said SPAM; the order says CANCELED, and that is what counts.
    assert lead["state"] == "closed" and lead["finished_reason"] == "crm_status_canceled"


def test_approved_order_cancels_the_pending_callback(client, salesrender_sandbox, now_callbacks):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    assert hook(client, salesrender_sandbox.webhook_body(order_id)).status_code == 200
    lead = leads.get(lead_id)
    assert lead["state"] == "closed" and lead["crm_status_group"] == "APPROVED" and lead["crm_closed_at"]
    # The callback queued by the intake worker comes due: the dialer skips the finished lead, no call.
    assert deliver("callbacks", "callback_worker") == [True]
    assert calls.get(calls.call_id_for(lead_id, 1)) is None


def test_a_retry_scheduled_before_the_approval_is_not_dialled(client, salesrender_sandbox, now_callbacks):
    from functions.calling import schedule
    from functions.core import times

    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    receive("callbacks")  # the first attempt's callback: taken off, as if it had rung unanswered
    schedule.schedule(lead_id, 2, times.utcnow(), "no_answer")
    leads.update(lead_id, state="callback_scheduled", retry_2_at=times.now_iso())
    salesrender_sandbox.set_order_status(order_id, CANCELED)
    hook(client, salesrender_sandbox.webhook_body(order_id))
    assert deliver("callbacks", "callback_worker") == [True]
    assert calls.get(calls.call_id_for(lead_id, 2)) is None
    assert leads.get(lead_id)["finished_reason"] == "crm_status_canceled"


def test_twenty_copies_change_nothing_more_than_one(client, salesrender_sandbox, now_callbacks):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    body = salesrender_sandbox.webhook_body(order_id)
    assert hook(client, body).status_code == 200
    after_first = leads.get(lead_id)
    for _ in range(19):
        assert json.loads(hook(client, body).body)["orders"] == {order_id: "seen"}
    assert leads.get(lead_id) == after_first


def test_a_finished_lead_keeps_its_own_ending(client, salesrender_sandbox):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    leads.update(lead_id, state="done", finished_reason="answered")
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    hook(client, salesrender_sandbox.webhook_body(order_id))
    assert leads.get(lead_id)["finished_reason"] == "answered"


def test_processing_order_leaves_the_lead_alone(client, salesrender_sandbox):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    before = leads.get(lead_id)
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {order_id: "seen"}
    assert leads.get(lead_id)["state"] == before["state"] == "callback_scheduled"


def test_an_order_of_a_lead_from_before_the_links_is_still_its_own(client, salesrender_sandbox, use_config):
    def bare(doc):  # orders of this offer cannot carry the lead id
        doc["offers"][0].pop("landing_url")
        doc["offers"][0]["salesrender"]["fields"]["comment"] = None

    use_config(bare)
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    resources.table().delete_item(Key={"pk": f"ORDER#{order_id}", "sk": "ORDER"})  # made before this version
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {order_id: "closed"}
    assert leads.get(lead_id)["state"] == "closed"
    assert leads.get(leads.lead_id_for("salesrender", order_id)) is None


def test_own_order_is_recognised_before_the_intake_worker_links_it(client, salesrender_sandbox):
    """The trigger fires the moment addOrder lands, before the worker has the answer: the order carries the
    lead id, so it is this lead's, not an order from outside."""
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    from functions.core import resources as res

    res.table().delete_item(Key={"pk": f"ORDER#{order_id}", "sk": "ORDER"})  # as if not linked yet
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {order_id: "seen"}
    assert order_links.get(order_id)["lead_id"] == lead_id
    assert leads.get(leads.lead_id_for("salesrender", order_id)) is None


def test_an_own_order_not_linked_yet_costs_one_read_of_its_lead(client, salesrender_sandbox, dynamodb_requests):
    """Issue 9: the lead named by the order is read once (not again after linking it), the link is a put, and
    the order's status a write: four requests for a webhook of an order in PROCESSING."""
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    resources.table().delete_item(Key={"pk": f"ORDER#{order_id}", "sk": "ORDER"})  # as if not linked yet
    dynamodb_requests.clear()
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {order_id: "seen"}
    sent = list(dynamodb_requests)
    assert [op for op, pk in sent if pk == f"LEAD#{lead_id}"] == ["GetItem"]
    assert [op for op, pk in sent if pk == f"ORDER#{order_id}"] == ["GetItem", "PutItem", "UpdateItem"]
    assert len(sent) <= 4, sent
    assert order_links.get(order_id)["lead_id"] == lead_id


def test_a_link_refused_names_the_first_lead_without_a_read(aws, dynamodb_requests):
    """The intake worker and the webhook race to link each new order: the loser's refused put carries the
    link that won (ReturnValuesOnConditionCheckFailure), so it needs no GetItem."""
    assert order_links.link("8001", "lead-first", "callbridge") == "lead-first"
    dynamodb_requests.clear()
    assert order_links.link("8001", "lead-second", "crm") == "lead-first"
    assert [op for op, _ in dynamodb_requests] == ["PutItem"]
    stored = order_links.get("8001")
    assert (stored["lead_id"], stored["origin"]) == ("lead-first", "callbridge")  # the first link stays


def test_an_order_from_outside_gets_a_lead_and_one_callback(client, salesrender_sandbox, now_callbacks):
    order_id = crm_order(salesrender_sandbox)
    for _ in range(3):
        response = hook(client, salesrender_sandbox.webhook_body(order_id))
        assert response.status_code == 200
    lead_id = leads.lead_id_for("salesrender", order_id)
    lead = leads.get(lead_id)
    assert lead["source"] == "salesrender" and lead["order_id"] == order_id and lead["offer_id"] == 101
    assert lead["phone"] == "+79995554433" and lead["name"] == "Ольга К"
    assert lead["subid"] == "CPA-77" and lead["utm"] == {"utm_source": "cpa"}
    [callback] = bodies(receive("callbacks"))  # like a Tilda lead's first callback, once
    assert callback["lead_id"] == lead_id and callback["attempt"] == 1 and callback["reason"] == "new_lead"
    assert order_links.get(order_id)["origin"] == "crm"
    assert len(salesrender_sandbox.orders()) == 1  # its order is the CRM's: no addOrder


def test_an_order_from_outside_already_closed_is_left_alone(client, salesrender_sandbox):
    order_id = crm_order(salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {
        order_id: "foreign_not_processing"}
    assert leads.get(leads.lead_id_for("salesrender", order_id)) is None
    assert receive("callbacks") == []


def test_an_order_in_a_project_no_offer_uses_is_acknowledged(client, salesrender_sandbox, use_config):
    use_config(lambda doc: doc["offers"].pop())  # offer 102 (project 2) gone
    order_id = crm_order(salesrender_sandbox, project="2")
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {
        order_id: "foreign_ignored"}
    assert receive("callbacks") == []


def test_unknown_order_id_is_acknowledged_and_logged(client, salesrender_sandbox, log_output):
    response = hook(client, {"orders": [{"id": "999999"}]})
    assert response.status_code == 200
    assert json.loads(response.body)["orders"] == {"999999": "unknown_order"}
    assert "SalesRender does not know" in log_output.getvalue()


def test_salesrender_down_queues_the_order_for_a_re_read(client, salesrender_sandbox, now_callbacks, monkeypatch):
    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    salesrender_sandbox.add_fault(1, status=500, operation="ordersFetcher")  # 500s are not retried inline
    response = hook(client, salesrender_sandbox.webhook_body(order_id))
    assert response.status_code == 200 and json.loads(response.body)["orders"] == {order_id: "queued"}
    assert leads.get(lead_id)["state"] == "callback_scheduled"  # not applied yet
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    salesrender_sandbox.add_fault(1, status=502, operation="ordersFetcher")  # still down at the first re-read
    assert deliver("postbacks", "postback_worker") == [False]  # comes back with backoff
    assert deliver("postbacks", "postback_worker") == [True]
    assert leads.get(lead_id)["state"] == "closed"


def test_queue_down_too_answers_503_so_the_sender_may_retry(client, salesrender_sandbox, monkeypatch):
    salesrender_sandbox.add_fault(5, status=503, operation="ordersFetcher")

    def no_queue(*args, **kwargs):
        raise RuntimeError("SQS unavailable")

    monkeypatch.setattr(queues, "send", no_queue)
    response = hook(client, {"orders": [{"id": "12"}]})
    assert response.status_code == 503


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"", 400, "body"),
    (b"   ", 400, "body"),
    (b"\xff\xfe{}", 400, "body"),
    (b"{not json", 400, "body"),
    (b"[" * 40 + b"]" * 40, 400, "body"),
    (b'{"id": 1' + b"0" * 200 + b"}", 400, "body"),
    (b'"just a string"', 400, "body"),
    (b"{}", 400, "id"),
    (b'{"data": "x"}', 400, "data"),
    (b'{"data": {"ordersFetcher": {"orders": {"id": "1"}}}}', 400, "data.ordersFetcher.orders"),
    (b'{"data": {"ordersFetcher": []}}', 400, "data.ordersFetcher"),
    (b'{"orders": []}', 400, "orders"),
    (b'{"orders": ["1"]}', 400, "orders.0"),
    (b'{"orders": [{"id": true}]}', 400, "orders.0.id"),
    (b'{"orders": [{"id": {"x": 1}}]}', 400, "orders.0.id"),
    (b'{"orders": [{"id": "../../etc"}]}', 400, "orders.0.id"),
    (b'{"orders": [{"id": "' + b"1" * 65 + b'"}]}', 400, "orders.0.id"),
    (b'{"data": {"order": {"name": "x"}}}', 400, "data.order.id"),
    (json.dumps({"orders": [{"id": str(i)} for i in range(101)]}).encode(), 413, "orders"),
    (b'{"orders": [{"id": "1", "pad": "' + b"x" * (1024 * 1024) + b'"}]}', 413, "body"),
])
def test_hostile_bodies_are_4xx_naming_the_field(client, salesrender_sandbox, body, status, field):
    response = hook(client, body)
    assert response.status_code == status, response.body
    assert json.loads(response.body)["field"] == field
    assert order_reads(salesrender_sandbox) == []


def test_a_numeric_id_and_repeated_ids_read_each_order_once(client, salesrender_sandbox):
    _lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    before = len(order_reads(salesrender_sandbox))
    response = hook(client, {"orders": [{"id": int(order_id)}, {"id": order_id}]})
    assert json.loads(response.body)["orders"] == {order_id: "seen"}
    assert len(order_reads(salesrender_sandbox)) - before == 1


def test_subid_from_the_tilda_post_reaches_the_lead_and_the_order(client, salesrender_sandbox):
    form = {"Name": "Анна", "Phone": "+7 999 111 22 44", "tranid": "sub:1", "formid": "form493249737",
            "utm_source": "vk", "ClickID": "clk-42"}
    response = client.http.post("/webhooks/tilda", body=urlencode(form), headers={"Content-Type": FORM,
                                                                                  "X-Api-Key": TILDA_KEY})
    assert response.status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    lead = leads.get(leads.lead_id_for("tilda", "tranid:sub:1"))
    assert lead["subid"] == "clk-42"
    [order] = salesrender_sandbox.orders()
    assert "subid=clk-42" in order["source"]["refererUri"]
    assert "subid=clk-42" in order["orderData"]["stringFields"][0]["value"]
    assert resources.queue_url("postbacks")  # the queue the re-reads and postbacks share exists


def test_an_order_that_cannot_carry_the_lead_id_is_matched_to_its_lead_in_flight(client, salesrender_sandbox,
                                                                                   use_config):
    """Offer without a comment field or a landing URL: the trigger fires before the intake worker has the
    addOrder answer, and the order carries no lead id; the phone's lead with its addOrder under way owns it."""
    from functions.core import times

    def bare(doc):
        doc["offers"][0].pop("landing_url")
        doc["offers"][0]["salesrender"]["fields"]["comment"] = None

    use_config(bare)
    lead_id = post_lead(client)
    leads.update(lead_id, order_attempted_at=times.now_iso())  # addOrder sent, its answer not back yet
    order_id = crm_order(salesrender_sandbox, phone="+79991112233", referer="https://x.example/")
    assert json.loads(hook(client, salesrender_sandbox.webhook_body(order_id)).body)["orders"] == {order_id: "seen"}
    assert order_links.lead_of(order_id) == lead_id
    assert leads.get(leads.lead_id_for("salesrender", order_id)) is None


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                         st.sampled_from(["data", "ordersFetcher", "orders", "order", "id", "x"]), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_json)
def test_no_body_is_ever_a_5xx(client, salesrender_sandbox, document):
    response = hook(client, document)
    assert response.status_code in (200, 400, 413), response.body
    if response.status_code != 200:
        assert json.loads(response.body)["field"]


def test_an_approved_order_counts_once_in_the_report(client, salesrender_sandbox, now_callbacks):
    # The webhook is where an approval is usually seen first: twenty copies add one approved order and its payout.
    from functions.core import config
    from functions.records import daily

    lead_id, order_id = lead_with_order(client, salesrender_sandbox)
    salesrender_sandbox.set_order_status(order_id, APPROVED)
    body = salesrender_sandbox.webhook_body(order_id)
    for _ in range(20):
        assert hook(client, body).status_code == 200
    offer_id = leads.get(lead_id)["offer_id"]
    day = daily.today(offer_id).isoformat()
    token = {"Authorization": f"Bearer {os.environ['CALLBRIDGE_API_TOKEN']}"}
    reply = client.http.get(f"/v1/reports/summary?from={day}&to={day}&offer_id={offer_id}", headers=token)
    assert reply.status_code == 200, reply.body
    total = json.loads(reply.body)["total"]
    assert total["approved"] == 1
    assert total["revenue_rub"] == config.load().offer(offer_id).payout_rub
