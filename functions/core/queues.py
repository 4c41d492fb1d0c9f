"""SQS plumbing shared by the workers: sending, backoff on failure, and poison messages to the DLQ.

Every SQS handler runs with batch size 1 (Chalice 1.34 cannot enable ReportBatchItemFailures, so a
partial-batch answer would be ignored and failed records deleted). A handler's outcome:
- success: the message is deleted by Lambda;
- `Transient` or any unexpected error: the message's visibility is pushed out by an exponential
  backoff (2 s doubling, capped at 15 min, jittered) and the error re-raised, so SQS delivers it
  again later. A blip costs seconds (retries after about 2, 4, 8, 16 s); up to MAX_RECEIVES
  deliveries (about 2.8 hours in all) ride out an hour-long provider outage (R-7);
- `Poison`, or the last allowed delivery failing: the body goes to the queue's DLQ *with its reason*
  as message attributes, and the original is acknowledged. The queue's own redrive policy
  (maxReceiveCount 25 in infra/template.yaml) stays as the net for crashes that skip all of this.
`python -m functions.core.replay_dlq <queue>` (`make replay-dlq`) re-drives a DLQ.
A `ConfigError` (the configuration document is invalid) is retried like a transient error, so a fixed
document lets the message through, and emits `ConfigErrors` at once: its alarm is the loud part (issue 12).
"""

from __future__ import annotations

import json
import random

from functions.core import resources
from functions.core.observability import is_config_error, logger, metric, report_config_error

MAX_RECEIVES = 20  # 2+4+...+512 s, then 900 s: 10,022 s (2.8 h) before the last delivery, < maxReceiveCount 25
BACKOFF_BASE_SECONDS = 2
BACKOFF_CAP_SECONDS = 900
SQS_MAX_DELAY = 900


class Transient(Exception):
    """Worth retrying later (provider down, lock held, rate limited)."""


class Poison(Exception):
    """Will never succeed as is: park it in the DLQ with this reason for a person to look at."""

    def __init__(self, reason: str, code: str = "poison"):
        super().__init__(reason)
        self.code = code


def send(kind: str, body: dict, delay_seconds: int = 0) -> str:
    response = resources.client("sqs").send_message(
        QueueUrl=resources.queue_url(kind),
        MessageBody=json.dumps(body, separators=(",", ":")),
        DelaySeconds=max(0, min(SQS_MAX_DELAY, int(delay_seconds))),
    )
    return response["MessageId"]


def send_to_dlq(kind: str, body: str, reason: str, code: str, receive_count: int) -> None:
    resources.client("sqs").send_message(
        QueueUrl=resources.queue_url(kind, dlq=True),
        MessageBody=body,
        MessageAttributes={
            "reason": {"DataType": "String", "StringValue": reason[:1000] or "unknown"},
            "code": {"DataType": "String", "StringValue": code},
            "receive_count": {"DataType": "Number", "StringValue": str(receive_count)},
        },
    )


def backoff_seconds(receive_count: int) -> int:
    base = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(max(0, receive_count - 1), 30))
    return max(1, round(base * random.uniform(0.8, 1.0)))  # jitter spreads a recovering provider's load


def run(kind: str, record, handler) -> None:
    """Process one SQS record (Chalice's SQSRecord or anything with .body/.receipt_handle/.to_dict())."""
    raw = record.to_dict()
    receive_count = int(raw.get("attributes", {}).get("ApproximateReceiveCount", "1"))
    message_id = raw.get("messageId", "")
    try:
        body = json.loads(record.body)
        if not isinstance(body, dict):
            raise ValueError("not an object")
        json.dumps(body, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") no store or client takes
    except (ValueError, RecursionError):  # RecursionError: nested too deep for Python's parser
        logger.error("malformed message parked in DLQ", extra={"queue": kind, "message_id": message_id})
        send_to_dlq(kind, record.body, "malformed message body", "malformed", receive_count)
        metric("MessagesParked", queue=kind)
        return
    try:
        handler(body)
    except Poison as exc:
        _park(kind, record.body, str(exc), exc.code, receive_count, message_id)
    except Exception as exc:
        config_error = is_config_error(exc)
        if config_error:
            # A broken configuration document: alarm at once (ConfigErrors), but keep the message: once the
            # document is fixed and deployed, the next delivery goes through. Parked only when it outlasts the
            # retries, with a reason that says so (replay it after the fix).
            report_config_error(exc, f"queue {kind}")
        if receive_count >= MAX_RECEIVES:
            _park(kind, record.body, f"gave up after {receive_count} tries: {exc}", "config" if config_error
                  else "exhausted", receive_count, message_id)
            return
        delay = backoff_seconds(receive_count)
        logger.warning(
            "message failed, will retry",
            extra={"queue": kind, "message_id": message_id, "receive_count": receive_count,
                   "retry_in_seconds": delay, "error": str(exc), "error_type": type(exc).__name__},
        )
        metric("MessageRetries", queue=kind)
        try:
            resources.client("sqs").change_message_visibility(
                QueueUrl=resources.queue_url(kind), ReceiptHandle=record.receipt_handle, VisibilityTimeout=delay
            )
        except Exception:  # noqa: BLE001 - the queue's own visibility timeout still brings it back
            logger.warning("could not set retry backoff", extra={"queue": kind, "message_id": message_id})
        raise


def _park(kind: str, body: str, reason: str, code: str, receive_count: int, message_id: str) -> None:
    logger.error("message parked in DLQ", extra={"queue": kind, "message_id": message_id, "reason": reason,
                                                 "code": code})
    send_to_dlq(kind, body, reason, code, receive_count)
    metric("MessagesParked", queue=kind)
