"""The SalesRender GraphQL client (R-7, providers/salesrender.md) and the AddOrderInput built from a lead.

`responses` stands in for SalesRender. It emulates urllib3's *status* retries (a 503 is re-sent), but an
exception given as a body is raised once, whatever the Retry says; so the rules that keep an order from
being created twice are also checked against a real socket on 127.0.0.1 and on the Retry object itself.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import responses
from responses import registries
from urllib3.util.retry import Retry

from functions.core import config, http
from functions.providers.salesrender import client as sr
from functions.providers.salesrender.client import SalesRenderClient, SalesRenderError
from functions.providers.salesrender.orders import add_order_input

URL = "https://salesrender.test/companies/1/CRM"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.test.token"
ORDER = {"projectId": "1", "statusId": "1",
         "orderData": {"phoneFields": [{"field": "phone", "value": "+79991112233"}]}}
CREATED = {"data": {"orderMutation": {"addOrder": {"id": "48211"}}}}


def graphql_error(code: str | None, message: str = "failed") -> dict:
    error: dict = {"message": message}
    if code is not None:
        error["extensions"] = {"code": code}
    return {"data": None, "errors": [error]}


@pytest.fixture
def mocked():
    with responses.RequestsMock(registry=registries.OrderedRegistry, assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def client():
    return SalesRenderClient(URL, TOKEN)


def failure(client) -> SalesRenderError:
    with pytest.raises(SalesRenderError) as info:
        client.add_order(ORDER)
    return info.value


# --- the request ---------------------------------------------------------------------------------------------


def test_add_order_sends_the_raw_token_and_a_graphql_body(mocked, client):
    mocked.post(URL, json=CREATED)
    assert client.add_order(ORDER) == "48211"
    [call] = mocked.calls
    assert call.request.method == "POST"
    assert call.request.url == URL
    assert call.request.headers["Authorization"] == TOKEN  # raw, as SalesRender's own client sends it
    assert not call.request.headers["Authorization"].startswith("Bearer")
    assert call.request.headers["Content-Type"] == "application/json"
    body = json.loads(call.request.body)
    assert set(body) == {"query", "variables"}
    assert "addOrder(input: $input)" in body["query"] and "mutation AddOrder" in body["query"]
    assert body["variables"] == {"input": ORDER}


def test_add_order_returns_the_id_as_text(mocked, client):
    mocked.post(URL, json={"data": {"orderMutation": {"addOrder": {"id": 7}}}})
    assert client.add_order(ORDER) == "7"


@pytest.mark.parametrize("data", [{}, {"orderMutation": None}, {"orderMutation": {"addOrder": {}}}])
def test_add_order_without_an_id_is_a_transient_failure(mocked, client, data):
    mocked.post(URL, json={"data": data})
    error = failure(client)
    assert (error.code, error.transient) == ("NO_ID", True)


def test_get_and_update_order(mocked, client):
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": [{"id": "48211", "status": {"id": "1"}}]}}})
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": []}}})
    mocked.post(URL, json={"data": {"orderMutation": {"updateOrder": {"id": "48211", "status": {"id": "3"}}}}})
    assert client.get_order("48211")["id"] == "48211"
    assert client.get_order("1") is None
    assert client.update_order({"id": "48211", "statusId": "3"}) == {"id": "48211", "status": {"id": "3"}}
    assert json.loads(mocked.calls[0].request.body)["variables"] == {"ids": ["48211"]}
    assert json.loads(mocked.calls[2].request.body)["variables"] == {"input": {"id": "48211", "statusId": "3"}}


def test_default_client_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SALESRENDER_API_URL", URL)
    assert sr.api_url() == URL
    monkeypatch.delenv("SALESRENDER_API_URL")
    monkeypatch.setenv("SALESRENDER_COMPANY_ID", "77")
    assert sr.api_url() == "https://de.backend.salesrender.com/companies/77/CRM"


# --- errors and their classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        ("ERR_ORDER_VALIDATION_FAILED", False),
        ("ERR_ORDER_STATUS_NOT_FOUND", False),
        ("ERR_ORDER_STATUS_ARCHIVED", False),
        ("ERR_PROJECT_NOT_FOUND", False),
        ("GRAPHQL_VALIDATION_FAILED", False),
        ("ERR_ORDER_LOCKED", True),
        ("ERR_SOMETHING_NEW", True),  # unknown: retried, and the DLQ catches it if it persists
    ],
)
def test_graphql_errors_in_a_200_are_failures(mocked, client, code, transient):
    mocked.post(URL, json=graphql_error(code, "order is wrong"))
    error = failure(client)
    assert error.code == code
    assert error.transient is transient
    assert error.status == 200
    assert code in str(error) and "order is wrong" in str(error)


def test_all_error_messages_are_kept(mocked, client):
    mocked.post(URL, json={"errors": [{"message": "first", "extensions": {"code": "ERR_ORDER_VALIDATION_FAILED"}},
                                      {"message": "second"}, "third"]})
    error = failure(client)
    assert error.code == "ERR_ORDER_VALIDATION_FAILED"
    assert "first; second; third" in str(error)


def test_graphql_error_without_a_code_is_named_by_its_status(mocked, client):
    mocked.post(URL, json=graphql_error(None))
    error = failure(client)
    assert (error.code, error.transient) == ("HTTP_200", True)


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_errors_are_transient(mocked, client, status):
    mocked.post(URL, status=status, body="<html>Bad gateway</html>")
    error = failure(client)
    assert (error.code, error.transient, error.status) == (f"HTTP_{status}", True, status)


def test_server_error_with_graphql_errors_is_transient(mocked, client):
    mocked.post(URL, status=500, json=graphql_error("INTERNAL_SERVER_ERROR"))
    error = failure(client)
    assert (error.code, error.transient) == ("INTERNAL_SERVER_ERROR", True)


@pytest.mark.parametrize("code", ["GRAPHQL_PARSE_FAILED", "BAD_USER_INPUT", None])
def test_400_with_errors_is_not_transient(mocked, client, code):
    mocked.post(URL, status=400, json=graphql_error(code, "Syntax Error"))
    error = failure(client)
    assert error.transient is False
    assert error.code == (code or "HTTP_400")
    assert error.status == 400


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token_is_transient(mocked, client, status):
    # Documented: a token someone will fix; the leads wait in the queue until then.
    mocked.post(URL, status=status, json={"message": "Unauthorized"})
    error = failure(client)
    assert (error.code, error.transient) == (f"HTTP_{status}", True)


def test_404_without_errors_is_not_transient(mocked, client):
    mocked.post(URL, status=404, body="Not found")
    error = failure(client)
    assert (error.code, error.transient) == ("HTTP_404", False)


@pytest.mark.parametrize("body", ["<html>Maintenance</html>", "", '{"unexpected": true}'])
def test_a_200_without_graphql_data_is_transient(mocked, client, body):
    mocked.post(URL, status=200, body=body, content_type="text/html")
    error = failure(client)
    assert error.code == "HTTP_200"
    assert error.transient is True


def test_a_200_without_graphql_data_is_an_error(mocked, client):
    # The part of the above that holds today: it is an error, not an order id.
    mocked.post(URL, status=200, body="<html>Maintenance</html>", content_type="text/html")
    assert failure(client).code == "HTTP_200"


def test_connection_error_is_transient_network(mocked, client):
    mocked.post(URL, body=requests.ConnectionError("refused"))
    error = failure(client)
    assert (error.code, error.transient, error.status) == ("NETWORK", True, None)


def test_read_timeout_is_transient_and_sent_once(mocked, client):
    mocked.post(URL, body=requests.ReadTimeout("read timed out"))
    error = failure(client)
    assert (error.code, error.transient) == ("NETWORK", True)
    assert len(mocked.calls) == 1  # an order must not be created twice


def test_503_is_retried_inline_for_reads(mocked, client):
    mocked.post(URL, status=503, body="busy")
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": [{"id": "48211"}]}}})
    assert client.get_order("48211") == {"id": "48211"}
    assert len(mocked.calls) == 2


def test_add_order_503_is_not_retried_inline(mocked, client):
    # A 503 may come from a proxy after SalesRender created the order: the worker looks before retrying.
    mocked.post(URL, status=503, body="busy")
    mocked.post(URL, json=CREATED)
    error = failure(client)
    assert (error.code, error.transient) == ("HTTP_503", True)
    assert len(mocked.calls) == 1


def test_429_is_retried_inline(mocked, client):
    mocked.post(URL, status=429, body="slow down")
    mocked.post(URL, json=CREATED)
    assert client.add_order(ORDER) == "48211"
    assert len(mocked.calls) == 2


def test_503_retries_are_bounded_then_transient(mocked, client):
    for _ in range(5):
        mocked.post(URL, status=503, body="busy")
    with pytest.raises(SalesRenderError) as info:
        client.get_order("1")
    assert (info.value.code, info.value.transient) == ("HTTP_503", True)
    assert len(mocked.calls) == 3  # the first try and connect_only_retry's two


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_are_not_retried_inline(mocked, client, status):
    mocked.post(URL, status=status, body="oops")
    mocked.post(URL, json=CREATED)
    assert failure(client).transient is True
    assert len(mocked.calls) == 1  # the request may have landed: the worker decides


def test_connect_only_retry_policy():
    retry = http.connect_only_retry()
    assert retry.total == 2 and retry.connect == 2 and retry.status == 2
    assert retry.read == 0 and retry.other == 0
    assert set(retry.status_forcelist) == {429, 503}
    assert not {500, 502, 504} & set(retry.status_forcelist)
    assert retry.allowed_methods is None  # POST included
    assert retry.raise_on_status is False


def test_the_client_uses_connect_only_retries():
    client = SalesRenderClient(URL, TOKEN)
    retry = client._session.get_adapter(URL).max_retries
    assert retry.read == 0 and set(retry.status_forcelist) == {429, 503}
    create = client._create_session.get_adapter(URL).max_retries
    assert create.read == 0 and create.other == 0 and set(create.status_forcelist) == {429}


def test_idempotent_retry_policy_retries_5xx():
    retry = http.idempotent_retry()
    assert {500, 502, 503, 504, 429} <= set(retry.status_forcelist)


# --- the same rules on a real socket ------------------------------------------------------------------------


class _Server:
    """A local HTTP server answering POSTs from a script: an int status, or "hang" (read, never answer)."""

    def __init__(self, script: list):
        self.script = list(script)
        self.requests: list[bytes] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                action = outer.script.pop(0) if outer.script else 500
                if action == "hang":
                    outer.release.wait(10)
                    return
                body = json.dumps(CREATED if action == 200 else {}).encode()
                self.send_response(action)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/companies/1/CRM"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_real_read_timeout_sends_the_order_once(monkeypatch, retry_sleeps):
    monkeypatch.setattr(sr, "TIMEOUT", (2, 0.2))
    with _Server(["hang", "hang", "hang"]) as server:
        with pytest.raises(SalesRenderError) as info:
            SalesRenderClient(server.url, TOKEN).add_order(ORDER)
        assert len(server.requests) == 1
    assert (info.value.code, info.value.transient) == ("NETWORK", True)
    assert retry_sleeps == []


@pytest.mark.parametrize("status", [500, 503])
def test_real_5xx_on_add_order_is_not_retried_inline(status):
    with _Server([status, 200]) as server:
        with pytest.raises(SalesRenderError):
            SalesRenderClient(server.url, TOKEN).add_order(ORDER)
        assert len(server.requests) == 1


@pytest.fixture
def retry_sleeps(monkeypatch):
    """urllib3 sleeps before each inline retry: count the retries instead of waiting for them."""
    sleeps = []
    monkeypatch.setattr(Retry, "sleep", lambda self, response=None: sleeps.append(self))
    return sleeps


def test_real_connection_refused_is_retried_then_transient_network(retry_sleeps):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: every try is refused before anything is sent.
    with pytest.raises(SalesRenderError) as info:
        SalesRenderClient(f"http://127.0.0.1:{port}/CRM", TOKEN).add_order(ORDER)
    assert (info.value.code, info.value.transient) == ("NETWORK", True)
    assert len(retry_sleeps) == 2  # refused before sending: safe, so connect_only_retry tries twice more


# --- orders.add_order_input ---------------------------------------------------------------------------------


def make_offer(**changes) -> config.Offer:
    document = {
        "id": 101, "name": "Drops", "caller_id": "+74951234567", "operators": ["200"],
        "landing_url": "https://drops.example.ru/",
        "salesrender": {"project_id": 3, "status_id": 9,
                        "fields": {"phone": "phone1", "name": "fio", "email": "mail", "comment": "note"},
                        "items": {"WATCH-01": {"item_id": 7, "variation": 2, "price_rub": 4990}},
                        "default_item": {"item_id": 1, "variation": 1, "price_rub": 1990}},
    }
    for key, value in changes.items():
        if key in ("items", "default_item", "fields"):
            document["salesrender"][key] = value
        else:
            document[key] = value
    return config.Offer.model_validate(document)


def lead(**fields) -> dict:
    return {"phone": "+79991112233", "name": "Анна", "email": "anna@example.com", "comment": "",
            "utm": {}, "formid": "", "formname": "", "products": [], **fields}


def test_minimal_order_input():
    order = add_order_input(lead(), make_offer())
    assert order["projectId"] == "3" and order["statusId"] == "9"  # ids as text
    assert order["orderData"]["phoneFields"] == [{"field": "phone1", "value": "+79991112233"}]
    assert order["orderData"]["humanNameFields"] == [
        {"field": "fio", "value": {"firstName": "Анна", "lastName": ""}}]
    assert order["orderData"]["emailFields"] == [{"field": "mail", "value": "anna@example.com"}]
    assert "stringFields" not in order["orderData"]  # nothing to comment
    assert order["source"] == {"refererUri": "https://drops.example.ru/"}


def test_referer_carries_the_utm():
    order = add_order_input(lead(utm={"utm_source": "vk", "utm_medium": "cpc"}), make_offer())
    assert order["source"]["refererUri"] == "https://drops.example.ru/?utm_source=vk&utm_medium=cpc"


def test_referer_keeps_the_landings_own_query():
    offer = make_offer(landing_url="https://drops.example.ru/land?ref=partner#form")
    order = add_order_input(lead(utm={"utm_source": "vk"}), offer)
    assert order["source"]["refererUri"] == "https://drops.example.ru/land?ref=partner&utm_source=vk#form"


def test_no_source_without_a_landing_url():
    order = add_order_input(lead(utm={"utm_source": "vk"}), make_offer(landing_url=None))
    assert "source" not in order


def test_no_landing_url_means_no_source():
    # Tilda posts from its own servers, so the customer's IP is unknown and never sent.
    order = add_order_input(lead(client_ip="203.0.113.7"), make_offer(landing_url=None))
    assert "source" not in order


def test_empty_email_and_name_are_omitted():
    order = add_order_input(lead(email="", name=""), make_offer())
    assert "emailFields" not in order["orderData"] and "humanNameFields" not in order["orderData"]


def test_fields_the_offer_does_not_map_are_omitted():
    offer = make_offer(fields={"phone": "phone", "name": None, "email": None, "comment": None})
    order = add_order_input(lead(comment="Перезвоните"), offer)
    assert set(order["orderData"]) == {"phoneFields"}


def test_comment_collects_everything_that_has_no_field():
    order = add_order_input(
        lead(comment="Перезвоните вечером", email="", email_rejected="anna@", formname="Заявка", formid="form1",
             utm={"utm_source": "vk", "utm_campaign": "spring"},
             products=[{"name": "Strap", "quantity": 2, "price_rub": 500.0, "sku": "STRAP"}]),
        make_offer())
    [field] = order["orderData"]["stringFields"]
    assert field["field"] == "note"
    assert field["value"].split("\n") == [
        "Перезвоните вечером",
        "Strap × 2 — 500 ₽",
        "e-mail (не принят): anna@",
        "Tilda: Заявка",
        "utm_campaign=spring utm_source=vk",
    ]


def test_comment_names_the_form_by_id_without_a_name():
    order = add_order_input(lead(formid="form493249737"), make_offer())
    assert order["orderData"]["stringFields"][0]["value"] == "Tilda: form493249737"


def test_comment_is_cut_at_4000():
    order = add_order_input(lead(comment="x" * 5000), make_offer())
    assert len(order["orderData"]["stringFields"][0]["value"]) == 4000


def test_the_lead_id_survives_the_cut_of_a_long_comment():
    order = add_order_input(lead(comment="x" * 5000, lead_id="lead-1"), make_offer())
    value = order["orderData"]["stringFields"][0]["value"]
    assert len(value) == 4000 and value.endswith("\ncallbridge lead: lead-1")


def test_mapped_products_become_cart_items_in_kopecks():
    products = [{"name": "Watch", "quantity": 2, "price_rub": 4500.5, "sku": "WATCH-01"},
                {"name": "Gift", "quantity": 1, "price_rub": 0.0, "sku": "WATCH-01"},
                {"name": "", "quantity": 3, "price_rub": 0.0, "sku": "UNKNOWN"}]
    order = add_order_input(lead(products=products, amount_rub=9999), make_offer())
    assert order["cart"] == {"items": [
        {"itemId": 7, "variation": 2, "quantity": 2, "price": 450050},
        {"itemId": 7, "variation": 2, "quantity": 1, "price": 499000},  # no Tilda price: the catalogue's
    ]}
    assert "UNKNOWN × 3 — 0 ₽" in order["orderData"]["stringFields"][0]["value"]


def test_default_item_uses_the_amount_when_given():
    order = add_order_input(lead(amount_rub=2490.0), make_offer())
    assert order["cart"] == {"items": [{"itemId": 1, "variation": 1, "quantity": 1, "price": 249000}]}


@pytest.mark.parametrize("amount", [None, 0, 0.0])
def test_default_item_falls_back_to_its_own_price(amount):
    order = add_order_input(lead(amount_rub=amount), make_offer())
    assert order["cart"] == {"items": [{"itemId": 1, "variation": 1, "quantity": 1, "price": 199000}]}


def test_default_item_when_only_unmapped_products():
    products = [{"name": "Strap", "quantity": 1, "price_rub": 500.0, "sku": "STRAP"}]
    order = add_order_input(lead(products=products, amount_rub=500.0), make_offer())
    assert order["cart"]["items"] == [{"itemId": 1, "variation": 1, "quantity": 1, "price": 50000}]


def test_no_cart_without_items_or_default():
    order = add_order_input(lead(amount_rub=100.0), make_offer(default_item=None))
    assert "cart" not in order


def test_kopecks_are_rounded_not_truncated():
    order = add_order_input(lead(amount_rub=19.99), make_offer())
    assert order["cart"]["items"][0]["price"] == 1999  # 19.99 * 100 is 1998.9999999999998


# --- the order read back by the order webhook (R-21) ------------------------------------------------------


def test_read_order_asks_by_id_and_never_takes_another_order(mocked, client):
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": [{"id": "48211", "status": {"group": "APPROVED"}}]}}})
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": [{"id": "5"}]}}})  # a filter the server ignored
    mocked.post(URL, json={"data": {"ordersFetcher": {"orders": []}}})
    assert client.read_order("48211", timeout=(1, 2))["status"]["group"] == "APPROVED"
    assert client.read_order("48211") is None
    assert client.read_order("7") is None
    assert json.loads(mocked.calls[0].request.body)["variables"] == {"ids": ["48211"]}


def test_the_subid_rides_on_the_referer_and_in_the_comment():
    order = add_order_input(lead(utm={"utm_source": "vk"}, subid="clk 1", lead_id="L1"), make_offer())
    assert order["source"]["refererUri"] == "https://drops.example.ru/?utm_source=vk&subid=clk+1&callbridge_lead=L1"
    assert "subid=clk 1 utm_source=vk" in order["orderData"]["stringFields"][0]["value"]


def test_an_order_read_back_tells_its_lead_phone_name_and_tags():
    from functions.providers.salesrender import orders

    lead_id = "c61841a2-a797-57f6-b2ae-7b77480039f6"
    by_referer = {"source": {"refererUri": f"https://x.example/?callbridge_lead={lead_id}"}}
    by_comment = {"data": {"stringFields": [{"field": "note", "value": f"hi\ncallbridge lead: {lead_id}"}]}}
    assert orders.lead_id_of(by_referer) == orders.lead_id_of(by_comment) == lead_id
    assert orders.lead_id_of({"source": {"refererUri": "https://x.example/?callbridge_lead=../../x"}}) is None
    order = {"data": {"phoneFields": [{"field": "phone1", "value": "+79995554433"}],
                      "humanNameFields": [{"field": "fio", "value": {"firstName": "Ольга", "lastName": "К"}}]},
             "source": {"refererUri": "https://cpa.example/?Click_ID=n-9&utm_medium=cpa", "utm_source": "net"}}
    assert orders.phone_of(order, make_offer()) == "+79995554433"
    assert orders.name_of(order, make_offer()) == "Ольга К"
    assert orders.source_tags(order) == ({"utm_source": "net", "utm_medium": "cpa"}, "n-9")
