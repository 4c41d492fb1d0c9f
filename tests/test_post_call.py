"""Recordings and the SalesRender write-back (R-19): the recordings queue's two jobs against the strict
Beeline and SalesRender sandboxes, with the MP3 of a call the Beeline sandbox really simulated."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import pytest
from conftest import TILDA_KEY, EventSink, bodies, deliver, receive

from functions.core import config, links, resources, store, times
from functions.core.queues import Poison, Transient
from functions.postcall import recorder, write_back
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender.orders import add_order_input
from functions.records import calls, leads

PHONE = "+79991112255"  # ends in 55: the sandbox answers it


@pytest.fixture
def crm(aws, salesrender_sandbox, monkeypatch):
    monkeypatch.setenv("RECORDING_LINK_SECRET", "test-link-secret")
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://calls.example.test")
    return salesrender_sandbox


@pytest.fixture
def env(crm, beeline_sandbox):
    beeline_sandbox.time_scale = 0.001  # a 75 s call plays in under 0.1 s
    return {"crm": crm, "pbx": beeline_sandbox}


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def make_lead(phone: str = PHONE, order: bool = True) -> str:
    """A lead as the intake worker leaves it, with its order in the SalesRender sandbox."""
    lead_id = f"lead-{uuid.uuid4().hex[:10]}"
    lead = {"lead_id": lead_id, "source": "test", "state": "ordered", "offer_id": 101, "phone": phone,
            "name": "Анна", "created_at": times.now_iso()}
    if order:
        lead["order_id"] = salesrender.default_client().add_order(add_order_input(lead, config.load().offer(101)))
    assert leads.create(lead)
    return lead_id


def wait_recorded(pbx, ext: str) -> None:
    # wait_idle() can return just before the sandbox files the recording (it does so after the release).
    deadline = time.monotonic() + 5
    while not any(r["externalId"] == ext for r in pbx.records()):
        assert time.monotonic() < deadline, "the sandbox stored no recording"
        time.sleep(0.005)


def pbx_call(pbx, phone: str = PHONE, talk: float | None = None) -> dict:
    """Originate on the Beeline sandbox and let it play out: the call, with its recording filed."""
    digits = phone[-10:]
    if talk is not None:
        pbx.set_outcome(digits, "answered", talk_seconds=talk)
    beeline.default_client().originate("200", digits)
    assert pbx.wait_idle()
    simulated = pbx.calls()[-1]
    if pbx.recording_delay_seconds == 0:
        wait_recorded(pbx, simulated["ext_tracking_id"])
    return simulated


OPERATOR_USER_ID = "SIP0343PU200QK@ip.beeline.ru"  # abonent 200 of the conftest sandbox
_FROM_PBX = "as the simulated call"


def make_call(lead_id: str, simulated: dict | None = None, attempt: int = 1, *, outcome: str = "answered",
              talk: int = 75, ended_at: dt.datetime | None = None, ext: str | None = None,
              target_id: str | None = _FROM_PBX) -> str:
    """An ended call as the call tracker leaves it: times, extTrackingId and the operator's userId from
    the simulated call when given (shifted to end at `ended_at` if that is given too)."""
    lead = leads.get(lead_id)
    call_id = calls.call_id_for(lead_id, attempt)
    if simulated:
        start, answered, ended = (_ms(simulated[k]) for k in ("start_time", "answer_time", "release_time"))
        talk = round((ended - answered).total_seconds())
    else:
        ended = dt.datetime.now(dt.UTC)
        answered = ended - dt.timedelta(seconds=talk)
        start = answered - dt.timedelta(seconds=10)
    if ended_at is not None:
        start, answered, ended = start + (ended_at - ended), answered + (ended_at - ended), ended_at
    if target_id == _FROM_PBX:
        target_id = simulated["abonent_user_id"] if simulated else OPERATOR_USER_ID
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": lead["offer_id"], "attempt": attempt,
                                 "phone": lead["phone"], "operator": "200", "provider": "Beeline_Main",
                                 "dialing_at": _iso(start), "created_at": _iso(start)})
    bound = {"ext_tracking_id": ext or (simulated or {}).get("ext_tracking_id") or "40000000:1"}
    calls.update(call_id, **bound, **({"target_id": target_id} if target_id else {}))
    answered_ok = outcome == "answered"
    assert calls.finish(call_id, outcome, answered_at=_iso(answered) if answered_ok else None, ended_at=_iso(ended),
                        talk_seconds=talk if answered_ok else 0, short_call=answered_ok and talk < 60)
    store.put_new({"pk": f"LEAD#{lead_id}", "sk": f"CALLLOG#{_iso(ended)}#{call_id}"}, {"call_id": call_id})
    return call_id


def call_log(crm, lead_id: str) -> str | None:
    order_id = leads.get(lead_id)["order_id"]
    [order] = [o for o in crm.orders() if o["id"] == order_id]
    return next((f["value"] for f in order["data"]["stringFields"] if f["field"] == "call_log"), None)


def update_orders(crm) -> list[dict]:
    return [r for r in crm.requests_log() if "orderMutation.updateOrder" in r["operation"]]


def s3_objects() -> list[str]:
    listing = resources.client("s3").list_objects_v2(Bucket=resources.bucket_name())
    return [o["Key"] for o in listing.get("Contents", [])]


def record_and_write_back(call_id: str) -> None:
    recorder.process({"job": "recording", "call_id": call_id})
    jobs = bodies(receive("recordings"))
    assert jobs == [{"job": "writeback", "call_id": call_id}]
    recorder.process(jobs[0])


# --- the recording job ---------------------------------------------------------------------------------

@pytest.fixture
def s3_puts(aws):
    """The parameters of every S3 PutObject the code sends."""
    puts: list[dict] = []

    def capture(params, **_):
        puts.append(dict(params))

    events = resources.client("s3").meta.events
    events.register("provide-client-params.s3.PutObject", capture)
    yield puts
    events.unregister("provide-client-params.s3.PutObject", capture)


def test_recording_lands_in_s3_encrypted_under_lead_and_call_once(env, s3_puts):
    lead_id = make_lead()
    simulated = pbx_call(env["pbx"])
    call_id = make_call(lead_id, simulated)
    recorder.process({"job": "recording", "call_id": call_id})
    recorder.process({"job": "recording", "call_id": call_id})  # a duplicate delivery

    ended = _ms(simulated["release_time"])
    key = f"recordings/{ended:%Y/%m/%d}/lead-{lead_id}/call-{call_id}.mp3"
    assert s3_objects() == [key]
    s3 = resources.client("s3")
    head = s3.head_object(Bucket=resources.bucket_name(), Key=key)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentType"] == "audio/mpeg"
    assert head["Metadata"] == {"lead_id": lead_id, "call_id": call_id, "offer_id": "101"}  # no phone
    # Asked for explicitly, not only the bucket's default (a bucket recreated without it stays safe).
    assert [p["ServerSideEncryption"] for p in s3_puts] == ["AES256"]
    # Kept 30 days (the default retention) and seldom played: Standard-IA, half the storage price.
    assert head["StorageClass"] == "STANDARD_IA"
    assert recorder.storage_class(7) == "STANDARD"  # Standard-IA's 30-day minimum would bill a week as a month
    audio = s3.get_object(Bucket=resources.bucket_name(), Key=key)["Body"].read()
    [record] = env["pbx"].records()
    assert len(audio) == record["fileSize"] and recorder.is_mp3(audio)

    call = calls.get(call_id)
    assert call["recording_state"] == "stored" and call["recording_key"] == key
    assert "recording_url" not in call  # derived where it is shown (core/links.py)
    assert links.stored_recording_link(call_id, call) == links.recording_link(call_id)
    assert links.recording_link(call_id).startswith(f"https://calls.example.test/v1/recordings/{call_id}?sig=")
    assert call["short_call"] is False  # 75 s


def test_a_repeated_recording_job_queues_the_write_back_until_that_has_run(env, dynamodb_requests):
    """No writeback_queued flag (a 2-WRU write of the call per recording): a duplicate before the write-back
    ran queues it again (harmless, the same text); after it ran, its mark says it was queued."""
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    dynamodb_requests.clear()
    recorder.process({"job": "recording", "call_id": call_id})
    assert [op for op, pk in dynamodb_requests if pk == f"CALL#{call_id}"].count("UpdateItem") == 1
    recorder.process({"job": "recording", "call_id": call_id})  # a duplicate delivery, before the write-back
    jobs = bodies(receive("recordings"))
    assert jobs == [{"job": "writeback", "call_id": call_id}] * 2
    for job in jobs:
        recorder.process(job)
    assert call_log(env["crm"], lead_id).endswith("запись: " + links.recording_link(call_id))
    recorder.process({"job": "recording", "call_id": call_id})  # after it
    assert receive("recordings") == []
    assert "writeback_queued" not in calls.get(call_id)


def test_a_call_stored_before_the_link_was_derived_shows_the_derived_link(env):
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    recorder.process({"job": "recording", "call_id": call_id})
    calls.update(call_id, recording_url="https://old-host.example.test/v1/recordings/x?sig=0")  # as then stored
    recorder.process(bodies(receive("recordings"))[0])
    assert call_log(env["crm"], lead_id).endswith("запись: " + links.recording_link(call_id))


def test_short_call_is_flagged(env):
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"], talk=30))
    record_and_write_back(call_id)
    call = calls.get(call_id)
    assert call["talk_seconds"] == 30 and call["short_call"] is True
    assert " · ответил · 0:30 (< 60 с) · запись: " in call_log(env["crm"], lead_id)


def test_download_falls_back_to_the_records_list(env):
    # No userId known: the by-call download cannot be addressed; the list finds it by externalId.
    by_id = make_call(make_lead(), pbx_call(env["pbx"]), target_id=None)
    assert "target_id" not in calls.get(by_id)
    recorder.process({"job": "recording", "call_id": by_id})
    assert calls.get(by_id)["recording_state"] == "stored"
    # An extTrackingId the PBX does not know: the list finds it by phone and time.
    other = "+79991112277"
    by_phone = make_call(make_lead(phone=other), pbx_call(env["pbx"], phone=other), ext="12345678:1")
    recorder.process({"job": "recording", "call_id": by_phone})
    assert calls.get(by_phone)["recording_state"] == "stored"
    assert len(s3_objects()) == 2


def test_a_recording_of_another_number_or_another_time_is_not_taken(env):
    simulated = pbx_call(env["pbx"], phone=PHONE)  # a recording exists, by extTrackingId unknown to us
    other_number = make_call(make_lead(phone="+79991112266"), ext="12345678:1")
    later = make_call(make_lead(), ext="12345678:1",  # the same number, but this call was 5 minutes later
                      ended_at=_ms(simulated["release_time"]) + dt.timedelta(minutes=5))
    for call_id in (other_number, later):
        with pytest.raises(Transient):
            recorder.process({"job": "recording", "call_id": call_id})
    assert s3_objects() == []


def test_recording_not_ready_within_30_minutes_is_transient(env):
    env["pbx"].recording_delay_seconds = 100_000  # the file appears long after the call
    call_id = make_call(make_lead(), pbx_call(env["pbx"]))
    with pytest.raises(Transient, match="not ready"):
        recorder.process({"job": "recording", "call_id": call_id})
    assert s3_objects() == []
    assert receive("recordings") == []  # no write-back yet: it waits for the file
    assert "recording_state" not in calls.get(call_id)


def test_download_that_is_not_audio_is_not_ready(env, monkeypatch):
    call_id = make_call(make_lead(), pbx_call(env["pbx"]))
    client = beeline.default_client()
    monkeypatch.setattr(client, "download_record", lambda *_: b"<html>maintenance</html>")
    monkeypatch.setattr(client, "download_record_by_id", lambda *_: b"<html>maintenance</html>")
    with pytest.raises(Transient):
        recorder.process({"job": "recording", "call_id": call_id})
    assert s3_objects() == []


@pytest.mark.parametrize("data,ok", [
    (b"ID3\x04\x00rest", True), (bytes((0xFF, 0xFB, 0x14, 0xC0)) + bytes(92), True), (b"\xff\xe3", True),
    (b'{"errorCode":"RecordNotFound"}', False), (b"<html>503</html>", False), (b"", False), (b"\xff\x1f", False),
])
def test_mp3_check(data, ok):
    assert recorder.is_mp3(data) is ok


def test_after_30_minutes_the_recording_is_missing_and_the_write_back_still_happens(env):
    ended = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=31)
    lead_id = make_lead()
    call_id = make_call(lead_id, ended_at=ended, ext="12345678:1")
    record_and_write_back(call_id)
    call = calls.get(call_id)
    assert call["recording_state"] == "missing" and "recording_url" not in call
    assert s3_objects() == []
    assert call_log(env["crm"], lead_id).endswith("оператор 200 · ответил · 1:15 · запись: не найдена")
    assert call["written_back_at"]


def test_beeline_outage_after_30_minutes_keeps_retrying(env, monkeypatch):
    call_id = make_call(make_lead(), ended_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=31))

    def down(*_args, **_kwargs):
        raise beeline.BeelineError("Beeline HTTP 502", code="HTTP_502", status=502, transient=True)

    monkeypatch.setattr(beeline.default_client(), "download_record", down)
    monkeypatch.setattr(beeline.default_client(), "records", down)
    with pytest.raises(Transient, match="Beeline unavailable"):
        recorder.process({"job": "recording", "call_id": call_id})
    assert "recording_state" not in calls.get(call_id)


# --- the write-back job --------------------------------------------------------------------------------

def test_write_back_puts_the_call_line_on_the_order_idempotently(env):
    lead_id = make_lead()
    simulated = pbx_call(env["pbx"])
    call_id = make_call(lead_id, simulated)
    record_and_write_back(call_id)
    call = calls.get(call_id)
    started = _ms(simulated["start_time"]).astimezone(ZoneInfo("Europe/Moscow"))
    link = links.recording_link(call_id)
    expected = f"{started:%Y-%m-%d %H:%M} МСК · оператор 200 · ответил · 1:15 · запись: {link}"
    assert call_log(env["crm"], lead_id) == expected
    assert call["written_back_at"]
    recorder.process({"job": "writeback", "call_id": call_id})  # again: the same text
    assert call_log(env["crm"], lead_id) == expected
    assert len(update_orders(env["crm"])) == 2


def test_the_write_back_job_reads_its_call_once_for_the_cdr_check_and_the_write_back(env, dynamodb_requests):
    """Issue 9: the job's call read once and handed to both steps; calls.ended_of_lead reads it once more with
    the lead's history. Six requests: that, the plugin check, the lead, the history query, written_back_at."""
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    recorder.process({"job": "recording", "call_id": call_id})
    [job] = bodies(receive("recordings"))
    dynamodb_requests.clear()
    recorder.process(job)
    sent = list(dynamodb_requests)
    assert call_log(env["crm"], lead_id).endswith("запись: " + links.recording_link(call_id))
    assert [op for op, pk in sent if pk == f"CALL#{call_id}"].count("GetItem") <= 2, sent
    assert len(sent) <= 6, sent


