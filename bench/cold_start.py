"""Cold start: a fresh Python process imports `app` from the unzipped Lambda package and serves one event,
next to a minimal Chalice app whose handler does one boto3 DynamoDB put_item, in the same environment.

The package is built by the real packaging step (`python -m infra.deploy package`, which byte-compiles it)
and unzipped; a copy without its .pyc files shows what the compiled modules save. Each trial is a new
process started as Lambda's runtime would: `python -S -B` (no site-packages, nothing written), the task
root first on sys.path and this virtual environment's site-packages last, where Lambda's runtime keeps
boto3. The figure compared is the process's CPU time (user + system, interpreter start to handler return):
on a shared machine the wall clock of the same cold start varies twofold between runs; both are kept.
AWS is a moto server (infra.local.moto_atomic) with the stack of infra/template.yaml; SalesRender and
Beeline are the sandboxes, in this process. Timed from the process's start to the handler's return:

- Tilda: API Gateway's event for POST /webhooks/tilda (a new lead: one conditional put, one SQS send);
- callback worker: the SQS event of that lead's first callback (created beforehand by the intake worker),
  up to its originate in the Beeline sandbox. Each trial runs in a stage of its own, so every dial finds
  free channels and operators.

`python -m bench.cold_start [--trials 5]`; results in build/bench/cold_start.json.
"""

from __future__ import annotations

import json
import os
import py_compile
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "bench"
SITE_PACKAGES = sysconfig.get_paths()["purelib"]

CHILD = r"""
import json, sys, time
started = time.perf_counter()
task_root, site, handler_name, event_path = sys.argv[1:5]
sys.path.insert(0, task_root)
sys.path.append(site)
with open(event_path) as f:
    event = json.load(f)

class Context:
    function_name = "callbridge-cold-" + (handler_name if handler_name != "app" else "api_handler")
    function_version = "$LATEST"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:" + function_name
    aws_request_id = "cold-start"
    log_group_name = "/aws/lambda/" + function_name
    log_stream_name = "cold"
    def get_remaining_time_in_millis(self):
        return 60000

import app
imported = time.perf_counter()
result = getattr(app, handler_name)(event, Context())
done = time.perf_counter()
status = result.get("statusCode") if isinstance(result, dict) else None
print(json.dumps({"import_ms": (imported - started) * 1000, "handler_ms": (done - imported) * 1000,
                  "in_process_ms": (done - started) * 1000, "status": status,
                  "modules": len(sys.modules)}))
"""

MINIMAL_APP = '''"""The baseline: one route and one SQS handler, each one boto3 DynamoDB put_item."""
import os
import uuid

import boto3
from chalice import Chalice

app = Chalice(app_name="minimal")


def _put():
    boto3.client("dynamodb").put_item(TableName=os.environ["STATE_TABLE"],
                                      Item={"pk": {"S": "MIN#" + uuid.uuid4().hex}, "sk": {"S": "MIN"}})


@app.route("/webhooks/tilda", methods=["POST"], content_types=["application/x-www-form-urlencoded"])
def tilda_webhook():
    _put()
    return {"ok": True}


@app.on_sqs_message(queue="minimal", batch_size=1)
def callback_worker(event):
    for _ in event:
        _put()
'''


