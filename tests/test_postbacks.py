"""Postbacks (R-21) on the wire, into the SalesRender sandbox's tracker: configured per offer as
`{on, method, url, body}`, fired once per order and status group however often the status is seen,
placeholders URL-encoded in the url and JSON-escaped in the body, failures retried on our own schedule
for 24 h then parked with the reason, every attempt stored (secrets masked) and listed by the API."""

from __future__ import annotations

import datetime as dt
import json
import threading
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, deliver, receive

from functions.core import config, queues, resources, times
from functions.crm import postbacks as worker
from functions.records import leads
from functions.records import postbacks as records

SECRET = "test-salesrender-webhook-secret"
APPROVED, CANCELED = "2", "3"
AUTH = {"Authorization": "Bearer test-api-token"}


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch):
    monkeypatch.setenv("SALESRENDER_WEBHOOK_SECRET", SECRET)


@pytest.fixture
def sent(aws):
    """Every SendMessage on the postbacks queue as it goes on the wire."""
    captured = []

    def capture(params, **_):
        if params["QueueUrl"] == resources.queue_url("postbacks"):
            captured.append(dict(params))

    resources.client("sqs").meta.events.register("provide-client-params.sqs.SendMessage", capture)
    return captured


@pytest.fixture
def tracker(salesrender_sandbox, use_config):
    """Offer 101 with a GET postback on APPROVED and a POST one on APPROVED/CANCELED, both to the tracker."""
    base = salesrender_sandbox.base_url

    def change(doc):
        doc["offers"][0]["postbacks"] = [
            {"on": ["APPROVED"], "method": "GET",
             "url": base + "/tracker/pb?subid={subid}&status={status}&payout={payout}&order={order_id}"
                           "&token=s3cr3t&src={utm_source}"},
            {"on": ["APPROVED", "CANCELED"], "method": "POST", "url": base + "/tracker/post/{order_id}",
             "body": '{"subid": "{subid}", "status": "{status}", "name": "{status_name}", "lead": "{lead_id}"}'},
        ]

    use_config(change)
    return salesrender_sandbox


def lead_and_order(client, subid="clk-1", tranid="pb:1") -> tuple[str, str]:
    form = {"Name": "Анна", "Phone": "+7 999 111 22 33", "tranid": tranid, "formid": "form493249737",
            "utm_source": "vk", "sub_id": subid}
    response = client.http.post("/webhooks/tilda", body=urlencode(form),
                                headers={"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": TILDA_KEY})
    assert response.status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    lead_id = leads.lead_id_for("tilda", f"tranid:{tranid}")
    return lead_id, leads.get(lead_id)["order_id"]


def approve(client, sandbox, order_id, status_id=APPROVED):
    sandbox.set_order_status(order_id, status_id)
    response = client.http.post(f"/webhooks/salesrender/{SECRET}", headers={"Content-Type": "application/json"},
                                body=json.dumps(sandbox.webhook_body(order_id)))
    assert response.status_code == 200


def hits(sandbox, path_start="/tracker/"):
    return [h for h in sandbox.tracker_hits() if h["path"].startswith(path_start)]


def test_each_postback_fires_once_however_often_the_status_is_seen(client, tracker):
    lead_id, order_id = lead_and_order(client)
    for _ in range(3):
        approve(client, tracker, order_id)
    group = records.status_seen(order_id, "APPROVED", "Подтверждён", lead_id=lead_id, offer_id=101)  # the dialer's
    assert group == []
    assert deliver("postbacks", "postback_worker") == [True, True]
    assert deliver("postbacks", "postback_worker") == []
    [get] = hits(tracker, "/tracker/pb")
    assert get["method"] == "GET"
    assert get["query"] == {"subid": "clk-1", "status": "approved", "payout": "900", "order": order_id,
                            "token": "s3cr3t", "src": "vk"}
    [post] = hits(tracker, "/tracker/post/")
    assert post["path"] == f"/tracker/post/{order_id}"
    assert json.loads(post["body"]) == {"subid": "clk-1", "status": "approved", "name": "Подтверждён", "lead": lead_id}