def test_two_calls_make_two_lines_oldest_first_whatever_order_jobs_run(env):
    lead_id = make_lead()
    first = make_call(lead_id, None, 1, outcome="no_answer", ended_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    second = make_call(lead_id, pbx_call(env["pbx"]), 2)
    record_and_write_back(second)
    recorder.process({"job": "writeback", "call_id": first})  # the older call's job runs last
    lines = call_log(env["crm"], lead_id).split("\n")
    assert len(lines) == 2
    assert lines[0].endswith("МСК · оператор 200 · нет ответа")
    assert lines[1].endswith(" · ответил · 1:15 · запись: " + links.recording_link(second))


def test_line_uses_the_offer_time_zone(crm, use_config):
    use_config(lambda doc: doc["offers"][0]["working_hours"].update(timezone="Asia/Yekaterinburg"))
    lead_id = make_lead()
    call_id = make_call(lead_id, outcome="busy", ended_at=dt.datetime(2026, 11, 25, 11, 4, 25, tzinfo=dt.UTC))
    recorder.process({"job": "writeback", "call_id": call_id})
    assert call_log(crm, lead_id) == "2026-11-25 16:03 UTC+5 · оператор 200 · занято"  # started 11:03 UTC


def test_salesrender_503_is_transient_then_lands(crm):
    lead_id = make_lead()
    call_id = make_call(lead_id, outcome="busy")
    crm.add_fault(count=3, status=503, operation="updateOrder")  # 3: the client retries a 503 twice inline
    with pytest.raises(Transient):
        recorder.process({"job": "writeback", "call_id": call_id})
    assert call_log(crm, lead_id) is None and "written_back_at" not in calls.get(call_id)
    recorder.process({"job": "writeback", "call_id": call_id})
    assert call_log(crm, lead_id).endswith("оператор 200 · занято")


def test_salesrender_permanent_error_is_poison_with_the_reason(crm):
    call_id = make_call(make_lead(), outcome="busy")
    crm.add_fault(graphql_error="ERR_ORDER_NOT_FOUND", operation="updateOrder")
    with pytest.raises(Poison, match="ERR_ORDER_NOT_FOUND") as caught:
        recorder.process({"job": "writeback", "call_id": call_id})
    assert caught.value.code == "ERR_ORDER_NOT_FOUND"


def test_offer_without_call_log_field_writes_nothing(crm, use_config):
    use_config(lambda doc: doc["offers"][0]["salesrender"]["fields"].update(call_log=None))
    call_id = make_call(make_lead(), outcome="busy")
    recorder.process({"job": "writeback", "call_id": call_id})
    assert update_orders(crm) == []
    assert [s.name for s in write_back.sinks()] == ["call_log_field"]


def test_lead_without_an_order_yet_is_transient(crm):
    call_id = make_call(make_lead(order=False), outcome="busy")
    with pytest.raises(Transient, match="no CRM order"):
        recorder.process({"job": "writeback", "call_id": call_id})


@pytest.mark.parametrize("message", [{"job": "transcribe", "call_id": "x"}, {"job": "recording"}, {}])
def test_unknown_or_malformed_jobs_are_poison(message):
    with pytest.raises(Poison):
        recorder.process(message)


def test_unknown_call_is_poison(aws):
    with pytest.raises(Poison, match="does not exist"):
        recorder.process({"job": "writeback", "call_id": "no-such-call"})


def test_logs_hold_no_full_phone(env, log_output):
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    env["crm"].add_fault(graphql_error="ERR_ORDER_LOCKED", operation="updateOrder")
    recorder.process({"job": "recording", "call_id": call_id})
    with pytest.raises(Transient):
        recorder.process({"job": "writeback", "call_id": call_id})
    recorder.process({"job": "writeback", "call_id": call_id})
    text = log_output.getvalue()
    assert "recording stored" in text and "write-back failed" in text and "call written back" in text
    assert "9991112255" not in text and "999 111 22 55" not in text and "999111" not in text


# --- through the queue, from a real call ---------------------------------------------------------------

def test_a_real_call_goes_from_tilda_to_the_crm_call_log_through_the_queue(env, client, monkeypatch):
    """Tilda post -> intake -> dialer -> sandbox call -> XSI events -> recording worker -> write-back."""
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", "test-beeline-secret")
    sink = EventSink()
    try:
        beeline.default_client().subscribe(sink.url, 3600)
        body = urlencode({"Name": "Анна", "Phone": PHONE, "tranid": "pc:1", "formid": "form493249737"})
        assert client.http.post("/webhooks/tilda", body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": TILDA_KEY}).status_code == 200
        assert deliver("intake", "intake_worker") == [True]
        assert deliver("callbacks", "callback_worker") == [True]
        assert env["pbx"].wait_idle()
        wait_recorded(env["pbx"], env["pbx"].calls()[-1]["ext_tracking_id"])
        for event in sink.bodies:
            assert client.http.post("/webhooks/beeline/test-beeline-secret", body=event,
                                    headers={"Content-Type": "application/xml"}).status_code == 200
    finally:
        sink.server.shutdown()
    lead_id = leads.lead_id_for("tilda", "tranid:pc:1")
    call_id = calls.call_id_for(lead_id, 1)
    assert calls.get(call_id)["outcome"] == "answered"

    assert deliver("recordings", "recording_worker") == [True]  # the recording job
    assert deliver("recordings", "recording_worker") == [True]  # the write-back it queued
    call = calls.get(call_id)
    assert call["recording_state"] == "stored" and call["written_back_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d МСК · оператор 200 · ответил · 1:15 · запись: "
                        + re.escape(links.recording_link(call_id)), call_log(env["crm"], lead_id))
    assert receive("recordings", dlq=True) == []


def test_not_ready_recording_is_retried_by_the_queue_not_parked(env):
    call_id = make_call(make_lead(), ext="12345678:1")  # a file the PBX will not have for a while
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("recordings"),
                                         MessageBody=json.dumps({"job": "recording", "call_id": call_id}))
    assert deliver("recordings", "recording_worker") == [False]
    attributes = resources.client("sqs").get_queue_attributes(
        QueueUrl=resources.queue_url("recordings"), AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "1"  # back after its backoff
    assert receive("recordings", dlq=True) == []
