"""Call tracking from Beeline's XSI events (R-15, R-17, R-18): the webhook, the state machine per
extTrackingId, and what a finished call sets off. Event documents come from the Beeline sandbox's
real simulation (captured by a small HTTP sink subscribed to it), then fed to the app in any order."""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, EventSink, deliver, receive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functions.calling import channels, operators
from functions.core import store, times
from functions.providers.beeline import client as beeline
from functions.records import call_events, calls, leads, spend
from functions.tracking import beeline_webhook, tracker

SECRET = "test-beeline-secret"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def pbx(beeline_sandbox, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    sink = EventSink()
    beeline.default_client().subscribe(sink.url, 3600)
    yield beeline_sandbox, sink
    sink.server.shutdown()


@pytest.fixture
def stack(client, salesrender_sandbox, pbx, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    return {"client": client, "crm": salesrender_sandbox, "pbx": pbx[0], "sink": pbx[1]}


def place_call(stack, phone="+79991115555", n=0):
    """Tilda post -> intake -> dialer: the sandbox simulates the call; returns (lead_id, call_id, events)."""
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"ct:{n}:{phone}", "formid": "form493249737"})
    assert stack["client"].http.post("/webhooks/tilda", body=body,
                                     headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    before = len(stack["sink"].bodies)
    assert deliver("callbacks", "callback_worker") == [True]
    assert stack["pbx"].wait_idle(10)
    lead_id = leads.lead_id_for("tilda", f"tranid:ct:{n}:{phone}")
    return lead_id, calls.call_id_for(lead_id, 1), stack["sink"].bodies[before:]


def _bound(ext: str) -> str | None:
    return call_events.track(ext)[0]


def post_event(client, body: bytes, secret=SECRET):
    return client.http.post(f"/webhooks/beeline/{secret}", body=body,
                            headers={"Content-Type": "application/xml; charset=UTF-8"})


def test_answered_call_is_tracked_to_its_end(stack):
    lead_id, call_id, events = place_call(stack)
    assert [re.search(rb'eventData xsi1:type="xsi:(\w+)"', e).group(1) for e in events] == [
        b"CallOriginatedEvent", b"CallOriginatedEvent", b"CallAnsweredEvent", b"CallReleasedEvent"]
    states = []
    for body in events:
        assert post_event(stack["client"], body).status_code == 200
        states.append(calls.get(call_id)["state"])
    assert states == ["ringing", "ringing", "talking", "ended"]
    call = calls.get(call_id)
    assert call["outcome"] == "answered" and call["talk_seconds"] == 75
    assert call["cost_rub"] == 4.0  # 75 s = 2 started minutes x 2 RUB
    assert spend.spent() == 4.0
    assert leads.get(lead_id)["state"] == "done"
    assert channels.busy("Beeline_Main", 5) == 0
    assert "busy_call" not in (store.get({"pk": "OPERATORS", "sk": "200"}) or {})
    [job] = [json.loads(m["Body"]) for m in receive("recordings")]
    assert job == {"job": "recording", "call_id": call_id}


def test_an_event_reads_its_call_binding_and_legs_once_and_the_end_reads_the_call_once(stack, dynamodb_requests):
    """Issue 9: each event is one Query of its call's partition (binding and legs together); the end's
    consequences use the call as the finish left it."""
    _, call_id, events = place_call(stack)
    dynamodb_requests.clear()
    for body in events:
        assert post_event(stack["client"], body).status_code == 200
    tracks = [op for op, pk in dynamodb_requests if (pk or "").startswith("TRACK#")]
    assert tracks.count("Query") == len(events) and "GetItem" not in tracks
    # The first event's look for its call, and the finish's own read (the rest use what these returned).
    assert [op for op, pk in dynamodb_requests if pk == f"CALL#{call_id}"].count("GetItem") == 2
    assert calls.get(call_id)["state"] == "ended"


@pytest.mark.parametrize("phone,outcome", [("+79991115501", "busy"), ("+79991115502", "no_answer"),
                                           ("+79991115503", "operator_missed"), ("+79991115504", "failed")])
def test_unanswered_outcomes_free_the_channel_and_schedule_the_retry(stack, phone, outcome):
    lead_id, call_id, events = place_call(stack, phone)
    for body in events:
        post_event(stack["client"], body)
    call = calls.get(call_id)
    assert call["outcome"] == outcome and call["talk_seconds"] == 0 and call["cost_rub"] == 0
    assert channels.busy("Beeline_Main", 5) == 0
    [retry] = [json.loads(m["Body"]) for m in receive("callbacks")] or [None]
    assert retry is None  # the retry waits its 600 s interval
    assert leads.get(lead_id)["retry_2_at"]
    [job] = [json.loads(m["Body"]) for m in receive("recordings")]
    assert job == {"job": "writeback", "call_id": call_id}


def _rewrite(bodies: list[bytes], ext: str, salt: str) -> list[bytes]:
    """The same call under a fresh extTrackingId and fresh eventIDs (copies keep equal ids)."""
    out = []
    for body in bodies:
        text = re.sub(rb"<xsi:extTrackingId>[^<]*<", f"<xsi:extTrackingId>{ext}<".encode(), body)
        text = re.sub(rb"<xsi:eventID>([^<]*)<",
                      lambda m: b"<xsi:eventID>" + str(uuid.uuid5(uuid.NAMESPACE_URL, salt + m.group(1).decode()))
                      .encode() + b"<", text)
        out.append(text)
    return out


def _fresh_call(n: int) -> str:
    """A dialled call waiting for its events: lead, lease, operator 200 reserved, call claimed."""
    lead_id = f"prop-lead-{n}-{uuid.uuid4().hex[:6]}"
    call_id = calls.call_id_for(lead_id, 1)
    leads.create({"lead_id": lead_id, "offer_id": 101, "phone": "+79991115555", "state": "dialing",
                  "created_at": times.now_iso()})
    slot = channels.acquire("Beeline_Main", 5, call_id)
    operators.release("200", (store.get({"pk": "OPERATORS", "sk": "200"}) or {}).get("busy_call", ""))
    # The previous example's call ended a moment ago: its wrap-up is not what this test is about.
    store.update({"pk": "OPERATORS", "sk": "200"}, {}, remove=("available_at",))
    assert operators.reserve("200", call_id)
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": 101, "attempt": 1, "phone": "+79991115555",
                                 "operator": "200", "channel_slot": slot, "provider": "Beeline_Main"})
    calls.mark_open(call_id)
    return call_id


