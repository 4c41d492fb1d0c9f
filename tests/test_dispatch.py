"""Dispatch on release (issue 9 items 1-3): due callbacks that find no free channel or operator wait in
their offer's list, oldest first, at no provider cost, and are dialled when a call's release (after the
operator's wrap-up) or the minute's sweep frees capacity. Through the callbacks queue's handler in Lambda's
event shape, against the strict sandboxes; provider requests are counted on the wire."""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, callbacks_at_once, deliver, receive

from functions.calling import channels, dialer, dispatch
from functions.core import http, resources, store, times
from functions.records import calls, leads, waiting
from functions.tracking import tracker
from infra.local.runner import LambdaContext, schedule_event, sqs_event

FORM = "application/x-www-form-urlencoded"
PROVIDER = "Beeline_Main"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    beeline_sandbox.hold(True)  # calls stay up: each originate holds its channel and operator
    yield {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox}
    beeline_sandbox.hold(False)


@pytest.fixture
def sent(aws):
    """Every SendMessage (queue, body, delay) from here on."""
    found = []
    resources.client("sqs").meta.events.register(
        "provide-client-params.sqs.SendMessage",
        lambda params, **_: found.append({"queue": params["QueueUrl"], "body": json.loads(params["MessageBody"]),
                                          "delay": params.get("DelaySeconds", 0)}))
    return found


def small(use_config, channel_limit=1, operators=("200",), wrap_up=15, **offer):
    use_config(lambda doc: (doc["provider"].update(channel_limit=channel_limit),
                            doc["offers"][0].update(operators=list(operators), wrap_up_seconds=wrap_up, **offer)))


