"""The pruned, stripped, sourceless Lambda package still works (issue 9 items 5-6, infra/lambda_package.py).

The package is built once by the real packaging step (`chalice package`, then infra.deploy.compile_package),
unzipped, and run the way Lambda's runtime runs it: `python -S -B`, the task root first on sys.path and only
what the runtime itself provides after it (boto3, botocore and their dependencies from this venv). Nothing
else from the venv is reachable, so a module the prune list took away fails the import instead of being
found in site-packages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from infra import deploy, lambda_package
from infra.local.stack import OUTPUT_ENV

ROOT = Path(__file__).resolve().parent.parent
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
# What Lambda's python3.11 runtime puts on sys.path after the task root (boto3 and what it needs).
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "dateutil", "six.py")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean") / "out"
    env = {k: v for k, v in os.environ.items() if k not in OUTPUT_ENV.values()}
    env.update(CALLBRIDGE_STAGE="dev", CALLBRIDGE_CONFIG="config/dev.yaml", AWS_DEFAULT_REGION="us-east-1")
    reports: dict[str, lambda_package.Report] = {}
    real = lambda_package.compile_package

    def recording(zip_path, runtime, *args, **kwargs):
        reports[Path(zip_path).name] = report = real(zip_path, runtime, *args, **kwargs)
        return report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lambda_package, "compile_package", recording)
        deploy.package(ROOT, "dev", env, out)  # one packaging at a time in the project (deploy.package's lock)
    zip_path = out / "deployment.zip"
    task_root = tmp_path_factory.mktemp("task-root")
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        zf.extractall(task_root)
    runtime = tmp_path_factory.mktemp("runtime")
    for name in RUNTIME_PROVIDED:
        (runtime / name).symlink_to(SITE_PACKAGES / name)
    return {"zip": zip_path, "names": set(names), "report": reports["deployment.zip"], "task_root": task_root,
            "runtime": runtime}


CHILD = r"""
import base64, importlib, json, os, pkgutil, sys, threading
task_root, runtime = sys.argv[1:3]
sys.path.insert(0, task_root)
sys.path.append(runtime)
results = {}

import app
import functions
for info in pkgutil.walk_packages(functions.__path__, "functions."):
    importlib.import_module(info.name)  # every model class is built here (pydantic schemas)
results["functions_modules"] = sum(1 for m in sys.modules if m.startswith("functions."))

class Context:
    function_name = "callbridge-dev-api_handler"
    function_version = "$LATEST"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:callbridge-dev-api_handler"
    aws_request_id = "package-test"
    log_group_name = "/aws/lambda/callbridge-dev-api_handler"
    log_stream_name = "package-test"
    def get_remaining_time_in_millis(self):
        return 60000

def get(path):
    event = {"resource": path, "path": path, "httpMethod": "GET", "headers": {"Host": "example.invalid"},
             "multiValueHeaders": {"Host": ["example.invalid"]}, "queryStringParameters": None,
             "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
             "requestContext": {"resourcePath": path, "httpMethod": "GET", "path": "/api" + path, "stage": "api",
                                "requestId": "package-test", "identity": {"sourceIp": "127.0.0.1"}},
             "body": None, "isBase64Encoded": False}
    return app.app(event, Context())

health = get("/v1/health")
results["health"] = [health["statusCode"], json.loads(health["body"])]
results["plugin_info"] = get("/salesrender-plugin/info")["statusCode"]

# pydantic: the stage configuration validated into its models, and a bad value refused
from functions.core import config
cfg = config.load()
results["offers"] = len(cfg.offers)
from pydantic import BaseModel, ValidationError
class Probe(BaseModel):
    n: int
results["pydantic"] = Probe.model_validate({"n": "7"}).n
try:
    Probe.model_validate({"n": "seven"})
    results["pydantic_refuses"] = False
except ValidationError:
    results["pydantic_refuses"] = True

# PyJWT RS512 with cryptography's RSA, and Fernet
import jwt
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
token = jwt.encode({"sub": "plugin"}, key, algorithm="RS512")
results["jwt"] = jwt.decode(token, key.public_key(), algorithms=["RS512"])["sub"]
other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
try:
    jwt.decode(token, other.public_key(), algorithms=["RS512"])
    results["jwt_refuses_other_key"] = False
except jwt.InvalidSignatureError:
    results["jwt_refuses_other_key"] = True
fernet_key = Fernet.generate_key()
results["fernet"] = Fernet(fernet_key).decrypt(Fernet(fernet_key).encrypt(b"secret at rest")).decode()

