"""Re-drive a dead-letter queue: `python -m functions.core.replay_dlq intake --stage prod [--max N] [--dry-run]`.

Prints each parked message's reason, sends its body back to the work queue, and deletes it from the
DLQ only after the send succeeded (a crash replays it twice at worst; the workers are idempotent).
`make replay-dlq QUEUE=intake STAGE=prod [DRY_RUN=1] [MAX=N]`. The stage names the queues
(`callbridge-<stage>-<queue>[-dlq]`, as infra/template.yaml makes them). A deployed stage uses your AWS
credentials and region (default us-east-1); `--stage local` talks to the local stack's moto server
(AWS_ENDPOINT_URL, else http://127.0.0.1:$MOTO_PORT, port 5000) with its dummy credentials.
"""

from __future__ import annotations

import argparse
import os
import sys

from functions.core import resources


def replay(kind: str, max_messages: int = 1000, dry_run: bool = False, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a replaced stdout
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


def _environment(stage: str, environ) -> None:
    """Point resources.py at the stage's queues (nothing from another stage left in the environment)."""
    shell_stage = environ.get("CALLBRIDGE_STAGE")
    if shell_stage and shell_stage != stage:
        raise SystemExit(f"CALLBRIDGE_STAGE={shell_stage} in your shell, but --stage {stage}: make them equal")
    environ["CALLBRIDGE_STAGE"] = stage
    for kind in resources.QUEUES:  # names follow the stage, as the template makes them
        environ.pop(f"{kind.upper()}_QUEUE", None)
        environ.pop(f"{kind.upper()}_DLQ", None)
    if not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")):
        environ["AWS_DEFAULT_REGION"] = "us-east-1"
    if stage == "local":
        environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{environ.get('MOTO_PORT', '5000')}")
        if not environ.get("AWS_ACCESS_KEY_ID") and not environ.get("AWS_PROFILE"):
            environ["AWS_ACCESS_KEY_ID"] = environ["AWS_SECRET_ACCESS_KEY"] = "testing"  # noqa: S105 - moto's
    resources.reset()


def main(argv: list[str] | None = None, environ=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue", choices=resources.QUEUES)
    parser.add_argument("--stage", default=os.environ.get("CALLBRIDGE_STAGE", "dev"))
    parser.add_argument("--max", type=int, default=1000)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    _environment(args.stage, os.environ if environ is None else environ)
    replay(args.queue, args.max, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
