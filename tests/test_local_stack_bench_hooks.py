"""What the bench reads from the local stack (issue 9 item 4), proven in-process and fast:

- the moto server counts requests by service and operation (DynamoDB and SQS requests per lead);
- it snapshots its state once idle, not four times a second under load (the exclusive lock of every
  snapshot stopped all requests; under a burst that doubled the Tilda -> originate latency);
- the Beeline sandbox draws talk times from a range, has operators beyond the default three, and counts
  its API requests by operation (provider requests per dialled lead);
- the runner delivers a queue with several pollers, the callbacks queue with one per channel.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import requests

from infra.local import moto_atomic
from infra.local.beeline_sandbox import BeelineSandbox


def _call(app, environ: dict) -> tuple[str, bytes]:
    status = []
    body = b"".join(app({"REQUEST_METHOD": "POST", "PATH_INFO": "/", "wsgi.input": io.BytesIO(b""), **environ},
                        lambda s, h: status.append(s)))
    return status[0], body


def test_moto_requests_are_counted_by_service_and_operation():
    seen = []

    def moto(environ, start_response):
        seen.append(environ["wsgi.input"].read())  # the body is still there for moto
        start_response("200 OK", [])
        return [b"{}"]

    counts = moto_atomic.RequestCounts(moto)
    auth = "AWS4-HMAC-SHA256 Credential=local/20261202/us-east-1/{}/aws4_request, SignedHeaders=host, Signature=x"
    for _ in range(2):
        _call(counts, {"HTTP_AUTHORIZATION": auth.format("dynamodb"), "HTTP_X_AMZ_TARGET": "DynamoDB_20120810.PutItem"})
    _call(counts, {"HTTP_AUTHORIZATION": auth.format("sqs"), "HTTP_X_AMZ_TARGET": "AmazonSQS.SendMessage"})
    body = b"Action=Publish&TopicArn=x"
    _call(counts, {"HTTP_AUTHORIZATION": auth.format("sns"), "CONTENT_TYPE": "application/x-www-form-urlencoded",
                   "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)})
    _call(counts, {"HTTP_AUTHORIZATION": auth.format("s3"), "REQUEST_METHOD": "PUT"})
    status, answer = _call(counts, {"REQUEST_METHOD": "GET", "PATH_INFO": moto_atomic.COUNTS_PATH})
    assert status == "200 OK"
    assert json.loads(answer) == {"dynamodb": {"PutItem": 2}, "sqs": {"SendMessage": 1}, "sns": {"Publish": 1},
                                  "s3": {"PUT": 1}}
    assert body in seen


def test_moto_snapshots_once_idle_or_when_old_not_on_every_change(tmp_path):
    snapshots = moto_atomic.Snapshots(tmp_path / "state.pickle")
    now = time.monotonic()
    assert not snapshots.due(now)  # nothing changed
    snapshots.changes = 1
    snapshots.last_request = snapshots.last_save = now
    assert not snapshots.due(now + moto_atomic.SNAPSHOT_SECONDS)  # a change a quarter second ago: still busy
    assert snapshots.due(now + moto_atomic.IDLE_SECONDS)  # idle: save
    snapshots.last_request = now + moto_atomic.MAX_SNAPSHOT_AGE_SECONDS  # requests never stopped ...
    assert snapshots.due(now + moto_atomic.MAX_SNAPSHOT_AGE_SECONDS)  # ... but the last snapshot is old
    assert moto_atomic.IDLE_SECONDS > moto_atomic.SNAPSHOT_SECONDS


def test_beeline_sandbox_talk_range_extra_operators_and_request_counts():
    with BeelineSandbox(token="t", time_scale=0.001, talk_range=(60, 180), extra_abonents=12) as pbx:
        headers = {"X-MPBX-API-AUTH-TOKEN": "t"}
        abonents = requests.get(pbx.api_url + "abonents", headers=headers, timeout=5).json()
        assert {a["extension"] for a in abonents} >= {"200", "201", "202", "300", "311"}
        talks = {pbx.outcome_for(f"99900000{i:02d}")[1] for i in range(10, 40)}
        assert all(60 <= t <= 180 for t in talks) and len(talks) > 1
        assert requests.post(pbx.api_url + "abonents/305/call?phoneNumber=9990000055", headers=headers,
                             timeout=5).status_code == 200
        requests.get(pbx.base_url + "/_sandbox/calls", timeout=5)  # control endpoints are not the provider's API
        stats = requests.get(pbx.base_url + "/_sandbox/stats", timeout=5).json()
        assert stats["api_requests"] == {"abonents": 1, "call": 1}


def test_the_runner_polls_each_queue_with_several_threads_and_callbacks_with_one_per_channel(monkeypatch):
    from functions.core import config, resources
    from infra.local import runner

    monkeypatch.delenv("RUNNER_POLLERS", raising=False)
    r = runner.Runner(app_module=None)
    assert r.pollers(resources.queue_name("intake")) == runner.DEFAULT_POLLERS > 1
    assert r.pollers(resources.queue_name("callbacks")) == max(2, config.load().provider.channel_limit)
    assert r.pollers(resources.queue_name("callbacks"), 7) == 7  # the event source's own maximum wins
    monkeypatch.setenv("RUNNER_POLLERS", "3")
    assert r.pollers(resources.queue_name("recordings")) == 3


class _OneMessageQueue:
    """An SQS client that hands out one message; `on_receive` runs as it does (e.g. a stop arriving)."""

    def __init__(self, on_receive=lambda: None):
        self.on_receive, self.deleted, self.given = on_receive, [], False

    def get_queue_url(self, QueueName):
        return {"QueueUrl": f"http://sqs/{QueueName}"}

    def get_queue_attributes(self, QueueUrl, AttributeNames):
        return {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:123456789012:q"}}

    def receive_message(self, **_):
        self.on_receive()
        if self.given:
            return {}
        self.given = True
        return {"Messages": [{"MessageId": "m1", "ReceiptHandle": "r1", "Body": "{}"}]}

    def delete_message(self, QueueUrl, ReceiptHandle):
        self.deleted.append(ReceiptHandle)


def test_a_message_a_poll_receives_after_the_stop_is_not_run(monkeypatch):
    """It stays in flight and comes back after its visibility timeout, as when Lambda scales in."""
    import threading
    import types

    from functions.core import resources
    from infra.local import runner

    ran = []
    app = types.SimpleNamespace(worker=lambda event, context: ran.append(event))
    r = runner.Runner(app_module=app)
    queue = _OneMessageQueue(on_receive=r.stop_event.set)
    monkeypatch.setattr(resources, "client", lambda service: queue)
    poller = threading.Thread(target=r.poll, args=("q", "app.worker"))
    poller.start()
    poller.join(10)
    assert not poller.is_alive()
    assert ran == [] and queue.deleted == [] and r.delivered == 0


def test_a_stop_waits_for_the_invocation_in_progress_not_for_idle_polls(monkeypatch):
    import threading
    import types

    from functions.core import resources
    from infra.local import runner

    started, release = threading.Event(), threading.Event()

    def worker(event, context):
        started.set()
        release.wait(10)

    r = runner.Runner(app_module=types.SimpleNamespace(worker=worker))
    queue = _OneMessageQueue()
    monkeypatch.setattr(resources, "client", lambda service: queue)
    threading.Thread(target=r.poll, args=("q", "app.worker"), daemon=True).start()
    assert started.wait(10)
    r.stop_event.set()
    assert r.wait_idle(0.2) is False  # the handler still runs
    release.set()
    assert r.wait_idle(10) is True
    assert queue.deleted == ["r1"]  # it finished, so it was deleted


def test_the_runner_times_each_invocation_and_its_cpu_apart_from_its_waiting():
    """The bench prices Lambda's CPU share apart from waiting (bench/cost.billed_seconds): the runner must tell
    a handler that computes from one that waits on I/O."""
    from bench import cost
    from infra.local import runner

    class Sqs:
        def delete_message(self, **_):
            pass

    def computes(event, context):
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass

    def waits(event, context):
        time.sleep(0.05)

    recorded = {}
    message = {"MessageId": "m", "ReceiptHandle": "r", "Body": "{}", "Attributes": {}, "MD5OfBody": ""}
    for handler in (computes, waits):
        assert runner.invoke(Sqs(), "url", "arn:aws:sqs:us-east-1:1:q", message, handler, handler.__name__,
                             "us-east-1", record=lambda name, wall, cpu: recorded.__setitem__(name, (wall, cpu)))
    assert recorded["computes"][1] > 0.8 * recorded["computes"][0]
    assert recorded["waits"][1] < 0.2 * recorded["waits"][0]
    assert cost.billed_seconds({"seconds": 1.0, "cpu_seconds": 0.1}) == pytest.approx(0.9 + 0.1 * 1769 / 256)
