"""The dialer through the callbacks queue's handler (Lambda-shaped events from moto) against the
strict Beeline and SalesRender sandboxes (R-10, R-11, R-12)."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pytest
from conftest import TILDA_KEY, callbacks_at_once, deliver, receive

from functions.calling import dialer, dnc, retry_policy
from functions.core import resources
from functions.records import calls, leads, spend, waiting
from infra.local.runner import sqs_event

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    return {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox}


@pytest.fixture
def sent(aws):
    calls_ = []
    resources.client("sqs").meta.events.register(
        "provide-client-params.sqs.SendMessage", lambda params, **_: calls_.append(dict(params)))
    return calls_


def new_lead(stack, n: int = 0, phone: str | None = None, formid: str = "form493249737") -> str:
    """A Tilda post taken through the intake worker: the lead has its order and its callback is due."""
    phone = phone or f"+7 999 111 {1000 + n:04d}"
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"t:{n}:{phone}", "formid": formid})
    assert stack["client"].http.post("/webhooks/tilda", body=body,
                                     headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    return leads.lead_id_for("tilda", f"tranid:t:{n}:{phone}")


def originates(pbx) -> list[dict]:
    return pbx.calls()


def test_due_callback_originates_one_call_to_the_first_operator(stack):
    lead_id = new_lead(stack)
    assert deliver("callbacks", "callback_worker") == [True]
    [call] = originates(stack["pbx"])
    assert call["pattern"] == "200" and call["phone"] == "9991111000"
    record = calls.get(calls.call_id_for(lead_id, 1))
    assert record["state"] in ("dialing", "ringing", "talking", "ended") and record["operator"] == "200"
    assert leads.get(lead_id)["attempts"] == 1


def test_a_callback_dialled_at_once_reads_its_lead_and_call_once(stack, dynamodb_requests):
    """Issue 9: the delivery that joins the waiting list and is dialled by its own pass reuses the lead and the
    call it has just read and checked; the claim takes that lead too."""
    lead_id = new_lead(stack)
    call_id = calls.call_id_for(lead_id, 1)
    dynamodb_requests.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    assert len(originates(stack["pbx"])) == 1
    assert [op for op, pk in dynamodb_requests if pk == f"LEAD#{lead_id}"].count("GetItem") == 1
    assert [op for op, pk in dynamodb_requests if pk == f"CALL#{call_id}"].count("GetItem") == 1


def test_round_robin_alternates_operators_and_skips_busy_ones(stack):
    for n in range(3):
        new_lead(stack, n)
        deliver("callbacks", "callback_worker")
    # 200, 201; then the turn is 200's again, but 200 is still on its call (nobody released it).
    assert [c["pattern"] for c in originates(stack["pbx"])] == ["200", "201"]
    assert len(receive("callbacks")) == 0  # the third waits in the list (no re-send) for a free operator
    assert len(waiting.entries(101)) == 1


def test_order_no_longer_processing_is_not_called(stack):
    lead_id = new_lead(stack)
    stack["crm"].set_order_status(leads.get(lead_id)["order_id"], "3")  # a manager cancelled it
    assert deliver("callbacks", "callback_worker") == [True]
    assert originates(stack["pbx"]) == []
    lead = leads.get(lead_id)
    assert lead["state"] == "closed" and lead["finished_reason"] == "crm_status_canceled"


def test_outside_working_hours_is_rescheduled_to_the_next_opening(stack, use_config, sent):
    local = dt.datetime.now(ZoneInfo("Europe/Moscow"))
    tomorrow = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][(local.weekday() + 1) % 7]
    use_config(lambda doc: doc["offers"][0]["working_hours"].update(days={tomorrow: "10:00-18:00"}))
    lead_id = new_lead(stack)
    sent.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    assert originates(stack["pbx"]) == []
    [again] = [json.loads(p["MessageBody"]) for p in sent]
    opening = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(10), tzinfo=ZoneInfo("Europe/Moscow"))
    assert again["lead_id"] == lead_id and again["attempt"] == 1
    assert dt.datetime.fromisoformat(again["due_at"].replace("Z", "+00:00")) == opening
    assert sent[0]["DelaySeconds"] == 900  # the rest in hops


def test_not_yet_due_callback_hops_without_calling(stack, sent):
    lead_id = new_lead(stack)
    receive("callbacks")  # drop the due one
    due = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    sent.clear()
    assert dialer.process({"lead_id": lead_id, "attempt": 1, "due_at": due.isoformat(), "reason": "x"}) == "hopped"
    assert sent[0]["DelaySeconds"] == 900 and originates(stack["pbx"]) == []


def test_do_not_call_list_stops_the_call(stack):
    lead_id = new_lead(stack)
    dnc.add("+79991111000", "asked not to be called")
    assert deliver("callbacks", "callback_worker") == [True]
    assert originates(stack["pbx"]) == [] and leads.get(lead_id)["state"] == "do_not_call"


def test_spent_budget_stops_automatic_callbacks_until_the_budget_allows_again(stack, sent, use_config):
    lead_id = new_lead(stack)
    spend.add(5000.0)
    sent.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    assert originates(stack["pbx"]) == []
    lead = leads.get(lead_id)
    assert lead["state"] == "budget_waiting" and lead["waiting_reason"] == "budget_exhausted"
    assert "finished_at" not in lead  # waiting, not finished
    [again] = sent
    body = json.loads(again["MessageBody"])
    assert body["lead_id"] == lead_id and body["attempt"] == 1 and body["reason"] == "budget_exhausted"
    assert again["DelaySeconds"] == dialer.BUDGET_RECHECK_SECONDS
    # Looked at again while nothing changed: it waits on.
    assert dialer.process(body, now=dt.datetime.fromisoformat(body["due_at"])) == "budget_waiting"
    # The budget is raised: the next look dials it.
    use_config(lambda doc: doc["budget"].update(monthly_rub=10000))
    assert dialer.process(body, now=dt.datetime.fromisoformat(body["due_at"])) == "originated"
    assert len(originates(stack["pbx"])) == 1 and leads.get(lead_id)["state"] == "dialing"


def test_a_lead_stopped_by_the_budget_resumes_with_the_new_month(stack, sent):
    lead_id = new_lead(stack)
    now = dt.datetime.now(dt.UTC)
    spend.add(5000.0, spend.month(now))
    receive("callbacks")
    message = {"lead_id": lead_id, "attempt": 1, "due_at": now.isoformat(), "reason": "new_lead"}
    assert dialer.process(message, now=now) == "budget_waiting"
    later = now + dt.timedelta(days=40)  # next month's spend is its own: nothing spent yet
    assert spend.month(later) != spend.month(now)
    assert dialer.process({**message, "due_at": later.isoformat()}, now=later) == "originated"


def test_operator_on_break_is_skipped(stack):
    stack["pbx"].set_agent_status("200", "BREAK")
    new_lead(stack)
    deliver("callbacks", "callback_worker")
    assert [c["pattern"] for c in originates(stack["pbx"])] == ["201"]


def test_least_recently_called_picks_the_longest_idle_operator(stack, use_config):
    from functions.calling import operators

    use_config(lambda doc: doc["offers"][0].update(distribution="least_recently_called",
                                                   operators=["200", "201", "202"]))
    for n in range(4):
        lead_id = new_lead(stack, n)
        deliver("callbacks", "callback_worker")
        call = calls.get(calls.call_id_for(lead_id, 1))
        operators.release(call["operator"], call["holder"])  # the call ended (the call tracker's job)
    # Each in turn, then the one idle longest again.
    assert [c["pattern"] for c in originates(stack["pbx"])] == ["200", "201", "202", "200"]


def _callback_events(n_leads: int, stack) -> list[dict]:
    """n due callback messages as Lambda would deliver them (received, not yet deleted)."""
    for n in range(n_leads):
        new_lead(stack, n)
    messages = []
    while len(messages) < n_leads:
        got = receive("callbacks")
        assert got, "callbacks missing"
        messages += got
    sqs = resources.client("sqs")
    url = resources.queue_url("callbacks")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return [sqs_event(m, arn, "us-east-1") for m in messages]


def test_twelve_concurrent_callbacks_never_exceed_five_channels(stack, use_config, sent):
    operators_12 = [str(200 + i) for i in range(12)]
    use_config(lambda doc: (doc["provider"].update(channel_limit=5),
                            doc["offers"][0].update(operators=operators_12)))
    stack["pbx"].hold(True)  # calls stay up: every originate holds its channel
    events = _callback_events(12, stack)
    sent.clear()
    assert callbacks_at_once(events) == ["ok"] * 12
    stats = stack["pbx"].stats()
    assert stats["originates"] == 5 and stats["max_in_flight"] <= 5
    # The other seven wait in the offer's list, oldest first: no callback is re-sent to itself.
    assert [p for p in sent if p["QueueUrl"] == resources.queue_url("callbacks")] == []
    assert len(waiting.entries(101)) == 7
    stack["pbx"].hold(False)


def test_same_callback_delivered_three_times_concurrently_dials_once(stack):
    [event] = _callback_events(1, stack)
    [record] = event["Records"]
    copies = [{"Records": [{**record, "messageId": f"copy-{i}"}]} for i in range(3)]
    assert callbacks_at_once(copies) == ["ok"] * 3
    assert len(originates(stack["pbx"])) == 1
    assert leads.get(leads.lead_id_for("tilda", "tranid:t:0:+7 999 111 1000"))["attempts"] == 1


def test_attempt_beyond_the_cap_is_not_dialled(stack):
    lead_id = new_lead(stack)
    receive("callbacks")
    now = dt.datetime.now(dt.UTC)
    assert dialer.process({"lead_id": lead_id, "attempt": 4, "due_at": now.isoformat()}) == "max_attempts"
    assert originates(stack["pbx"]) == [] and leads.get(lead_id)["state"] == "exhausted"


def test_originate_that_never_landed_is_retried_and_dials_once(stack, monkeypatch):
    from functions.core import queues

    monkeypatch.setattr(queues, "backoff_seconds", lambda n: 0)
    lead_id = new_lead(stack)
    stack["pbx"].add_fault(3, status=503, operation="call")  # 503 is retried inline twice, then the queue
    assert deliver("callbacks", "callback_worker") == [False]
    assert calls.get(calls.call_id_for(lead_id, 1))["state"] == "queued"
    assert deliver("callbacks", "callback_worker") == [True]
    assert len(originates(stack["pbx"])) == 1


def test_uncertain_originate_is_never_dialled_again(stack, monkeypatch):
    from functions.providers.beeline import client as beeline

    monkeypatch.setattr(beeline, "TIMEOUT", (1, 0.3))
    beeline.default_client.cache_clear()
    lead_id = new_lead(stack)
    stack["pbx"].add_fault(1, delay_seconds=1.0, operation="call")
    [message] = receive("callbacks")
    body = json.loads(message["Body"])
    assert dialer.process(body) == "uncertain"
    assert dialer.process(body) == "duplicate"
    stack["pbx"].wait_idle(10)
    assert len(originates(stack["pbx"])) <= 1
    assert calls.get(calls.call_id_for(lead_id, 1))["originate_uncertain"] is True


@pytest.mark.parametrize("outcome", ["busy", "no_answer", "operator_missed", "failed"])
def test_retryable_outcome_schedules_the_next_attempt_after_its_interval(stack, sent, outcome):
    lead_id = new_lead(stack)
    deliver("callbacks", "callback_worker")
    call_id = calls.call_id_for(lead_id, 1)
    calls.finish(call_id, outcome)
    sent.clear()
    assert retry_policy.on_outcome(call_id) == "retry_scheduled"
    assert retry_policy.on_outcome(call_id) == "already_scheduled"  # a duplicate event changes nothing
    [retry] = sent
    body = json.loads(retry["MessageBody"])
    assert body["attempt"] == 2 and body["reason"] == outcome and retry["DelaySeconds"] == 600


def test_answered_finishes_the_lead_and_the_last_attempt_exhausts_it(stack):
    lead_id = new_lead(stack)
    deliver("callbacks", "callback_worker")
    call_id = calls.call_id_for(lead_id, 1)
    calls.finish(call_id, "answered", talk_seconds=75)
    assert retry_policy.on_outcome(call_id) == "done" and leads.get(lead_id)["state"] == "done"
    last = calls.call_id_for(lead_id, 3)
    calls.claim(last, {"lead_id": lead_id, "offer_id": 101, "attempt": 3, "phone": "+79991111000"})
    calls.finish(last, "busy")
    assert retry_policy.on_outcome(last) == "exhausted"


def test_callback_messages_in_lambda_shape_are_validated(aws):
    for body in ({"attempt": 1}, {"lead_id": "x", "attempt": 0}, {"lead_id": "x", "attempt": 1, "due_at": "soon"}):
        resources.client("sqs").send_message(QueueUrl=resources.queue_url("callbacks"), MessageBody=json.dumps(body))
    assert deliver("callbacks", "callback_worker") == [True, True, True]
    assert len(receive("callbacks", dlq=True)) == 3


def test_a_lease_whose_release_was_lost_expires_by_itself(aws, monkeypatch):
    from functions.calling import channels

    monkeypatch.setenv("CHANNEL_LEASE_SECONDS", "60")
    t0 = 1_800_000_000
    assert sorted(channels.acquire("Beeline_Main", 2, f"call-{i}", now=t0) for i in range(2)) == [0, 1]
    assert channels.acquire("Beeline_Main", 2, "call-late", now=t0 + 59) is None
    assert channels.busy("Beeline_Main", 2, now=t0 + 59) == 2
    # Nobody released them; a minute later they are free again.
    slot = channels.acquire("Beeline_Main", 2, "call-late", now=t0 + 61)
    assert slot is not None
    assert channels.release("Beeline_Main", slot, "call-0") is False  # only the holder releases
    assert channels.release("Beeline_Main", slot, "call-late") is True


def test_a_caller_that_read_the_free_slots_tries_only_those(aws):
    """A dispatch pass reads the slots first and spends no conditional write on one it saw held."""
    from functions.calling import channels

    assert channels.acquire("Beeline_Main", 3, "pass-a", candidates=[2]) == 2
    assert channels.free("Beeline_Main", 3) == [0, 1]
    # Its candidate was taken meanwhile: no other slot is tried (the pass stops; the slot's taker dials).
    assert channels.acquire("Beeline_Main", 3, "pass-b", candidates=[2]) is None
    assert channels.free("Beeline_Main", 3) == [0, 1] and channels.busy("Beeline_Main", 3) == 1
