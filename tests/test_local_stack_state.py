"""The local stack keeps its state across restarts (issue 8 item 17) and logs no secret (item 13).

Each stateful child of `make run` is restarted here on its own, on free ports: the SalesRender and Beeline
sandboxes through their state files, the moto server as a process (stopped with SIGTERM, and killed).
The access-log rule is checked on `loggable_path`, what the app's and moto's access logs print.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests

from infra.local import stack as local_stack
from infra.local.beeline_sandbox import BeelineSandbox
from infra.local.run import clear_state, loggable_path, wait_for
from infra.local.salesrender_sandbox import SalesRenderSandbox
from infra.local.sandbox_http import StateFile

ROOT = Path(__file__).resolve().parent.parent
ADD_ORDER = """mutation($input: AddOrderInput!) { orderMutation { addOrder(input: $input) { id } } }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_order(sandbox: SalesRenderSandbox, phone: str) -> str:
    answer = requests.post(sandbox.api_url, timeout=5, headers={"Authorization": sandbox.token},
                           json={"query": ADD_ORDER, "variables": {"input": {
                               "projectId": "1", "statusId": "1",
                               "orderData": {"phoneFields": [{"field": "phone", "value": phone}]}}}})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["orderMutation"]["addOrder"]["id"]


def test_salesrender_orders_survive_a_restart_of_the_sandbox(tmp_path):
    path = tmp_path / "salesrender-state.json"
    with SalesRenderSandbox() as first:
        assert add_order(first, "+79991112233") == "1"
        assert StateFile(first, path).save()
        before = first.orders()
    with SalesRenderSandbox() as second:
        assert StateFile(second, path).load()
        assert second.orders() == before
        assert add_order(second, "+79992223344") == "2"  # ids go on, never reused


def test_beeline_calls_recordings_and_subscriptions_survive_a_restart_of_the_sandbox(tmp_path):
    path = tmp_path / "beeline-state.json"
    headers = {"X-MPBX-API-AUTH-TOKEN": "sandbox-beeline-token"}
    with BeelineSandbox(time_scale=0.001) as first:
        subscribed = requests.put(first.api_url + "subscription", headers=headers, timeout=5, json={
            "url": "http://127.0.0.1:9/webhooks/beeline/s", "expires": 3600, "subscriptionType": "BASIC_CALL"})
        assert subscribed.status_code == 200
        placed = requests.post(first.api_url + "abonents/200/call", params={"phoneNumber": "9991112233"},
                               headers=headers, timeout=5)
        assert placed.status_code == 200
        assert first.wait_idle(10)
        assert StateFile(first, path).save()
        calls, records = first.calls(), first.records()
    assert [c["state"] for c in calls] == ["released"] and len(records) == 1
    with BeelineSandbox(time_scale=0.001) as second:
        assert StateFile(second, path).load()
        assert second.calls() == calls
        assert second.records() == records
        [sub] = second.subscriptions()
        assert sub["subscriptionId"] == subscribed.json()["subscriptionId"] and sub["live"]
        audio = requests.get(f"{second.api_url}v2/records/{records[0]['id']}/download", headers=headers, timeout=5)
        assert audio.status_code == 200 and audio.content[:2] == b"\xff\xfb"
        again = requests.post(second.api_url + "abonents/200/call", params={"phoneNumber": "9991112244"},
                              headers=headers, timeout=5)
        assert again.status_code == 200
        assert second.wait_idle(10)
        tracking_ids = [c["ext_tracking_id"] for c in second.calls()]
        assert len(set(tracking_ids)) == 2  # the counters go on from the saved ones


def test_a_sandbox_whose_state_file_is_unreadable_refuses_to_start_empty(tmp_path):
    path = tmp_path / "salesrender-state.json"
    path.write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "infra.local.salesrender_sandbox", "--port", str(free_port()),
                           "--state-file", str(path), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "FRESH=1" in done.stderr


def _moto(port: int, state: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "infra.local.moto_atomic", "-p", str(port), "--state-file",
                                 str(state)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_for(f"http://127.0.0.1:{port}/moto-api/", 60, proc)
    return proc


def test_the_moto_server_keeps_tables_queues_and_objects_across_a_restart_and_a_crash(tmp_path):
    port, state, log = free_port(), tmp_path / "moto-state.pickle", tmp_path / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    proc = _moto(port, state, log)
    try:
        env = local_stack.deploy(endpoint, stage="local")
        session = boto3.session.Session(region_name="us-east-1", aws_access_key_id="local",
                                        aws_secret_access_key="local")
        table = session.resource("dynamodb", endpoint_url=endpoint).Table(env["STATE_TABLE"])
        sqs = session.client("sqs", endpoint_url=endpoint)
        s3 = session.client("s3", endpoint_url=endpoint)
        queue = sqs.get_queue_url(QueueName=env["INTAKE_QUEUE"])["QueueUrl"]
        table.put_item(Item={"pk": "LEAD#1", "sk": "LEAD", "phone": "+79991112233"})
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"lead_id": "1"}))
        s3.put_object(Bucket=env["RECORDINGS_BUCKET"], Key="recordings/call-1.mp3", Body=b"\xff\xfbaudio")

        proc.send_signal(signal.SIGTERM)  # what make run's Ctrl-C does to it
        assert proc.wait(30) == 0
        proc = _moto(port, state, log)
        assert table.get_item(Key={"pk": "LEAD#1", "sk": "LEAD"})["Item"]["phone"] == "+79991112233"
        [message] = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"]
        assert json.loads(message["Body"]) == {"lead_id": "1"}
        sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        body = s3.get_object(Bucket=env["RECORDINGS_BUCKET"], Key="recordings/call-1.mp3")["Body"].read()
        assert body == b"\xff\xfbaudio"
        assert local_stack.deploy(endpoint, stage="local") == env  # the stack is there: nothing to create

        table.put_item(Item={"pk": "LEAD#2", "sk": "LEAD"})
        deadline = time.monotonic() + 10  # the snapshot follows a change once moto is idle (IDLE_SECONDS)
        while b"LEAD#2" not in state.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # a crash: no chance to save at exit
        proc.wait()
        proc = _moto(port, state, log)
        assert "Item" in table.get_item(Key={"pk": "LEAD#2", "sk": "LEAD"})
        assert "Messages" not in sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0)  # deleted stays deleted
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert "X-Amz" not in log.read_text() and "Signature=" not in log.read_text().replace("Signature=***", "")


