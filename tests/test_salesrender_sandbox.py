"""The SalesRender sandbox must reject what the real SalesRender rejects, and accept the contract's examples."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))
SalesRenderSandbox = importlib.import_module("infra.local.salesrender_sandbox").SalesRenderSandbox

TOKEN = "test-token"
ADD_ORDER = "mutation AddOrder($input: AddOrderInput!) { orderMutation { addOrder(input: $input) { id } } }"
UPDATE_ORDER = ("mutation UpdateOrder($input: UpdateOrderInput!) {"
                " orderMutation { updateOrder(input: $input) { id status { id group } } } }")
GET_ORDER = """query Order($ids: [ID!]) {
  ordersFetcher(pagination: {pageNumber: 1, pageSize: 100}, filters: {include: {ids: $ids}}) {
    orders { id status { id name group } project { id name }
             data { phoneFields { field value } humanNameFields { field value { firstName lastName } }
                    emailFields { field value } stringFields { field value } }
             cart { total items { itemId variation quantity price } }
             source { refererUri ip utm_source } createdAt }
    pageInfo { pagesCount }
  }
}"""
# The contract's example variables (salesrender.md, "Create").
EXAMPLE = {"input": {
    "projectId": "1", "statusId": "1",
    "orderData": {"phoneFields": [{"field": "phone", "value": "+79991112233"}],
                  "humanNameFields": [{"field": "name", "value": {"firstName": "Анна", "lastName": ""}}],
                  "emailFields": [{"field": "email", "value": "anna@example.com"}]},
    "cart": {"items": [{"itemId": 1, "variation": 1, "quantity": 1, "price": 199000}]},
    "source": {"refererUri": "https://landing.example/?utm_source=vk", "ip": "203.0.113.7"}}}


@pytest.fixture(scope="module")
def server():
    with SalesRenderSandbox(token=TOKEN) as sandbox:
        yield sandbox


@pytest.fixture()
def sr(server):
    server.reset()
    return server


def gql(sr, query, variables=None, *, headers=None, params=None):
    headers = {"Authorization": TOKEN} if headers is None else headers
    return requests.post(sr.api_url, json={"query": query, "variables": variables}, headers=headers,
                         params=params, timeout=5)


def example(**changes):
    variables = copy.deepcopy(EXAMPLE)
    variables["input"].update(changes)
    return variables


def error_code(response):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None
    return body["errors"][0]["extensions"]["code"]


def add_order(sr, **changes):
    response = gql(sr, ADD_ORDER, example(**changes))
    assert response.status_code == 200, response.text
    return response.json()["data"]["orderMutation"]["addOrder"]["id"]


def test_add_order_then_fetch_it(sr):
    order_id = add_order(sr)
    assert order_id == "1"
    response = gql(sr, GET_ORDER, {"ids": [order_id]})
    assert response.status_code == 200
    body = response.json()
    assert "errors" not in body
    (order,) = body["data"]["ordersFetcher"]["orders"]
    assert order["status"] == {"id": "1", "name": "Новый", "group": "PROCESSING"}
    assert order["project"] == {"id": "1", "name": "Demo offer"}
    assert order["data"]["phoneFields"] == [{"field": "phone", "value": "+79991112233"}]
    assert order["data"]["humanNameFields"][0]["value"] == {"firstName": "Анна", "lastName": ""}
    assert order["cart"]["total"] == 199000
    assert order["source"]["utm_source"] == "vk"
    assert order["createdAt"].endswith("+00:00")
    assert body["data"]["ordersFetcher"]["pageInfo"]["pagesCount"] == 1

    (stored,) = sr.orders()
    assert stored["statusGroup"] == "PROCESSING"
    assert stored["orderData"] == EXAMPLE["input"]["orderData"]
    assert sr.requests_log()[0]["operation"] == ["orderMutation.addOrder"]
    assert sr.requests_log()[0]["authorized"] is True


@pytest.mark.parametrize("how", ["raw", "bearer", "query"])
def test_token_forms_accepted(sr, how):
    headers = {"raw": {"Authorization": TOKEN}, "bearer": {"Authorization": f"Bearer {TOKEN}"}, "query": {}}[how]
    params = {"token": TOKEN} if how == "query" else None
    response = gql(sr, "{ projectsFetcher { projects { id } } }", headers=headers, params=params)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("headers", [{"Authorization": "wrong"}, {}])
def test_wrong_or_missing_token_is_401(sr, headers):
    response = gql(sr, ADD_ORDER, EXAMPLE, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"errors": [{"message": "Unauthorized", "extensions": {"code": "ERR_UNAUTHORIZED"}}]}
    assert sr.orders() == []
    assert sr.requests_log()[-1]["authorized"] is False


def test_introspection_without_token(sr):
    response = gql(sr, "{ __schema { mutationType { name } } __type(name: \"AddOrderInput\") { name } }",
                   headers={})
    assert response.status_code == 200
    assert response.json()["data"]["__schema"]["mutationType"]["name"] == "Mutation"
    # Mixing introspection with data still needs the token.
    assert gql(sr, "{ __schema { queryType { name } } projectsFetcher { projects { id } } }",
               headers={}).status_code == 401


@pytest.mark.parametrize(("changes", "code"), [
    ({"statusId": "99"}, "ERR_ORDER_STATUS_NOT_FOUND"),
    ({"statusId": 4}, "ERR_ORDER_STATUS_ARCHIVED"),
    ({"projectId": "42"}, "ERR_PROJECT_NOT_FOUND"),
])
def test_business_errors(sr, changes, code):
    assert error_code(gql(sr, ADD_ORDER, example(**changes))) == code
    assert sr.orders() == []


@pytest.mark.parametrize(("order_data", "field"), [
    ({"stringFields": [{"field": "no_such_field", "value": "x"}]}, "no_such_field"),
    ({"phoneFields": [{"field": "phone", "value": "79991112233"}]}, "phone"),
    ({"phoneFields": [{"field": "comment", "value": "+79991112233"}]}, "comment"),
    ({"emailFields": [{"field": "email", "value": "anna.example.com"}]}, "email"),
])
def test_order_validation_failed(sr, order_data, field):
    response = gql(sr, ADD_ORDER, example(orderData=order_data))
    assert error_code(response) == "ERR_ORDER_VALIDATION_FAILED"
    assert f'"{field}"' in response.json()["errors"][0]["message"]


def test_document_errors_are_400(sr):
    missing_argument = gql(sr, "mutation { orderMutation { addOrder { id } } }")
    assert missing_argument.status_code == 400
    assert missing_argument.json()["errors"]
    unknown_field = gql(sr, "{ ordersFetcher { orders { id phone } } }")
    assert unknown_field.status_code == 400
    assert "phone" in unknown_field.json()["errors"][0]["message"]
    wrong_variable_type = gql(sr, ADD_ORDER, example(cart={"items": [{"itemId": "x", "variation": 1,
                                                                       "quantity": 1, "price": 1}]}))
    assert wrong_variable_type.status_code == 400
    assert gql(sr, "{ ordersFetcher {").status_code == 400
    assert sr.orders() == []


def test_http_level_rejections(sr):
    form = requests.post(sr.api_url, data={"query": "{ projectsFetcher { projects { id } } }"},
                         headers={"Authorization": TOKEN}, timeout=5)
    assert form.status_code == 415
    wrong_company = requests.post(f"{sr.base_url}/companies/2/CRM", json={"query": "{ __typename }"},
                                  headers={"Authorization": TOKEN}, timeout=5)
    assert wrong_company.status_code == 404
    bad_json = requests.post(sr.api_url, data="{not json", timeout=5,
                             headers={"Authorization": TOKEN, "Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert requests.post(sr.api_url, json={"variables": {}}, headers={"Authorization": TOKEN},
                         timeout=5).status_code == 400


def test_fault_status_then_success(sr):
    sr.add_fault(count=1, status=503, operation="addOrder")
    # The fault is limited to addOrder: a query goes through.
    assert gql(sr, "{ statusesFetcher { statuses { id } } }").status_code == 200
    first = gql(sr, ADD_ORDER, EXAMPLE)
    assert first.status_code == 503
    assert sr.orders() == []
    assert add_order(sr) == "1"
    assert [r["status"] for r in sr.requests_log()] == [200, 503, 200]


def test_fault_graphql_error_over_http(sr):
    response = requests.post(f"{sr.base_url}/_sandbox/faults", json={"count": 2, "graphql_error": "ERR_ORDER_LOCKED"},
                             timeout=5)
    assert response.status_code == 200
    assert error_code(gql(sr, ADD_ORDER, EXAMPLE)) == "ERR_ORDER_LOCKED"
    assert error_code(gql(sr, ADD_ORDER, EXAMPLE)) == "ERR_ORDER_LOCKED"
    assert add_order(sr) == "1"
    bad = requests.post(f"{sr.base_url}/_sandbox/faults", json={"count": 0, "status": 500}, timeout=5)
    assert bad.status_code == 400


def test_fault_delay(sr):
    sr.add_fault(delay_seconds=0.2)
    started = time.monotonic()
    assert gql(sr, "{ projectsFetcher { projects { id } } }").status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("spoil", [{"status": 502}, {"graphql_error": "ERR_INTERNAL"}])
def test_fault_carry_out_then_answer_an_error(sr, spoil):
    response = requests.post(f"{sr.base_url}/_sandbox/faults",
                             json={"carry_out": True, "operation": "addOrder", **spoil}, timeout=5)
    assert response.status_code == 200
    answer = gql(sr, ADD_ORDER, EXAMPLE)
    assert answer.status_code == spoil.get("status", 200) and "addOrder" not in answer.text
    [order] = sr.orders()  # carried out all the same
    assert order["projectId"] == "1"
    assert sr.requests_log()[-1]["carried_out_status"] == 200


def test_fault_carry_out_then_answer_too_late(sr):
    sr.add_fault(carry_out=True, delay_seconds=2, operation="addOrder")
    with pytest.raises(requests.ReadTimeout):
        requests.post(sr.api_url, json={"query": ADD_ORDER, "variables": EXAMPLE}, headers={"Authorization": TOKEN},
                      timeout=(5, 0.3))
    assert len(sr.orders()) == 1  # the order exists although the client saw no answer
    assert sr.requests_log()[-1]["operation"] == ["orderMutation.addOrder"]  # logged on arrival


@pytest.mark.parametrize("carry_out", [True, False])
def test_fault_drop_connection(sr, carry_out):
    sr.add_fault(drop_connection=True, carry_out=carry_out, operation="addOrder")
    with pytest.raises(requests.ConnectionError):
        gql(sr, ADD_ORDER, EXAMPLE)
    assert len(sr.orders()) == (1 if carry_out else 0)
    assert sr.requests_log()[-1]["status"] == "dropped"
    assert add_order(sr)  # the next connection is served


@pytest.mark.parametrize("spec", [{"drop_connection": True, "status": 500}, {"carry_out": True},
                                  {"drop_connection": "yes"}, {"carry_out": 1, "status": 500}])
def test_bad_lost_answer_faults_are_refused(sr, spec):
    assert requests.post(f"{sr.base_url}/_sandbox/faults", json=spec, timeout=5).status_code == 400


def test_orders_fetcher_accepts_only_the_documented_filter(sr):
    add_order(sr)
    page = "{ ordersFetcher(pagination: {pageNumber: 1, pageSize: 100}) { orders { id } pageInfo { pagesCount } } }"
    assert gql(sr, page).json()["data"]["ordersFetcher"] == {"orders": [{"id": "1"}], "pageInfo": {"pagesCount": 1}}
    undocumented = "{ ordersFetcher(filters: {include: {refererUri: \"x\"}}) { orders { id } } }"
    assert gql(sr, undocumented).status_code == 400


def test_update_order_status_and_string_field(sr):
    order_id = add_order(sr)
    response = gql(sr, UPDATE_ORDER, {"input": {"id": order_id, "statusId": 3}})
    assert response.json()["data"]["orderMutation"]["updateOrder"]["status"] == {"id": "3", "group": "CANCELED"}
    for text in ("call 1", "call 1\ncall 2"):
        response = gql(sr, UPDATE_ORDER, {"input": {"id": order_id, "orderData": {
            "stringFields": [{"field": "call_log", "value": text}]}}})
        assert response.status_code == 200 and "errors" not in response.json(), response.text
    (order,) = gql(sr, GET_ORDER, {"ids": [order_id]}).json()["data"]["ordersFetcher"]["orders"]
    assert order["data"]["stringFields"] == [{"field": "call_log", "value": "call 1\ncall 2"}]
    assert order["data"]["phoneFields"] == [{"field": "phone", "value": "+79991112233"}]
    assert len(sr.orders()[0]["history"]) == 3
    assert error_code(gql(sr, UPDATE_ORDER, {"input": {"id": "999", "statusId": 3}})) == "ERR_ORDER_NOT_FOUND"
    assert error_code(gql(sr, UPDATE_ORDER, {"input": {"id": order_id, "statusId": 4}})) == "ERR_ORDER_STATUS_ARCHIVED"


def test_manager_status_change(sr):
    order_id = add_order(sr)
    response = requests.post(f"{sr.base_url}/_sandbox/orders/{order_id}/status", json={"status_id": "2"}, timeout=5)
    assert response.status_code == 200
    assert response.json()["statusGroup"] == "APPROVED"
    (order,) = gql(sr, GET_ORDER, {"ids": [order_id]}).json()["data"]["ordersFetcher"]["orders"]
    assert order["status"]["group"] == "APPROVED"
    assert requests.post(f"{sr.base_url}/_sandbox/orders/77/status", json={"status_id": "2"},
                         timeout=5).status_code == 404


def test_reference_fetchers(sr):
    body = gql(sr, """{ statusesFetcher { statuses { id name group archived } }
                        projectsFetcher { projects { id name } }
                        orderFieldsFetcher { fields { name label __typename } } }""").json()["data"]
    statuses = {s["id"]: s for s in body["statusesFetcher"]["statuses"]}
    assert statuses["4"] == {"id": "4", "name": "Старый", "group": "PROCESSING", "archived": True}
    assert [p["id"] for p in body["projectsFetcher"]["projects"]] == ["1", "2"]
    fields = {f["name"]: f["__typename"] for f in body["orderFieldsFetcher"]["fields"]}
    assert fields == {"phone": "PhoneOrderField", "name": "HumanNameOrderField", "email": "EmailOrderField",
                      "comment": "StringOrderField", "call_log": "StringOrderField"}


def test_control_endpoints(sr):
    add_order(sr)
    assert requests.get(f"{sr.base_url}/_sandbox/health", timeout=5).json() == {"ok": True}
    assert len(requests.get(f"{sr.base_url}/_sandbox/orders", timeout=5).json()) == 1
    assert len(requests.get(f"{sr.base_url}/_sandbox/requests", timeout=5).json()) == 1
    assert requests.post(f"{sr.base_url}/_sandbox/reset", timeout=5).status_code == 200
    assert sr.orders() == [] and sr.requests_log() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_serves_and_exits_cleanly(sig):
    env = {**os.environ, "SALESRENDER_API_TOKEN": "env-token"}
    proc = subprocess.Popen([sys.executable, "-m", "infra.local.salesrender_sandbox", "--port", "0", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("salesrender sandbox: http://127.0.0.1:") and line.endswith("/companies/1/CRM")
        url = line.split(": ", 1)[1]
        response = requests.post(url, json={"query": "{ projectsFetcher { projects { id } } }"},
                                 headers={"Authorization": "env-token"}, timeout=5)
        assert response.status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


# ---- the order trigger and the postback tracker (R-21) ---------------------------------------------------

@pytest.fixture()
def sink(server):
    from conftest import EventSink

    receiver = EventSink()
    yield receiver
    server.configure_webhook(None)  # the module's sandbox posts nowhere again
    receiver.server.shutdown()


@pytest.mark.parametrize(("shape", "path"), [("ordersFetcher", ("data", "ordersFetcher", "orders", 0)),
                                             ("data", ("data",)), ("orders", ("orders", 0)), ("order", ())])
def test_a_status_change_posts_the_order_to_the_webhook_in_the_chosen_shape(sr, sink, shape, path):
    order_id = add_order(sr)
    requests.post(f"{sr.base_url}/_sandbox/webhook", json={"url": sink.url, "shape": shape}, timeout=5)
    moved = requests.post(f"{sr.base_url}/_sandbox/orders/{order_id}/status", json={"status_id": "2"}, timeout=20)
    assert moved.status_code == 200
    [body] = [json.loads(b) for b in sink.bodies]
    for step in path:
        body = body[step]
    assert body["id"] == order_id and body["status"]["group"] == "APPROVED"
    assert body["data"]["phoneFields"] == [{"field": "phone", "value": "+79991112233"}]
    [delivery] = requests.get(f"{sr.base_url}/_sandbox/webhooks", timeout=5).json()
    assert (delivery["event"], delivery["order_id"], delivery["status"]) == ("status", order_id, 200)


def test_api_orders_and_crm_orders_fire_created_and_no_url_fires_nothing(sr, sink):
    add_order(sr)  # no webhook configured: nothing is sent
    sr.configure_webhook(sink.url)
    api_order = add_order(sr)
    crm = requests.post(f"{sr.base_url}/_sandbox/orders/new", timeout=20, json={
        "projectId": "1", "statusId": "1", "orderData": {"phoneFields": [{"field": "phone", "value": "+79990001122"}]},
        "source": {"refererUri": "https://cpa.example/?subid=7"}})
    assert crm.status_code == 200
    deadline = time.monotonic() + 5
    while len(sink.bodies) < 2 and time.monotonic() < deadline:  # addOrder's webhook goes out in a thread
        time.sleep(0.05)
    ids = sorted(json.loads(b)["data"]["ordersFetcher"]["orders"][0]["id"] for b in sink.bodies)
    assert ids == sorted([api_order, crm.json()["id"]])
    assert {d["event"] for d in sr.webhooks()} == {"created"}


def test_a_crm_order_is_checked_like_add_order(sr):
    response = requests.post(f"{sr.base_url}/_sandbox/orders/new", timeout=5, json={
        "projectId": "9", "statusId": "1", "orderData": {}})
    assert response.status_code == 400 and "Project 9 not found" in response.json()["error"]


@pytest.mark.parametrize("spec", [{"url": "ftp://x"}, {"shape": "xml"}, {"events": ["deleted"]}, {"nope": 1}])
def test_bad_webhook_settings_are_refused(sr, spec):
    assert requests.post(f"{sr.base_url}/_sandbox/webhook", json=spec, timeout=5).status_code == 400


def test_the_tracker_records_every_postback_and_fails_on_request(sr):
    assert requests.post(f"{sr.base_url}/_sandbox/tracker/faults", json={"count": 1, "status": 503},
                         timeout=5).status_code == 200
    first = requests.get(f"{sr.base_url}/tracker/pb?subid=a%26b&status=approved", timeout=5)
    second = requests.post(f"{sr.base_url}/tracker/post/7", data=b'{"x": 1}', timeout=5)
    assert (first.status_code, second.status_code) == (503, 200)
    hits = requests.get(f"{sr.base_url}/_sandbox/tracker", timeout=5).json()
    assert [(h["method"], h["path"], h["status"]) for h in hits] == [("GET", "/tracker/pb", 503),
                                                                     ("POST", "/tracker/post/7", 200)]
    assert hits[0]["query"] == {"subid": "a&b", "status": "approved"} and hits[1]["body"] == '{"x": 1}'
    assert requests.post(f"{sr.base_url}/_sandbox/tracker/faults", json={"count": 0, "status": 500},
                         timeout=5).status_code == 400


def test_the_cli_posts_to_the_local_app_by_default(monkeypatch):
    from infra.local import salesrender_sandbox

    monkeypatch.delenv("SALESRENDER_SANDBOX_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("SALESRENDER_WEBHOOK_SECRET", "s")
    monkeypatch.setenv("CALLBRIDGE_PORT", "8123")
    assert salesrender_sandbox.default_webhook_url() == "http://127.0.0.1:8123/webhooks/salesrender/s"
    monkeypatch.delenv("SALESRENDER_WEBHOOK_SECRET")
    assert salesrender_sandbox.default_webhook_url() is None
