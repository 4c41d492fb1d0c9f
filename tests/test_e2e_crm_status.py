"""End to end through `make run` (R-21): the CRM's word on an order changes what callbridge does.

A Tilda lead whose customer does not answer is called once and gets a retry; the order is approved in the
SalesRender sandbox, whose order trigger posts the webhook to the app: the lead is finished, so the retry
never rings, and the offer's postback reaches the sandbox's tracker once however often the status is seen
again. An order made in the CRM itself gets one callback. The stage's configuration document lives outside
the repository (an absolute CALLBRIDGE_CONFIG), as a deployed stage may keep it.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlencode

import boto3
import pytest
import requests
import yaml
from test_e2e_local_stack import ROOT, free_port, make_run, wait_until

from functions.records import calls, leads

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer local-api-token"}
SECRET = "local-salesrender-secret"  # make run's built-in SALESRENDER_WEBHOOK_SECRET


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ports = {"MOTO_PORT": free_port(), "SALESRENDER_SANDBOX_PORT": free_port(), "BEELINE_SANDBOX_PORT": free_port(),
             "CALLBRIDGE_PORT": free_port()}
    document = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))
    offer = document["offers"][0]
    offer["retry"]["no_answer"] = {"interval_seconds": 30, "max_attempts": 3}
    offer["postbacks"] = [{"on": ["APPROVED"], "method": "GET",
                           "url": f"http://127.0.0.1:{ports['SALESRENDER_SANDBOX_PORT']}/tracker/pb"
                                  "?subid={subid}&status={status}&payout={payout}&order={order_id}"}]
    config_path = tmp_path_factory.mktemp("stage-config") / "e2e.yaml"
    config_path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    with make_run(tmp_path_factory.mktemp("local"), ports, FRESH="1", CALLBRIDGE_CONFIG=str(config_path)) as running:
        yield running


def lead_item(stack, lead_id: str) -> dict:
    table = boto3.resource("dynamodb", endpoint_url=stack["aws"], region_name="us-east-1",
                           aws_access_key_id="local", aws_secret_access_key="local").Table("callbridge-local-state")
    return table.get_item(Key={"pk": f"LEAD#{lead_id}", "sk": "LEAD"}, ConsistentRead=True).get("Item") or {}


def callbacks_pending(stack) -> int:
    sqs = boto3.client("sqs", endpoint_url=stack["aws"], region_name="us-east-1", aws_access_key_id="local",
                       aws_secret_access_key="local")
    url = sqs.get_queue_url(QueueName="callbridge-local-callbacks")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return sum(int(attributes.get(name, 0)) for name in (
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed"))


def originates(stack, digits: str) -> list:
    return [c for c in requests.get(stack["pbx"] + "/_sandbox/calls", timeout=5).json() if c["phone"] == digits]


def test_approved_in_the_crm_cancels_the_retry_and_fires_the_postback_once(stack):
    tranid = f"e2e-status:{uuid.uuid4().hex[:10]}"
    form = {"Name": "Вера", "Phone": "+7 999 777 66 02", "tranid": tranid, "formid": "form493249737",
            "SubID": "click-e2e-1"}  # "02": the customer does not answer
    response = requests.post(stack["app"] + "/webhooks/tilda", data=urlencode(form), timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded",
                                      "X-Api-Key": "local-tilda-key"})
    assert response.status_code == 200
    lead_id = leads.lead_id_for("tilda", f"tranid:{tranid}")

    def first_call_ended():
        call = requests.get(f"{stack['app']}/v1/calls/{calls.call_id_for(lead_id, 1)}", headers=AUTH, timeout=5)
        return call.json() if call.status_code == 200 and call.json()["state"] == "ended" else None

    assert wait_until(first_call_ended, 60, "the first call to end")["outcome"] == "no_answer"
    wait_until(lambda: lead_item(stack, lead_id).get("retry_2_at"), 30, "the retry to be scheduled")
    order_id = lead_item(stack, lead_id)["order_id"]

    # A manager approves the order: the sandbox's trigger posts the webhook and waits for the app's answer.
    moved = requests.post(f"{stack['sandbox']}/_sandbox/orders/{order_id}/status", json={"status_id": "2"},
                          timeout=30)
    assert moved.status_code == 200
    [delivery] = [d for d in requests.get(stack["sandbox"] + "/_sandbox/webhooks", timeout=5).json()
                  if d["order_id"] == order_id and d["event"] == "status"]
    assert delivery["status"] == 200 and delivery["answer"]["orders"] == {order_id: "closed"}
    assert "ordersFetcher" in delivery["body"]["data"]  # the real shape went over the wire
    lead = lead_item(stack, lead_id)
    assert lead["state"] == "closed" and lead["crm_closed_at"] and lead["finished_reason"] == "crm_status_approved"

    def postback_hits():
        return [h for h in requests.get(stack["sandbox"] + "/_sandbox/tracker", timeout=5).json()
                if h["query"].get("order") == order_id]

    [hit] = wait_until(postback_hits, 60, "the postback at the tracker")
    assert hit["query"] == {"subid": "click-e2e-1", "status": "approved", "payout": "900", "order": order_id}

    # The same status seen again, by the trigger and by copies of its webhook: nothing more is sent.
    requests.post(f"{stack['sandbox']}/_sandbox/orders/{order_id}/status", json={"status_id": "2"}, timeout=30)
    for _ in range(3):
        again = requests.post(f"{stack['app']}/webhooks/salesrender/{SECRET}", json=delivery["body"], timeout=10)
        assert again.status_code == 200
    listed = requests.get(f"{stack['app']}/v1/postbacks", params={"order_id": order_id}, headers=AUTH, timeout=5)
    assert [p["state"] for p in listed.json()["postbacks"]] == ["sent"]
    assert len(listed.json()["attempts"]) == 1

    # The retry comes due (30 s after the first call): the dialer finds the lead finished and rings nobody.
    wait_until(lambda: callbacks_pending(stack) == 0, 90, "the retry's callback to be worked")
    assert len(originates(stack, "9997776602")) == 1
    retry = requests.get(f"{stack['app']}/v1/calls/{calls.call_id_for(lead_id, 2)}", headers=AUTH, timeout=5)
    assert retry.status_code == 404  # never dialled
    assert len(postback_hits()) == 1


def test_an_order_made_in_the_crm_gets_one_callback(stack):
    made = requests.post(f"{stack['sandbox']}/_sandbox/orders/new", timeout=30, json={
        "projectId": "1", "statusId": "1",
        "orderData": {"phoneFields": [{"field": "phone", "value": "+79993334455"}],
                      "humanNameFields": [{"field": "name", "value": {"firstName": "Олег", "lastName": ""}}]},
        "source": {"refererUri": "https://cpa.example/?click_id=cpa-5"}})
    assert made.status_code == 200
    order_id = made.json()["id"]
    [delivery] = [d for d in requests.get(stack["sandbox"] + "/_sandbox/webhooks", timeout=5).json()
                  if d["order_id"] == order_id]
    assert delivery["answer"]["orders"] == {order_id: "adopted"}
    wait_until(lambda: originates(stack, "9993334455"), 60, "the callback of the CRM's order")
    lead_id = leads.lead_id_for("salesrender", order_id)
    assert lead_item(stack, lead_id)["subid"] == "cpa-5"

    def ended():
        call = requests.get(f"{stack['app']}/v1/calls/{calls.call_id_for(lead_id, 1)}", headers=AUTH, timeout=5)
        return call.status_code == 200 and call.json()["state"] == "ended"

    wait_until(ended, 60, "the call to end")
    requests.post(f"{stack['app']}/webhooks/salesrender/{SECRET}", json=delivery["body"], timeout=10)
    wait_until(lambda: callbacks_pending(stack) == 0, 60, "the callbacks queue to drain")
    assert len(originates(stack, "9993334455")) == 1
    assert json.loads(json.dumps(lead_item(stack, lead_id)["order_id"])) == order_id