# PyYAML with libyaml (the stripped extension), phonenumbers
import yaml
results["yaml"] = [yaml.__with_libyaml__, yaml.load("a: [1, 2]", Loader=yaml.CSafeLoader)]
import phonenumbers
number = phonenumbers.parse("8 (912) 345-67-89", "RU")
results["phone"] = [phonenumbers.is_valid_number(number), phonenumbers.region_code_for_number(number)]

# zoneinfo from the shipped tzdata alone (no system zone files), for every zone the configurations name
import zoneinfo
zoneinfo.reset_tzpath(to=[])
zones = {o.working_hours.timezone for o in cfg.offers} | {cfg.budget.timezone}
results["zones"] = sorted(str(zoneinfo.ZoneInfo.no_cache(z)) for z in zones)

# Powertools: Logger, Metrics, idempotency on DynamoDB and parameters on SSM, AWS stubbed by botocore
from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, Metrics, MetricUnit
from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.idempotency import (DynamoDBPersistenceLayer, IdempotencyConfig,
                                                         idempotent_function)
import boto3
from botocore.stub import Stubber
Logger(service="package-test").info("logger works")
metrics = EphemeralMetrics(namespace="package-test", service="")
metrics.add_metric(name="Probe", unit=MetricUnit.Count, value=1)
metrics.flush_metrics()
results["metrics_class"] = Metrics.__name__
dynamodb = boto3.client("dynamodb")
stub = Stubber(dynamodb)
stub.add_response("put_item", {})
stub.add_response("update_item", {})
stub.activate()
layer = DynamoDBPersistenceLayer(table_name="state", key_attr="pk", sort_key_attr="sk", static_pk_value="IDEM",
                                 expiry_attr="ttl", boto3_client=dynamodb)
idempotency = IdempotencyConfig(event_key_jmespath="lead_id", raise_on_no_idempotency_key=True)
idempotency.register_lambda_context(Context())
@idempotent_function(data_keyword_argument="lead", persistence_store=layer, config=idempotency)
def create(lead):
    return {"order": lead["lead_id"] + "-order"}
results["idempotent"] = create(lead={"lead_id": "L1"})
stub.assert_no_pending_responses()
ssm = boto3.client("ssm")
ssm_stub = Stubber(ssm)
ssm_stub.add_response("get_parameter", {"Parameter": {"Name": "/callbridge/dev/x", "Value": "from-ssm"}})
ssm_stub.activate()
results["ssm"] = parameters.SSMProvider(boto3_client=ssm).get("/callbridge/dev/x", decrypt=True)

# requests: a real round trip to a local server; a body without a charset goes through charset_normalizer
import http.server
import requests
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "Звонок назначен".encode("cp1251")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
with requests.Session() as session:
    reply = session.get(f"http://127.0.0.1:{server.server_port}/", timeout=10)
    reply.encoding = reply.apparent_encoding  # what requests does for a text body without a charset
    results["requests"] = [reply.status_code, reply.text]
server.shutdown()
results["ca_bundle"] = os.path.isfile(requests.certs.where())

# Where everything came from: the task root, the runtime's boto3, or the standard library; every native
# extension of the package loaded (so each stripped one still links).
stdlib = os.path.dirname(os.__file__)
outside = sorted(name for name, m in list(sys.modules.items())
                 if getattr(m, "__file__", None) and not m.__file__.startswith((task_root, runtime, stdlib)))
results["outside"] = outside
results["extensions_loaded"] = sorted({os.path.relpath(m.__file__, task_root) for m in list(sys.modules.values())
                                      if getattr(m, "__file__", "") and m.__file__.startswith(task_root)
                                      and m.__file__.endswith(".so")})