POLLER = """
import sys, boto3
sqs = boto3.client("sqs", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="local",
                   aws_secret_access_key="local")
print("polling", flush=True)
sqs.receive_message(QueueUrl=sys.argv[2], WaitTimeSeconds=20)
"""


def test_a_long_poll_of_a_killed_client_takes_no_message(tmp_path):
    """A runner killed mid-poll (make run restarts it) leaves its 20-second long polls in moto; the next
    message must reach the new runner at once, not hide in flight for the visibility timeout."""
    port, log = free_port(), tmp_path / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    proc = _moto(port, tmp_path / "moto-state.pickle", log)
    try:
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="local",
                           aws_secret_access_key="local")
        queue = sqs.create_queue(QueueName="polled", Attributes={"VisibilityTimeout": "300"})["QueueUrl"]
        pollers = [subprocess.Popen([sys.executable, "-c", POLLER, endpoint, queue], stdout=subprocess.PIPE,
                                    text=True) for _ in range(3)]
        for poller in pollers:
            assert poller.stdout.readline().strip() == "polling"
        time.sleep(1.5)  # their receives are waiting inside moto
        for poller in pollers:
            poller.kill()
            poller.wait()
        time.sleep(0.5)
        sqs.send_message(QueueUrl=queue, MessageBody="the recording job")
        messages = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=5).get("Messages", [])
        assert [m["Body"] for m in messages] == ["the recording job"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_fresh_removes_only_the_saved_state(tmp_path):
    for name in ("moto-state.pickle", "salesrender-state.json", "beeline-state.json", "moto.log"):
        (tmp_path / name).write_text("x")
    assert sorted(clear_state(tmp_path)) == ["beeline-state.json", "moto-state.pickle", "salesrender-state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["moto.log"]


@pytest.mark.parametrize(("target", "shown"), [
    ("/webhooks/beeline/local-beeline-secret", "/webhooks/beeline/***"),
    ("/webhooks/tilda?key=local-tilda-key", "/webhooks/tilda?key=***"),
    ("/v1/recordings/abc?sig=deadbeef&exp=1790000000", "/v1/recordings/abc?sig=***&exp=***"),
    ("/bucket/recordings/x.mp3?X-Amz-Signature=abc&X-Amz-Credential=local%2F2026",
     "/bucket/recordings/x.mp3?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("/bucket?lifecycle", "/bucket?lifecycle"),
    ("/v1/calls/+79991112233", "/v1/calls/+7 999 ***-**-33"),
])
def test_access_logs_show_paths_without_secrets(target, shown):
    assert loggable_path(target) == shown


def test_a_child_that_dies_is_started_again(monkeypatch, tmp_path, capsys):
    from infra.local import run

    monkeypatch.setattr(run, "LOG_DIR", tmp_path)
    monkeypatch.setattr(run, "BACKOFF_FIRST_SECONDS", 0.0)
    marker = tmp_path / "crashed-once"
    # Dies on its first start (a crash), then runs until stopped.
    script = (f"import pathlib, sys, time\nm = pathlib.Path({str(marker)!r})\n"
              "if not m.exists():\n    m.touch()\n    sys.exit(3)\ntime.sleep(60)")
    stack = run.Stack()
    child = run.Child("flaky", [sys.executable, "-c", script], quiet=True)
    stack.start_child(child)
    try:
        assert stack.watch(lambda: bool(child.restarts) and child.proc.poll() is None) == 0
        assert child.proc.poll() is None  # running again
    finally:
        stack.stop()
    err = capsys.readouterr().err
    assert "flaky exited with 3: restarting" in err and "flaky: restarted" in err


def test_a_child_that_keeps_dying_stops_the_stack_with_the_reason(monkeypatch, tmp_path, capsys):
    from infra.local import run

    monkeypatch.setattr(run, "LOG_DIR", tmp_path)
    monkeypatch.setattr(run, "BACKOFF_FIRST_SECONDS", 0.0)
    stack = run.Stack()
    child = run.Child("broken", [sys.executable, "-c", "print('no such table'); raise SystemExit(4)"], quiet=True)
    stack.start_child(child)
    try:
        assert stack.watch(lambda: False) == 1
    finally:
        stack.stop()
    assert len(child.restarts) == run.MAX_RESTARTS
    err = capsys.readouterr().err
    assert f"broken exited with 4: restarted {run.MAX_RESTARTS} times" in err
    assert "broken.log: no such table" in err  # the reason, from the child's own log