@pytest.mark.parametrize("phone", ["+79991115555", "+79991115501", "+79991115503"])
def test_any_order_and_duplication_of_events_ends_the_same(stack, phone):
    """Property (hypothesis): shuffled and duplicated real event sequences reach one final state,
    and its consequences (spend, retry, post-call job) happen once."""
    _, reference_id, events = place_call(stack, phone)
    for body in events:
        post_event(stack["client"], body)
    reference = calls.get(reference_id)
    counter = iter(range(10_000))

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.integers(0, len(events) - 1), min_size=len(events), max_size=3 * len(events))
           .filter(lambda picks: set(picks) == set(range(len(events)))), st.randoms())
    def check(picks, rnd):
        n = next(counter)
        call_id = _fresh_call(n)
        ext = f"9{n:07d}:1"
        docs = _rewrite(events, ext, salt=str(n))
        sequence = [docs[i] for i in picks]
        rnd.shuffle(sequence)
        spent_before = spend.spent()
        sent_before = len(receive_all_jobs())
        for body in sequence:
            assert beeline_webhook.receive(SECRET, body, "127.0.0.1").status == 200
        call = calls.get(call_id)
        for key in ("state", "outcome", "talk_seconds", "cost_rub", "answered_at", "ended_at"):
            assert call.get(key) == reference.get(key), key
        assert spend.spent() - spent_before == pytest.approx(reference["cost_rub"] or 0)
        assert len(receive_all_jobs()) - sent_before == 1
        assert _bound(ext) == call_id

    check()


_JOBS: list[str] = []


def receive_all_jobs() -> list[str]:
    """Post-call jobs seen so far (accumulated: receive() hides what it read)."""
    _JOBS.extend(m["MessageId"] for m in receive("recordings"))
    return list(_JOBS)


@pytest.fixture(autouse=True)
def _reset_jobs():
    _JOBS.clear()


def test_wrong_secret_is_404_and_stores_nothing(client, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    body = _event("CallAnsweredEvent", "Originator", "Active", answer=True)
    assert post_event(client, body, secret="wrong").status_code == 404
    from functions.core import resources

    assert resources.table().scan()["Items"] == []


def test_caller_outside_the_allowlist_is_403(client, monkeypatch, use_config):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    use_config(lambda doc: doc["provider"].update(webhook_cidrs=["10.0.0.0/8"]))
    response = post_event(client, _event("CallAnsweredEvent", "Originator", "Active", answer=True))
    assert response.status_code == 403


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><xsi:Event xmlns:xsi="x">&c;</xsi:Event>',
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Event>&e;</Event>',
    b"<not-closed>",
    b"",
    b"<Event><eventData/></Event>",
])
def test_hostile_or_broken_xml_is_400(client, monkeypatch, body):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    response = post_event(client, body)
    assert response.status_code == 400 and response.json_body["field"] == "body"


