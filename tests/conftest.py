"""Shared fixtures. The environment is set before app.py is imported (Chalice applies stage variables
only during a call), and AWS_ENDPOINT_URL is removed so no test can reach a running moto server."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.update(
    AWS_DEFAULT_REGION="us-east-1",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SECURITY_TOKEN="testing",
    AWS_SESSION_TOKEN="testing",
    CALLBRIDGE_STAGE="test",
    CALLBRIDGE_CONFIG=str(ROOT / "config" / "local.yaml"),
    TILDA_API_KEY="test-tilda-key",
    SALESRENDER_API_TOKEN="test-salesrender-token",
    SALESRENDER_API_URL="http://salesrender.invalid/companies/1/CRM",
    BEELINE_API_URL="http://beeline.invalid/apis/portal/",
    BEELINE_API_TOKEN="test-beeline-token",
    CALLBRIDGE_API_TOKEN="test-api-token",
    POWERTOOLS_SERVICE_NAME="callbridge",
    POWERTOOLS_METRICS_NAMESPACE="callbridge",
)
os.environ.pop("CALLBACK_DELAY_SECONDS", None)

import pytest
from chalice.test import Client
from moto import mock_aws

from infra.local import moto_atomic, moto_speed, moto_transactions

moto_atomic.patch()  # DynamoDB's conditional writes are atomic; moto's are not without this
moto_transactions.patch()  # a transaction's rollback copies its items, not the whole table (records/daily.py)
moto_speed.patch()  # a Query reads its partition, not the whole table sorted

TILDA_KEY = os.environ["TILDA_API_KEY"]
EVENTS = ROOT / "events"


def _clear_caches() -> None:
    from functions.core import config, resources
    from functions.intake import order_worker
    from functions.providers.beeline import client as beeline
    from functions.providers.salesrender import client as salesrender

    resources.reset()
    config.load.cache_clear()
    salesrender.default_client.cache_clear()
    beeline.default_client.cache_clear()
    order_worker._create_order_once.cache_clear()


class _Account:
    """The moto account of a test module: the stack is deployed into it once, and before each test it is
    emptied back to what the deploy left (no items, messages or objects; nothing a test created)."""

    def __init__(self):
        import boto3

        session = boto3.session.Session(region_name="us-east-1")
        self.dynamodb = session.resource("dynamodb")
        self.sqs, self.s3, self.sns = (session.client(name) for name in ("sqs", "s3", "sns"))
        self.deployed = self._inventory()

    def _inventory(self) -> dict[str, set[str]]:
        def every(client, operation: str, key: str, field: str | None = None) -> set[str]:
            pages = client.get_paginator(operation).paginate()
            return {item[field] if field else item for page in pages for item in page.get(key, [])}

        return {"tables": every(self.dynamodb.meta.client, "list_tables", "TableNames"),
                "queues": every(self.sqs, "list_queues", "QueueUrls"),
                "buckets": {b["Name"] for b in self.s3.list_buckets()["Buckets"]},
                "topics": every(self.sns, "list_topics", "Topics", "TopicArn"),
                "subscriptions": every(self.sns, "list_subscriptions", "Subscriptions", "SubscriptionArn")}

    def empty(self) -> None:
        now = self._inventory()
        for name in now["tables"]:
            if name in self.deployed["tables"]:
                self._empty_table(name)
            else:
                self.dynamodb.meta.client.delete_table(TableName=name)
        with pytest.MonkeyPatch.context() as mp:
            # moto refuses a second purge of a queue within 60 s unless told otherwise.
            mp.setenv("MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR", "false")
            for url in now["queues"]:
                if url in self.deployed["queues"]:
                    self.sqs.purge_queue(QueueUrl=url)  # in moto: visible, in-flight and delayed alike
                else:
                    self.sqs.delete_queue(QueueUrl=url)
        for bucket in now["buckets"]:
            self._empty_bucket(bucket)
            if bucket not in self.deployed["buckets"]:
                self.s3.delete_bucket(Bucket=bucket)
        for arn in now["subscriptions"] - self.deployed["subscriptions"]:
            self.sns.unsubscribe(SubscriptionArn=arn)
        for arn in now["topics"] - self.deployed["topics"]:
            self.sns.delete_topic(TopicArn=arn)

    def _empty_table(self, name: str) -> None:
        table = self.dynamodb.Table(name)
        keys = [k["AttributeName"] for k in table.key_schema]
        scan = {"ProjectionExpression": ", ".join(f"#k{i}" for i in range(len(keys))),
                "ExpressionAttributeNames": {f"#k{i}": key for i, key in enumerate(keys)}}
        while True:
            page = table.scan(**scan)
            with table.batch_writer() as batch:
                for item in page["Items"]:
                    batch.delete_item(Key={key: item[key] for key in keys})
            if "LastEvaluatedKey" not in page:
                return
            scan["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _empty_bucket(self, bucket: str) -> None:
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                self.s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            versions = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                        for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
            if versions:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": versions, "Quiet": True})


_BOTOCORE_DATA: dict = {}  # the JSON botocore parses (service models, endpoints), shared across aws tests


def _create_loader(search_path_string=None):
    """botocore's data loader, with a cache common to every session: each test's fresh clients (see
    _clear_caches) then skip re-parsing the service models, ~0.1 s a test. The data are read-only."""
    from botocore import loaders

    loader = loaders.create_loader(search_path_string)
    loader._cache = _BOTOCORE_DATA
    return loader


@pytest.fixture(scope="module")
def _aws_stack():
    """moto with the resources of infra/template.yaml (stage `test`), deployed once per test module.
    The mock is active only while a test that asks for `aws` runs; between tests moto keeps the data."""
    from infra.local import stack

    mock = mock_aws()
    mock.start()
    try:
        env = stack.deploy(stage="test")
        account = _Account()
    except BaseException:
        mock.stop()
        raise
    mock.stop(remove_data=False)
    yield mock, env, account
    mock.start(reset=False)
    mock.stop()  # and the data goes


@pytest.fixture
def aws(_aws_stack, monkeypatch):
    """An in-process AWS with the resources of infra/template.yaml (stage `test`), empty as if just deployed."""
    mock, env, account = _aws_stack
    monkeypatch.setattr("botocore.session.create_loader", _create_loader)
    mock.start(reset=False)
    try:
        account.empty()
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _clear_caches()
        yield env
    finally:
        mock.stop(remove_data=False)
        _clear_caches()


@pytest.fixture
def use_config(monkeypatch, tmp_path):
    """Point CALLBRIDGE_CONFIG at a variant of config/local.yaml: use_config(lambda doc: ...)."""
    import yaml

    from functions.core import config

    def apply(change):
        document = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))
        change(document)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
        monkeypatch.setenv("CALLBRIDGE_CONFIG", str(path))
        config.load.cache_clear()
        return path

    return apply


@pytest.fixture
def dynamodb_requests(aws):
    """Every DynamoDB request as it goes out, the idempotency layer's too: (operation, its item's pk, or a
    Query's partition: its key condition's first value, or None). Taken after boto3 has turned the table
    resource's conditions into expressions (registered after them, on the same event)."""
    from functions.core import resources

    sent = []

    def capture(params, model, **_):
        pk = (params.get("Key") or params.get("Item") or {}).get("pk")
        if model.name == "Query":
            pk = next(iter((params.get("ExpressionAttributeValues") or {}).values()), None)
        sent.append((model.name, pk.get("S") if isinstance(pk, dict) else pk))

    clients = (resources.table().meta.client, resources.client("dynamodb"))
    for dynamodb in clients:
        dynamodb.meta.events.register("before-parameter-build.dynamodb", capture)
    yield sent
    for dynamodb in clients:
        dynamodb.meta.events.unregister("before-parameter-build.dynamodb", capture)


