"""The local stand-in for Lambda's event sources: long-polls the SQS queues and runs the schedules,
invoking the Chalice handlers of app.py with events in the shapes Lambda uses.

Which queue feeds which handler, and which schedule runs which, is read from the Chalice app itself
(`app.event_sources`), so a new `@app.on_sqs_message` or `@app.schedule` is picked up with no change
here. Semantics follow Lambda's SQS event source mapping with batch size 1: a record whose handler
returns is deleted; one whose handler raises stays in the queue and comes back when its visibility
timeout ends (the workers push that out themselves for backoff).

Concurrency follows Lambda's too: each queue is polled by several threads, each running one message at a
time, as Lambda runs several function instances; the callbacks queue by as many as its event source's
maximum concurrency (one dialer per channel: the configuration's channel limit), the others by
RUNNER_POLLERS (default 8), so that a burst is not held up by the local stand-in.

Polls are 20-second long polls, as Lambda's pollers make them: with one-second polls the idle pollers' empty
receives were 40% of the moto server's requests under the bench's burst. Stopping does not wait for them: a
stop waits for the invocations in progress only, and a message a poll receives after the stop is not run (it
comes back after its visibility timeout, as one does when Lambda scales in).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import uuid

from functions.core import resources
from functions.core.observability import logger

POLL_SECONDS = 20  # Lambda's long poll
STOP_WAIT_SECONDS = 70  # the longest SQS worker timeout (60 s) and some
DEFAULT_POLLERS = 8
_RATE = re.compile(r"^rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


class LambdaContext:
    """What handlers and Powertools read from Lambda's context object."""

    def __init__(self, function_name: str, timeout_seconds: int = 60):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 256
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def sqs_event(message: dict, queue_arn: str, region: str) -> dict:
    """A Lambda SQS event with one record, from a ReceiveMessage result."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message.get("Attributes", {}),
                "messageAttributes": {
                    k: {"stringValue": v.get("StringValue"), "dataType": v["DataType"]}
                    for k, v in message.get("MessageAttributes", {}).items()
                },
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
        ]
    }


def invoke(sqs, url: str, arn: str, message: dict, handler, function_name: str, region: str,
           record=None) -> bool:
    """Run the handler on one received message as Lambda would; delete it when the handler returns.
    `record(function_name, seconds, cpu_seconds)` is told each invocation's duration and this thread's CPU time
    in it (the bench's Lambda GB-s)."""
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        handler(sqs_event(message, arn, region), LambdaContext(function_name))
    except Exception as exc:
        if record is not None:
            record(function_name, time.perf_counter() - started, time.thread_time() - cpu)
        # As in Lambda: the record stays and returns after its visibility timeout.
        logger.warning("handler failed", extra={"function_name": function_name, "queue_url": url,
                                                "error_type": type(exc).__name__})
        return False
    if record is not None:
        record(function_name, time.perf_counter() - started, time.thread_time() - cpu)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return True


def schedule_event(rule_name: str, region: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": now, "region": region,
        "resources": [f"arn:aws:events:{region}:123456789012:rule/{rule_name}"], "detail": {},
    }


def rate_seconds(expression: str) -> int | None:
    match = _RATE.match(expression.strip())
    if not match:
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2).rstrip("s")]