results["pydantic_file"] = os.path.relpath(sys.modules["pydantic.main"].__file__, task_root)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def ran(built):
    env = {"PATH": os.environ.get("PATH", ""), "CALLBRIDGE_STAGE": "dev", "CALLBRIDGE_CONFIG": "config/dev.yaml",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "package-test",
           "AWS_SECRET_ACCESS_KEY": "package-test", "AWS_LAMBDA_FUNCTION_NAME": "callbridge-dev-api_handler",
           "POWERTOOLS_SERVICE_NAME": "callbridge", "POWERTOOLS_METRICS_NAMESPACE": "callbridge",
           "POWERTOOLS_LOG_LEVEL": "WARNING", "TZ": "UTC"}
    proc = subprocess.run([sys.executable, "-S", "-B", "-c", CHILD, str(built["task_root"]), str(built["runtime"])],
                          cwd=built["task_root"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_app_and_every_functions_module_import_and_the_api_answers(ran):
    expected = sum(1 for p in (ROOT / "functions").rglob("*.py") if p != ROOT / "functions" / "__init__.py")
    assert ran["functions_modules"] == expected
    assert ran["health"] == [200, {"ok": True, "service": "callbridge", "stage": "dev"}]
    assert ran["plugin_info"] == 200
    assert ran["offers"] >= 1


def test_each_heavy_dependency_works_from_the_package(ran):
    assert ran["pydantic"] == 7 and ran["pydantic_refuses"]
    assert ran["jwt"] == "plugin" and ran["jwt_refuses_other_key"]
    assert ran["fernet"] == "secret at rest"
    assert ran["yaml"] == [True, {"a": [1, 2]}]
    assert ran["phone"] == [True, "RU"]
    assert "Europe/Moscow" in ran["zones"]
    assert ran["idempotent"] == {"order": "L1-order"}
    assert ran["ssm"] == "from-ssm"
    assert ran["metrics_class"] == "Metrics"
    assert ran["requests"] == [200, "Звонок назначен"]
    assert ran["ca_bundle"]


def test_nothing_came_from_outside_the_package_and_every_stripped_extension_loads(ran, built):
    assert ran["outside"] == []
    assert ran["pydantic_file"] == "pydantic/main.pyc"  # sourceless byte-code, not a source
    shipped = sorted(n for n in built["names"] if n.endswith(".so"))
    assert shipped and sorted(built["report"].stripped) == shipped
    assert ran["extensions_loaded"] == shipped


def test_own_code_ships_as_source_with_pyc_and_third_party_as_sourceless_pyc(built):
    names = built["names"]
    for own in ("app.py", "functions/core/config.py"):
        folder, _, base = own.rpartition("/")
        pyc = f"{folder + '/' if folder else ''}__pycache__/{base[:-3]}.{sys.implementation.cache_tag}.pyc"
        assert {own, pyc} <= names
    assert {"pydantic/main.pyc", "aws_lambda_powertools/logging/logger.pyc", "chalice/app.pyc"} <= names
    assert not {"pydantic/main.py", "aws_lambda_powertools/logging/logger.py", "chalice/app.py"} & names
    third_party_sources = [n for n in names if n.endswith(".py") and not lambda_package.is_own_code(n)]
    assert third_party_sources == []
    with zipfile.ZipFile(built["zip"]) as zf:
        for name in ("pydantic/main.pyc", "functions/core/__pycache__/config.cpython-311.pyc"):
            header = zf.read(name)[:16]
            assert header[:4] == importlib.util.MAGIC_NUMBER
            assert int.from_bytes(header[4:8], "little") == 0b01  # hash-based, unchecked


def test_every_prune_rule_still_removes_something_and_licences_stay(built):
    report, names = built["report"], built["names"]
    stale = [pattern for pattern, count in report.matched.items() if count == 0]
    assert not stale, f"prune rules that match nothing any more (re-read them): {stale}"
    assert not [n for n in names if lambda_package.pruned_by(n)]
    assert not [n for n in names if n.startswith(("cffi/", "pycparser/", "pydantic/v1/",
                                                  "aws_lambda_powertools/event_handler/"))]
    assert "cryptography-50.0.2.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.endswith(("METADATA", "RECORD", ".pyi", "py.typed"))]


def test_strip_removed_symbols_from_the_native_extensions(built):
    shipped = (built["task_root"] / "cryptography/hazmat/bindings/_rust.abi3.so").stat().st_size
    installed = (SITE_PACKAGES / "cryptography/hazmat/bindings/_rust.abi3.so").stat().st_size
    assert shipped < installed * 0.9
    assert built["report"].stripped_bytes > 1_000_000


def test_the_package_stays_within_its_size_budget(built):
    # 15.8 MB zipped before pruning; today's 10.0 MB is mostly cryptography's and pydantic-core's extensions
    # (6.2 MB). Growing past the budget means a new dependency or a prune rule gone stale: look before raising it.
    size = lambda_package.zip_size(built["zip"])
    assert size["zipped_bytes"] <= 10_500_000, size
    assert size["unzipped_bytes"] <= 26_000_000, size


def test_no_prune_rule_can_reach_our_own_code_or_configuration():
    # Broad patterns (*/tests/*, *.pyi) must never take callbridge's own files, whatever their names.
    for name in ("app.py", "functions/tests/helpers.py", "functions/core/py.typed", "functions/x.pyi",
                 "config/tests/dev.yaml"):
        assert lambda_package.pruned_by(name) is None, name
    assert lambda_package.pruned_by("certifi/tests/test_certify.py").pattern == "*/tests/*"
    assert lambda_package.pruned_by("cryptography-50.0.2.dist-info/licenses/LICENSE") is None
    assert lambda_package.pruned_by("cryptography-50.0.2.dist-info/METADATA").pattern == "*.dist-info/*"