def build_package() -> Path:
    """The dev stage's package from the real packaging step, unzipped; returns the zip's path."""
    out = OUT / "package"
    for _ in (1, 2):  # .chalice/deployments is shared: a packaging test running meanwhile may clear it
        proc = subprocess.run([sys.executable, "-m", "infra.deploy", "package", "--stage", "dev", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "CALLBRIDGE_STAGE": "dev", "CALLBRIDGE_CONFIG": "config/dev.yaml"})
        if proc.returncode == 0:
            return out / "deployment.zip"
    raise SystemExit(f"make package failed twice:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def unzip(zip_path: Path, target: Path, with_pyc: bool = True) -> Path:
    """`with_pyc=False` leaves out the compiled copies of shipped sources (__pycache__/); a sourceless module
    (a .pyc in place of its .py, as the packaging ships third-party code) is kept, or it could not be imported."""
    shutil.rmtree(target, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        members = [n for n in zf.namelist() if with_pyc or not (n.endswith(".pyc") and "__pycache__/" in n)]
        zf.extractall(target, members)
    return target


def package_size(zip_path: Path) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        by_top: dict[str, int] = {}
        for i in infos:
            top = i.filename.split("/")[0]
            by_top[top] = by_top.get(top, 0) + i.compress_size
    return {"zipped_bytes": zip_path.stat().st_size, "unzipped_bytes": sum(i.file_size for i in infos),
            "files": len(infos), "pyc_files": sum(1 for i in infos if i.filename.endswith(".pyc")),
            "largest_zipped_bytes": dict(sorted(by_top.items(), key=lambda kv: -kv[1])[:8])}


def minimal_app(package_root: Path, target: Path) -> Path:
    """The baseline's task root: its app.py and the same chalice/ runtime files the package ships, compiled
    the same way."""
    shutil.rmtree(target, ignore_errors=True)
    (target / "chalice").mkdir(parents=True)
    (target / "app.py").write_text(MINIMAL_APP, encoding="utf-8")
    sources = [target / "app.py"]
    for name in ("__init__", "app"):
        shipped = package_root / "chalice" / f"{name}.py"
        if shipped.exists():
            shutil.copy(shipped, target / "chalice" / shipped.name)
            sources.append(target / "chalice" / shipped.name)
        else:  # the package ships chalice sourceless (chalice/app.pyc): the same byte-code, as it is
            shutil.copy(package_root / "chalice" / f"{name}.pyc", target / "chalice" / f"{name}.pyc")
    for source in sources:
        py_compile.compile(str(source), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return target


def child(task_root: Path, handler: str, event: dict, env: dict) -> dict:
    event_path = OUT / f"event-{handler}.json"
    event_path.write_text(json.dumps(event), encoding="utf-8")
    started = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-S", "-B", "-c", CHILD, str(task_root), SITE_PACKAGES, handler,
                           str(event_path)], cwd=task_root, env=env, capture_output=True, text=True, timeout=120)
    wall = (time.perf_counter() - started) * 1000
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{task_root.name} {handler}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_ms"] = wall
    result["cpu_ms"] = cpu
    return result


def tilda_event(i: int, key: str) -> dict:
    body = urlencode({"Name": "Анна", "Phone": f"+7999{i:06d}5", "tranid": f"cold:{i}:{time.time_ns()}",
                      "formid": "form493249737"})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": key, "Host": "example.invalid"}
    return {
        "resource": "/webhooks/tilda", "path": "/webhooks/tilda", "httpMethod": "POST", "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": None,
        "multiValueQueryStringParameters": None, "pathParameters": None, "stageVariables": None,
        "requestContext": {"resourcePath": "/webhooks/tilda", "httpMethod": "POST", "path": "/api/webhooks/tilda",
                           "stage": "api", "requestId": f"cold-{i}", "identity": {"sourceIp": "127.0.0.1"},
                           "accountId": "123456789012", "apiId": "cold"},
        "body": body, "isBase64Encoded": False,
    }


def sqs_event(body: str, queue: str) -> dict:
    return {"Records": [{"messageId": "cold-1", "receiptHandle": "cold-1", "body": body, "attributes": {
        "ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))}, "messageAttributes": {},
        "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue}",
        "awsRegion": "us-east-1"}]}


def _median(trials: list[dict], key: str) -> float:
    return round(statistics.median(t[key] for t in trials), 1)


def run(trials: int = 5) -> dict:
    import boto3

    from bench.burst import free_port
    from infra.local import stack
    from infra.local.beeline_sandbox import BeelineSandbox
    from infra.local.salesrender_sandbox import SalesRenderSandbox

    OUT.mkdir(parents=True, exist_ok=True)
    zip_path = build_package()
    size = package_size(zip_path)
    package_root = unzip(zip_path, OUT / "task-root")
    sourceless = unzip(zip_path, OUT / "task-root-no-pyc", with_pyc=False)
    minimal = minimal_app(package_root, OUT / "task-root-minimal")

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "infra.local.moto_atomic", "-H", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    crm = SalesRenderSandbox(token="cold-crm", company_id="1").start()
    pbx = BeelineSandbox(token="cold-pbx", time_scale=0.001).start()
    endpoint = f"http://127.0.0.1:{port}"
    base_env = {
        "PATH": os.environ.get("PATH", ""), "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "cold", "AWS_SECRET_ACCESS_KEY": "cold", "CALLBRIDGE_CONFIG": "config/local.yaml",
        "TILDA_API_KEY": "cold-key", "SALESRENDER_API_TOKEN": "cold-crm", "SALESRENDER_COMPANY_ID": "1",
        "SALESRENDER_API_URL": crm.api_url, "BEELINE_API_URL": pbx.api_url, "BEELINE_API_TOKEN": "cold-pbx",
        "BEELINE_WEBHOOK_SECRET": "cold-secret", "SALESRENDER_WEBHOOK_SECRET": "cold-secret",
        "CALLBRIDGE_API_TOKEN": "cold-token", "RECORDING_LINK_SECRET": "cold-secret",
        "PUBLIC_BASE_URL": "http://127.0.0.1:9", "CALLBACK_DELAY_SECONDS": "0", "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_SERVICE_NAME": "callbridge", "POWERTOOLS_METRICS_NAMESPACE": "callbridge",
        "AWS_LAMBDA_FUNCTION_NAME": "callbridge-cold",  # Powertools reads it as "in Lambda"
    }
    results: dict[str, list[dict]] = {k: [] for k in ("tilda", "tilda_no_pyc", "minimal_route", "callback",
                                                      "callback_no_pyc", "minimal_sqs")}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="cold",
                             aws_secret_access_key="cold").get_caller_identity()
                break
            except Exception:  # noqa: BLE001 - not up yet, whatever botocore says
                time.sleep(0.2)
        for i in range(trials):
            for variant, root in (("", package_root), ("_no_pyc", sourceless)):
                stage = f"cold{i}{variant.replace('_', '')}"[:20]
                env = {**base_env, **stack.deploy(endpoint, stage=stage)}
                sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="cold",
                                   aws_secret_access_key="cold")
                results["tilda" + variant].append(child(root, "app", tilda_event(i, "cold-key"), env))
                intake = sqs.get_queue_url(QueueName=env["INTAKE_QUEUE"])["QueueUrl"]
                [message] = sqs.receive_message(QueueUrl=intake, WaitTimeSeconds=5)["Messages"]
                # The intake worker makes the order and queues the first callback (in a child too: the same code).
                child(root, "intake_worker", sqs_event(message["Body"], env["INTAKE_QUEUE"]), env)
                callbacks = sqs.get_queue_url(QueueName=env["CALLBACKS_QUEUE"])["QueueUrl"]
                [callback] = sqs.receive_message(QueueUrl=callbacks, WaitTimeSeconds=5)["Messages"]
                before = len(pbx.calls())
                trial = child(root, "callback_worker", sqs_event(callback["Body"], env["CALLBACKS_QUEUE"]), env)
                trial["dialled"] = len(pbx.calls()) > before
                results["callback" + variant].append(trial)
            env = {**base_env, "STATE_TABLE": env["STATE_TABLE"]}
            results["minimal_route"].append(child(minimal, "app", tilda_event(i, "x"), env))
            results["minimal_sqs"].append(child(minimal, "callback_worker", sqs_event("{}", "minimal"), env))
    finally:
        moto.terminate()
        moto.wait(30)
        crm.stop()
        pbx.stop()

    summary = {name: {"cpu_ms": _median(t, "cpu_ms"), "wall_ms": _median(t, "wall_ms"),
                      "import_ms": _median(t, "import_ms"),
                      "handler_ms": _median(t, "handler_ms"), "modules": t[0]["modules"], "trials": len(t),
                      **({"status": t[0]["status"]} if t[0]["status"] is not None else {}),
                      **({"dialled": all(x.get("dialled") for x in t)} if "dialled" in t[0] else {})}
               for name, t in results.items()}
    for name, base in (("tilda", "minimal_route"), ("tilda_no_pyc", "minimal_route"), ("callback", "minimal_sqs"),
                       ("callback_no_pyc", "minimal_sqs")):
        summary[name]["ratio"] = round(summary[name]["cpu_ms"] / summary[base]["cpu_ms"], 2)
        summary[name]["wall_ratio"] = round(summary[name]["wall_ms"] / summary[base]["wall_ms"], 2)
    return {"package": size, "cold_start": summary}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    result = run(args.trials)
    (OUT / "cold_start.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