def test_a_later_group_fires_its_own_postbacks_and_a_repeat_of_the_first_does_not(client, tracker):
    _lead_id, order_id = lead_and_order(client)
    approve(client, tracker, order_id)
    deliver("postbacks", "postback_worker")
    approve(client, tracker, order_id, CANCELED)
    approve(client, tracker, order_id, APPROVED)  # back again: APPROVED was told already
    deliver("postbacks", "postback_worker")
    statuses = sorted(json.loads(h["body"])["status"] for h in hits(tracker, "/tracker/post/"))
    assert statuses == ["approved", "canceled"]
    assert len(hits(tracker, "/tracker/pb")) == 1


def test_placeholders_are_url_encoded_in_the_url_and_json_escaped_in_the_body(client, tracker):
    subid = 'a"b&c=d {status} \\ й'
    _lead_id, order_id = lead_and_order(client, subid=subid)
    approve(client, tracker, order_id)
    deliver("postbacks", "postback_worker")
    [get] = hits(tracker, "/tracker/pb")
    assert get["query"]["subid"] == subid  # one value, however many & and = it holds; never re-templated
    [post] = hits(tracker, "/tracker/post/")
    assert json.loads(post["body"])["subid"] == subid


def test_payout_is_an_integer_when_whole():
    assert worker.payout_text(900.0) == "900" and worker.payout_text(12.5) == "12.5"


def test_no_postback_for_a_group_nobody_listens_to(client, tracker, sent):
    _lead_id, order_id = lead_and_order(client)
    approve(client, tracker, order_id, "1")  # PROCESSING
    assert sent == []


def test_a_failure_is_retried_after_a_minute_and_every_attempt_is_listed(client, tracker, sent):
    _lead_id, order_id = lead_and_order(client)
    tracker.add_tracker_fault(1, status=503)
    approve(client, tracker, order_id)
    assert sorted(deliver("postbacks", "postback_worker")) == [True, True]
    retry = [json.loads(p["MessageBody"]) for p in sent if json.loads(p["MessageBody"]).get("attempt") == 2]
    [again] = retry
    assert [p["DelaySeconds"] for p in sent if json.loads(p["MessageBody"]) == again] == [60]
    due = times.parse(again["due_at"])
    assert worker.send(again, now=due) == "sent"
    assert worker.send(again, now=due) == "already_sent"  # a copy of the message
    listing = client.http.get(f"/v1/postbacks?order_id={order_id}", headers=AUTH)
    assert listing.status_code == 200
    found = json.loads(listing.body)
    attempts = [a for a in found["attempts"] if "/tracker/pb" in a["url"]]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 503), (2, 200)]
    assert all("token=***" in a["url"] and "s3cr3t" not in a["url"] for a in attempts)
    assert {p["state"] for p in found["postbacks"]} == {"sent"}
    assert all(a["at"] for a in attempts)


def test_a_timeout_is_retried_too(client, tracker, sent, monkeypatch):
    monkeypatch.setattr(worker, "TIMEOUT", (1.0, 0.3))
    _lead_id, order_id = lead_and_order(client)
    tracker.add_tracker_fault(2, delay_seconds=1.0)
    approve(client, tracker, order_id)
    deliver("postbacks", "postback_worker")
    failed = [a for a in records.of_order(order_id)["attempts"]]
    assert {a["error"] for a in failed} == {"timeout"} and {a["status_code"] for a in failed} == {None}
    assert sorted(json.loads(p["MessageBody"]).get("attempt") for p in sent) == [1, 1, 2, 2]


