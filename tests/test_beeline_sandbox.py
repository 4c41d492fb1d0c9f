"""The Beeline sandbox must reject what Beeline rejects and play the click-to-call sequences of beeline.md."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from defusedxml import ElementTree

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))
beeline_sandbox = importlib.import_module("infra.local.beeline_sandbox")
BeelineSandbox = beeline_sandbox.BeelineSandbox

TOKEN = "test-beeline-token"
SCALE = 0.002  # a 75 s conversation takes 0.15 s
XSI = "http://schema.broadsoft.com/xsi"
XSI1 = "http://www.w3.org/2001/XMLSchema-instance"
OPERATOR = "SIP0343PU049QK@ip.beeline.ru"  # extension 200
CUSTOMER = "9991112233"
DAY = {"dateFrom": "2000-01-01T00:00:00.000Z", "dateTo": "2100-01-01T00:00:00Z"}


class Receiver:
    """A webhook endpoint that keeps every POST it gets."""

    def __init__(self):
        self.posts: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.posts.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                           "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str = "SECRET") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/beeline/{name}"

    def events(self, name: str | None = None) -> list[dict]:
        with self.lock:
            posts = list(self.posts)
        return [parse_event(p["body"]) for p in posts if name is None or p["path"].endswith(f"/{name}")]

    def clear(self):
        with self.lock:
            self.posts.clear()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def flatten(element, prefix="") -> dict:
    out = {}
    for child in element:
        key = f"{prefix}{local(child.tag)}"
        if len(child):
            out.update(flatten(child, key + "/"))
        else:
            out[key] = child.text
    return out


def parse_event(body: bytes) -> dict:
    """Parse by local names, as callbridge must (namespace URIs are uncertain)."""
    root = ElementTree.fromstring(body)
    assert local(root.tag) == "Event"
    event: dict = {"call": None}
    for child in root:
        name = local(child.tag)
        if name == "eventData":
            event["type"] = next(v for k, v in child.attrib.items() if local(k) == "type").split(":")[-1]
            event["data"] = flatten(child)
            call = next((c for c in child if local(c.tag) == "call"), None)
            event["call"] = flatten(call) if call is not None else None
        elif name == "httpContact":
            event["uri"] = flatten(child)["uri"]
        else:
            event[name] = child.text
    return event


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server():
    with BeelineSandbox(token=TOKEN, time_scale=SCALE, max_expires=3600) as sandbox:
        yield sandbox


@pytest.fixture()
def pbx(server, receiver):
    server.reset()
    receiver.clear()
    yield server
    server.hold(False)


def api(pbx, method, path, *, token=TOKEN, **kwargs):
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers = {beeline_sandbox.TOKEN_HEADER: token, **headers}
    return requests.request(method, pbx.api_url + path, headers=headers, timeout=5, **kwargs)


def control(pbx, method, path, **kwargs):
    return requests.request(method, f"{pbx.base_url}/_sandbox/{path}", timeout=10, **kwargs)


def subscribe(pbx, url, *, expires=3600, kind="BASIC_CALL", pattern=None) -> dict:
    body = {"expires": expires, "subscriptionType": kind, "url": url}
    if pattern is not None:
        body["pattern"] = pattern
    response = api(pbx, "PUT", "subscription", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def originate(pbx, phone=CUSTOMER, pattern="200"):
    return api(pbx, "POST", f"abonents/{pattern}/call", params={"phoneNumber": phone})


def call_events(receiver, name="SECRET"):
    return [e for e in receiver.events(name) if e["call"] is not None]


def steps(events):
    return [(e["type"], e["call"]["personality"], e["call"]["state"]) for e in events]


def error_code(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"errorCode", "description"}
    return body["errorCode"]


# ---- transport --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "code"), [(None, "AuthTokenNotFoundInRequest"), ("wrong", "AuthTokenNotFound")])
def test_token_missing_or_wrong_is_403(pbx, token, code):
    for path in ("abonents", "numbers", "no/such/method"):
        assert error_code(api(pbx, "GET", path, token=token), 403) == code
    assert error_code(originate_with_token(pbx, token), 403) == code
    assert pbx.calls() == []
    assert control(pbx, "GET", "health").json() == {"ok": True}  # control endpoints need no token


def originate_with_token(pbx, token):
    return api(pbx, "POST", "abonents/200/call", token=token, params={"phoneNumber": CUSTOMER})


def test_unknown_paths_and_methods(pbx):
    assert error_code(api(pbx, "GET", "no/such/method"), 404) == "NotFound"
    assert error_code(api(pbx, "GET", "abonents/"), 404) == "NotFound"  # a trailing slash is another path
    assert error_code(api(pbx, "GET", "/abonents"), 400) == "BadRequest"  # "//" is refused outright
    assert error_code(api(pbx, "GET", "abonents/200/call"), 405) == "MethodNotAllowed"
    assert requests.get(f"{pbx.base_url}/elsewhere", timeout=5).status_code == 404


def test_abonents_directory(pbx):
    response = api(pbx, "GET", "abonents")
    assert response.status_code == 200
    abonents = response.json()
    assert [a["extension"] for a in abonents] == ["200", "201", "202"]
    assert len({a["userId"] for a in abonents}) == 3
    first = abonents[0]
    assert first == {"userId": OPERATOR, "phone": "9001000200", "firstName": "Ольга", "lastName": "Оператор",
                     "email": None, "department": "Sales", "extension": "200"}
    for pattern in ("200", OPERATOR, "9001000200"):
        assert api(pbx, "GET", f"abonents/{pattern}").json() == first
    assert error_code(api(pbx, "GET", "abonents/299"), 404) == "AbonentNotFound"
    assert error_code(api(pbx, "GET", "abonents/+79001000200"), 404) == "AbonentNotFound"
    numbers = api(pbx, "GET", "numbers").json()
    assert [n["phone"] for n in numbers] == ["4951234567", "4951234568"]
    assert all(n["numberId"] for n in numbers)


def test_agent_status(pbx):
    assert api(pbx, "GET", "abonents/200/agent").json() == "ONLINE"
    response = api(pbx, "PUT", "abonents/200/agent", json={"agentStatus": "BREAK"})
    assert response.status_code == 200 and response.content == b""
    assert api(pbx, "GET", f"abonents/{OPERATOR}/agent").json() == "BREAK"
    assert api(pbx, "PUT", "abonents/200/agent", json="OFFLINE").status_code == 200
    assert api(pbx, "GET", "abonents/200/agent").json() == "OFFLINE"
    for bad in ({"agentStatus": "LUNCH"}, {"status": "BREAK"}, {"agentStatus": None}, "online", 1):
        assert error_code(api(pbx, "PUT", "abonents/200/agent", json=bad), 400) == "BadRequest"
    assert api(pbx, "PUT", "abonents/200/agent", data="BREAK").status_code == 415  # not JSON
    assert error_code(api(pbx, "GET", "abonents/299/agent"), 404) == "AbonentNotFound"
    assert control(pbx, "PUT", "agent/201", json={"agentStatus": "BREAK"}).json() == {"agentStatus": "BREAK"}
    assert api(pbx, "GET", "abonents/201/agent").json() == "BREAK"
    pbx.set_agent_status("201", "ONLINE")
    assert api(pbx, "GET", "abonents/201/agent").json() == "ONLINE"


def test_recording_switch(pbx, receiver):
    assert api(pbx, "GET", "abonents/200/recording").json() == "ON"
    assert api(pbx, "DELETE", "abonents/200/recording").status_code == 200
    assert api(pbx, "GET", "abonents/200/recording").json() == "OFF"
    subscribe(pbx, receiver.url())
    pbx.set_outcome(CUSTOMER, "answered", talk_seconds=10)
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    assert pbx.records() == []
    assert all("recordingState" not in e["call"] for e in call_events(receiver))
    assert api(pbx, "PUT", "abonents/200/recording").status_code == 200
    assert api(pbx, "GET", "abonents/200/recording").json() == "ON"


# ---- click-to-call ----------------------------------------------------------------------------------------


def test_answered_call_full_sequence(pbx, receiver):
    sub = subscribe(pbx, receiver.url())
    pbx.set_outcome(CUSTOMER, "answered", talk_seconds=30)
    response = originate(pbx)
    assert response.status_code == 200
    assert response.content == b""  # the body is undocumented: the sandbox sends none
    assert pbx.wait_idle(5)

    posts = list(receiver.posts)
    assert {p["content_type"] for p in posts} == {"application/xml; charset=UTF-8"}
    root = ElementTree.fromstring(posts[0]["body"])
    assert root.tag == f"{{{XSI}}}Event"
    assert root.get(f"{{{XSI1}}}type") == "xsi:SubscriptionEvent"

    events = call_events(receiver)
    assert steps(events) == [
        ("CallOriginatedEvent", "Click-to-Dial", "Alerting"),
        ("CallOriginatedEvent", "Originator", "Alerting"),
        ("CallAnsweredEvent", "Originator", "Active"),
        ("CallReleasedEvent", "Originator", "Released"),
    ]
    (tracking,) = {e["call"]["extTrackingId"] for e in events}
    assert tracking.endswith(":1")
    assert [int(e["sequenceNumber"]) for e in events] == [1, 2, 3, 4]
    assert len({e["eventID"] for e in events}) == 4
    assert all(uuid.UUID(e["eventID"]) for e in events)
    assert {e["subscriptionId"] for e in events} == {sub["subscriptionId"]}
    assert {e["uri"] for e in events} == {receiver.url()}
    assert {e["targetId"] for e in events} == {OPERATOR}
    assert {e["externalApplicationId"] for e in events} == {"portal"}
    assert {e["call"]["endpoint/addressOfRecord"] for e in events} == {OPERATOR}
    # The operator leg's remote party is the operator's own number; the customer's appears from step 2.
    assert events[0]["call"]["remoteParty/address"] == "tel:+79001000200"
    assert {e["call"]["remoteParty/address"] for e in events[1:]} == {f"tel:+7{CUSTOMER}"}
    assert events[1]["call"]["remoteParty/callType"] == "Network"

    answered, released = events[2]["call"], events[3]["call"]
    start, answer = int(answered["startTime"]), int(answered["answerTime"])
    release = int(released["releaseTime"])
    assert answer - start == 10_000  # the operator's phone rang 5 s, then the customer's 5 s (simulated)
    assert release - answer == 30_000  # the talk time, simulated
    assert int(released["answerTime"]) == answer and int(released["startTime"]) == start
    assert released["releasingParty"] == "remoteRelease"
    assert "answerTime" not in events[1]["call"] and "releaseTime" not in answered
    assert answered["recordingState"] == "Started"

    (call,) = pbx.calls()
    assert call["ext_tracking_id"] == tracking
    assert (call["pattern"], call["abonent_user_id"], call["phone"]) == ("200", OPERATOR, CUSTOMER)
    assert call["outcome"] == "answered" and call["state"] == "released"
    assert call["in_flight_at_accept"] == 0 and call["accepted_at"]
    assert [e["type"] for e in call["events"] if e["subscriptions"]] == [e["type"] for e in events]
    assert pbx.stats() == {"originates": 1, "max_in_flight": 1, "in_flight": 0,
                           "api_requests": {"subscription": 1, "call": 1}}


@pytest.mark.parametrize("phone", ["+79991112233", "79991112233", "89991112233", "999111223", "99911122aa",
                                   "999 111 22 33", ""])
def test_originate_rejects_anything_but_ten_digits(pbx, phone):
    assert error_code(originate(pbx, phone), 400) == "BadRequest"
    assert pbx.calls() == []


def test_originate_needs_phone_and_known_abonent(pbx):
    assert error_code(api(pbx, "POST", "abonents/200/call"), 400) == "BadRequest"
    assert error_code(originate(pbx, pattern="299"), 404) == "AbonentNotFound"
    assert pbx.calls() == []
    assert originate(pbx, pattern=OPERATOR).status_code == 200  # the userId works as pattern too


@pytest.mark.parametrize(("phone", "outcome", "expected", "cause", "cdr"), [
    ("9991112201", "busy",
     [("CallOriginatedEvent", "Click-to-Dial", "Alerting"), ("CallOriginatedEvent", "Originator", "Alerting"),
      ("CallReleasedEvent", "Originator", "Released")], "Busy", "017"),
    ("9991112202", "no_answer",
     [("CallOriginatedEvent", "Click-to-Dial", "Alerting"), ("CallOriginatedEvent", "Originator", "Alerting"),
      ("CallReleasedEvent", "Originator", "Released")], "Temporarily Unavailable", "019"),
    ("9991112203", "operator_missed",
     [("CallOriginatedEvent", "Click-to-Dial", "Alerting"), ("CallReleasedEvent", "Click-to-Dial", "Released")],
     "Request Timeout", "111"),
    ("9991112204", "failed",
     [("CallOriginatedEvent", "Click-to-Dial", "Alerting"), ("CallReleasedEvent", "Click-to-Dial", "Released")],
     "Server Failure", "041"),
])
def test_outcomes_by_last_two_digits(pbx, receiver, phone, outcome, expected, cause, cdr):
    subscribe(pbx, receiver.url())
    assert originate(pbx, phone).status_code == 200
    assert pbx.wait_idle(5)
    events = call_events(receiver)
    assert steps(events) == expected
    assert all(e["type"] != "CallAnsweredEvent" for e in events)
    last = events[-1]["call"]
    assert last["releaseCause/internalReleaseCause"] == cause
    assert last["releaseCause/cdrTerminationCause"] == cdr
    assert "answerTime" not in last and int(last["releaseTime"]) > int(last["startTime"])
    assert len({e["call"]["extTrackingId"] for e in events}) == 1
    (call,) = pbx.calls()
    assert call["outcome"] == outcome and call["state"] == "released"
    assert pbx.records() == []


def test_outcome_mapping_overrides_the_digit_rule(pbx, receiver):
    subscribe(pbx, receiver.url())
    response = control(pbx, "POST", "outcomes", json={"9991112201": {"outcome": "answered", "talk_seconds": 12},
                                                      "9991112255": {"outcome": "busy"}})
    assert response.status_code == 200
    assert response.json()["9991112201"] == {"outcome": "answered", "talk_seconds": 12.0}
    assert control(pbx, "POST", "outcomes", json={"+79991112201": {"outcome": "busy"}}).status_code == 400
    assert control(pbx, "POST", "outcomes", json={"9991112201": {"outcome": "maybe"}}).status_code == 400
    assert originate(pbx, "9991112201").status_code == 200
    assert originate(pbx, "9991112255").status_code == 200
    assert pbx.wait_idle(5)
    assert [c["outcome"] for c in pbx.calls()] == ["answered", "busy"]
    answered = [e["call"] for e in call_events(receiver) if e["type"] == "CallReleasedEvent"
                and e["call"].get("answerTime")]
    assert int(answered[0]["releaseTime"]) - int(answered[0]["answerTime"]) == 12_000


def test_hold_keeps_calls_in_flight(pbx, receiver):
    subscribe(pbx, receiver.url())
    assert control(pbx, "POST", "hold", json={"hold": True}).json() == {"hold": True}
    for n in range(3):
        assert originate(pbx, f"99911122{n + 10}").status_code == 200
    time.sleep(0.3)  # far longer than a whole call at this time scale
    stats = control(pbx, "GET", "stats").json()
    assert (stats["originates"], stats["max_in_flight"], stats["in_flight"]) == (3, 3, 3)
    calls = control(pbx, "GET", "calls").json()
    assert [c["in_flight_at_accept"] for c in calls] == [0, 1, 2]
    assert {c["state"] for c in calls} == {"operator_alerting"}
    assert not pbx.wait_idle(0.1)
    assert {s for s in steps(call_events(receiver))} == {("CallOriginatedEvent", "Click-to-Dial", "Alerting")}
    control(pbx, "POST", "hold", json={"hold": False})
    assert pbx.wait_idle(5)
    assert {c["state"] for c in pbx.calls()} == {"released"}
    assert pbx.stats()["in_flight"] == 0 and pbx.stats()["max_in_flight"] == 3
    assert len([e for e in call_events(receiver) if e["type"] == "CallReleasedEvent"]) == 3


def test_delay_fault_lets_the_client_time_out_while_the_call_rings(pbx):
    assert control(pbx, "POST", "faults", json={"count": 1, "delay_seconds": 0.6, "operation": "call"}).status_code \
        == 200
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(pbx.api_url + "abonents/200/call", params={"phoneNumber": CUSTOMER}, timeout=0.2,
                      headers={beeline_sandbox.TOKEN_HEADER: TOKEN})
    assert len(pbx.calls()) == 1  # Beeline took the call although the client gave up
    assert originate(pbx).status_code == 200  # the fault was used up
    assert pbx.wait_idle(5)


def test_status_fault_on_call_does_not_dial(pbx):
    pbx.add_fault(1, status=503, operation="call")
    response = originate(pbx)
    assert response.status_code == 503
    assert pbx.calls() == []
    pbx.add_fault(1, status=500, operation="call", proceed=True)
    assert originate(pbx).status_code == 500
    assert len(pbx.calls()) == 1  # a 500 after the PBX took the call: it rings anyway


def test_originate_body_text_and_recording_delay(receiver):
    with BeelineSandbox(token=TOKEN, time_scale=SCALE, originate_body="text", recording_delay_seconds=100) as pbx:
        pbx.set_outcome(CUSTOMER, "answered", talk_seconds=5)
        response = originate(pbx)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert pbx.wait_idle(5)
        (call,) = pbx.calls()
        assert response.text == call["ext_tracking_id"]
        download = f"v2/records/{call['ext_tracking_id']}/{OPERATOR}/download"
        assert error_code(api(pbx, "GET", download), 404) == "RecordNotFound"  # not ready yet
        assert api(pbx, "GET", "records", params=DAY).json() == []
        time.sleep(100 * SCALE + 0.05)
        assert api(pbx, "GET", download).content[:2] == b"\xff\xfb"


# ---- inbound calls ----------------------------------------------------------------------------------------

CALLER = "9997770011"
COMPANY = "4951234567"


def inbound(pbx, **body):
    return control(pbx, "POST", "inbound", json={"from": CALLER, "to": COMPANY, **body})


def test_inbound_answered_call(pbx, receiver):
    sub = subscribe(pbx, receiver.url())
    response = inbound(pbx, extension="200", outcome="answered", talk_seconds=40)
    assert response.status_code == 200, response.text
    view = response.json()
    tracking = view["ext_tracking_id"]
    assert tracking.endswith(":1")
    assert (view["direction"], view["phone"], view["number"], view["abonent_user_id"], view["outcome"]) \
        == ("INBOUND", CALLER, COMPANY, OPERATOR, "answered")
    assert pbx.wait_idle(5)

    events = call_events(receiver)
    assert steps(events) == [
        ("CallReceivedEvent", "Terminator", "Alerting"),
        ("CallAnsweredEvent", "Terminator", "Active"),
        ("CallReleasedEvent", "Terminator", "Released"),
    ]
    assert {e["call"]["extTrackingId"] for e in events} == {tracking}
    assert [int(e["sequenceNumber"]) for e in events] == [1, 2, 3]
    assert {e["subscriptionId"] for e in events} == {sub["subscriptionId"]}
    assert {e["targetId"] for e in events} == {OPERATOR}
    assert {e["call"]["endpoint/addressOfRecord"] for e in events} == {OPERATOR}
    assert {e["call"]["remoteParty/address"] for e in events} == {f"tel:+7{CALLER}"}
    assert {e["call"]["remoteParty/callType"] for e in events} == {"Network"}
    # Every event names the dialled company number as the (last) redirection.
    assert {e["call"]["redirections/redirection/party/address"] for e in events} == {f"tel:+7{COMPANY}"}

    received, answered, released = (e["call"] for e in events)
    assert "answerTime" not in received and "releaseTime" not in received
    start, answer = int(answered["startTime"]), int(answered["answerTime"])
    assert answer - start == 5_000  # rang ring_seconds (simulated)
    assert "releaseTime" not in answered and answered["recordingState"] == "Started"
    assert int(released["answerTime"]) == answer and int(released["startTime"]) == start
    assert int(released["releaseTime"]) - answer == 40_000
    assert released["releasingParty"] == "remoteRelease"

    (call,) = pbx.calls()
    assert call["state"] == "released" and call["release_time"] == int(released["releaseTime"])
    stats = pbx.stats()
    assert (stats["originates"], stats["max_in_flight"], stats["in_flight"]) == (0, 1, 0)  # not an originate

    (row,) = api(pbx, "GET", "v2/statistics", params=DAY).json()
    assert (row["direction"], row["status"], row["duration"], row["phone_from"]) \
        == ("INBOUND", "RECIEVED", 40_000, CALLER)
    assert row["startDate"] == start and row["abonent"]["extension"] == "200"

    (record,) = api(pbx, "GET", "records", params=DAY).json()
    assert (record["externalId"], record["direction"], record["phone"], record["duration"]) \
        == (tracking, "INBOUND", CALLER, 40_000)
    assert record["abonent"]["userId"] == OPERATOR
    assert api(pbx, "GET", f"v2/records/{tracking}/{OPERATOR}/download").content[:2] == b"\xff\xfb"


def test_inbound_missed_call(pbx, receiver):
    subscribe(pbx, receiver.url())
    subscribe(pbx, receiver.url("OTHER"), pattern="200")
    view = pbx.inbound(CALLER, "4951234568", extension="201", outcome="missed")
    assert view["outcome"] == "missed" and view["abonent_user_id"] != OPERATOR
    assert pbx.wait_idle(5)
    assert receiver.events("OTHER") == []  # another abonent's subscription hears nothing

    events = call_events(receiver)
    assert steps(events) == [("CallReceivedEvent", "Terminator", "Alerting"),
                             ("CallReleasedEvent", "Terminator", "Released")]
    assert {e["call"]["extTrackingId"] for e in events} == {view["ext_tracking_id"]}
    assert {e["targetId"] for e in events} == {view["abonent_user_id"]}
    assert {e["call"]["redirections/redirection/party/address"] for e in events} == {"tel:+74951234568"}
    released = events[1]["call"]
    assert "answerTime" not in released
    assert released["releaseCause/internalReleaseCause"] == "Request Timeout"
    assert int(released["releaseTime"]) - int(released["startTime"]) == 30_000  # the no-answer ring time
    assert all(e["type"] != "CallAnsweredEvent" for e in events)

    (row,) = api(pbx, "GET", "v2/statistics", params=DAY).json()
    assert (row["direction"], row["status"], row["duration"], row["phone_from"]) == ("INBOUND", "MISSED", 0, CALLER)
    assert pbx.records() == []


def test_inbound_without_recording_and_with_advanced_subscription(pbx, receiver):
    subscribe(pbx, receiver.url("ADV"), kind="ADVANCED_CALL")
    assert [e["type"] for e in receiver.events("ADV")] == []
    pbx.inbound(CALLER, COMPANY, talk_seconds=5)
    assert pbx.wait_idle(5)
    assert [e["type"] for e in receiver.events("ADV")] == ["CallReceivedEvent", "CallAnsweredEvent",
                                                            "CallRecordingStartedEvent", "CallReleasedEvent"]
    receiver.clear()
    pbx.set_recording("200", False)
    pbx.inbound(CALLER, COMPANY, talk_seconds=5)
    assert pbx.wait_idle(5)
    assert [e["type"] for e in receiver.events("ADV")] == ["CallReceivedEvent", "CallAnsweredEvent",
                                                            "CallReleasedEvent"]
    assert len(pbx.records()) == 1  # only the first call was recorded


def test_inbound_hold_keeps_the_call_ringing(pbx, receiver):
    subscribe(pbx, receiver.url())
    pbx.hold(True)
    pbx.inbound(CALLER, COMPANY)
    assert originate(pbx).status_code == 200
    time.sleep(0.2)
    assert [c["state"] for c in pbx.calls()] == ["alerting", "operator_alerting"]
    stats = pbx.stats()
    assert (stats["originates"], stats["max_in_flight"], stats["in_flight"]) == (1, 2, 2)
    assert pbx.calls()[1]["in_flight_at_accept"] == 1
    assert not pbx.wait_idle(0.1)
    pbx.hold(False)
    assert pbx.wait_idle(5)
    assert {c["state"] for c in pbx.calls()} == {"released"}
    assert len({e["call"]["extTrackingId"] for e in call_events(receiver)}) == 2
    # Only the inbound call carries redirections.
    assert all(("redirections/redirection/party/address" in e["call"]) == (e["call"]["personality"] == "Terminator")
               for e in call_events(receiver))


@pytest.mark.parametrize("body", [
    {"from": "+79997770011"}, {"from": "999777001"}, {"from": 9997770011}, {"from": None},
    {"to": "74951234567"}, {"to": "4950000000"}, {"to": None},
    {"extension": "299"}, {"extension": ""}, {"extension": 200},
    {"outcome": "busy"}, {"talk_seconds": 0}, {"talk_seconds": "40"}, {"talk_seconds": True},
    {"outcome": "missed", "talk_seconds": 10}, {"caller": CALLER},
])
def test_inbound_validation(pbx, receiver, body):
    subscribe(pbx, receiver.url())
    response = inbound(pbx, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]
    assert pbx.calls() == []
    assert receiver.events() == []


def test_inbound_control_endpoint_shape(pbx):
    assert control(pbx, "GET", "inbound").status_code == 405
    assert control(pbx, "POST", "inbound", data="[1]").status_code == 400
    assert control(pbx, "POST", "inbound", data="{").status_code == 400
    with pytest.raises(ValueError, match="company numbers"):
        pbx.inbound(CALLER, "4950000000")
    with pytest.raises(ValueError, match="not found"):
        pbx.inbound(CALLER, COMPANY, extension="299")
    assert pbx.calls() == []
    # Defaults: extension 200, answered, the default talk time.
    view = control(pbx, "POST", "inbound", json={"from": CALLER, "to": COMPANY}).json()
    assert (view["extension"], view["outcome"], view["talk_seconds"]) == ("200", "answered", 75.0)
    assert pbx.wait_idle(5)


# ---- subscriptions ----------------------------------------------------------------------------------------


def test_subscription_create_get_delete(pbx, receiver):
    created = subscribe(pbx, receiver.url(), expires=100_000)
    assert created["expires"] == 3600  # capped at max_expires: use the answer's value
    sub_id = created["subscriptionId"]
    assert uuid.UUID(sub_id)
    info = api(pbx, "GET", "subscription", params={"subscriptionId": sub_id}).json()
    assert info["subscriptionId"] == sub_id and info["url"] == receiver.url()
    assert info["subscriptionType"] == "BASIC_CALL" and info["targetType"] == "GROUP" and info["targetId"]
    assert 0 < info["expires"] <= 3600
    assert subscribe(pbx, receiver.url(), expires=60)["expires"] == 60

    mine = subscribe(pbx, receiver.url("OPERATOR"), pattern="200", kind="ADVANCED_CALL")
    info = api(pbx, "GET", "subscription", params={"subscriptionId": mine["subscriptionId"]}).json()
    assert (info["targetType"], info["targetId"], info["subscriptionType"]) == ("ABONENT", OPERATOR, "ADVANCED_CALL")
    assert len(pbx.subscriptions()) == 3

    assert api(pbx, "DELETE", "subscription", params={"subscriptionId": sub_id}).status_code == 200
    assert error_code(api(pbx, "GET", "subscription", params={"subscriptionId": sub_id}), 400) \
        == "GetSubscriptionInfoError"
    assert error_code(api(pbx, "DELETE", "subscription", params={"subscriptionId": sub_id}), 400) \
        == "GetSubscriptionInfoError"
    assert error_code(api(pbx, "GET", "subscription"), 400) == "BadRequest"


def test_abonent_subscription_and_advanced_events(pbx, receiver):
    subscribe(pbx, receiver.url("ADV"), pattern="200", kind="ADVANCED_CALL")
    subscribe(pbx, receiver.url("OTHER"), pattern="201")
    pbx.set_outcome(CUSTOMER, "answered", talk_seconds=5)
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    assert receiver.events("OTHER") == []  # another abonent's subscription hears nothing
    types = [e["type"] for e in receiver.events("ADV")]
    assert types == ["CallOriginatedEvent", "CallOriginatedEvent", "CallAnsweredEvent", "CallRecordingStartedEvent",
                     "CallReleasedEvent"]


@pytest.mark.parametrize("body", [
    {"expires": 60, "subscriptionType": "BASIC_CALL"},
    {"expires": 60, "subscriptionType": "BASIC_CALL", "url": "not a url"},
    {"expires": 60, "subscriptionType": "BASIC_CALL", "url": "ftp://example.org/x"},
    {"expires": 0, "subscriptionType": "BASIC_CALL", "url": "https://example.org/x"},
    {"expires": -5, "subscriptionType": "BASIC_CALL", "url": "https://example.org/x"},
    {"expires": "60", "subscriptionType": "BASIC_CALL", "url": "https://example.org/x"},
    {"expires": True, "subscriptionType": "BASIC_CALL", "url": "https://example.org/x"},
    {"subscriptionType": "BASIC_CALL", "url": "https://example.org/x"},
    {"expires": 60, "subscriptionType": "FULL_CALL", "url": "https://example.org/x"},
    {"expires": 60, "url": "https://example.org/x"},
    ["https://example.org/x"],
])
def test_subscription_validation(pbx, body):
    assert error_code(api(pbx, "PUT", "subscription", json=body), 400) == "BadRequest"
    assert pbx.subscriptions() == []


def test_subscription_needs_json_and_a_known_pattern(pbx):
    form = api(pbx, "PUT", "subscription", data={"expires": "60", "subscriptionType": "BASIC_CALL",
                                                 "url": "https://example.org/x"})
    assert form.status_code == 415
    unknown = {"expires": 60, "subscriptionType": "BASIC_CALL", "url": "https://example.org/x", "pattern": "299"}
    assert error_code(api(pbx, "PUT", "subscription", json=unknown), 404) == "AbonentNotFound"


def test_expired_subscription_gets_no_events(pbx, receiver):
    sub = subscribe(pbx, receiver.url("SHORT"), expires=1)  # 1 simulated second = 2 ms here
    assert sub["expires"] == 1
    time.sleep(0.05)
    assert error_code(api(pbx, "GET", "subscription", params={"subscriptionId": sub["subscriptionId"]}), 400) \
        == "GetSubscriptionInfoError"
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    assert receiver.events("SHORT") == []
    assert pbx.subscriptions() == []


def test_fault_503_on_put_subscription(pbx, receiver):
    response = control(pbx, "POST", "faults", json={"count": 2, "status": 503, "operation": "subscription"})
    assert response.status_code == 200
    body = {"expires": 60, "subscriptionType": "BASIC_CALL", "url": receiver.url()}
    first = api(pbx, "PUT", "subscription", json=body)
    assert first.status_code == 503
    assert api(pbx, "GET", "abonents").status_code == 200  # the fault is limited to PUT subscription
    assert api(pbx, "PUT", "subscription", json=body).status_code == 503
    assert pbx.subscriptions() == []
    assert api(pbx, "PUT", "subscription", json=body).status_code == 200
    assert control(pbx, "POST", "faults", json={"count": 1, "status": 503, "operation": "dial"}).status_code == 400


def test_terminate_sends_subscription_terminated_event(pbx, receiver):
    sub_id = subscribe(pbx, receiver.url("TERM"))["subscriptionId"]
    response = control(pbx, "POST", f"subscriptions/{sub_id}/terminate")
    assert response.status_code == 200
    assert pbx.wait_idle(5)
    (event,) = receiver.events("TERM")
    assert event["type"] == "SubscriptionTerminatedEvent"
    assert event["subscriptionId"] == sub_id and event["data"] == {} and event["call"] is None
    assert event["sequenceNumber"] == "1"
    assert error_code(api(pbx, "GET", "subscription", params={"subscriptionId": sub_id}), 400) \
        == "GetSubscriptionInfoError"
    assert control(pbx, "POST", f"subscriptions/{sub_id}/terminate").status_code == 404
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    assert len(receiver.events("TERM")) == 1


def test_overlapping_subscriptions_get_the_same_event_ids(pbx, receiver):
    subscribe(pbx, receiver.url("A"))
    subscribe(pbx, receiver.url("B"))
    pbx.set_outcome(CUSTOMER, "busy")
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    a, b = receiver.events("A"), receiver.events("B")
    assert [e["eventID"] for e in a] == [e["eventID"] for e in b]
    assert {e["subscriptionId"] for e in a} != {e["subscriptionId"] for e in b}


# ---- recordings and statistics ----------------------------------------------------------------------------


def test_records_list_and_mp3_download(pbx, receiver):
    subscribe(pbx, receiver.url())
    pbx.set_outcome(CUSTOMER, "answered", talk_seconds=20)
    assert originate(pbx).status_code == 200
    assert pbx.wait_idle(5)
    (call,) = pbx.calls()
    tracking = call["ext_tracking_id"]

    listed = api(pbx, "GET", "records", params={**DAY, "userId": "", "id": ""})
    assert listed.status_code == 200
    (record,) = listed.json()
    assert record["externalId"] == tracking and record["phone"] == CUSTOMER
    assert record["direction"] == "OUTBOUND" and record["duration"] == 20_000
    assert record["abonent"]["userId"] == OPERATOR and record["abonent"]["extension"] == "200"
    assert record["date"] == call["start_time"] and record["fileSize"] > 0
    assert api(pbx, "GET", "records", params={**DAY, "id": record["id"]}).json() == []
    assert api(pbx, "GET", "records", params={**DAY, "userId": "SIP0343PU07RT2@ip.beeline.ru"}).json() == []
    assert error_code(api(pbx, "GET", "records", params={"dateFrom": "2026-05-28T00:00:00",
                                                         "dateTo": DAY["dateTo"]}), 400) == "BadRequest"
    assert error_code(api(pbx, "GET", "records"), 400) == "BadRequest"

    by_call = api(pbx, "GET", f"v2/records/{tracking}/{OPERATOR}/download")
    assert by_call.status_code == 200
    assert by_call.headers["Content-Type"] == "audio/mpeg"
    audio = by_call.content
    assert audio[:2] == b"\xff\xfb" or audio[:3] == b"ID3"
    assert len(audio) == record["fileSize"] and len(audio) % 96 == 0
    assert all(audio[i:i + 4] == b"\xff\xfb\x14\xc0" for i in range(0, len(audio), 96))  # every frame
    assert error_code(api(pbx, "GET", f"v2/records/{tracking}/SIP0343PU07RT2@ip.beeline.ru/download"), 404) \
        == "RecordNotFound"
    assert error_code(api(pbx, "GET", "v2/records/1:1/" + OPERATOR + "/download"), 404) == "RecordNotFound"
    assert api(pbx, "GET", f"v2/records/{record['id']}/download").content == audio

    reference = api(pbx, "GET", f"records/{record['id']}/reference").json()
    assert requests.get(reference["url"], timeout=5).content == audio  # fetched without the token

    assert api(pbx, "DELETE", f"v2/records/{record['id']}").status_code == 200
    assert error_code(api(pbx, "GET", f"v2/records/{record['id']}/download"), 404) == "RecordNotFound"
    assert api(pbx, "GET", "records", params=DAY).json() == []


def test_statistics_rows(pbx):
    pbx.set_outcome(CUSTOMER, "answered", talk_seconds=40)
    assert originate(pbx).status_code == 200
    assert originate(pbx, "9991112201").status_code == 200  # busy
    assert originate(pbx, "9991112203").status_code == 200  # operator missed
    assert pbx.wait_idle(5)
    rows = api(pbx, "GET", "v2/statistics", params={**DAY, "page": 0, "pageSize": 100}).json()
    by_phone = {r["phone_to"]: r for r in rows}
    assert set(by_phone) == {CUSTOMER, "9991112201", "9991112203"}
    assert by_phone[CUSTOMER]["duration"] == 40_000 and by_phone[CUSTOMER]["status"] == "PLACED"
    assert by_phone["9991112201"]["duration"] == 0 and by_phone["9991112201"]["status"] == "PLACED"
    assert by_phone["9991112203"]["status"] == "MISSED"
    assert {r["direction"] for r in rows} == {"OUTBOUND"}
    assert all(isinstance(r["startDate"], int) and r["abonent"]["extension"] == "200" for r in rows)
    assert [r["startDate"] for r in rows] == sorted(r["startDate"] for r in rows)
    pages = [api(pbx, "GET", "v2/statistics", params={**DAY, "page": n, "pageSize": 2}).json() for n in range(3)]
    assert [len(p) for p in pages] == [2, 1, 0]
    assert error_code(api(pbx, "GET", "v2/statistics", params={**DAY, "pageSize": 0}), 400) == "BadRequest"
    assert error_code(api(pbx, "GET", "v2/statistics", params={"dateFrom": "2026-05-28", "dateTo": "2026-05-29"}),
                      400) == "BadRequest"


def test_reset_stops_calls_and_forgets_everything(pbx, receiver):
    subscribe(pbx, receiver.url())
    pbx.hold(True)
    assert originate(pbx).status_code == 200
    pbx.reset()
    assert pbx.wait_idle(2)
    assert pbx.calls() == [] and pbx.subscriptions() == []
    assert pbx.stats() == {"originates": 0, "max_in_flight": 0, "in_flight": 0, "api_requests": {}}
    assert control(pbx, "POST", "reset").json() == {"ok": True}


def test_silent_mp3_frames():
    audio = beeline_sandbox.silent_mp3(1.0)
    assert len(audio) == 42 * 96  # 24 ms per frame
    assert beeline_sandbox.silent_mp3(600)[:4] == b"\xff\xfb\x14\xc0"
    assert len(beeline_sandbox.silent_mp3(600)) <= 96 * 420  # capped: the files stay small
    assert beeline_sandbox.mask_phone("+79991112233") == "+7 999 ***-**-33"
    assert beeline_sandbox.mask_phone("9991112233") == "+7 999 ***-**-33"


# ---- command line -----------------------------------------------------------------------------------------


def test_cli_prints_url_masks_phones_and_exits_on_sigterm(receiver):
    env = {**os.environ, "BEELINE_API_TOKEN": "cli-token"}
    proc = subprocess.Popen([sys.executable, "-m", "infra.local.beeline_sandbox", "--port", "0",
                             "--time-scale", "0.001"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("beeline sandbox: http://127.0.0.1:") and line.endswith("/apis/portal/")
        api_url = line.split(": ", 1)[1]
        headers = {beeline_sandbox.TOKEN_HEADER: "cli-token"}
        dead = "http://127.0.0.1:9/webhooks/beeline/CLISECRET"  # nothing listens: delivery fails and is logged
        assert requests.put(api_url + "subscription", headers=headers, timeout=5,
                            json={"expires": 60, "subscriptionType": "BASIC_CALL", "url": dead}).status_code == 200
        assert requests.post(api_url + f"abonents/{CUSTOMER}/call", headers=headers, timeout=5,
                             params={"phoneNumber": CUSTOMER}).status_code == 404
        assert requests.post(api_url + "abonents/200/call", headers=headers, params={"phoneNumber": CUSTOMER},
                             timeout=5).status_code == 200
        base = api_url.removesuffix("/apis/portal/")
        assert requests.post(f"{base}/_sandbox/wait-idle", json={"timeout": 5}, timeout=10).json() == {"idle": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert "POST /apis/portal/abonents/200/call 200" in stderr
    assert "+7 999 ***-**-33" in stderr
    assert "failed" in stderr  # delivery failures are logged
    assert CUSTOMER not in stderr and "CLISECRET" not in stderr and "cli-token" not in stderr
