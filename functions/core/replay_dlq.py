"""Re-drive a dead-letter queue: `python -m functions.core.replay_dlq intake [--max N] [--dry-run]`.

Prints each parked message's reason, sends its body back to the work queue, and deletes it from the
DLQ only after the send succeeded (a crash replays it twice at worst; the workers are idempotent).
Works against AWS or, with AWS_ENDPOINT_URL, the local moto server. `make replay-dlq QUEUE=intake`.
"""

from __future__ import annotations

import argparse
import sys

from functions.core import resources


def replay(kind: str, max_messages: int = 1000, dry_run: bool = False, out=sys.stdout) -> int:
    sqs = resources.client("sqs")
    dlq, target = resources.queue_url(kind, dlq=True), resources.queue_url(kind)
    moved = seen = 0
    while seen < max_messages:
        batch = sqs.receive_message(
            QueueUrl=dlq, MaxNumberOfMessages=min(10, max_messages - seen), WaitTimeSeconds=1,
            VisibilityTimeout=60, MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not batch:
            break
        for message in batch:
            attrs = message.get("MessageAttributes", {})
            reason = attrs.get("reason", {}).get("StringValue", "(no reason: redriven by SQS after maxReceiveCount)")
            print(f"{message['MessageId']}: {reason}", file=out)
            seen += 1
            if dry_run:
                continue
            sqs.send_message(QueueUrl=target, MessageBody=message["Body"])
            sqs.delete_message(QueueUrl=dlq, ReceiptHandle=message["ReceiptHandle"])
            moved += 1
    # In a dry run the messages reappear in the DLQ when their 60 s visibility ends.
    print(f"{'would replay' if dry_run else 'replayed'} {seen if dry_run else moved} message(s) "
          f"to {resources.queue_name(kind)}", file=out)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue", choices=resources.QUEUES)
    parser.add_argument("--max", type=int, default=1000)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    replay(args.queue, args.max, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
