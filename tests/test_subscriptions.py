"""The Beeline event subscription keeper (R-16) against the Beeline sandbox: created once, checked,
renewed by the *granted* lifetime, recreated when gone, terminated or pointed at an old URL, and a
503 from `PUT subscription` never loses the current one."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import requests

from functions.core import store
from functions.providers.beeline import client as beeline
from functions.tracking import subscriptions

BASE = "http://127.0.0.1:9"  # nothing listens: the sandbox's event posts fail at once, nothing waits
SECRET = "sub-test-secret"
URL = f"{BASE}/webhooks/beeline/{SECRET}"
T0 = 1_800_000_000.0  # a logical "now" for keep(): expiry decisions are made against it


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("PUBLIC_BASE_URL", BASE + "/")  # a trailing slash must not double up
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)


@pytest.fixture
def pbx(aws, beeline_sandbox, env):
    return beeline_sandbox


@pytest.fixture
def metrics(monkeypatch):
    names: list[str] = []
    monkeypatch.setattr(subscriptions, "metric", lambda name, *a, **k: names.append(name))
    return names


def _sandbox(monkeypatch, **kwargs):
    from infra.local.beeline_sandbox import BeelineSandbox

    sandbox = BeelineSandbox(token=os.environ["BEELINE_API_TOKEN"], **kwargs).start()
    monkeypatch.setenv("BEELINE_API_URL", sandbox.api_url)
    beeline.default_client.cache_clear()
    return sandbox


def live(pbx) -> list[str]:
    return [s["subscriptionId"] for s in pbx.subscriptions()]


def test_webhook_url_is_base_plus_secret(env):
    assert subscriptions.webhook_url() == URL


def test_first_tick_creates_and_the_next_one_only_checks(pbx):
    assert subscriptions.keep(now=T0) == "created"
    [sub] = pbx.subscriptions()
    assert sub["url"] == URL and sub["subscriptionType"] == "BASIC_CALL" and sub["requested"] == 86400
    record = subscriptions.current()
    assert record["subscription_id"] == sub["subscriptionId"]
    assert record["granted_expires"] == 86400 and record["expires_at"] == int(T0 + 86400)
    assert SECRET not in str(record)  # the table holds a hash of the URL, not the webhook secret

    assert subscriptions.keep(now=T0 + 300) == "ok"
    assert live(pbx) == [sub["subscriptionId"]]
    assert pbx.stats()["originates"] == 0 and subscriptions.current() == record


def test_renewal_follows_the_granted_lifetime(aws, env, monkeypatch):
    pbx = _sandbox(monkeypatch, max_expires=7200)  # asked 86400, granted 7200
    try:
        assert subscriptions.keep(now=T0) == "created"
        old = subscriptions.current()
        assert old["granted_expires"] == 7200 and old["expires_at"] == int(T0 + 7200)
        # Renew with max(15 min, 25 % of 7200 s = 30 min) left: not at 2200 s left, yes at 1700 s.
        assert subscriptions.keep(now=T0 + 5000) == "ok"
        assert subscriptions.keep(now=T0 + 5500) == "renewed"
        new = subscriptions.current()
        assert new["subscription_id"] != old["subscription_id"]
        assert new["expires_at"] == int(T0 + 5500 + 7200)
        assert live(pbx) == [new["subscription_id"]]  # the old one was deleted after the new one was stored
    finally:
        pbx.stop()


def test_short_grants_are_renewed_every_tick(aws, env, monkeypatch):
    pbx = _sandbox(monkeypatch, max_expires=600)  # shorter than the 15-minute margin
    try:
        assert subscriptions.keep(now=T0) == "created"
        first = subscriptions.current()["subscription_id"]
        assert subscriptions.keep(now=T0 + 300) == "renewed"
        assert live(pbx) == [subscriptions.current()["subscription_id"]] != [first]
    finally:
        pbx.stop()


def test_a_subscription_gone_at_beeline_is_recreated(pbx):
    assert subscriptions.keep() == "created"
    old = subscriptions.current()["subscription_id"]
    beeline.default_client().unsubscribe(old)  # deleted on Beeline's side
    assert subscriptions.keep() == "recreated"
    new = subscriptions.current()["subscription_id"]
    assert new != old and live(pbx) == [new]


def test_an_expired_subscription_is_recreated(aws, env, monkeypatch):
    pbx = _sandbox(monkeypatch, max_expires=1, time_scale=0.01)  # lives 10 ms
    try:
        assert subscriptions.keep() == "created"
        old = subscriptions.current()["subscription_id"]
        deadline = time.monotonic() + 5
        while live(pbx) and time.monotonic() < deadline:  # wait for it to lapse (no assertion on time)
            time.sleep(0.01)
        assert live(pbx) == []
        assert subscriptions.keep() == "recreated"
        assert subscriptions.current()["subscription_id"] != old
    finally:
        pbx.stop()


def test_503_on_put_keeps_the_current_subscription(pbx, no_http_backoff, metrics, log_output):
    assert subscriptions.keep(now=T0) == "created"
    before = subscriptions.current()
    pbx.add_fault(count=100, status=503, operation="subscription")  # outlasts the client's own retries
    assert subscriptions.keep(now=T0 + 86000) == "retry_later"  # renewal due, Beeline refuses: no exception
    assert subscriptions.current() == before
    assert live(pbx) == [before["subscription_id"]]
    assert "SubscriptionRenewFailed" in metrics
    assert '"level":"WARNING"' in log_output.getvalue() and SECRET not in log_output.getvalue()

    assert requests.delete(f"{pbx.base_url}/_sandbox/faults", timeout=5).status_code == 200
    assert subscriptions.keep(now=T0 + 86000 + 300) == "renewed"  # the next tick
    assert live(pbx) == [subscriptions.current()["subscription_id"]] != [before["subscription_id"]]


def test_an_unreachable_check_changes_nothing(pbx, no_http_backoff):
    assert subscriptions.keep(now=T0) == "created"
    before = subscriptions.current()
    pbx.add_fault(count=100, status=503, operation="subscription_get")
    assert subscriptions.keep(now=T0 + 300) == "retry_later"  # unknown is not "gone": no recreation
    assert subscriptions.current() == before and live(pbx) == [before["subscription_id"]]


def test_503_on_the_first_create_stores_nothing(pbx, no_http_backoff):
    pbx.add_fault(count=100, status=503, operation="subscription")
    assert subscriptions.keep() == "retry_later"
    assert subscriptions.current() is None and live(pbx) == []
    requests.delete(f"{pbx.base_url}/_sandbox/faults", timeout=5)
    assert subscriptions.keep() == "created"


def test_a_permanent_refusal_fails_the_tick_loudly_but_keeps_the_record(pbx, metrics):
    assert subscriptions.keep(now=T0) == "created"
    before = subscriptions.current()
    pbx.add_fault(count=1, status=400, operation="subscription")
    with pytest.raises(beeline.BeelineError):
        subscriptions.keep(now=T0 + 86000)
    assert subscriptions.current() == before and "SubscriptionRenewFailed" in metrics


def test_terminated_current_subscription_is_replaced_at_once(pbx):
    assert subscriptions.keep() == "created"
    old = subscriptions.current()["subscription_id"]
    pbx.terminate_subscription(old)
    assert subscriptions.on_terminated(old) == "recreated"
    new = subscriptions.current()["subscription_id"]
    assert new != old and live(pbx) == [new]


def test_terminated_event_through_the_webhook(pbx, client):
    assert subscriptions.keep() == "created"
    old = subscriptions.current()["subscription_id"]
    pbx.terminate_subscription(old)
    body = (f'<?xml version="1.0" encoding="UTF-8"?><xsi:Event xmlns:xsi="http://schema.broadsoft.com/xsi" '
            f'xmlns:xsi1="http://www.w3.org/2001/XMLSchema-instance" xsi1:type="xsi:SubscriptionEvent">'
            f"<xsi:eventID>{uuid.uuid4()}</xsi:eventID><xsi:sequenceNumber>1</xsi:sequenceNumber>"
            f"<xsi:subscriptionId>{old}</xsi:subscriptionId><xsi:targetId>group</xsi:targetId>"
            f'<xsi:eventData xsi1:type="xsi:SubscriptionTerminatedEvent"/></xsi:Event>').encode()
    response = client.http.post(f"/webhooks/beeline/{SECRET}", body=body,
                                headers={"Content-Type": "application/xml; charset=UTF-8"})
    assert response.status_code == 200
    new = subscriptions.current()["subscription_id"]
    assert new != old and live(pbx) == [new]


def test_terminated_event_for_an_old_subscription_changes_nothing(pbx):
    assert subscriptions.keep(now=T0) == "created"
    old = subscriptions.current()["subscription_id"]
    assert subscriptions.keep(now=T0 + 86000) == "renewed"
    record = subscriptions.current()
    assert subscriptions.on_terminated(old) == "ignored"
    assert subscriptions.current() == record and live(pbx) == [record["subscription_id"]]


def test_terminated_with_nothing_stored_creates(pbx):
    assert subscriptions.on_terminated("someone-elses") == "created"
    assert live(pbx) == [subscriptions.current()["subscription_id"]]


def test_a_new_public_base_url_recreates_with_the_new_url(pbx, monkeypatch):
    assert subscriptions.keep() == "created"
    old = subscriptions.current()["subscription_id"]
    monkeypatch.setenv("PUBLIC_BASE_URL", "http://localhost:9")
    assert subscriptions.keep() == "recreated"
    [sub] = pbx.subscriptions()
    assert sub["subscriptionId"] != old and sub["url"] == f"http://localhost:9/webhooks/beeline/{SECRET}"
    assert subscriptions.keep() == "ok"


def test_two_concurrent_keepers_create_one_subscription(pbx, monkeypatch):
    # Each PUT is held 0.3 s, so a keeper that did not wait for the other would PUT as well.
    pbx.add_fault(count=2, delay_seconds=0.3, operation="subscription")
    puts: list[str] = []
    real = beeline.BeelineClient.subscribe

    def counted(self, *args, **kwargs):
        puts.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(beeline.BeelineClient, "subscribe", counted)
    barrier = threading.Barrier(2)
    results: list[str] = []

    def run():
        barrier.wait()
        results.append(subscriptions.keep())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) in (["created", "ok"], ["created", "retry_later"])
    assert len(puts) == 1  # not two subscriptions raced for the record: only one was ever asked for
    assert live(pbx) == [subscriptions.current()["subscription_id"]]
    assert store.get(subscriptions.LOCK) is None  # released


def test_a_held_lock_makes_the_tick_wait(pbx):
    assert store.put_new(subscriptions.LOCK, {"holder": "other", "expires_at": int(time.time()) + 60})
    assert subscriptions.keep() == "retry_later"
    assert live(pbx) == [] and subscriptions.current() is None


def test_a_stale_keeper_does_not_overwrite_a_newer_record(pbx, monkeypatch):
    assert subscriptions.keep(now=T0) == "created"
    first = subscriptions.current()["subscription_id"]
    client = beeline.default_client()
    real = client.subscribe

    def subscribe_while_another_keeper_takes_over(*args, **kwargs):
        answer = real(*args, **kwargs)
        store.update(subscriptions.CURRENT, {"subscription_id": "newer-by-another-keeper"})
        return answer

    monkeypatch.setattr(client, "subscribe", subscribe_while_another_keeper_takes_over)
    assert subscriptions.keep(now=T0 + 86000) == "retry_later"
    assert subscriptions.current()["subscription_id"] == "newer-by-another-keeper"
    assert live(pbx) == [first]  # ours (the surplus) was deleted, and the one we meant to replace kept