def test_unknown_types_and_duplicates_are_acknowledged_once(client, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    hook = _event("HookStatusEvent", None, None)
    assert post_event(client, hook).status_code == 200
    body = _event("CallUpdatedEvent", "Originator", "Active", answer=True)
    assert post_event(client, body).status_code == 200
    assert post_event(client, body).status_code == 200
    from functions.core import resources

    stored = [i for i in resources.table().scan()["Items"] if i["sk"].startswith("EVENT#")]
    assert len(stored) == 1


def _event(event_type, personality, state, *, ext="77000001:1", answer=False, release=False, cause="",
           remote="tel:+79991115555", target="SIP0343PU200QK@ip.beeline.ru", redirect=None, event_id=None,
           prefix="xsi") -> bytes:
    call = ""
    if personality:
        p = prefix
        parts = [f"<{p}:callId>callhalf-1:0</{p}:callId>", f"<{p}:extTrackingId>{ext}</{p}:extTrackingId>",
                 f"<{p}:personality>{personality}</{p}:personality>", f"<{p}:state>{state}</{p}:state>"]
        if cause:
            parts.append(f"<{p}:releaseCause><{p}:internalReleaseCause>{cause}</{p}:internalReleaseCause>"
                         f"</{p}:releaseCause>")
        parts.append(f"<{prefix}:remoteParty><{prefix}:address>{remote}</{prefix}:address></{prefix}:remoteParty>")
        if redirect:
            parts.append(f"<{prefix}:redirections><{prefix}:redirection><{prefix}:party><{prefix}:address>{redirect}"
                         f"</{prefix}:address></{prefix}:party></{prefix}:redirection></{prefix}:redirections>")
        parts.append(f"<{prefix}:startTime>1779987800000</{prefix}:startTime>")
        if answer:
            parts.append(f"<{prefix}:answerTime>1779987810000</{prefix}:answerTime>")
        if release:
            parts.append(f"<{prefix}:releaseTime>1779987850000</{prefix}:releaseTime>")
        call = f"<{prefix}:call>{''.join(parts)}</{prefix}:call>"
    return (f'<?xml version="1.0" encoding="UTF-8"?><{prefix}:Event xmlns:{prefix}="http://schema.broadsoft.com/xsi" '
            f'xmlns:t="http://www.w3.org/2001/XMLSchema-instance" t:type="{prefix}:SubscriptionEvent">'
            f"<{prefix}:eventID>{event_id or uuid.uuid4()}</{prefix}:eventID>"
            f"<{prefix}:sequenceNumber>1</{prefix}:sequenceNumber>"
            f"<{prefix}:subscriptionId>sub-1</{prefix}:subscriptionId><{prefix}:targetId>{target}</{prefix}:targetId>"
            f'<{prefix}:eventData t:type="{prefix}:{event_type}">{call}</{prefix}:eventData></{prefix}:Event>').encode()


def test_namespace_prefixes_do_not_matter(client, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    body = _event("CallUpdatedEvent", "Originator", "Active", answer=True, prefix="ns7")
    assert post_event(client, body).status_code == 200
    from functions.core import resources

    [stored] = [i for i in resources.table().scan()["Items"] if i["sk"].startswith("EVENT#")]
    assert stored["pk"] == "TRACK#77000001:1" and stored["leg"]["personality"] == "Originator"


def test_inbound_call_from_an_unknown_number_creates_a_lead_and_an_order(client, salesrender_sandbox, pbx):
    ring = _event("CallReceivedEvent", "Terminator", "Alerting", ext="88000001:1", remote="tel:+79997770011",
                  redirect="tel:+74951234567")
    assert post_event(client, ring).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    [order] = salesrender_sandbox.orders()
    assert order["orderData"]["phoneFields"][0]["value"] == "+79997770011"
    lead = leads.latest_by_phone("+79997770011")
    assert lead["source"] == "inbound_call" and lead["offer_id"] == 101  # +74951234567 is offer 101's number
    release = _event("CallReleasedEvent", "Terminator", "Released", ext="88000001:1", remote="tel:+79997770011",
                     redirect="tel:+74951234567", answer=True, release=True)
    assert post_event(client, release).status_code == 200
    call = calls.get(_bound("88000001:1"))
    assert call["direction"] == "inbound" and call["outcome"] == "answered" and call["talk_seconds"] == 40
    assert leads.get(lead["lead_id"])["called_by_person_at"]  # the dialer will not call them back


def test_inbound_call_from_a_known_number_attaches_to_its_lead(stack):
    lead_id, _, _ = place_call(stack, "+79991115566")
    ring = _event("CallReceivedEvent", "Terminator", "Alerting", ext="88000002:1", remote="tel:+79991115566",
                  redirect="tel:+74951234568")
    assert post_event(stack["client"], ring).status_code == 200
    call = calls.get(_bound("88000002:1"))
    assert call["lead_id"] == lead_id
    assert receive("intake") == []  # no second lead, no second order


def test_events_for_no_known_call_are_kept_not_failed(client, pbx):
    body = _event("CallOriginatedEvent", "Click-to-Dial", "Alerting", ext="99000001:1", target="nobody@x")
    assert post_event(client, body).status_code == 200
    assert _bound("99000001:1") is None


def test_a_failure_after_storing_is_acknowledged_and_healed_by_the_next_event(stack, monkeypatch):
    _, call_id, events = place_call(stack)
    real = tracker.refresh
    monkeypatch.setattr(tracker, "refresh", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert post_event(stack["client"], events[-1]).status_code == 200  # the release, first and failing
    monkeypatch.setattr(tracker, "refresh", real)
    assert calls.get(call_id)["state"] != "ended"
    post_event(stack["client"], events[0])
    assert calls.get(call_id)["outcome"] == "answered"


# --- an originate whose answer names the call: bound in the call's one write --------------------------------

def _dial_due_lead(stack, phone: str, n: int) -> tuple[str, str]:
    body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"ct:{n}:{phone}", "formid": "form493249737"})
    assert stack["client"].http.post("/webhooks/tilda", body=body,
                                     headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    lead_id = leads.lead_id_for("tilda", f"tranid:ct:{n}:{phone}")
    return lead_id, calls.call_id_for(lead_id, 1)


def test_an_originate_that_returns_its_ext_tracking_id_costs_one_call_update_and_binds(stack, dynamodb_requests,
                                                                                      monkeypatch):
    monkeypatch.setattr(stack["pbx"], "originate_body", "text")  # Beeline's answer: the extTrackingId
    _, call_id = _dial_due_lead(stack, "+79991115601", 60)
    before = len(stack["sink"].bodies)
    dynamodb_requests.clear()
    assert deliver("callbacks", "callback_worker") == [True]
    dialling = list(dynamodb_requests)
    call = calls.get(call_id)
    ext = call["ext_tracking_id"]
    assert call["originate_response"] == ext and call["originated_at"]
    assert _bound(ext) == call_id
    # The claim is a transaction; after the originate, one UpdateItem says both "originated" and "bound".
    assert [op for op, pk in dialling if pk == f"CALL#{call_id}"].count("UpdateItem") == 1
    assert [op for op, pk in dialling if pk == f"TRACK#{ext}"] == ["PutItem"]
    assert stack["pbx"].wait_idle(10)
    for body in stack["sink"].bodies[before:]:
        assert post_event(stack["client"], body).status_code == 200
    assert calls.get(call_id)["state"] == "ended" and calls.get(call_id)["ext_tracking_id"] == ext


def test_events_that_bind_the_call_before_the_originate_answers_keep_their_binding(stack, monkeypatch):
    """The call events may come before the originate's answer: they bind the call through its operator; the
    dialer's own binding then loses, and the call still gets its originated_at, bound to nothing else."""
    monkeypatch.setattr(stack["pbx"], "originate_body", "text")
    _, call_id = _dial_due_lead(stack, "+79991115602", 61)
    before = len(stack["sink"].bodies)
    real_originate = beeline.BeelineClient.originate
    first_event = []

    def events_first(self, pattern, digits):
        answer = real_originate(self, pattern, digits)
        deadline = time.monotonic() + 5
        while len(stack["sink"].bodies) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        first_event.append(stack["sink"].bodies[before])
        assert post_event(stack["client"], first_event[0]).status_code == 200  # while the dialer waits
        return answer

    monkeypatch.setattr(beeline.BeelineClient, "originate", events_first)
    assert deliver("callbacks", "callback_worker") == [True]
    call = calls.get(call_id)
    ext = call["originate_response"]
    assert call["ext_tracking_id"] == ext and call["operator"] == "200" and call["originated_at"]
    assert call.get("target_id")  # written by the events' binding (through the operator), not the dialer's
    assert _bound(ext) == call_id and call["state"] == "ringing"  # the event's state, not undone
    # A later binding of that id (to any call) changes nothing: the first one wins.
    assert call_events.bind(ext, str(uuid.uuid4()), originated_at="later") == call_id
    assert _bound(ext) == call_id
    assert stack["pbx"].wait_idle(10)
    for body in stack["sink"].bodies[before + 1:]:
        assert post_event(stack["client"], body).status_code == 200
    assert calls.get(call_id)["state"] == "ended"