_REAL_ENVIRON = os.environ


@pytest.fixture(autouse=True)
def _environ_stays_the_process_environment():
    """Fail the test that leaves os.environ replaced by a copy: every later test in the worker would see
    that copy's values (a CALLBACK_DELAY_SECONDS=0 outliving its monkeypatch) and monkeypatch could not undo
    them."""
    yield
    if os.environ is not _REAL_ENVIRON:
        os.environ = _REAL_ENVIRON  # noqa: B003 - puts the process environment object itself back
        pytest.fail("os.environ was left replaced by a copy (the Chalice test client used from threads?)")


@contextlib.contextmanager
def _stage_variables_already_set(self, environment_variables):
    yield


@pytest.fixture
def client(aws, monkeypatch):
    """Chalice's test client, safe to call from threads. Per request it swaps os.environ for a copy holding
    the stage's variables and swaps the original back after, so two requests in threads can end with the
    first one's copy in place for good. The stage's variables are set once here instead."""
    import chalice.test

    import app

    with Client(app.app, stage_name="test", project_dir=str(ROOT)) as c:
        scoped = c._chalice_config.scope(c._chalice_config.chalice_stage, "api_handler")
        for name, value in scoped.environment_variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(chalice.test.BaseClient, "_patched_env_vars", _stage_variables_already_set)
        yield c


