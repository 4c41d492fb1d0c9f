"""The call reconciler: open calls that the events did not end are settled from stored events, from
Beeline's statistics, or expired, and each time the channel, the operator and the retry policy follow."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pytest
from conftest import receive

from functions.calling import channels, operators
from functions.core import queues, store, times
from functions.providers.beeline import client as beeline
from functions.providers.beeline.events import CallData, XsiEvent
from functions.records import call_events, calls, leads
from functions.tracking import reconciler

PROVIDER = "Beeline_Main"
OPERATOR_USER_ID = "SIP0343PU200QK@ip.beeline.ru"  # extension 200 in the conftest sandbox


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_call(phone: str = "+79991110000", operator: str = "200", ago: float = 7200,
              dialing_at: str | None = None) -> str:
    """A claimed, dialled call holding a channel slot and its operator, as the dialer leaves it."""
    lead_id = f"rec-{uuid.uuid4().hex[:10]}"
    assert leads.create({"lead_id": lead_id, "offer_id": 101, "phone": phone, "state": "dialing",
                         "created_at": times.now_iso()})
    call_id = calls.call_id_for(lead_id, 1)
    slot = channels.acquire(PROVIDER, 5, call_id)
    assert slot is not None and operators.reserve(operator, call_id)
    at = dialing_at or _iso(time.time() - ago)
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": 101, "attempt": 1, "phone": phone,
                                 "operator": operator, "channel_slot": slot, "provider": PROVIDER, "manual": False,
                                 "dialing_at": at, "created_at": at})
    calls.mark_open(call_id)
    return call_id


def operator_free(operator: str = "200") -> bool:
    return "busy_call" not in (store.get({"pk": "OPERATORS", "sk": operator}) or {})


@pytest.fixture
def sent(monkeypatch):
    """Every queue message sent, with its delay (moto hides delayed messages from receive)."""
    messages: list[tuple[str, dict, int]] = []
    real = queues.send

    def capture(kind, body, delay_seconds=0):
        messages.append((kind, body, delay_seconds))
        return real(kind, body, delay_seconds)

    monkeypatch.setattr(queues, "send", capture)
    return messages


def stored_release(call_id: str, ext: str, *, answered: bool = True) -> None:
    """The call's events as the webhook stores them, the release included, but never applied."""
    start = 1_779_987_800_000
    legs = [CallData(call_id="callhalf-1:0", ext_tracking_id=ext, personality="Click-to-Dial", state="Alerting",
                     start_ms=start),
            CallData(call_id="callhalf-1:0", ext_tracking_id=ext, personality="Originator", state="Released",
                     start_ms=start, answer_ms=start + 10_000 if answered else None, release_ms=start + 52_000,
                     releasing_party="remoteRelease")]
    for leg, kind in zip(legs, ("CallOriginatedEvent", "CallReleasedEvent"), strict=True):
        assert call_events.store_event(XsiEvent(event_id=str(uuid.uuid4()), event_type=kind,
                                                target_id=OPERATOR_USER_ID, call=leg))
    assert call_events.bind(ext, call_id, OPERATOR_USER_ID) == call_id


def test_a_stuck_call_without_statistics_expires_and_frees_everything(aws, beeline_sandbox, sent):
    call_id = open_call(ago=7200)
    assert channels.busy(PROVIDER, 5) == 1 and not operator_free()
    counts = reconciler.reconcile()
    assert counts["checked"] == 1 and counts["expired"] == 1 and counts["settled_statistics"] == 0
    call = calls.get(call_id)
    assert (call["state"], call["outcome"], call["settled_by"]) == ("ended", "failed", "expired")
    assert channels.busy(PROVIDER, 5) == 0 and operator_free()
    assert calls.open_calls() == []
    [(_, retry, delay)] = [m for m in sent if m[0] == "callbacks" and "dispatch" not in m[1]]
    assert retry["lead_id"] == call["lead_id"] and retry["attempt"] == 2 and retry["reason"] == "failed"
    assert delay == 600  # the offer's retry interval for "failed"
    assert leads.get(call["lead_id"])["state"] == "callback_scheduled"
    assert [json.loads(m["Body"]) for m in receive("recordings")] == [{"job": "writeback", "call_id": call_id}]
    assert reconciler.reconcile()["checked"] == 0  # settled once


def test_past_the_limit_but_not_expired_stays_open(aws, beeline_sandbox, sent):
    call_id = open_call(ago=1200)  # 20 minutes: looked up, nothing found, not yet an hour
    counts = reconciler.reconcile()
    assert counts["checked"] == 1 and counts["expired"] == 0 and counts["errors"] == 0
    assert calls.get(call_id)["state"] == "dialing" and calls.open_calls() == [call_id]
    assert channels.busy(PROVIDER, 5) == 1 and sent == []


def test_stored_but_unapplied_events_settle_the_call(aws):
    call_id = open_call(ago=60)  # recent: events are applied whatever the age
    stored_release(call_id, "55000001:1")
    assert calls.get(call_id)["state"] == "dialing"
    counts = reconciler.reconcile()
    assert counts["refreshed"] == 1 and counts["settled_events"] == 1 and counts["errors"] == 0
    call = calls.get(call_id)
    assert (call["outcome"], call["talk_seconds"], call["settled_by"]) == ("answered", 42, "events")
    assert channels.busy(PROVIDER, 5) == 0 and operator_free() and calls.open_calls() == []
    assert leads.get(call["lead_id"])["state"] == "done"