def new_lead(stack, n: int) -> str:
    phone = f"+7 999 222 {1000 + n:04d}"
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"d:{n}", "formid": "form493249737"})
    assert stack["client"].http.post("/webhooks/tilda", body=body,
                                     headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    return leads.lead_id_for("tilda", f"tranid:d:{n}")


def due_one_by_one(stack, n_leads: int) -> list[str]:
    """n leads whose callbacks are delivered in the order they became due (the oldest first)."""
    lead_ids = []
    for n in range(n_leads):
        lead_ids.append(new_lead(stack, n))
        time.sleep(0.002)  # distinct due times to the millisecond
    for _ in lead_ids:
        [message] = receive("callbacks", max_messages=1)
        assert deliver_message(message) is True
    return lead_ids


def deliver_message(message: dict) -> bool:
    import app
    from infra.local.runner import invoke

    sqs = resources.client("sqs")
    url = resources.queue_url("callbacks")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return invoke(sqs, url, arn, message, app.callback_worker, "callback_worker", "us-east-1")


def dialled(pbx) -> list[str]:
    """The customers' numbers in the order the PBX was asked to call them."""
    return [c["phone"] for c in pbx.calls()]


def phone10(n: int) -> str:
    return f"999222{1000 + n:04d}"


def provider_requests(stack) -> dict:
    crm = [r for r in stack["crm"].requests_log() if "ordersFetcher" in r["operation"]]
    pbx = stack["pbx"].api_requests()
    return {"crm_reads": len(crm), "agent": sum(r["operation"] == "agent" for r in pbx),
            "originate": sum(r["operation"] == "call" for r in pbx), "beeline": len(pbx)}


def callbacks_sent(sent) -> list[dict]:
    return [s for s in sent if s["queue"] == resources.queue_url("callbacks")]


def sweep() -> None:
    import app

    app.dispatch_sweeper(schedule_event("dispatch_sweeper", "us-east-1"), LambdaContext("dispatch_sweeper"))


def operator_state(pattern="200") -> dict:
    return store.get({"pk": "OPERATORS", "sk": pattern}) or {}


def deliver_at_once(count: int) -> list:
    """The next `count` callback messages, each delivered to its own callback worker, all at once."""
    messages = []
    while len(messages) < count:
        messages += receive("callbacks")
    sqs = resources.client("sqs")
    arn = sqs.get_queue_attributes(QueueUrl=resources.queue_url("callbacks"),
                                   AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return callbacks_at_once([sqs_event(m, arn, "us-east-1") for m in messages])

def test_one_channel_one_operator_three_due_leads_one_dials_the_others_wait_at_no_cost(stack, use_config, sent):
    small(use_config)
    due_one_by_one(stack, 1)
    assert dialled(stack["pbx"]) == [phone10(0)]
    first = provider_requests(stack)
    assert first["crm_reads"] == 1 and first["originate"] == 1

    lead_ids = [new_lead(stack, n) for n in (1, 2)]
    sent.clear()
    assert deliver("callbacks", "callback_worker") == [True, True]
    assert dialled(stack["pbx"]) == [phone10(0)]  # only one dials
    listed = waiting.entries(101)
    assert [e["lead_id"] for e in listed] == lead_ids  # both wait, oldest first
    # Waiting costs nothing: no re-sent callback, no provider request, however often the sweep looks.
    for _ in range(3):
        sweep()
        deliver("callbacks", "callback_worker")
    assert callbacks_sent(sent) == []
    assert provider_requests(stack) == first
    assert len(waiting.entries(101)) == 2


def test_the_release_dispatches_the_oldest_waiting_lead_after_the_wrap_up(stack, use_config, sent):
    small(use_config, wrap_up=3)
    lead_ids = due_one_by_one(stack, 3)
    assert dialled(stack["pbx"]) == [phone10(0)]
    first_call = calls.call_id_for(lead_ids[0], 1)

    sent.clear()
    assert tracker.finalize(first_call, "busy")  # the call ends (its events' job): lease and operator freed
    [trigger] = [s for s in callbacks_sent(sent) if dispatch.is_dispatch(s["body"])]
    # The offer's wrap-up: no earlier, as a pass that came early would sleep (billed) or skip the operator.
    assert trigger["delay"] == 3 and trigger["body"]["dispatch"] == "released"
    released_at = operator_state()["released_at"]
    assert operator_state()["available_at"] == pytest.approx(released_at + 3)
    assert channels.busy(PROVIDER, 1) == 0

    # During the wrap-up, a pass (here the sweep's) finds the channel free but not the operator.
    sweep()
    deliver("callbacks", "callback_worker")
    assert dialled(stack["pbx"]) == [phone10(0)]

    # The release's message, after the wrap-up: the oldest waiting lead, not the younger one.
    messages = receive("callbacks", wait=5)
    assert [json.loads(m["Body"])["dispatch"] for m in messages] == ["released"]
    assert deliver_message(messages[0]) is True
    assert dialled(stack["pbx"]) == [phone10(0), phone10(1)]
    second = calls.get(calls.call_id_for(lead_ids[1], 1))
    assert second["state"] == "dialing" and second["operator"] == "200"
    assert times.parse(second["dialing_at"]).timestamp() >= released_at + 3  # not before the wrap-up
    assert [e["lead_id"] for e in waiting.entries(101)] == [lead_ids[2]]


def test_a_pass_a_moment_early_waits_for_the_wrap_up_and_one_long_before_it_leaves_the_operator(stack, use_config):
    small(use_config, wrap_up=2)
    lead_ids = due_one_by_one(stack, 2)
    assert tracker.finalize(calls.call_id_for(lead_ids[0], 1), "busy")
    released_at = operator_state()["released_at"]
    sweep()  # the wrap-up ends in about two seconds: more than the slack, the operator is left for later
    deliver("callbacks", "callback_worker")
    assert dialled(stack["pbx"]) == [phone10(0)]
    time.sleep(max(0.0, released_at + 2 - 0.25 - time.time()))
    sweep()  # within the slack of the wrap-up's end (a clock a little ahead): waited for, then dialled
    deliver("callbacks", "callback_worker")
    assert dialled(stack["pbx"]) == [phone10(0), phone10(1)]
    second = calls.get(calls.call_id_for(lead_ids[1], 1))
    assert times.parse(second["dialing_at"]).timestamp() >= released_at + 2  # not before the wrap-up


def test_a_manual_call_waits_ahead_of_older_automatic_callbacks(stack, use_config):
    small(use_config, wrap_up=0)
    lead_ids = due_one_by_one(stack, 2)
    answer = stack["client"].http.post("/v1/calls", body=json.dumps({"phone": "+79992229999", "offer_id": 101}),
                                       headers={"Content-Type": "application/json",
                                                "Authorization": "Bearer test-api-token"})
    assert answer.status_code == 202
    call_id = json.loads(answer.body)["call_id"]
    deliver("callbacks", "callback_worker")
    assert [e["call_id"] for e in waiting.entries(101)] == [call_id, calls.call_id_for(lead_ids[1], 1)]
    tracker.finalize(calls.call_id_for(lead_ids[0], 1), "busy")
    deliver("callbacks", "callback_worker")  # the release's dispatch (no wrap-up)
    assert dialled(stack["pbx"])[-1] == "9992229999"
    assert calls.get(call_id)["state"] == "dialing"


def test_racing_dispatchers_dial_each_waiting_lead_once_and_lose_none(stack, use_config):
    small(use_config, channel_limit=5, operators=[str(200 + i) for i in range(12)], wrap_up=0)
    slots = [channels.acquire(PROVIDER, 5, f"elsewhere#{i}") for i in range(5)]  # every channel busy
    assert None not in slots
    lead_ids = due_one_by_one(stack, 7)
    assert dialled(stack["pbx"]) == [] and len(waiting.entries(101)) == 7

    for i, slot in enumerate(slots):
        assert channels.release(PROVIDER, slot, f"elsewhere#{i}")
    for _ in range(4):
        dispatch.trigger("released")
    assert deliver_at_once(4) == ["ok"] * 4

    stats = stack["pbx"].stats()
    assert stats["originates"] == 5 and stats["max_in_flight"] <= 5
    assert sorted(dialled(stack["pbx"])) == sorted(set(dialled(stack["pbx"])))  # nobody twice
    left = [e["lead_id"] for e in waiting.entries(101)]
    called = {leads.get(lead_id)["phone"][-10:] for lead_id in lead_ids if lead_id not in left}
    assert len(left) == 2 and called == set(dialled(stack["pbx"]))  # every lead dialled or still waiting
    assert left == lead_ids[5:]  # and the oldest went first
    assert all("taken_by" not in e for e in waiting.entries(101))  # no entry left locked
    counts = provider_requests(stack)  # per dialled lead: CRM order, agent status, originate
    assert counts["crm_reads"] == 5 and counts["originate"] == 5 and counts["agent"] <= 5
    assert (counts["crm_reads"] + counts["beeline"]) / 5 <= 3


def test_a_lost_trigger_and_an_expired_lease_are_caught_by_the_sweep(stack, use_config, sent):
    small(use_config, wrap_up=0)
    lead_ids = due_one_by_one(stack, 3)
    first_call = calls.call_id_for(lead_ids[0], 1)

    def lost(call):
        raise ConnectionError("SQS unreachable")

    sent.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "released", lost)
        assert tracker.finalize(first_call, "busy")  # the call ends, its dispatch is lost
    assert not [s for s in callbacks_sent(sent) if dispatch.is_dispatch(s["body"])]
    assert "dispatch_triggered" not in calls.get(first_call)
    deliver("callbacks", "callback_worker")
    assert dialled(stack["pbx"]) == [phone10(0)]

    sweep()  # the minute's safety net
    assert deliver("callbacks", "callback_worker") == [True]
    assert dialled(stack["pbx"]) == [phone10(0), phone10(1)]

    # The second call's release event is never seen: its lease (and reservation) expire by themselves.
    second = calls.get(calls.call_id_for(lead_ids[1], 1))
    later = time.time() + channels.lease_seconds() + 1
    store.update({"pk": f"CHANNELS#{PROVIDER}", "sk": f"SLOT#{second['channel_slot']:03d}"}, {"expires_at": 0})
    store.update({"pk": "OPERATORS", "sk": "200"}, {"busy_until": 0})
    assert channels.busy(PROVIDER, 1, now=later) == 0
    sweep()
    assert deliver("callbacks", "callback_worker") == [True]
    assert dialled(stack["pbx"]) == [phone10(0), phone10(1), phone10(2)]
    assert waiting.entries(101) == []


def test_operator_status_is_cached_and_an_operator_back_from_break_is_found_by_the_sweep(
        stack, use_config, monkeypatch):
    small(use_config, channel_limit=5, operators=["200", "201"], wrap_up=0)
    monkeypatch.setattr(dialer, "AGENT_STATUS_TTL_SECONDS", 300.0)  # this test's passes all fall within it
    stack["pbx"].set_agent_status("201", "BREAK")
    lead_ids = due_one_by_one(stack, 4)
    assert dialled(stack["pbx"]) == [phone10(0)]  # 200; 201 is on a break
    for _ in range(5):
        sweep()
        deliver("callbacks", "callback_worker")
    counts = provider_requests(stack)
    assert counts["agent"] == 2  # once per operator, whatever the backlog and the passes (within the TTL)
    assert [e["lead_id"] for e in waiting.entries(101)] == lead_ids[1:]

    stack["pbx"].set_agent_status("201", "ONLINE")  # back from the break: Beeline sends no event for it
    monkeypatch.setattr(dialer, "AGENT_STATUS_TTL_SECONDS", 0.0)
    dialer._status_cache.clear()
    sweep()
    deliver("callbacks", "callback_worker")
    assert dialled(stack["pbx"]) == [phone10(0), phone10(1)]  # the oldest waiting one
    counts = provider_requests(stack)
    # Per dialled lead its CRM order once and its originate once; the status once more for 201 (cache expired).
    assert (counts["crm_reads"], counts["originate"], counts["agent"]) == (2, 2, 3)


def test_an_entry_that_can_never_dial_goes_to_the_dlq_with_its_reason(stack, use_config):
    small(use_config, wrap_up=0)
    lead_ids = due_one_by_one(stack, 2)
    store.update({"pk": f"LEAD#{lead_ids[1]}", "sk": "LEAD"}, {"offer_id": 999})  # its offer is gone
    tracker.finalize(calls.call_id_for(lead_ids[0], 1), "busy")
    assert deliver("callbacks", "callback_worker") == [True]
    [parked] = receive("callbacks", dlq=True)
    assert json.loads(parked["Body"])["lead_id"] == lead_ids[1]
    assert parked["MessageAttributes"]["code"]["StringValue"] == "unknown_offer"
    assert waiting.entries(101) == []


def test_a_malformed_dispatch_request_is_parked(aws):
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("callbacks"),
                                         MessageBody=json.dumps({"dispatch": "x", "offers": "all"}))
    assert deliver("callbacks", "callback_worker") == [True]
    [parked] = receive("callbacks", dlq=True)
    assert parked["MessageAttributes"]["code"]["StringValue"] == "malformed"