def test_retries_back_off_and_last_at_least_24_hours_then_park_with_the_reason(client, tracker, sent, monkeypatch):
    _lead_id, order_id = lead_and_order(client)
    tracker.add_tracker_fault(1000, status=500)
    approve(client, tracker, order_id)
    [first] = [json.loads(p["MessageBody"]) for p in sent if json.loads(p["MessageBody"])["postback_id"]
               == records.postback_id(config.load().offer(101).postbacks[0])]
    start = times.utcnow().replace(microsecond=0)  # due_at is kept to the second
    message, now, delays = first, start, []
    while True:
        try:
            outcome = worker.send(message, now=now)
        except queues.Poison as exc:
            reason = str(exc)
            break
        assert outcome == "retry_scheduled"
        message = json.loads(sent[-1]["MessageBody"])
        nxt = times.parse(message["due_at"])
        delays.append(round((nxt - now).total_seconds()))
        now = nxt
    assert delays[:7] == [60, 120, 240, 480, 960, 1920, 3600] and set(delays[7:]) == {3600}
    assert (now - start) >= dt.timedelta(hours=24)  # the last attempt is at least a day after the first
    assert "given up" in reason and "HTTP 500" in reason and "token=***" in reason
    [marker] = [p for p in records.of_order(order_id)["postbacks"] if p["method"] == "GET"]
    assert marker["gave_up_at"] and marker["state"] == "pending"


def test_a_given_up_postback_is_parked_in_the_dlq_and_a_replay_tries_again(client, tracker, sent, monkeypatch):
    _lead_id, order_id = lead_and_order(client)
    tracker.add_tracker_fault(2, status=500)
    approve(client, tracker, order_id)
    monkeypatch.setattr(worker, "RETRY_FOR_SECONDS", 0)  # the day is over at the first failure
    assert deliver("postbacks", "postback_worker") == [True, True]  # parked, acknowledged
    parked = receive("postbacks", dlq=True)
    assert len(parked) == 2
    assert all(m["MessageAttributes"]["code"]["StringValue"] == "postback_gave_up" for m in parked)
    for m in parked:  # make replay-dlq sends the same body back
        queues.send("postbacks", json.loads(m["Body"]))
    assert deliver("postbacks", "postback_worker") == [True, True]
    assert {p["state"] for p in records.of_order(order_id)["postbacks"]} == {"sent"}


def test_copies_of_one_attempt_send_one_request(client, tracker):
    _lead_id, order_id = lead_and_order(client)
    approve(client, tracker, order_id)
    receive("postbacks")  # the queued jobs: taken off, the copies below stand in for them
    pid = records.postback_id(config.load().offer(101).postbacks[0])
    job = {"job": "postback", "order_id": order_id, "group": "APPROVED", "postback_id": pid, "attempt": 1}
    tracker.add_tracker_fault(1, status=200, delay_seconds=0.5)  # the first copy is slow
    outcomes = []

    def work():
        try:
            outcomes.append(worker.send(dict(job)))
        except queues.Transient:
            outcomes.append("retry later")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hits(tracker, "/tracker/pb")) == 1
    assert sorted(outcomes).count("sent") == 1 and set(outcomes) <= {"sent", "retry later", "already_sent"}
    assert worker.send(dict(job)) == "already_sent"


def test_a_crash_before_the_job_is_queued_is_repaired_by_the_next_sighting(client, tracker, monkeypatch):
    lead_id, order_id = lead_and_order(client)
    real, calls = queues.send, []

    def flaky(kind, body, delay_seconds=0):
        if kind == "postbacks" and not calls:
            calls.append(body)
            raise RuntimeError("crash between the marker and the send")
        return real(kind, body, delay_seconds)

    monkeypatch.setattr(queues, "send", flaky)
    with pytest.raises(RuntimeError):
        records.status_seen(order_id, "APPROVED", "Подтверждён", lead_id=lead_id, offer_id=101)
    assert len(records.status_seen(order_id, "APPROVED", "Подтверждён", lead_id=lead_id, offer_id=101)) == 2
    assert records.status_seen(order_id, "APPROVED", "Подтверждён", lead_id=lead_id, offer_id=101) == []


