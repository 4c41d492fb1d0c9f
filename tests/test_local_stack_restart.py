"""The local stack loses nothing (issue 8 item 17): a child of `make run` killed mid-call is started again and
the call finishes; a lead, its order, its call and its recording survive a full restart of `make run`, and
`make run FRESH=1` starts empty.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from functions.records import calls, leads
from tests.test_e2e_local_stack import free_port, make_run, wait_until

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": "Bearer local-api-token"}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (make -> infra.local.run -> its children)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def runner_pids(make_pid: int) -> list[int]:
    pids = []
    for pid in descendants(make_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"infra.local.runner" in cmdline:
            pids.append(pid)
    return pids


def call_of(stack, call_id: str) -> dict | None:
    answer = requests.get(f"{stack['app']}/v1/calls/{call_id}", headers=AUTH, timeout=5)
    return answer.json() if answer.status_code == 200 else None


def orders_for(stack, phone: str) -> list[dict]:
    orders = requests.get(stack["sandbox"] + "/_sandbox/orders", timeout=5).json()
    return [o for o in orders if o["orderData"]["phoneFields"][0]["value"] == phone]


def test_a_killed_runner_comes_back_and_the_state_survives_a_restart_of_make_run(tmp_path):
    local_dir = tmp_path / "local"
    ports = {"MOTO_PORT": free_port(), "SALESRENDER_SANDBOX_PORT": free_port(), "BEELINE_SANDBOX_PORT": free_port(),
             "CALLBRIDGE_PORT": free_port()}
    tranid = f"restart:{uuid.uuid4().hex[:12]}"
    call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{tranid}"), 1)
    # A slower clock than the other end-to-end tests: the call (about 9 s) is still live when the runner dies.
    with make_run(local_dir, ports, FRESH="1", BEELINE_SANDBOX_TIME_SCALE="0.1") as stack:
        posted = requests.post(stack["app"] + "/webhooks/tilda", timeout=10, data=urlencode(
            {"Name": "Глеб", "Phone": "+7 999 666 77 88", "tranid": tranid, "formid": "form493249737"}),
            headers={"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": "local-tilda-key"})
        assert (posted.status_code, posted.text) == (200, "ok")
        # Placed at the PBX, not only claimed: a runner killed between the claim and the originate leaves its
        # callback in flight until the visibility timeout, which is not what this test is about.
        wait_until(lambda: [c for c in requests.get(stack["pbx"] + "/_sandbox/calls", timeout=5).json()
                            if c["phone"] == "9996667788"], 60, "the dialer to place the call")
        [runner] = runner_pids(stack["proc"].pid)
        os.kill(runner, signal.SIGKILL)  # mid-call: the recording job is still to come

        wait_until(lambda: "runner: restarted" in stack["lines"], 30, "make run to restart the runner")
        assert any(line.startswith("runner exited with -9: restarting") for line in stack["lines"])
        [again] = wait_until(lambda: runner_pids(stack["proc"].pid) or None, 10, "the new runner")
        assert again != runner
        # The restarted runner takes the recording job: the call is finished as if nothing happened.
        try:
            call = wait_until(lambda: (c := call_of(stack, call_id)) and c["recording_url"] and c, 90,
                              "the recording, stored by the restarted runner")
        except AssertionError:
            raise AssertionError(f"{call_of(stack, call_id)}\n" + "\n".join(stack["lines"][-80:])) from None
        assert call["state"] == "ended" and call["outcome"] == "answered"
        [order] = wait_until(lambda: orders_for(stack, "+79996667788") or None, 30, "the order")
        beeline_calls = [c for c in requests.get(stack["pbx"] + "/_sandbox/calls", timeout=5).json()
                         if c["phone"] == "9996667788"]
        assert len(beeline_calls) == 1

    with make_run(local_dir, ports) as stack:  # no FRESH: the default keeps the state
        assert any(line.startswith("local state: kept in") for line in stack["lines"])
        kept = ("call_id", "lead_id", "state", "outcome", "answered_at", "ended_at", "talk_seconds", "recording_url")
        assert {k: call_of(stack, call_id)[k] for k in kept} == {k: call[k] for k in kept}
        assert [o["id"] for o in orders_for(stack, "+79996667788")] == [order["id"]]  # kept, and not made twice
        assert [c for c in requests.get(stack["pbx"] + "/_sandbox/calls", timeout=5).json()
                if c["phone"] == "9996667788"] == beeline_calls
        redirect = requests.get(call["recording_url"], timeout=5, allow_redirects=False)
        assert redirect.status_code == 302
        assert requests.get(redirect.headers["Location"], timeout=5).status_code == 200  # the MP3 survived too

    with make_run(local_dir, ports, FRESH="1") as stack:
        assert any(line.startswith("local state: fresh start") for line in stack["lines"])
        assert call_of(stack, call_id) is None
        assert requests.get(stack["sandbox"] + "/_sandbox/orders", timeout=5).json() == []
        assert requests.get(stack["pbx"] + "/_sandbox/calls", timeout=5).json() == []