# --- the client-side rate limit (core/http.py) ---------------------------------------------------------

def test_token_bucket_allows_its_burst_then_paces_then_refuses_beyond_its_wait():
    clock = [100.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    bucket = http.TokenBucket(2.0, 3, max_wait=1.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(3):
        bucket.take()
    assert slept == []  # the burst
    bucket.take()
    assert slept == [pytest.approx(0.5)]  # then 2 per second
    for _ in range(2):
        bucket._reserve()  # two more booked without waiting them out: the next would wait 1.5 s
    with pytest.raises(http.RateLimited):
        bucket.take()


def test_a_rate_limited_originate_never_reaches_beeline_and_is_retried_later(beeline_sandbox, monkeypatch):
    from functions.providers.beeline import client as beeline

    monkeypatch.setenv("RATE_LIMIT_BEELINE", "0.001/1")
    http.reset_limiters()
    try:
        client = beeline.BeelineClient(beeline_sandbox.api_url, "test-beeline-token")
        client.agent_status("200")  # the burst of one
        with pytest.raises(beeline.BeelineError) as raised:
            client.originate("200", "9992221000")
        assert raised.value.transient and not isinstance(raised.value, beeline.OriginateUncertain)
        assert [r["operation"] for r in beeline_sandbox.api_requests()] == ["agent"]
    finally:
        http.reset_limiters()


def test_a_transient_failure_puts_the_entry_back_in_its_place_with_its_own_backoff(stack, use_config):
    small(use_config, wrap_up=0)
    lead_ids = due_one_by_one(stack, 2)
    stack["crm"].add_fault(10, status=503)  # SalesRender is down when the waiting lead's turn comes
    tracker.finalize(calls.call_id_for(lead_ids[0], 1), "busy")
    assert deliver("callbacks", "callback_worker") == [False]  # the dispatch message comes back later
    [entry] = waiting.entries(101)
    assert entry["lead_id"] == lead_ids[1] and "taken_by" not in entry  # not lost, not left locked
    assert entry["failures"] == 1 and entry["not_before"] > time.time() - 1
    assert channels.busy(PROVIDER, 1) == 0 and "busy_call" not in operator_state()  # nothing kept
    assert dialled(stack["pbx"]) == [phone10(0)]
    assert calls.get(calls.call_id_for(lead_ids[1], 1)) is None  # never claimed: dialled once it works


# --- a fresh callback is dialled by its own pass without being stored in the list --------------------------

def wait_writes(requests: list) -> list[str]:
    """The writes to the waiting lists among the DynamoDB requests (Queries are reads)."""
    return [op for op, pk in requests if (pk or "").startswith("WAIT#") and op != "Query"]


def test_a_fresh_callback_with_nobody_waiting_and_capacity_free_is_dialled_without_joining(
        stack, use_config, dynamodb_requests):
    small(use_config, channel_limit=2, operators=("200", "201"), wrap_up=0)
    lead_id = new_lead(stack, 0)
    dynamodb_requests.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    assert dialled(stack["pbx"]) == [phone10(0)]
    assert calls.get(calls.call_id_for(lead_id, 1))["state"] == "dialing"
    # No join, lock or removal of a WAIT# item: the list's heads are only read.
    assert wait_writes(dynamodb_requests) == []
    assert [op for op, pk in dynamodb_requests if pk == "WAIT#101"].count("Query") >= 1
    assert waiting.entries(101) == []


def test_a_fresh_callback_joins_behind_a_waiting_lead_which_dials_first(stack, use_config, dynamodb_requests):
    small(use_config, wrap_up=0)
    elsewhere = channels.acquire(PROVIDER, 1, "elsewhere#0")  # the one channel busy: the first lead waits
    older = new_lead(stack, 0)
    assert deliver("callbacks", "callback_worker") == [True]
    assert [e["lead_id"] for e in waiting.entries(101)] == [older]
    assert channels.release(PROVIDER, elsewhere, "elsewhere#0")  # freed, its release's pass not yet run

    younger = new_lead(stack, 1)
    dynamodb_requests.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    assert dialled(stack["pbx"]) == [phone10(0)]  # the waiting lead, not the fresh one
    assert [e["lead_id"] for e in waiting.entries(101)] == [younger]  # which now waits behind it
    assert calls.get(calls.call_id_for(younger, 1)) is None
    assert wait_writes(dynamodb_requests).count("PutItem") == 1  # the fresh one's join


def test_a_fresh_callback_that_finds_no_channel_reads_again_after_joining(stack, use_config, monkeypatch):
    """A release whose own pass ran between this pass's look at the channels and its join (so that pass saw
    nothing waiting) must not strand the lead until the sweep: the pass looks again after the join."""
    small(use_config, wrap_up=0)
    elsewhere = channels.acquire(PROVIDER, 1, "elsewhere#0")
    real_join = waiting.join

    def join_then_release(*args, **kwargs):
        joined = real_join(*args, **kwargs)
        channels.release(PROVIDER, elsewhere, "elsewhere#0")  # as if freed just before the join landed
        return joined

    monkeypatch.setattr(waiting, "join", join_then_release)
    new_lead(stack, 0)
    assert deliver("callbacks", "callback_worker") == [True]
    assert dialled(stack["pbx"]) == [phone10(0)]  # in the same delivery, from the list it joined
    assert waiting.entries(101) == []


def test_two_fresh_callbacks_at_once_for_one_channel_one_dials_and_the_other_waits(stack, use_config):
    small(use_config, channel_limit=1, operators=("200", "201"), wrap_up=0)
    lead_ids = [new_lead(stack, n) for n in (0, 1)]
    assert deliver_at_once(2) == ["ok"] * 2
    assert len(dialled(stack["pbx"])) == 1
    [left] = waiting.entries(101)
    called = {leads.get(lead_id)["phone"][-10:] for lead_id in lead_ids if lead_id != left["lead_id"]}
    assert called == set(dialled(stack["pbx"]))  # one dialled, the other listed: none lost
    assert "taken_by" not in left


class Crash(BaseException):
    """The Lambda dies here (not an exception the code handles)."""


def test_a_crash_after_the_claim_leaves_no_entry_and_its_redelivery_dials_nothing(stack, use_config, monkeypatch):
    small(use_config, wrap_up=0)
    lead_id = new_lead(stack, 0)
    [message] = receive("callbacks")

    def crash(call_id):
        raise Crash()

    with monkeypatch.context() as mp:
        mp.setattr(calls, "mark_open", crash)  # the first thing after the claim
        with pytest.raises(Crash):
            deliver_message(message)
    call_id = calls.call_id_for(lead_id, 1)
    assert calls.get(call_id)["state"] == "dialing"  # claimed, never originated
    assert waiting.entries(101) == []  # nothing stored for it: the message itself is what comes back

    assert deliver_message(message) is True  # the redelivery: the claim refuses a second dial
    assert dialled(stack["pbx"]) == []
    assert waiting.entries(101) == []


def test_a_failure_before_the_join_leaves_the_message_to_be_retried(stack, use_config, monkeypatch):
    small(use_config, wrap_up=0)
    elsewhere = channels.acquire(PROVIDER, 1, "elsewhere#0")  # the channel busy: the fresh one must join
    new_lead(stack, 0)
    [message] = receive("callbacks")

    def unavailable(*args, **kwargs):
        raise ConnectionError("DynamoDB unreachable")

    with monkeypatch.context() as mp:
        mp.setattr(waiting, "join", unavailable)
        assert deliver_message(message) is False  # not acknowledged: SQS delivers it again
    assert waiting.entries(101) == []
    assert deliver_message(message) is True
    body = json.loads(message["Body"])
    joined = body.get("call_id") or calls.call_id_for(body["lead_id"], 1)
    assert [e["call_id"] for e in waiting.entries(101)] == [joined]
    assert channels.release(PROVIDER, elsewhere, "elsewhere#0")
