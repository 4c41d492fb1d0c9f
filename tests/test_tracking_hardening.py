"""Call tracking when things go wrong (issue 8): a crash between an effect and its flag, an inbound call to
a support line or cut short between the lead and its queue message, a conversation longer than the channel
lease, and talk time and the budget month the same on every path. Events go through the webhook route;
crashes are faults at the AWS seam (a DynamoDB request that fails before it lands or after, an SQS send)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pytest
from conftest import receive

from functions.calling import channels, operators
from functions.core import queues, resources, store, times
from functions.providers.beeline import client as beeline
from functions.records import call_events, calls, leads, spend
from functions.tracking import reconciler

SECRET = "test-beeline-secret"
PROVIDER = "Beeline_Main"
OPERATOR = "SIP0343PU200QK@ip.beeline.ru"  # the event's targetId; the call's operator pattern too
START_MS = 1_779_987_800_000


@pytest.fixture
def webhook(client, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)

    def post(body: bytes) -> int:
        return client.http.post(f"/webhooks/beeline/{SECRET}", body=body,
                                headers={"Content-Type": "application/xml; charset=UTF-8"}).status_code

    return post


def event(event_type: str, personality: str, state: str, ext: str, *, answer_ms: int | None = None,
          release_ms: int | None = None, cause: str = "", remote: str = "tel:+79991110000",
          redirect: str | None = None) -> bytes:
    """One XSI event document as Beeline posts it (see providers/beeline.md)."""
    parts = [f"<xsi:callId>callhalf-1:0</xsi:callId><xsi:extTrackingId>{ext}</xsi:extTrackingId>",
             f"<xsi:personality>{personality}</xsi:personality><xsi:state>{state}</xsi:state>"]
    if cause:
        parts.append(f"<xsi:releaseCause><xsi:internalReleaseCause>{cause}</xsi:internalReleaseCause></xsi:releaseCause>")
    parts.append(f"<xsi:remoteParty><xsi:address>{remote}</xsi:address></xsi:remoteParty>")
    if redirect:
        parts.append("<xsi:redirections><xsi:redirection><xsi:party><xsi:address>"
                     f"{redirect}</xsi:address></xsi:party></xsi:redirection></xsi:redirections>")
    parts.append(f"<xsi:startTime>{(answer_ms or release_ms or START_MS) - 5000}</xsi:startTime>")
    if answer_ms:
        parts.append(f"<xsi:answerTime>{answer_ms}</xsi:answerTime>")
    if release_ms:
        parts.append(f"<xsi:releaseTime>{release_ms}</xsi:releaseTime>")
    return ('<?xml version="1.0" encoding="UTF-8"?><xsi:Event xmlns:xsi="http://schema.broadsoft.com/xsi" '
            'xmlns:xsi1="http://www.w3.org/2001/XMLSchema-instance" xsi1:type="xsi:SubscriptionEvent">'
            f"<xsi:eventID>{uuid.uuid4()}</xsi:eventID><xsi:sequenceNumber>1</xsi:sequenceNumber>"
            f"<xsi:subscriptionId>sub-1</xsi:subscriptionId><xsi:targetId>{OPERATOR}</xsi:targetId>"
            f'<xsi:eventData xsi1:type="xsi:{event_type}"><xsi:call>{"".join(parts)}</xsi:call></xsi:eventData>'
            "</xsi:Event>").encode()


def dialled_call(ext: str, *, phone: str = "+79991110000", holder: str | None = None,
                 taken_ago: float = 60) -> str:
    """A call as the dialer leaves it: lead, channel lease and operator taken `taken_ago` seconds ago by
    `holder` (the call id when None), claimed, open, and its extTrackingId bound."""
    lead_id = f"hard-{uuid.uuid4().hex[:10]}"
    assert leads.create({"lead_id": lead_id, "offer_id": 101, "phone": phone, "state": "dialing",
                         "created_at": times.now_iso()})
    call_id = calls.call_id_for(lead_id, 1)
    holder = holder or call_id
    taken_at = time.time() - taken_ago
    slot = channels.acquire(PROVIDER, 5, holder, now=taken_at)
    assert slot is not None and operators.reserve(OPERATOR, call_id, now=taken_at, holder=holder)
    at = dt.datetime.fromtimestamp(taken_at, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": 101, "attempt": 1, "phone": phone,
                                 "operator": OPERATOR, "channel_slot": slot, "provider": PROVIDER, "manual": False,
                                 "holder": holder, "dialing_at": at, "created_at": at})
    calls.mark_open(call_id)
    assert call_events.bind(ext, call_id, OPERATOR) == call_id
    return call_id


def answered_and_released(ext: str, talk_ms: int, answer_ms: int = START_MS) -> list[bytes]:
    return [event("CallAnsweredEvent", "Originator", "Active", ext, answer_ms=answer_ms),
            event("CallReleasedEvent", "Originator", "Released", ext, answer_ms=answer_ms,
                  release_ms=answer_ms + talk_ms)]


class DynamoFault:
    """Fails the chosen DynamoDB writes of every client the app uses: `before` ones never land (a crash
    before the request), `after` ones land and then raise (the answer lost)."""

    def __init__(self, marker: str, faults: list[str]):
        self.marker, self.faults, self.seen = marker, list(faults), []
        for client in (resources.table().meta.client, resources.client("dynamodb")):
            client.meta.events.register("before-call.dynamodb", self._before)
            client.meta.events.register("after-call.dynamodb", self._after)

    def _matches(self, model, params) -> bool:
        return model.name in ("PutItem", "UpdateItem", "TransactWriteItems") and self.marker in json.dumps(
            params, default=str)

    def _before(self, model, params, **_):
        if self._matches(model, params):
            self.seen.append(model.name)
            if self.faults and self.faults[0] == "before":
                self.faults.pop(0)
                raise RuntimeError("crash before the write")
            if self.faults and self.faults[0] == "after":
                self.faults[0] = "after:pending"

    def _after(self, model, **_):
        if self.faults and self.faults[0] == "after:pending" and model.name in self.seen[-1:]:
            self.faults.pop(0)
            raise RuntimeError("answer lost after the write")


# --- item 5: a once-only flag is written after its effect, or with it ----------------------------------------

def test_a_crash_around_the_spend_write_neither_loses_nor_doubles_the_cost(webhook):
    call_id = dialled_call("51000001:1")
    fault = DynamoFault("SPEND#", ["before", "after"])
    for body in answered_and_released("51000001:1", 75_000, answer_ms=int(time.time() * 1000) - 90_000):
        assert webhook(body) == 200  # the finish crashes at its spend write (in its transaction): stored, acknowledged
    assert not calls.get(call_id).get("effects_done")
    first = reconciler.reconcile()  # the spend write lands, its answer is lost
    second = reconciler.reconcile()  # and this pass finishes the rest
    call = calls.get(call_id)
    assert call["cost_rub"] == 4.0
    assert spend.spent(spend.month(times.parse(call["ended_at"]))) == 4.0  # once: not 0, not 8
    assert fault.faults == [] and (first["errors"], second["closed"]) == (1, 1)
    assert call["effects_done"] and channels.busy(PROVIDER, 5) == 0 and calls.open_calls() == []


def test_a_crash_at_the_post_call_send_still_gets_the_recording_job(webhook, monkeypatch):
    call_id = dialled_call("51000002:1")
    real, failures = queues.send, ["recordings"]

    def send(kind, body, delay_seconds=0):
        if kind in failures:
            failures.remove(kind)
            raise RuntimeError("SQS unreachable")
        return real(kind, body, delay_seconds)

    monkeypatch.setattr(queues, "send", send)
    for body in answered_and_released("51000002:1", 30_000):
        assert webhook(body) == 200
    assert receive("recordings") == []
    assert reconciler.reconcile()["closed"] == 1
    assert [json.loads(m["Body"]) for m in receive("recordings")] == [{"job": "recording", "call_id": call_id}]
    assert calls.get(call_id)["effects_done"]


# --- item 7: inbound calls make leads only for an offer's numbers, crash-safely --------------------------------

@pytest.mark.parametrize("known", [False, True])
def test_a_call_to_a_support_line_creates_nothing(webhook, beeline_sandbox, known):
    caller = "+79997770021"
    if known:
        assert leads.create({"lead_id": "known-lead", "source": "tilda", "offer_id": 101, "phone": caller,
                             "phone_key": caller, "state": "done", "created_at": times.now_iso()})
    ring = event("CallReceivedEvent", "Terminator", "Alerting", "88100001:1", remote=f"tel:{caller}",
                 redirect="tel:+74957770000")  # a company number, but no offer's caller_id (default_offer_id is set)
    release = event("CallReleasedEvent", "Terminator", "Released", "88100001:1", remote=f"tel:{caller}",
                    redirect="tel:+74957770000", answer_ms=START_MS, release_ms=START_MS + 90_000)
    assert webhook(ring) == 200 and webhook(release) == 200
    assert call_events.track("88100001:1")[0] is None
    assert [i for i in resources.table().scan()["Items"] if i["pk"].startswith(("CALL#", "LEAD#", "OPENCALLS"))
            and i["pk"] != "LEAD#known-lead"] == []
    assert receive("intake") == []
    assert (leads.latest_by_phone(caller) or {}).get("lead_id") == ("known-lead" if known else None)


def _failing_once(monkeypatch, module, name: str, when=lambda *a, **k: True):
    real, state = getattr(module, name), {"failed": False}

    def wrapper(*args, **kwargs):
        if not state["failed"] and when(*args, **kwargs):
            state["failed"] = True
            raise RuntimeError(f"crash in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return state


def _ring(caller: str, ext: str, **kwargs) -> bytes:
    return event("CallReceivedEvent", "Terminator", "Alerting", ext, remote=f"tel:{caller}",
                 redirect="tel:+74951234567", **kwargs)


def test_an_inbound_lead_cut_short_is_finished_by_the_next_event(webhook, beeline_sandbox, monkeypatch):
    for n, (module, name, when) in enumerate([(queues, "send", lambda kind, *a, **k: kind == "intake"),
                                             (leads, "create", lambda *a, **k: True)]):
        caller, ext = f"+7999777003{n}", f"88100002:{n}"
        state = _failing_once(monkeypatch, module, name, when)
        assert webhook(_ring(caller, ext)) == 200  # stored, then the crash (send / lead write): acknowledged
        assert state["failed"] and receive("intake") == []
        release = event("CallReleasedEvent", "Terminator", "Released", ext, remote=f"tel:{caller}",
                        redirect="tel:+74951234567", release_ms=START_MS)
        assert webhook(release) == 200
        lead = leads.latest_by_phone(caller)
        assert lead["source"] == "inbound_call" and lead["offer_id"] == 101
        assert [json.loads(m["Body"]) for m in receive("intake")] == [{"lead_id": lead["lead_id"]}], name
        call = calls.get(call_events.track(ext)[0])
        assert call["lead_id"] == lead["lead_id"] and call["outcome"] == "no_answer"


@pytest.mark.parametrize("crash", ["lead write", "intake send"])
def test_an_inbound_lead_cut_short_is_finished_by_the_reconciler(webhook, beeline_sandbox, monkeypatch, crash):
    caller, ext = "+79997770041", "88100003:1"
    if crash == "lead write":
        _failing_once(monkeypatch, leads, "create")
    else:
        _failing_once(monkeypatch, queues, "send", lambda kind, *a, **k: kind == "intake")
    assert webhook(_ring(caller, ext)) == 200  # the only event that ever comes (the rest were lost)
    assert receive("intake") == []
    reconciler.reconcile()  # a lead written a moment ago may be being queued right now: left alone
    reconciler.reconcile(now=time.time() + 300)  # five minutes on: the next scheduled pass
    lead = leads.latest_by_phone(caller)
    assert lead is not None and lead["source"] == "inbound_call"
    assert [json.loads(m["Body"]) for m in receive("intake")] == [{"lead_id": lead["lead_id"]}]
    assert reconciler.reconcile(now=time.time() + 600)["requeued"] == 0  # queued once


# --- item 8: long calls keep their channel -----------------------------------------------------------------

def _answered_long_ago(ext: str, taken_ago: float) -> str:
    """A call answered `taken_ago` seconds ago whose events since then never came: talking, lease nearly out."""
    call_id = dialled_call(ext, holder=f"delivery-{uuid.uuid4().hex[:8]}", taken_ago=taken_ago)
    answered = int((time.time() - taken_ago + 10) * 1000)
    assert call_events.store_event(beeline_event_of(event("CallAnsweredEvent", "Originator", "Active", ext,
                                                          answer_ms=answered)))
    assert calls.progress(call_id, state="talking", answered_at=times.from_epoch_ms(answered))
    return call_id


def beeline_event_of(body: bytes):
    from functions.providers.beeline.events import parse

    return parse(body)


def _held_in(seconds: float, call_id: str) -> tuple[bool, bool]:
    """(channel, operator) still held by the call `seconds` from now."""
    later = time.time() + seconds
    operator = store.get({"pk": "OPERATORS", "sk": OPERATOR}) or {}
    return (channels.busy(PROVIDER, 5, now=later) == 1,
            operator.get("busy_call") == call_id and operator.get("busy_until", 0) >= later)


def test_a_conversation_longer_than_the_lease_keeps_its_channel_and_operator(aws, beeline_sandbox):
    call_id = _answered_long_ago("58000001:1", taken_ago=19 * 60)  # a 20-minute lease: one minute left
    assert _held_in(5 * 60, call_id) == (False, False)
    counts = reconciler.reconcile()
    assert _held_in(10 * 60, call_id) == (True, True)
    assert counts["kept_alive"] == 1 and counts["errors"] == 0
    assert not operators.reserve(OPERATOR, "another-call", now=time.time() + 10 * 60)  # nobody else gets them
    assert calls.get(call_id)["state"] == "talking" and calls.open_calls() == [call_id]


def test_the_lease_is_kept_even_when_the_pass_runs_out_of_time(aws, monkeypatch):
    # The run's 10 s went on statistics look-ups of other calls (a slow Beeline): the keep-alive still ran.
    call_id = _answered_long_ago("58000002:1", taken_ago=19 * 60)
    monkeypatch.setattr(reconciler, "TIME_BUDGET_SECONDS", -1.0)
    counts = reconciler.reconcile()
    assert _held_in(10 * 60, call_id) == (True, True)
    assert counts["deferred"] == 1 and counts["kept_alive"] == 1


# --- item 11: talk time and the budget month, the same on every path -------------------------------------

def test_talk_time_is_rounded_up_the_same_from_events_and_from_statistics(webhook, beeline_sandbox):
    by_events = dialled_call("59000001:1", phone="+79991117001")
    for body in answered_and_released("59000001:1", 60_400):
        assert webhook(body) == 200

    phone = "+79991117002"
    beeline_sandbox.set_outcome(phone[2:], "answered", talk_seconds=60.4)
    lead_id = f"stat-{uuid.uuid4().hex[:8]}"
    assert leads.create({"lead_id": lead_id, "offer_id": 101, "phone": phone, "state": "dialing",
                         "created_at": times.now_iso()})
    by_statistics = calls.call_id_for(lead_id, 1)
    slot = channels.acquire(PROVIDER, 5, by_statistics)
    assert operators.reserve("201", by_statistics)
    assert calls.claim(by_statistics, {"lead_id": lead_id, "offer_id": 101, "attempt": 1, "phone": phone,
                                       "operator": "201", "channel_slot": slot, "provider": PROVIDER,
                                       "dialing_at": times.now_iso(), "created_at": times.now_iso()})
    calls.mark_open(by_statistics)
    beeline.default_client().originate("201", phone[2:])  # its events never arrive
    assert beeline_sandbox.wait_idle(10)
    assert reconciler.reconcile(now=time.time() + 1200)["settled_statistics"] == 1

    for call_id in (by_events, by_statistics):
        call = calls.get(call_id)
        assert (call["outcome"], call["talk_seconds"], call["cost_rub"]) == ("answered", 61, 4.0), call["settled_by"]


def test_a_call_just_after_midnight_in_moscow_counts_in_the_new_month(webhook):
    # 2031-12-31 21:30 UTC is 2032-01-01 00:30 in Moscow: the January budget pays for it.
    answer_ms = int(dt.datetime(2031, 12, 31, 21, 30, tzinfo=dt.UTC).timestamp() * 1000)
    call_id = dialled_call("59000002:1")
    for body in answered_and_released("59000002:1", 75_000, answer_ms=answer_ms):
        assert webhook(body) == 200
    assert calls.get(call_id)["cost_rub"] == 4.0
    assert spend.spent("2032-01") == 4.0 and spend.spent("2031-12") == 0