@pytest.mark.parametrize("phone,outcome,talk", [("+79991117777", "answered", 12),
                                                ("+79991117703", "operator_missed", 0)])
def test_a_call_found_in_the_statistics_is_settled_from_them(aws, beeline_sandbox, sent, phone, outcome, talk):
    if outcome == "answered":
        beeline_sandbox.set_outcome(phone[2:], "answered", talk_seconds=12)
    dialing_at = times.now_iso()
    ours = open_call(phone, "200", dialing_at=dialing_at)
    other_operator = open_call(phone, "201", dialing_at=dialing_at)  # same number, another abonent: no row
    beeline.default_client().originate("200", phone[2:])  # the real call, whose events never came
    assert beeline_sandbox.wait_idle(10)

    counts = reconciler.reconcile(now=time.time() + 1200)  # 20 minutes later
    assert counts["settled_statistics"] == 1 and counts["expired"] == 0 and counts["errors"] == 0
    call = calls.get(ours)
    assert (call["outcome"], call["talk_seconds"], call["settled_by"]) == (outcome, talk, "statistics")
    assert call["cost_rub"] == (2.0 if talk else 0)  # one started minute x 2 RUB
    assert calls.get(other_operator)["state"] == "dialing"
    assert calls.open_calls() == [other_operator]
    assert operator_free("200") and not operator_free("201") and channels.busy(PROVIDER, 5) == 1
    retries = [m for m in sent if m[0] == "callbacks" and "dispatch" not in m[1]]
    assert len(retries) == (0 if outcome == "answered" else 1)
    # The freed channel and operator go to a waiting lead once the operator's wrap-up (15 s) is over.
    assert [m for m in sent if m[0] == "callbacks" and "dispatch" in m[1]] == [
        ("callbacks", {"dispatch": "released"}, 15)]


def test_a_recent_call_is_left_alone(aws):
    # No sandbox: a statistics lookup would fail against beeline.invalid and count as an error.
    call_id = open_call(ago=120)
    counts = reconciler.reconcile()
    assert counts == {**dict.fromkeys(counts, 0), "checked": 1}
    assert calls.get(call_id)["state"] == "dialing" and calls.open_calls() == [call_id]
    assert channels.busy(PROVIDER, 5) == 1 and not operator_free()


def test_an_ended_call_leaves_the_open_list(aws):
    call_id = open_call(ago=60)
    assert calls.finish(call_id, "busy")
    calls.update(call_id, effects_done=True)
    assert reconciler.reconcile()["closed"] == 1
    assert calls.open_calls() == []


def test_a_call_put_back_in_the_queue_is_not_expired(aws, beeline_sandbox, sent):
    call_id = open_call(ago=7200)
    operators.release("200", call_id)
    channels.release(PROVIDER, int(calls.get(call_id)["channel_slot"]), call_id)
    assert calls.unclaim(call_id)  # the originate never reached Beeline: the queue retries it
    assert reconciler.reconcile()["closed"] == 1
    assert calls.get(call_id)["state"] == "queued" and calls.open_calls() == [] and sent == []


def test_an_ended_call_with_interrupted_consequences_gets_them(aws, sent):
    call_id = open_call(ago=60)
    assert calls.finish(call_id, "busy")  # and the Lambda died before freeing anything
    assert reconciler.reconcile()["closed"] == 1
    assert calls.open_calls() == [] and channels.busy(PROVIDER, 5) == 0 and operator_free()
    [(_, retry, delay)] = [m for m in sent if m[0] == "callbacks" and "dispatch" not in m[1]]
    assert retry["attempt"] == 2 and retry["reason"] == "busy" and delay == 600


def test_a_beeline_error_skips_only_that_call(aws, beeline_sandbox, no_http_backoff, sent):
    broken = open_call("+79991110001", "200", ago=7200)
    healthy = open_call("+79991110002", "201", ago=60)
    stored_release(healthy, "55000002:1", answered=False)
    beeline_sandbox.add_fault(count=100, status=503, operation="statistics")
    counts = reconciler.reconcile()
    assert counts["checked"] == 2 and counts["errors"] == 1 and counts["settled_events"] == 1
    assert counts["expired"] == 0
    assert calls.get(broken)["state"] == "dialing" and calls.open_calls() == [broken]  # not expired blind
    assert calls.get(healthy)["outcome"] == "no_answer"


def test_a_broken_call_item_does_not_stop_the_run(aws, monkeypatch):
    first, second = open_call(ago=60), open_call("+79991110003", "201", ago=60)
    stored_release(second, "55000003:1")
    real = calls.get
    monkeypatch.setattr(calls, "get", lambda cid: (_ for _ in ()).throw(RuntimeError("boom")) if cid == first
                        else real(cid))
    counts = reconciler.reconcile()
    assert counts["errors"] == 1 and counts["settled_events"] == 1
    assert real(second)["outcome"] == "answered"
