"""The fault suite (issue 8, item 14): the whole chain in-process — Tilda posts, the three queues in Lambda's
event shape, the SalesRender and Beeline sandboxes, the XSI events posted back to the webhook, the
reconciler — each run with one kind of fault. Every run must end the same way: every lead in the CRM once,
every call settled, every lease free, and the month's spend equal to the sum of the calls' costs.

Time is compressed, not waited for: the queues' retry backoff is zero (a failed message is visible again at
once), and the providers' read timeouts are a fraction of a second so a "slow answer" fault costs little."""

from __future__ import annotations

import contextlib
import random
import re
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, EventSink, deliver

from functions.calling import channels
from functions.core import queues, resources, store
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.records import calls, leads, spend
from functions.tracking import subscriptions

SECRET = "fault-suite-secret"
FORM = "application/x-www-form-urlencoded"
QUEUES = (("intake", "intake_worker"), ("callbacks", "callback_worker"), ("recordings", "recording_worker"))
PHONES = ("+79991117701", "+79991117755", "+79991117702", "+79991117766")  # busy, answered, no answer, answered
_RELEASE = re.compile(rb"CallReleasedEvent")


@pytest.fixture
def chain(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    monkeypatch.setenv("RECONCILE_AFTER_SECONDS", "0")
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    monkeypatch.setattr(salesrender, "TIMEOUT", (1, 0.5))
    monkeypatch.setattr(beeline, "TIMEOUT", (1, 0.5))
    sink = EventSink()
    beeline.default_client().subscribe(sink.url, 3600)
    yield {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox, "sink": sink, "posted": 0}
    sink.server.shutdown()


def post_leads(chain, phones=PHONES):
    for n, phone in enumerate(phones):
        body = urlencode({"Name": "Анна", "Phone": phone, "tranid": f"fault:{n}", "formid": "form493249737"})
        answer = chain["client"].http.post("/webhooks/tilda", body=body,
                                           headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
        assert answer.status_code == 200


def post_events(chain, transform=None) -> int:
    """Post the events the PBX sent since the last call to the webhook (optionally reordered, doubled, cut)."""
    chain["pbx"].wait_idle(10)
    new = chain["sink"].bodies[chain["posted"]:]
    chain["posted"] += len(new)
    for body in (transform(new) if transform else new):
        answer = chain["client"].http.post(f"/webhooks/beeline/{SECRET}", body=body,
                                           headers={"Content-Type": "application/xml; charset=UTF-8"})
        assert answer.status_code == 200
    return len(new)


def deliver_twice(kind: str, handler_name: str) -> list[bool]:
    """Every visible message handled by two concurrent-looking deliveries (SQS is at-least-once)."""
    from conftest import receive

    import app
    from infra.local.runner import invoke

    sqs = resources.client("sqs")
    url = resources.queue_url(kind)
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    handler = getattr(app, handler_name)
    results = []
    for message in receive(kind):
        results.append(invoke(sqs, url, arn, dict(message), handler, handler_name, "us-east-1"))
        results.append(invoke(sqs, url, arn, dict(message), handler, handler_name, "us-east-1"))
    return results


def run_until_quiet(chain, *, twice=False, transform=None, rounds=40):
    for _ in range(rounds):
        moved = 0
        for kind, handler in QUEUES:
            moved += len((deliver_twice if twice else deliver)(kind, handler))
        moved += post_events(chain, transform)
        if not moved:
            break
    reconcile()
    for kind, handler in QUEUES:  # what the reconciler's settling queued (post-call jobs)
        deliver(kind, handler)


def reconcile():
    import app
    from infra.local.runner import LambdaContext, schedule_event

    app.call_reconciler(schedule_event("call_reconciler", "us-east-1"), LambdaContext("call_reconciler"))


def every_call() -> list[dict]:
    items = resources.table().scan()["Items"]
    return [calls.get(i["pk"].removeprefix("CALL#")) for i in items if i["pk"].startswith("CALL#")]


def assert_settled(chain, phones=PHONES):
    orders = chain["crm"].orders()
    assert len(orders) == len(phones), "every lead in the CRM once"
    for n, _ in enumerate(phones):
        lead = leads.get(leads.lead_id_for("tilda", f"tranid:fault:{n}"))
        assert lead and lead.get("order_id") in {str(o["id"]) for o in orders}
    dialled = every_call()
    assert dialled, "the chain placed no call at all"
    assert [c["state"] for c in dialled if c["state"] != "ended"] == [], "every call settled"
    assert calls.open_calls() == []
    assert channels.busy("Beeline_Main", 5) == 0, "every channel lease free"
    held = [i for i in resources.table().scan()["Items"] if i["pk"] == "OPERATORS" and "busy_call" in i]
    assert held == [], "every operator free"
    assert spend.spent() == pytest.approx(sum(float(c.get("cost_rub") or 0) for c in dialled))
    assert len(chain["pbx"].calls()) == len(dialled), "each call dialled once"


def test_no_fault(chain):
    post_leads(chain)
    run_until_quiet(chain)
    assert_settled(chain)


@pytest.mark.parametrize("fault", [
    {"status": 503, "count": 3},
    {"graphql_error": "ERR_INTERNAL", "count": 3},
    {"carry_out": True, "delay_seconds": 1.0, "count": 2},     # the order is made, the answer comes too late
    {"carry_out": True, "drop_connection": True, "count": 2},  # the order is made, the answer is lost
    {"carry_out": True, "status": 502, "count": 2},            # made, then a 5xx
], ids=["503", "graphql-error", "slow-answer", "lost-answer", "made-then-5xx"])
def test_salesrender_faults(chain, fault):
    chain["crm"].add_fault(**fault)
    post_leads(chain)
    run_until_quiet(chain)
    assert_settled(chain)


@pytest.mark.parametrize("fault", [
    {"status": 503, "operation": "call", "count": 2},
    {"delay_seconds": 1.0, "proceed": True, "operation": "call", "count": 1},  # rings, answer too late
], ids=["originate-503", "originate-timeout"])
def test_beeline_faults(chain, fault):
    chain["pbx"].add_fault(**fault)
    post_leads(chain)
    run_until_quiet(chain)
    assert_settled(chain)


def test_events_duplicated_shuffled_and_one_release_lost(chain):
    rng = random.Random(7)
    lost = []

    def scramble(bodies):
        doubled = bodies + bodies
        rng.shuffle(doubled)
        releases = [b for b in doubled if _RELEASE.search(b)]
        if releases and not lost:
            lost.append(releases[0])
            doubled = [b for b in doubled if b != releases[0]]
        return doubled

    post_leads(chain)
    run_until_quiet(chain, transform=scramble)
    assert lost, "the scenario dropped no release"
    assert_settled(chain)


def test_every_message_delivered_twice(chain):
    post_leads(chain)
    deliver_twice("intake", "intake_worker")
    deliver_twice("callbacks", "callback_worker")
    # Before any event is applied, each dialled call still holds its channel and operator: the losing copy
    # must not have released what the winner took.
    live = len(chain["pbx"].calls())
    assert live and channels.busy("Beeline_Main", 5) == live
    held = [i for i in resources.table().scan()["Items"] if i["pk"] == "OPERATORS" and "busy_call" in i]
    assert len(held) == live
    run_until_quiet(chain, twice=True)
    assert_settled(chain)


def test_worker_killed_between_originate_and_its_state_write(chain, monkeypatch):
    real = calls.update
    killed = []

    def crash_once(call_id, **changes):
        if "originated_at" in changes and not killed:
            killed.append(call_id)
            raise SystemExit("worker killed")  # not an Exception: nothing in the handler may swallow it
        return real(call_id, **changes)

    monkeypatch.setattr(calls, "update", crash_once)
    post_leads(chain)
    with pytest.raises(SystemExit):
        run_until_quiet(chain)
    monkeypatch.setattr(calls, "update", real)
    run_until_quiet(chain)
    assert killed
    assert_settled(chain)


def test_subscription_keeper_rides_out_beeline_errors(chain, monkeypatch):
    import app
    from infra.local.runner import LambdaContext, schedule_event

    monkeypatch.setenv("PUBLIC_BASE_URL", "http://127.0.0.1:9")  # never delivered to: only the subscription counts
    before = len(chain["pbx"].subscriptions())
    chain["pbx"].add_fault(status=503, operation="subscription", count=5)
    for _ in range(3):
        with contextlib.suppress(Exception):  # a failed run is retried by the next schedule
            app.subscription_keeper(schedule_event("subscription_keeper", "us-east-1"),
                                    LambdaContext("subscription_keeper"))
    ours = [s for s in chain["pbx"].subscriptions() if "127.0.0.1:9" in str(s.get("url", ""))]
    assert len(chain["pbx"].subscriptions()) == before + 1 and len(ours) == 1
    assert store.get(subscriptions.CURRENT) is not None
