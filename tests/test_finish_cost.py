"""A finished call's cost is counted in its finish transaction, the recent-calls feed is a plain put after it,
and a talking call's channel lease and operator are extended only once they are past a third of their period:
fewer capacity units per call, the same guarantees (each fact counted once, nothing lost to a crash).
Calls come from the Beeline sandbox's real simulation and their events through the webhook."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from conftest import EventSink
from test_call_tracking import SECRET, place_call, post_event

from functions.calling import channels
from functions.core import resources, store, times
from functions.providers.beeline import client as beeline
from functions.records import alert_marks, calls, daily, spend
from functions.tracking import reconciler, tracker

PROVIDER = "Beeline_Main"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    """As tests/test_call_tracking.py's: the sandbox's events of each call are captured to be posted."""
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    sink = EventSink()
    beeline.default_client().subscribe(sink.url, 3600)
    yield {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox, "sink": sink}
    sink.server.shutdown()


class Fault:
    """Fail DynamoDB writes whose request mentions `marker`: "before" (nothing written) or "after" (written,
    the answer lost), one fault per matching request, in order."""

    def __init__(self, marker: str, faults: list[str]):
        self.marker, self.faults, self.hit = marker, list(faults), []
        self.clients = (resources.table().meta.client, resources.client("dynamodb"))
        for client in self.clients:
            client.meta.events.register("before-call.dynamodb", self._before)
            client.meta.events.register("after-call.dynamodb", self._after)

    def _before(self, model, params, **_):
        if model.name in ("PutItem", "UpdateItem", "TransactWriteItems") and self.marker in json.dumps(
                params, default=str) and self.faults:
            self.hit.append(model.name)
            if self.faults[0] == "before":
                self.faults.pop(0)
                raise RuntimeError("crash before the write")
            self.faults[0] = "after:pending"

    def _after(self, model, **_):
        if self.faults and self.faults[0] == "after:pending":
            self.faults.pop(0)
            raise RuntimeError("answer lost after the write")

    def remove(self):
        for client in self.clients:
            client.meta.events.unregister("before-call.dynamodb", self._before)
            client.meta.events.unregister("after-call.dynamodb", self._after)


@pytest.fixture
def small_budget(use_config):
    # 4 RUB (one 75 s call) is 80% of it: the owner alert shows whether the cost was reported.
    use_config(lambda doc: doc["budget"].update(monthly_rub=5, alert_thresholds=[0.8, 1.0]))


def _day_cost(call: dict) -> float:
    return daily.days(call["offer_id"], call["counted_day"], call["counted_day"])[call["counted_day"]]["cost_rub"]


def _feed(call_id: str) -> list[dict]:
    return [item for item in daily.recent_calls(daily.RECENT_CAP) if item["call_id"] == call_id]


def _counted_once(call_id: str) -> dict:
    call = calls.get(call_id)
    month = spend.month(times.parse(call["ended_at"]))
    assert call["cost_rub"] == 4.0 and call["cost_counted"] and call["effects_done"]
    assert spend.spent(month) == 4.0 and _day_cost(call) == 4.0  # once: not 0, not 8
    assert store.get({"pk": f"SPEND#{month}", "sk": "TOTAL"})["calls"] == 1
    assert len(_feed(call_id)) == 1
    assert alert_marks.budget_was_sent(alert_marks.budget_sent(month), 0.8)
    assert channels.busy(PROVIDER, 5) == 0 and calls.open_calls() == []
    return call


def test_an_answered_call_ends_in_one_transaction_that_counts_its_cost(stack, small_budget, dynamodb_requests):
    _, call_id, events = place_call(stack)
    dynamodb_requests.clear()
    for body in events:
        assert post_event(stack["client"], body).status_code == 200
    ops = [op for op, _ in dynamodb_requests]
    assert ops.count("TransactWriteItems") == 1  # was 2: the finish, then the cost
    assert ("PutItem", daily.RECENT_PK) in dynamodb_requests  # the feed: a plain put, not a transaction item
    call = _counted_once(call_id)
    assert call["outcome"] == "answered" and call["talk_seconds"] == 75

    # The final event again, every event again, and the tracker once more: nothing is counted twice.
    dynamodb_requests.clear()
    for body in [events[-1], *events]:
        assert post_event(stack["client"], body).status_code == 200
    tracker.finalize(call_id, "answered", talk_seconds=75)
    assert "TransactWriteItems" not in [op for op, _ in dynamodb_requests]
    _counted_once(call_id)


def test_an_unanswered_call_ends_in_one_transaction_and_costs_nothing(stack, dynamodb_requests):
    _, call_id, events = place_call(stack, "+79991115501")  # busy
    dynamodb_requests.clear()
    for body in events:
        assert post_event(stack["client"], body).status_code == 200
    assert [op for op, _ in dynamodb_requests].count("TransactWriteItems") == 1
    assert ("PutItem", daily.RECENT_PK) in dynamodb_requests
    assert not [pk for _, pk in dynamodb_requests if (pk or "").startswith("SPEND#")]
    call = calls.get(call_id)
    assert call["outcome"] == "busy" and not call.get("cost_counted") and call["effects_done"]
    assert spend.spent(spend.month(times.parse(call["ended_at"]))) == 0 and _day_cost(call) == 0
    assert len(_feed(call_id)) == 1


@pytest.mark.parametrize("marker,faults", [
    ("SPEND#", ["before"]),                # the finish transaction never written
    ("SPEND#", ["after"]),                 # written, its answer lost: the finish is not repeated
    (daily.RECENT_PK, ["before"]),         # finished, the feed put not written
    (daily.RECENT_PK, ["after"]),          # finished and listed, the answer lost
    (daily.RECENT_PK, ["before", "before"]),  # and the first repair fails too
])
def test_a_crash_around_the_finish_neither_loses_nor_doubles_the_cost_or_the_feed_item(
        stack, small_budget, marker, faults):
    _, call_id, events = place_call(stack)
    fault = Fault(marker, faults)
    try:
        for body in events:
            assert post_event(stack["client"], body).status_code == 200  # a crash is stored and acknowledged
        assert not calls.get(call_id).get("effects_done")
        for _ in range(3):  # the reconciler heals what the events left (one pass per injected crash at most)
            reconciler.reconcile()
    finally:
        fault.remove()
    assert fault.faults == [] and fault.hit
    if marker == daily.RECENT_PK:  # the crash hit the feed's own put, after the finish
        assert set(fault.hit) == {"PutItem"} and calls.get(call_id)["cost_counted"]
    _counted_once(call_id)


def test_a_cost_the_finish_did_not_count_is_counted_once_by_the_tracker(stack, small_budget):
    """A finish that knew no cost (the dialer's, an older deployment's) leaves it to add_call_cost, once."""
    _, call_id, events = place_call(stack)
    for body in events[:-1]:
        post_event(stack["client"], body)
    assert calls.finish(call_id, "answered", talk_seconds=75, ended_at=times.now_iso())  # no cost_rub
    assert not calls.get(call_id).get("cost_counted")
    assert calls.update(call_id, cost_rub=4.0)
    tracker.finalize(call_id, "answered", talk_seconds=75)
    tracker.finalize(call_id, "answered", talk_seconds=75)
    _counted_once(call_id)


# --- keep_alive: nothing written while the lease is young ---------------------------------------------------

def _writes(requests: list, prefix: str) -> list:
    return [op for op, pk in requests if op == "UpdateItem" and (pk or "").startswith(prefix)]


def _slot(call: dict) -> dict:
    return store.get({"pk": f"CHANNELS#{call['provider']}", "sk": f"SLOT#{int(call['channel_slot']):03d}"})


def _operator(call: dict) -> dict:
    return store.get({"pk": "OPERATORS", "sk": call["operator"]})


@pytest.mark.parametrize("age_minutes,extended", [(1, False), (6, False), (7, True), (30, True)])
def test_a_talking_event_extends_the_lease_and_operator_only_past_a_third_of_the_lease(
        stack, dynamodb_requests, age_minutes, extended):
    _, call_id, events = place_call(stack)
    dialing_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=age_minutes)
    assert calls.update(call_id, dialing_at=times.iso(dialing_at))
    for body in events[:2]:
        post_event(stack["client"], body)
    call = calls.get(call_id)
    # What the claim took, aged like the call (a full lease period from dialling).
    expires = int(dialing_at.timestamp()) + channels.lease_seconds()
    assert store.update({"pk": f"CHANNELS#{call['provider']}", "sk": f"SLOT#{int(call['channel_slot']):03d}"},
                        {"expires_at": expires})
    assert store.update({"pk": "OPERATORS", "sk": call["operator"]}, {"busy_until": expires})
    dynamodb_requests.clear()
    assert post_event(stack["client"], events[2]).status_code == 200  # the answer: talking
    assert calls.get(call_id)["state"] == "talking"
    now = time.time()
    if extended:
        assert len(_writes(dynamodb_requests, "CHANNELS#")) == 1 and len(_writes(dynamodb_requests, "OPERATORS")) == 1
        assert _slot(call)["expires_at"] >= int(now) + channels.lease_seconds() - 5
        assert _operator(call)["busy_until"] >= int(now) + channels.lease_seconds() - 5
    else:
        assert _writes(dynamodb_requests, "CHANNELS#") == [] and _writes(dynamodb_requests, "OPERATORS") == []
        # Left as the claim took them: two thirds of the period still to go.
        assert _slot(call)["expires_at"] == expires > now + channels.lease_seconds() * 2 / 3
        assert _operator(call)["busy_until"] == expires
    post_event(stack["client"], events[3])
    assert calls.get(call_id)["state"] == "ended" and channels.busy(PROVIDER, 5) == 0


def test_the_reconciler_keeps_a_silent_long_call_alive_in_time(stack, dynamodb_requests):
    """A call that sends nothing after its answer: young passes write nothing, and the first pass past a
    third of the lease extends both, while the claim's lease has time left for one more pass."""
    _, call_id, events = place_call(stack)
    for body in events[:3]:
        post_event(stack["client"], body)
    call = calls.get(call_id)
    assert call["state"] == "talking"
    lease = channels.lease_seconds()
    for age in range(0, lease + 1, 300):  # a pass every 5 minutes, as if the call was dialled `age` s ago
        dialing_at = time.time() - age
        assert calls.update(call_id, dialing_at=times.iso(dt.datetime.fromtimestamp(dialing_at, dt.UTC)))
        dynamodb_requests.clear()
        assert reconciler.reconcile()["kept_alive"] == 1
        written = bool(_writes(dynamodb_requests, "CHANNELS#")) and bool(_writes(dynamodb_requests, "OPERATORS"))
        assert written == (age >= lease / 3), age
        if written:  # extended from now: a full period again
            assert _slot(call)["expires_at"] >= int(time.time()) + lease - 5
            break
        # Skipped: the claim's lease (taken at dialling) lasts beyond the next two passes (one may fail).
        assert dialing_at + lease > time.time() + 600
    else:
        pytest.fail("never extended")
    assert calls.get(call_id)["state"] == "talking"