@pytest.fixture
def salesrender_sandbox(monkeypatch):
    from functions.providers.salesrender import client as salesrender
    from infra.local.salesrender_sandbox import SalesRenderSandbox

    with SalesRenderSandbox(token=os.environ["SALESRENDER_API_TOKEN"]).start() as sandbox:
        monkeypatch.setenv("SALESRENDER_API_URL", sandbox.api_url)
        salesrender.default_client.cache_clear()
        yield sandbox
    salesrender.default_client.cache_clear()


@pytest.fixture
def no_http_backoff(monkeypatch):
    """urllib3 retries 5xx with 1 s + 2 s of backoff; the same retries without the sleeping."""
    from functions.core import http
    from functions.providers.beeline import client as beeline

    real = http.idempotent_retry
    monkeypatch.setattr(http, "idempotent_retry", lambda total=3: real(total).new(backoff_factor=0))
    beeline.default_client.cache_clear()  # its session holds the retry it was built with


@pytest.fixture
def log_output():
    """What the Powertools logger writes, as the JSON lines CloudWatch would get."""
    import io

    from functions.core.observability import logger

    buffer = io.StringIO()
    previous = logger.registered_handler.setStream(buffer)
    yield buffer
    logger.registered_handler.setStream(previous)


@pytest.fixture
def beeline_sandbox(monkeypatch):
    """The Beeline sandbox in-process, with time compressed 100x (a 75 s call lasts 0.75 s)."""
    from functions.providers.beeline import client as beeline
    from infra.local.beeline_sandbox import BeelineSandbox

    # Twelve operator abonents, extensions 200..211 (the default sandbox has 200..202).
    abonents = [{"userId": f"SIP0343PU{ext}QK@ip.beeline.ru", "phone": f"9001000{ext}", "firstName": "Оператор",
                 "lastName": ext, "email": None, "department": "Sales", "extension": ext}
                for ext in map(str, range(200, 212))]
    with BeelineSandbox(token=os.environ["BEELINE_API_TOKEN"], time_scale=0.01, abonents=abonents).start() as sandbox:
        monkeypatch.setenv("BEELINE_API_URL", sandbox.api_url)
        beeline.default_client.cache_clear()
        yield sandbox
    beeline.default_client.cache_clear()


class EventSink:
    """An HTTP endpoint on loopback that collects what a sandbox posts to it (Beeline's XSI events)."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                sink.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/events"


def receive(kind: str, dlq: bool = False, wait: int = 0, max_messages: int = 10) -> list[dict]:
    """Messages now visible on a queue, with attributes (they become invisible for 30 s)."""
    from functions.core import resources

    return resources.client("sqs").receive_message(
        QueueUrl=resources.queue_url(kind, dlq=dlq), MaxNumberOfMessages=max_messages, WaitTimeSeconds=wait,
        AttributeNames=["All"], MessageAttributeNames=["All"], VisibilityTimeout=120,
    ).get("Messages", [])


def callbacks_at_once(events: list[dict]) -> list:
    """Run the callback worker on each Lambda-shaped event in its own thread, all released together:
    "ok" per event handled, or the exception it raised."""
    import app
    from infra.local.runner import LambdaContext

    barrier = threading.Barrier(len(events))
    results: list = []

    def invoke(event):
        barrier.wait()
        try:
            app.callback_worker(event, LambdaContext("callbridge-test-callback_worker"))
            results.append("ok")
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=invoke, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def deliver(kind: str, handler_name: str) -> list[bool]:
    """Deliver every visible message of a queue to an app.py handler in Lambda's event shape, as the
    local runner does (same code): True per message handled and deleted, False per failure."""
    import app
    from functions.core import resources
    from infra.local.runner import invoke

    sqs = resources.client("sqs")
    url = resources.queue_url(kind)
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    handler = getattr(app, handler_name)
    return [invoke(sqs, url, arn, m, handler, handler_name, "us-east-1") for m in receive(kind)]


def bodies(messages: list[dict]) -> list[dict]:
    return [json.loads(m["Body"]) for m in messages]


def post_lead(client, sample="tilda_form_urlencoded.txt", content_type="application/x-www-form-urlencoded") -> str:
    """Post a sample from events/ to the Tilda webhook; returns its lead id, the intake message left visible."""
    from functions.core import resources

    response = client.http.post("/webhooks/tilda", body=(EVENTS / sample).read_text().strip(),
                                headers={"Content-Type": content_type, "X-Api-Key": TILDA_KEY})
    assert response.status_code == 200
    [message] = receive("intake")
    # Peeking hid it: make it visible again for the worker.
    resources.client("sqs").change_message_visibility(
        QueueUrl=resources.queue_url("intake"), ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    return json.loads(message["Body"])["lead_id"]
