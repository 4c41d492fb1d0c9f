"""End to end through `make run` (R-26): the real processes on loopback, as a user starts them.

A Tilda post to the app becomes an order in the SalesRender sandbox and, through the callbacks queue
and the dialer, an originate request in the Beeline sandbox; the local bucket carries the template's
lifecycle; SIGINT stops every process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import boto3
import pytest
import requests

from functions.records import calls, leads
from infra.local import stack as local_stack

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
# What conftest sets for in-process tests must not leak into the stack: it runs on its own defaults.
CONFTEST_KEYS = ("SALESRENDER_API_URL", "CALLBRIDGE_STAGE", "CALLBRIDGE_CONFIG", "TILDA_API_KEY",
                 "SALESRENDER_API_TOKEN", "AWS_ENDPOINT_URL", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN",
                 "BEELINE_API_URL", "BEELINE_API_TOKEN", "CALLBRIDGE_API_TOKEN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def make_run(local_dir: Path, ports: dict[str, int] | None = None, **env_overrides: str):
    """`make run` as a user starts it, on free ports, its state and logs in `local_dir`; stopped with Ctrl-C."""
    ports = ports or {"MOTO_PORT": free_port(), "SALESRENDER_SANDBOX_PORT": free_port(),
                      "BEELINE_SANDBOX_PORT": free_port(), "CALLBRIDGE_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if k not in CONFTEST_KEYS}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"CALLBACK_DELAY_SECONDS": "0", "BEELINE_SANDBOX_TIME_SCALE": "0.05",
                "CALLBRIDGE_LOCAL_DIR": str(local_dir), **env_overrides})
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(120):
            raise AssertionError("make run did not get ready:\n" + "\n".join(lines[-40:]))
        yield {"ports": ports, "lines": lines, "proc": proc, "dir": local_dir, "reader": reader,
               "app": f"http://127.0.0.1:{ports['CALLBRIDGE_PORT']}",
               "sandbox": f"http://127.0.0.1:{ports['SALESRENDER_SANDBOX_PORT']}",
               "pbx": f"http://127.0.0.1:{ports['BEELINE_SANDBOX_PORT']}",
               "aws": f"http://127.0.0.1:{ports['MOTO_PORT']}"}
    finally:
        stop_make_run(proc)


def stop_make_run(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


@pytest.fixture(scope="module")
def local_stack_running(tmp_path_factory):
    with make_run(tmp_path_factory.mktemp("local"), FRESH="1") as running:
        yield running


def aws_client(stack_info, service):
    return boto3.client(service, endpoint_url=stack_info["aws"], region_name="us-east-1",
                        aws_access_key_id="local", aws_secret_access_key="local")


def test_make_run_prints_one_line_per_service(local_stack_running):
    text = "\n".join(local_stack_running["lines"])
    assert f"moto server (AWS): {local_stack_running['aws']}" in text
    assert f"salesrender sandbox: {local_stack_running['sandbox']}/companies/1/CRM" in text
    assert f"beeline sandbox: {local_stack_running['pbx']}/apis/portal/" in text
    assert f"callbridge app: {local_stack_running['app']}" in text
    assert "runner:" in text
    assert "local state: fresh start" in text  # the fixture asks for FRESH=1
    assert requests.get(local_stack_running["app"] + "/v1/health", timeout=5).json()["ok"] is True


def test_tilda_post_becomes_an_order_and_a_call(local_stack_running):
    tranid = f"e2e:{uuid.uuid4().hex[:12]}"
    form = {"Name": "Анна", "Phone": "+7 (999) 111-22-33", "Email": "anna@example.com", "tranid": tranid,
            "formid": "form493249737", "utm_source": "vk"}
    response = requests.post(local_stack_running["app"] + "/webhooks/tilda", data=urlencode(form),
                             headers={"Content-Type": "application/x-www-form-urlencoded",
                                      "X-Api-Key": "local-tilda-key"}, timeout=10)
    assert (response.status_code, response.text) == (200, "ok")

    def order():
        orders = requests.get(local_stack_running["sandbox"] + "/_sandbox/orders", timeout=5).json()
        return [o for o in orders if "utm_source=vk" in o["source"].get("refererUri", "")]

    [created] = wait_until(order, 30, "the order in the SalesRender sandbox")
    assert created["orderData"]["phoneFields"] == [{"field": "phone", "value": "+79991112233"}]

    # The callback (CALLBACK_DELAY_SECONDS=0) reaches the dialer, which rings operator 200 first.
    def originate():
        return [c for c in requests.get(local_stack_running["pbx"] + "/_sandbox/calls", timeout=5).json()
                if c["phone"] == "9991112233"]

    [placed] = wait_until(originate, 30, "the originate request in the Beeline sandbox")
    assert placed["pattern"] == "200"
    call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{tranid}"), 1)
    call = requests.get(f"{local_stack_running['app']}/v1/calls/{call_id}", timeout=5,
                        headers={"Authorization": "Bearer local-api-token"}).json()
    assert call["operator"] == "200" and call["phone"] == "+7 999 ***-**-33"


def test_the_call_is_tracked_recorded_and_written_back_to_the_order(local_stack_running):
    """Beeline events -> call tracker -> recording in the local S3 -> call log on the SalesRender order."""
    tranid = f"e2e:{uuid.uuid4().hex[:12]}"
    form = {"Name": "Борис", "Phone": "+7 999 222 33 55", "tranid": tranid, "formid": "form493249737"}
    requests.post(local_stack_running["app"] + "/webhooks/tilda", data=urlencode(form), timeout=10,
                  headers={"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": "local-tilda-key"})
    call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{tranid}"), 1)
    auth = {"Authorization": "Bearer local-api-token"}

    def ended():
        call = requests.get(f"{local_stack_running['app']}/v1/calls/{call_id}", headers=auth, timeout=5)
        return call.json() if call.status_code == 200 and call.json()["state"] == "ended" else None

    call = wait_until(ended, 60, "the call to end through Beeline's events")
    assert call["outcome"] == "answered" and call["talk_seconds"] == 75 and call["cost_rub"] == 4.0

    def written_back():
        orders = requests.get(local_stack_running["sandbox"] + "/_sandbox/orders", timeout=5).json()
        [order] = [o for o in orders if o["orderData"]["phoneFields"][0]["value"] == "+79992223355"]
        log = [f["value"] for f in order["data"].get("stringFields", []) if f["field"] == "call_log"]
        return log[0] if log and "ответил" in log[0] else None

    log = wait_until(written_back, 90, "the call log on the SalesRender order")
    assert "/v1/recordings/" in log
    s3 = aws_client(local_stack_running, "s3")
    bucket = next(b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"].startswith("callbridge-local-"))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(call_id in key for key in keys)
    redirect = requests.get(f"{local_stack_running['app']}/v1/recordings/{call_id}", headers=auth, timeout=5,
                            allow_redirects=False)
    assert redirect.status_code == 302
    audio = requests.get(redirect.headers["Location"], timeout=5)
    assert audio.status_code == 200
    assert audio.content[:3] == b"ID3" or audio.content[:2] == b"\xff\xfb"  # an MP3, not an error page


def test_an_inbound_call_from_a_new_number_becomes_a_lead_and_an_order(local_stack_running):
    caller = f"99977{uuid.uuid4().int % 100000:05d}"
    response = requests.post(local_stack_running["pbx"] + "/_sandbox/inbound", timeout=5,
                              json={"from": caller, "to": "4951234567", "extension": "200", "outcome": "missed"})
    assert response.status_code == 200

    def order():
        orders = requests.get(local_stack_running["sandbox"] + "/_sandbox/orders", timeout=5).json()
        return [o for o in orders if o["orderData"]["phoneFields"][0]["value"] == "+7" + caller]

    [created] = wait_until(order, 60, "the inbound caller's order")
    assert created["projectId"] == "1"  # +74951234567 is offer 101's number


def test_local_bucket_lifecycle_equals_the_templates(local_stack_running):
    s3 = aws_client(local_stack_running, "s3")
    bucket = next(b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"].startswith("callbridge-local-"))
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rules == local_stack.template_lifecycle_rules(30)


def test_sigint_stops_every_process(local_stack_running):
    proc, ports = local_stack_running["proc"], local_stack_running["ports"]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=30)
    wait_until(lambda: "stopped" in local_stack_running["lines"], 10, "the stopped line")
    wait_until(lambda: not any(port_open(p) for p in ports.values()), 10, "every port to close")
