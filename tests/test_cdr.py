"""CDRs to SalesRender (R-20, issue 10 item 5): every finished call of a company with the plugin registered
reaches the SalesRender sandbox's CDR endpoint, which checks the HS512 token and every field strictly;
anything but 202 is sent again for more than 24 h; the call-log write-back can be switched off."""

from __future__ import annotations

import datetime as dt
import json
import time
from urllib.parse import urlencode

import jwt
import pytest
import requests
from conftest import bodies, deliver, receive
from test_post_call import make_call, make_lead, pbx_call

from functions.core import links, resources, times
from functions.core.queues import Transient
from functions.crm import cdr
from functions.postcall import recorder
from functions.providers.salesrender import plugin_tokens
from functions.records import calls, leads
from functions.tracking import tracker
from infra.local.salesrender_plugin_side import side

BASE = "https://callbridge.example.test/api"
PLUGIN_URL = f"{BASE}/salesrender-plugin/"
HPT = "the-registration-secret-" * 3  # 72 bytes: PyJWT warns below 64 for HS512


@pytest.fixture
def env(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("PLUGIN_ENCRYPTION_KEY", "test-plugin-encryption-key")
    monkeypatch.setenv("PUBLIC_BASE_URL", BASE)
    monkeypatch.setenv("RECORDING_LINK_SECRET", "test-link-secret")
    plugin_tokens.public_key.cache_clear()
    beeline_sandbox.time_scale = 0.001
    crm = side(salesrender_sandbox)
    crm.plugin_url = PLUGIN_URL
    crm.check_recordings = False  # the link names PUBLIC_BASE_URL, which nothing serves in-process (the e2e test does)
    return {"client": client, "crm": crm, "sandbox": salesrender_sandbox, "pbx": beeline_sandbox}


def register(env) -> None:
    response = env["client"].http.put("/salesrender-plugin/registration",
                                      body=urlencode({"registration": env["crm"].registration_token(HPT)}),
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    env["crm"].hpt = HPT  # what the sandbox's own register() keeps after the 200


def updates(sandbox) -> list[dict]:
    return [r for r in sandbox.requests_log() if "orderMutation.updateOrder" in r["operation"]]


def post_call_jobs() -> None:
    """Every recordings job, as the worker runs them (a recording job queues the write-back job)."""
    while True:
        results = deliver("recordings", "recording_worker")
        if not results:
            return
        assert all(results)


def test_an_answered_call_is_sent_with_its_recording_link_and_units(env):
    register(env)
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    calls.update(call_id, cost_rub=4.0)
    recorder.process({"job": "recording", "call_id": call_id})
    post_call_jobs()
    [job] = bodies(receive("cdrs"))
    assert job["call_id"] == call_id and job["attempt"] == 1
    assert cdr.process(job) == "sent"
    [got] = env["crm"].cdrs()
    call = calls.get(call_id)
    assert got["callId"] == call_id and got["phone"] == "+79991112255" and got["direction"] == "outgoing"
    assert got["bill_sec"] == call["talk_seconds"] == 75 and isinstance(got["early_media_duration"], int)
    assert got["call_start"] == int(times.parse(call["dialing_at"]).timestamp())
    assert got["record"] is True and got["call_record_url"] == links.recording_link(call_id)
    assert "recording_url" not in call  # derived when the CDR is built
    assert got["pricing"]["provider"] == {"amount": "400", "currency": "RUB"}
    assert (got["hangup_cause_status"], got["sip_fail_status"]) == (16, 200)
    assert got["caller"] == {"alias": "operator", "id": "200"}
    assert got["callee"] == {"alias": "client", "id": "+79991112255"}
    assert got["plugin"] == {"alias": "callbridge-beeline", "id": "42"}
    assert env["crm"].view()["rejected"] == []
    assert calls.get(call_id)["cdr_sent_at"]
    assert cdr.process(job) == "already_sent" and len(env["crm"].cdrs()) == 1  # a duplicate job sends nothing


def test_unanswered_and_inbound_calls_are_sent_too_but_not_calls_never_placed(env):
    register(env)
    missed = make_call(make_lead(), outcome="no_answer")
    inbound = make_call(make_lead(phone="+79991112266"), attempt=2)
    calls.update(inbound, direction="inbound")
    never_lead = make_lead(phone="+79991112277")
    never = calls.call_id_for(never_lead, 1)
    calls.settle_not_dialled(never, "do_not_call", {"lead_id": never_lead, "offer_id": 101, "attempt": 1,
                                                    "phone": "+79991112277"})
    for call_id in (missed, never):
        recorder.process({"job": "writeback", "call_id": call_id})
    calls.update(inbound, recording_state="missing")  # no file in the PBX for it: the recorder gave up
    recorder.process({"job": "writeback", "call_id": inbound})
    assert sorted(j["call_id"] for j in bodies(receive("cdrs"))) == sorted([missed, inbound])
    for call_id in (missed, inbound):
        assert cdr.process(cdr.job(call_id)) == "sent"
    got = {c["callId"]: c for c in env["crm"].cdrs()}
    assert got[missed]["record"] is False and got[missed]["call_record_url"] == "" and got[missed]["bill_sec"] == 0
    assert got[missed]["hangup_cause_status"] == 19 and got[missed]["pricing"]["provider"]["amount"] == "0"
    assert got[inbound]["direction"] == "incoming" and got[inbound]["caller"]["alias"] == "client"


def test_no_cdr_without_a_registered_plugin(env):
    missed = make_call(make_lead(), outcome="no_answer")
    recorder.process({"job": "writeback", "call_id": missed})
    assert receive("cdrs") == [] and len(updates(env["sandbox"])) == 1  # the call log as before


def test_a_refused_cdr_is_sent_again_with_a_growing_delay_until_taken(env, monkeypatch):
    register(env)
    call_id = make_call(make_lead(), outcome="busy")
    env["crm"].add_fault(count=2, status=500)
    first = cdr.job(call_id)
    sent: list[tuple[dict, int]] = []
    real_send = cdr.queues.send
    monkeypatch.setattr(cdr.queues, "send", lambda kind, body, delay_seconds=0: sent.append((body, delay_seconds))
                        or real_send(kind, body, 0))
    assert cdr.process(first) == "retry_scheduled"
    [second] = bodies(receive("cdrs"))
    assert cdr.process(second) == "retry_scheduled"
    [third] = bodies(receive("cdrs"))
    assert [d for _, d in sent] == [60, 120]  # SalesRender's own sender: every 60 s; here 60 s doubling to 900 s
    assert [b["attempt"] for b, _ in sent] == [2, 3] and {b["first_at"] for b, _ in sent} == {first["first_at"]}
    assert cdr.process(third) == "sent"
    assert [c["callId"] for c in env["crm"].cdrs()] == [call_id]
    assert [r["status"] for r in env["crm"].view()["rejected"]] == []  # faults answered before any check


def test_a_cdr_still_refused_after_48_hours_goes_to_the_dlq_with_the_reason(env):
    register(env)
    call_id = make_call(make_lead(), outcome="busy")
    env["crm"].add_fault(count=1, status=500)
    old = times.iso(dt.datetime.now(dt.UTC) - dt.timedelta(hours=48, minutes=1), "milliseconds")
    from functions.core import queues

    queues.send("cdrs", {"call_id": call_id, "attempt": 200, "first_at": old})
    assert deliver("cdrs", "cdr_worker") == [True]
    [parked] = receive("cdrs", dlq=True)
    assert parked["MessageAttributes"]["code"]["StringValue"] == "cdr_refused"
    assert "HTTP 500" in parked["MessageAttributes"]["reason"]["StringValue"]


def test_a_cdr_after_23_hours_of_refusals_is_still_retried(env):
    register(env)
    call_id = make_call(make_lead(), outcome="busy")
    env["crm"].add_fault(count=1, status=401)
    old = times.iso(dt.datetime.now(dt.UTC) - dt.timedelta(hours=23), "milliseconds")
    assert cdr.process({"call_id": call_id, "attempt": 90, "first_at": old}) == "retry_scheduled"
    assert receive("cdrs", dlq=True) == []


@pytest.mark.parametrize("mode, registered, written", [
    ("always", True, True), ("auto", True, False), ("auto", False, True), ("never", False, False)])
def test_the_call_log_write_back_switch(env, use_config, mode, registered, written):
    use_config(lambda doc: doc.update(crm={"call_log_write_back": mode}))
    if registered:
        register(env)
    missed = make_call(make_lead(), outcome="no_answer")
    recorder.process({"job": "writeback", "call_id": missed})
    assert bool(updates(env["sandbox"])) is written
    assert bool(receive("cdrs")) is registered


def test_the_tracker_to_cdr_path_for_a_finished_call(env):
    """Through finalize as the call tracker runs it: the post-call job leads to the CDR."""
    register(env)
    lead_id = make_lead()
    call_id = calls.call_id_for(lead_id, 1)
    assert calls.claim(call_id, {"lead_id": lead_id, "offer_id": 101, "attempt": 1, "phone": "+79991112255",
                                 "operator": "200", "provider": "Beeline_Main", "dialing_at": times.now_iso()})
    assert tracker.finalize(call_id, "operator_missed")
    post_call_jobs()
    assert deliver("cdrs", "cdr_worker") == [True]
    [got] = env["crm"].cdrs()
    assert got["callId"] == call_id and got["sip_fail_status"] == 487


# --- the sandbox is as strict as SalesRender ---------------------------------------------------------

def _put(env, token: str):
    return requests.put(env["sandbox"].base_url + "/companies/1/CRM/plugin/pbx/cdr", json={"request": token},
                        timeout=5)


def _good_cdr() -> dict:
    return plugin_tokens.cdr(phone="+79991112255", call_id="c-1", call_start=int(time.time()) - 100,
                             early_media_duration=10, bill_sec=75, record_url=None, provider_kopecks=400,
                             sip_fail=plugin_tokens.sip_cause(200, "OK"),
                             hangup_cause=plugin_tokens.sip_cause(16, "NORMAL_CLEARING"),
                             caller={"alias": "operator", "id": "200"}, callee={"alias": "client", "id": "+7"},
                             plugin=plugin_tokens.PluginRef("callbridge-beeline", "42"), direction="outgoing")


def _token(env, records, secret=HPT, **claims) -> str:
    token = plugin_tokens.cdr_request_token(records, secret=secret, plugin_url=PLUGIN_URL,
                                            cluster=env["sandbox"].base_url + "/", cid="1",
                                            plugin=plugin_tokens.PluginRef("callbridge-beeline", "42"))
    if claims:
        decoded = jwt.decode(token, secret, algorithms=["HS512"], options={"verify_aud": False})
        token = jwt.encode({**decoded, **claims}, secret, algorithm="HS512")
    return token


def test_the_sandbox_takes_a_good_cdr_and_refuses_wrong_units_secrets_and_claims(env):
    env["crm"].hpt = HPT
    assert _put(env, _token(env, [_good_cdr()])).status_code == 202
    wrong = {
        "kopecks as a number": {**_good_cdr(), "pricing": {"provider": {"amount": 400, "currency": "RUB"}}},
        "rubles with a point": {**_good_cdr(), "pricing": {"provider": {"amount": "4.00", "currency": "RUB"}}},
        "seconds as a float": {**_good_cdr(), "bill_sec": 75.0},
        "a record without a link": {**_good_cdr(), "record": True},
        "a local phone": {**_good_cdr(), "phone": "89991112255"},
        "no direction": {k: v for k, v in _good_cdr().items() if k != "direction"},
    }
    for what, record in wrong.items():
        response = _put(env, _token(env, [record]))
        assert response.status_code == 400, what
    assert _put(env, _token(env, [_good_cdr()], secret="another-secret")).status_code == 401
    assert _put(env, _token(env, [_good_cdr()], aud="https://elsewhere/")).status_code == 401
    assert _put(env, _token(env, [_good_cdr()], iss="https://other-plugin.example/")).status_code == 401
    assert _put(env, _token(env, [_good_cdr()], exp=int(time.time()) - 10)).status_code == 401
    assert _put(env, _token(env, [_good_cdr()], cid="2")).status_code == 400
    assert _put(env, _token(env, [])).status_code == 400
    assert len(env["crm"].cdrs()) == 1
    got = requests.get(env["sandbox"].base_url + "/_sandbox/cdrs", timeout=5).json()
    assert [c["callId"] for c in got] == ["c-1"]
    assert json.loads(requests.get(env["sandbox"].base_url + "/_sandbox/plugin", timeout=5).text)["cdrs"] == 1



# --- the recording link is derived, not stored; the post-call flags ride on the next update -------------

def _call_updates(sent: list, call_id: str) -> int:
    return sum(1 for op, pk in sent if op == "UpdateItem" and pk == f"CALL#{call_id}")


def test_an_answered_call_shows_its_working_link_everywhere_without_storing_it(env, use_config, dynamodb_requests):
    """Through the recordings queue in Lambda's shape: the call item keeps no recording_url (154 bytes of
    every later write), yet the call log, the CDR and GET /v1/calls/{id} give the same link, which redirects
    to the file. The recording job updates the call once (no writeback_queued flag of its own); the write-back
    job once: written_back_at with the CDR job's cdr_queued (the CDR was queued before it)."""
    use_config(lambda doc: doc.update(crm={"call_log_write_back": "always"}))
    register(env)
    lead_id = make_lead()
    call_id = make_call(lead_id, pbx_call(env["pbx"]))
    resources.client("sqs").send_message(QueueUrl=resources.queue_url("recordings"),
                                         MessageBody=json.dumps({"job": "recording", "call_id": call_id}))
    dynamodb_requests.clear()
    assert deliver("recordings", "recording_worker") == [True]  # the recording job
    assert _call_updates(dynamodb_requests, call_id) == 1, dynamodb_requests
    dynamodb_requests.clear()
    assert deliver("recordings", "recording_worker") == [True]  # the write-back job it queued
    assert _call_updates(dynamodb_requests, call_id) == 1, dynamodb_requests
    assert deliver("recordings", "recording_worker") == []  # nothing else queued
    call = calls.get(call_id)
    assert "recording_url" not in call and "writeback_queued" not in call
    assert call["recording_state"] == "stored" and call["written_back_at"] and call["cdr_queued"]

    link = links.recording_link(call_id)
    assert link.startswith(f"{BASE}/v1/recordings/{call_id}?sig=")
    order_id = leads.get(lead_id)["order_id"]
    [order] = [o for o in env["sandbox"].orders() if o["id"] == order_id]
    [text] = [f["value"] for f in order["data"]["stringFields"] if f["field"] == "call_log"]
    assert text.endswith(" · ответил · 1:15 · запись: " + link)
    assert deliver("cdrs", "cdr_worker") == [True]
    [got] = env["crm"].cdrs()
    assert got["record"] is True and got["call_record_url"] == link
    shown = env["client"].http.get(f"/v1/calls/{call_id}", headers={"Authorization": "Bearer test-api-token"})
    assert shown.status_code == 200 and shown.json_body["recording_url"] == link
    followed = env["client"].http.get(link.removeprefix(BASE))
    assert followed.status_code == 302 and call["recording_key"] in followed.headers["Location"]


def test_the_cdr_flag_of_a_failed_write_back_is_written_alone_so_retries_send_no_second_cdr(env, use_config):
    use_config(lambda doc: doc.update(crm={"call_log_write_back": "always"}))
    register(env)
    call_id = make_call(make_lead(), outcome="no_answer")
    env["sandbox"].add_fault(graphql_error="ERR_ORDER_LOCKED", operation="updateOrder")
    with pytest.raises(Transient):
        recorder.process({"job": "writeback", "call_id": call_id})
    assert calls.get(call_id)["cdr_queued"] and "written_back_at" not in calls.get(call_id)
    recorder.process({"job": "writeback", "call_id": call_id})  # the retry writes the call log
    assert calls.get(call_id)["written_back_at"]
    assert [j["call_id"] for j in bodies(receive("cdrs"))] == [call_id]  # one CDR job


def test_the_cdr_flag_is_written_when_the_write_back_has_no_sink(env, use_config, dynamodb_requests):
    use_config(lambda doc: doc.update(crm={"call_log_write_back": "auto"}))
    register(env)  # which switches the call log off
    call_id = make_call(make_lead(), outcome="no_answer")
    dynamodb_requests.clear()
    recorder.process({"job": "writeback", "call_id": call_id})
    assert updates(env["sandbox"]) == [] and calls.get(call_id)["cdr_queued"]
    assert _call_updates(dynamodb_requests, call_id) == 1
    recorder.process({"job": "writeback", "call_id": call_id})  # a duplicate job
    assert [j["call_id"] for j in bodies(receive("cdrs"))] == [call_id]