def test_an_order_from_outside_fires_with_the_subid_of_its_referer(client, tracker, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    order_id = tracker.create_crm_order({
        "projectId": "1", "statusId": "1", "orderData": {"phoneFields": [{"field": "phone", "value": "+79995554433"}]},
        "source": {"refererUri": "https://cpa.example/?CLICK_ID=net-9"}})["id"]
    approve(client, tracker, order_id, "1")
    approve(client, tracker, order_id)
    deliver("postbacks", "postback_worker")
    [get] = hits(tracker, "/tracker/pb")
    assert get["query"]["subid"] == "net-9" and get["query"]["order"] == order_id


def test_listing_needs_the_bearer_token_and_an_order_id(client):
    assert client.http.get("/v1/postbacks?order_id=1").status_code == 401
    response = client.http.get("/v1/postbacks", headers=AUTH)
    assert response.status_code == 400 and json.loads(response.body)["field"] == "order_id"
    response = client.http.get("/v1/postbacks?order_id=" + "x" * 100, headers=AUTH)
    assert response.status_code == 400 and json.loads(response.body)["field"] == "order_id"
    assert json.loads(client.http.get("/v1/postbacks?order_id=77", headers=AUTH).body) == {
        "order_id": "77", "postbacks": [], "attempts": []}


def test_masking_hides_passwords_and_credential_parameters():
    assert worker.masked("https://u:pw@t.example/pb?api_key=1&subid=x&Sig=2&status=ok") == \
        "https://u:***@t.example/pb?api_key=***&subid=x&Sig=***&status=ok"


def test_malformed_jobs_are_parked(aws):
    with pytest.raises(queues.Poison):
        worker.process({"job": "postback", "order_id": "1", "group": "NOPE", "postback_id": "x", "attempt": 1})
    with pytest.raises(queues.Poison):
        worker.process({"job": "other"})


# ---- the configuration shape ---------------------------------------------------------------------------

POSTBACK_YAML = """
    postbacks:
      - on: [APPROVED]           # SalesRender status groups that fire it
        method: GET              # GET or POST
        url: "https://tracker.example/pb?subid={subid}&status={status}&payout={payout}&order={order_id}"
      - on: [APPROVED, CANCELED]
        method: POST
        url: "https://tracker.example/pb"
        body: '{"subid": "{subid}", "status": "{status}"}'   # POST only, optional
"""


MINIMAL = """
tariff_rub_per_minute: 2
budget: {monthly_rub: 1000}
offers:
  - id: 101
    name: Drops
    salesrender: {project_id: "1", status_id: "1"}
    caller_id: "+74951234567"
    operators: ["200"]
    payout_rub: 900
"""


def _document(extra: str) -> str:
    return MINIMAL + extra.lstrip("\n")


def test_the_issue_shape_parses_yaml_on_included():
    cfg = config.parse(_document(POSTBACK_YAML))
    first, second = cfg.offer(101).postbacks
    assert first.on == ["APPROVED"] and first.method == "GET" and first.body is None
    assert second.on == ["APPROVED", "CANCELED"] and second.body == '{"subid": "{subid}", "status": "{status}"}'


@pytest.mark.parametrize(("extra", "message"), [
    ('    postbacks:\n      - {on: [PAID], url: "https://t.example/"}\n', "offers.0.postbacks.0.on.0"),
    ('    postbacks:\n      - {on: [APPROVED], url: "https://t.example/?x={clickid}"}\n',
     "unknown placeholder {clickid}"),
    ('    postbacks:\n      - {on: [APPROVED], url: "https://t.example/", body: "x"}\n', "POST only"),
    ('    postbacks:\n      - {url: "https://t.example/"}\n', "offers.0.postbacks.0.on"),
    ('    postbacks:\n      - {on: [APPROVED], statuses: [APPROVED], url: "https://t.example/"}\n', "statuses"),
])
def test_bad_postbacks_are_named(extra, message):
    with pytest.raises(config.ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        config.parse(_document(extra))


def test_callbridge_config_may_be_an_absolute_path(tmp_path, monkeypatch):
    path = tmp_path / "outside" / "stage.yaml"
    path.parent.mkdir()
    path.write_text(_document(POSTBACK_YAML), encoding="utf-8")
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(path))
    config.load.cache_clear()
    try:
        assert config.config_path() == path
        assert len(config.load().offer(101).postbacks) == 2
    finally:
        config.load.cache_clear()
