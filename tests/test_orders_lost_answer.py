"""A lost answer never doubles an order (issue 8, item 2; R-7).

The SalesRender sandbox carries `addOrder` out and then loses the answer (answers after the client gave
up, drops the connection, answers a 5xx). The intake worker's retry must find the order it made,
through `ordersFetcher`, before it sends a second `addOrder`.
"""

from __future__ import annotations

import json

import pytest
import responses
from conftest import deliver, post_lead
from responses import registries

from functions.core import queues
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender.orders import made_for_lead
from functions.records import leads

FORM = "application/x-www-form-urlencoded"
LOST_ANSWERS = {
    "answer_too_late": {"carry_out": True, "delay_seconds": 1.5},
    "connection_dropped": {"carry_out": True, "drop_connection": True},
    "502_after_acting": {"carry_out": True, "status": 502},
    "503_after_acting": {"carry_out": True, "status": 503},
    "500_after_acting": {"carry_out": True, "status": 500},
}


@pytest.fixture
def worker(client, salesrender_sandbox, monkeypatch):
    """A posted lead, failed deliveries back at once, and a client that gives up on an answer after 0.5 s."""
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    monkeypatch.setattr(salesrender, "TIMEOUT", (2, 0.5))
    return salesrender_sandbox




def operations(sandbox) -> list[str]:
    return [op for entry in sandbox.requests_log() for op in entry["operation"]]


@pytest.mark.parametrize("fault", LOST_ANSWERS.values(), ids=LOST_ANSWERS.keys())
def test_an_order_whose_answer_was_lost_is_found_not_created_again(client, worker, fault):
    lead_id = post_lead(client)
    worker.add_fault(1, operation="addOrder", **fault)
    assert deliver("intake", "intake_worker") == [False]  # the worker cannot know: it retries
    [made] = worker.orders()  # ...but SalesRender did create the order

    assert deliver("intake", "intake_worker") == [True]
    assert [o["id"] for o in worker.orders()] == [made["id"]]
    assert leads.get(lead_id)["order_id"] == made["id"]
    assert operations(worker).count("orderMutation.addOrder") == 1
    assert operations(worker)[-1] == "ordersFetcher"  # the retry looked, and found it


def test_an_order_that_did_not_land_is_added_after_the_look_up(client, worker):
    lead_id = post_lead(client)
    worker.add_fault(1, operation="addOrder", status=500)  # refused before acting
    assert deliver("intake", "intake_worker") == [False]
    assert worker.orders() == []
    assert deliver("intake", "intake_worker") == [True]
    [order] = worker.orders()
    assert leads.get(lead_id)["order_id"] == order["id"]
    assert operations(worker) == ["orderMutation.addOrder", "ordersFetcher", "orderMutation.addOrder"]


def test_no_second_add_order_while_the_look_up_fails(client, worker):
    post_lead(client)
    worker.add_fault(1, operation="addOrder", carry_out=True, drop_connection=True)
    assert deliver("intake", "intake_worker") == [False]
    worker.add_fault(2, operation="ordersFetcher", status=500)
    assert deliver("intake", "intake_worker") == [False]
    assert deliver("intake", "intake_worker") == [False]
    assert operations(worker).count("orderMutation.addOrder") == 1  # never blind
    assert deliver("intake", "intake_worker") == [True]
    assert len(worker.orders()) == 1


def test_other_leads_orders_are_not_taken_for_this_one(client, worker):
    first = post_lead(client)
    assert deliver("intake", "intake_worker") == [True]
    second = post_lead(client, "tilda_cart_urlencoded.txt")  # offer 102: no landing_url, found by its comment
    worker.add_fault(1, operation="addOrder", carry_out=True, status=502)
    assert deliver("intake", "intake_worker") == [False]
    assert deliver("intake", "intake_worker") == [True]
    orders = {o["id"]: o for o in worker.orders()}
    assert len(orders) == 2 and leads.get(first)["order_id"] != leads.get(second)["order_id"]
    mine = orders[leads.get(second)["order_id"]]
    assert mine["projectId"] == "2" and not mine["source"]  # found by the comment line alone


def test_the_look_up_reads_the_newest_pages_whichever_way_the_api_sorts():
    """The sort order of ordersFetcher is not documented: newest first reads pages 1.., oldest first the last."""
    url = "https://salesrender.test/companies/1/CRM"

    def page(ids, pages):
        return {"data": {"ordersFetcher": {"orders": [{"id": str(i), "data": {"stringFields": []},
                                                       "source": None} for i in ids],
                                           "pageInfo": {"pagesCount": pages}}}}

    mine = {"id": "7", "data": {"stringFields": [{"field": "comment", "value": "x\ncallbridge lead: L1"}]}}
    with responses.RequestsMock(registry=registries.OrderedRegistry) as rsps:
        # oldest first: page 1 holds ids 1..3, the order is on the last page (5)
        rsps.post(url, json=page([1, 2, 3], 5))
        rsps.post(url, json={"data": {"ordersFetcher": {"orders": [mine], "pageInfo": {"pagesCount": 5}}}})
        found = salesrender.SalesRenderClient(url, "t").find_order(lambda o: made_for_lead(o, "L1"))
        assert found == "7"
        assert [json.loads(c.request.body)["variables"]["pageNumber"] for c in rsps.calls] == [1, 5]
    with responses.RequestsMock(registry=registries.OrderedRegistry) as rsps:
        # newest first: pages 1, 2, 3 and nothing more
        for ids in ([30, 29], [28, 27], [26, 25]):
            rsps.post(url, json=page(ids, 50))
        assert salesrender.SalesRenderClient(url, "t").find_order(lambda o: made_for_lead(o, "L1")) is None
        assert [json.loads(c.request.body)["variables"]["pageNumber"] for c in rsps.calls] == [1, 2, 3]


def test_an_order_is_recognised_by_its_referer_or_its_comment_line_only():
    assert made_for_lead({"source": {"refererUri": "https://x.ru/?utm_source=vk&callbridge_lead=L1"}}, "L1")
    assert made_for_lead({"data": {"stringFields": [{"field": "c", "value": "hi\ncallbridge lead: L1"}]}}, "L1")
    assert not made_for_lead({"source": {"refererUri": "https://x.ru/?callbridge_lead=L12"}}, "L1")
    assert not made_for_lead({"data": {"stringFields": [{"field": "c", "value": "callbridge lead: L12"}]}}, "L1")
    assert not made_for_lead({"source": None, "data": None}, "L1")