class Runner:
    def __init__(self, app_module, schedule_scale: float = 1.0):
        self.app_module = app_module
        self.stop_event = threading.Event()
        self.schedule_scale = schedule_scale
        self.region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        self.delivered = 0
        self._count_lock = threading.Lock()
        self.invocations: dict[str, list[float]] = {}  # function name -> [count, seconds, CPU seconds]
        self.running = 0  # invocations in progress (a stop waits for these, not for idle long polls)
        self._idle = threading.Condition(self._count_lock)

    def record(self, function_name: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self._count_lock:
            entry = self.invocations.setdefault(function_name, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds
            entry[2] += cpu_seconds

    @staticmethod
    def function_name(handler_string: str) -> str:
        """The Lambda function name Chalice deploys: callbridge-<stage>-<handler>."""
        return f"callbridge-{resources.stage()}-{handler_string.rsplit('.', 1)[-1]}"

    def _handler(self, handler_string: str):
        return getattr(self.app_module, handler_string.rsplit(".", 1)[-1])

    def sources(self):
        queues, schedules = [], []
        for source in self.app_module.app.event_sources:
            kind = type(source).__name__
            if kind == "SQSEventConfig" and source.queue:
                queues.append((source.queue, source.handler_string, getattr(source, "maximum_concurrency", None)))
            elif getattr(source, "schedule_expression", None) is not None:  # ScheduledEventConfig
                expression = source.schedule_expression
                text = expression.to_string() if hasattr(expression, "to_string") else str(expression)
                schedules.append((source.name, text, source.handler_string))
        return queues, schedules

    def pollers(self, queue_name: str, maximum_concurrency: int | None = None) -> int:
        """How many threads deliver a queue: its event source's maximum concurrency where it has one (the
        callbacks queue: one per channel), else RUNNER_POLLERS."""
        if maximum_concurrency:
            return maximum_concurrency
        if queue_name == resources.queue_name("callbacks"):
            from functions.core import config  # the decorator's value is computed only while Chalice packages

            return max(2, config.load().provider.channel_limit)
        return max(1, int(os.environ.get("RUNNER_POLLERS", DEFAULT_POLLERS)))

    def poll(self, queue_name: str, handler_string: str) -> None:
        handler = self._handler(handler_string)
        sqs = resources.client("sqs")
        url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        while not self.stop_event.is_set():
            try:
                messages = sqs.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=POLL_SECONDS,
                    AttributeNames=["All"], MessageAttributeNames=["All"],
                ).get("Messages", [])
            except Exception as exc:  # moto restarting, network blip: keep polling
                logger.warning("receive failed", extra={"queue": queue_name, "error": str(exc)})
                self.stop_event.wait(1)
                continue
            for message in messages:
                with self._count_lock:
                    if self.stop_event.is_set():
                        break  # received after the stop: it comes back after its visibility timeout
                    self.delivered += 1
                    self.running += 1
                try:
                    invoke(sqs, url, arn, message, handler, self.function_name(handler_string), self.region,
                           self.record)
                finally:
                    with self._count_lock:
                        self.running -= 1
                        self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """After a stop: wait for the invocations in progress (the pollers' long polls are left behind)."""
        with self._count_lock:
            return self._idle.wait_for(lambda: self.running == 0, timeout)

    def tick(self, name: str, expression: str, handler_string: str) -> None:
        period = rate_seconds(expression)
        if period is None:
            logger.warning("schedule not run locally (only rate() is)", extra={"schedule": name})
            return
        handler = self._handler(handler_string)
        interval = max(1.0, period * self.schedule_scale)
        while not self.stop_event.wait(interval):
            self.run_schedule(name, handler_string, handler)

    def run_schedule(self, name: str, handler_string: str, handler=None) -> None:
        handler = handler or self._handler(handler_string)
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            handler(schedule_event(name, self.region), LambdaContext(self.function_name(handler_string)))
            self.record(self.function_name(handler_string), time.perf_counter() - started, time.thread_time() - cpu)
        except Exception:
            logger.exception("scheduled handler failed",
                             extra={"function_name": self.function_name(handler_string), "schedule": name})

    def start(self) -> list[threading.Thread]:
        queues, schedules = self.sources()
        # Unlike EventBridge, every schedule runs once at start, and before any queue is delivered: the first
        # call must find the Beeline subscription in place (its events would otherwise go nowhere).
        for name, expression, handler_string in schedules:
            if rate_seconds(expression) is not None:
                self.run_schedule(name, handler_string)
        threads = [threading.Thread(target=self.poll, args=(queue, handler), daemon=True, name=f"sqs:{queue}:{i}")
                   for queue, handler, concurrency in queues for i in range(self.pollers(queue, concurrency))]
        threads += [threading.Thread(target=self.tick, args=s, daemon=True, name=f"schedule:{s[0]}")
                    for s in schedules]
        for thread in threads:
            thread.start()
        return threads


def main() -> int:
    import app as app_module  # the real app.py, imported once like Lambda's runtime would

    runner = Runner(app_module, float(os.environ.get("CALLBRIDGE_SCHEDULE_SCALE", "1")))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop_event.set())
    threads = runner.start()
    queues, schedules = runner.sources()
    print(json.dumps({"runner": "started", "queues": {q: runner.pollers(q, c) for q, _, c in queues},
                      "schedules": [s for s, *_ in schedules]}), flush=True)
    while not runner.stop_event.wait(0.5):
        pass
    runner.wait_idle(STOP_WAIT_SECONDS)
    for thread in threads:
        if thread.name.startswith("schedule:"):
            thread.join(timeout=STOP_WAIT_SECONDS)  # a schedule run in progress; an idle one returns at once
    with runner._count_lock:
        invocations = {name: {"count": n, "seconds": round(t, 3), "cpu_seconds": round(c, 3)}
                       for name, (n, t, c) in runner.invocations.items()}
    # What the bench reads: Lambda invocations and their durations, as AWS would bill them.
    print(json.dumps({"runner": "stopped", "invocations": invocations}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
