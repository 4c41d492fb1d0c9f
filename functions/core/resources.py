"""AWS resource names and lazily created, cached boto3 clients.

Names come from environment variables, with defaults derived from the stage so that the
CloudFormation template (infra/template.yaml), the Chalice decorators (evaluated at import time,
also while `chalice package` runs) and the local stack agree without a hand-kept list.
Clients are created on first use: cold starts pay only for what a handler touches, and tests can
start moto before any client exists.
"""

from __future__ import annotations

import functools
import os
import threading

QUEUES = ("intake", "callbacks", "recordings", "postbacks", "cdrs")


def stage() -> str:
    return os.environ.get("CALLBRIDGE_STAGE", "dev")


def queue_name(kind: str) -> str:
    """Name of a work queue: `callbridge-{stage}-{kind}`; its DLQ is the same name + `-dlq`."""
    if kind not in QUEUES:
        raise ValueError(f"unknown queue {kind!r}")
    return os.environ.get(f"{kind.upper()}_QUEUE", f"callbridge-{stage()}-{kind}")


def dlq_name(kind: str) -> str:
    return os.environ.get(f"{kind.upper()}_DLQ", f"{queue_name(kind)}-dlq")


def table_name() -> str:
    return os.environ.get("STATE_TABLE", f"callbridge-{stage()}-state")


def bucket_name() -> str:
    return os.environ.get("RECORDINGS_BUCKET", f"callbridge-{stage()}-recordings")


def alerts_topic_arn() -> str | None:
    return os.environ.get("ALERTS_TOPIC_ARN")


def max_concurrency(kind: str) -> int | None:
    """MaximumConcurrency of a queue's event source: the callbacks queue gets one dialer per channel.

    Lambda's range is 2..1000; a dialer that finds no free channel puts the callback on its offer's waiting
    list (calling/dispatch.py), so the floor of 2 never dials more than the limit. Read only while Chalice
    packages or deploys (AWS_CHALICE_CLI_MODE): in Lambda the value already sits on the mapping, and loading
    the configuration would slow every cold start.
    """
    if kind != "callbacks" or not os.environ.get("AWS_CHALICE_CLI_MODE"):
        return None
    from functions.core import config  # deferred: only the packaging process needs the document here

    return max(2, config.load().provider.channel_limit)


@functools.cache
def _session():
    import boto3  # deferred: ~0.2 s of import that only AWS-touching paths should pay

    return boto3.session.Session()


# A Lambda container runs one invocation at a time; the local runner and `chalice local` run many threads on
# one client, and botocore's default pool of 10 connections would open and drop connections under a burst.
MAX_POOL_CONNECTIONS = 64


def _config():
    from botocore.config import Config  # botocore is loaded by boto3 already: no extra import cost

    return Config(max_pool_connections=MAX_POOL_CONNECTIONS)


# A boto3 session is not thread-safe while it creates clients (botocore copies its event handlers meanwhile):
# the local runner's threads creating their first SNS client at once raised "dictionary changed size during
# iteration". Creating is serialised; using a client from many threads is safe.
_CREATING = threading.Lock()


@functools.cache
def client(service: str):
    """One client per service per container. AWS_ENDPOINT_URL (moto locally) is honoured by botocore."""
    with _CREATING:
        return _session().client(service, config=_config())


@functools.cache
def table():
    with _CREATING:
        return _session().resource("dynamodb", config=_config()).Table(table_name())


@functools.cache
def queue_url(kind: str, dlq: bool = False) -> str:
    name = dlq_name(kind) if dlq else queue_name(kind)
    return client("sqs").get_queue_url(QueueName=name)["QueueUrl"]


def reset() -> None:
    """Forget cached clients (tests that start a fresh moto)."""
    for f in (_session, client, table, queue_url):
        f.cache_clear()
