"""Shared fixtures. The environment is set before app.py is imported (Chalice applies stage variables
only during a call), and AWS_ENDPOINT_URL is removed so no test can reach a running moto server."""

from __future__ import annotations

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

from infra.local import moto_atomic

moto_atomic.patch()  # DynamoDB's conditional writes are atomic; moto's are not without this

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


@pytest.fixture
def aws(monkeypatch):
    """A fresh in-process AWS with the resources of infra/template.yaml (stage `test`)."""
    with mock_aws():
        from infra.local import stack

        env = stack.deploy(stage="test")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _clear_caches()
        yield env
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
def client(aws):
    import app

    with Client(app.app, stage_name="test", project_dir=str(ROOT)) as c:
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
        AttributeNames=["All"], MessageAttributeNames=["All"], VisibilityTimeout=30,
    ).get("Messages", [])


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
