"""End to end through `make run` (issue 10 items 3-6): the SalesRender sandbox registers the PBX plugin with
the app, a Tilda lead's callback and a CRM "Call" each end as a CDR that the sandbox took after checking its
HS512 token, its fields and units, and that its recording link serves the MP3; `make demo CRM_PLUGIN=1`
runs the same loop."""

from __future__ import annotations

import os
import subprocess
import uuid
from urllib.parse import urlencode

import pytest
import requests

from functions.records import calls, leads
from tests.test_e2e_local_stack import CONFTEST_KEYS, ROOT, make_run, wait_until

pytestmark = pytest.mark.e2e
# Until infra/local/run.py sets it among its dummy credentials (the deploy generates it in SSM).
PLUGIN_KEY = {"PLUGIN_ENCRYPTION_KEY": "local-plugin-encryption-key"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with make_run(tmp_path_factory.mktemp("local"), FRESH="1", **PLUGIN_KEY) as running:
        registered = requests.post(running["sandbox"] + "/_sandbox/plugin/register", json={}, timeout=30).json()
        assert registered["status"] == 200, registered
        assert registered["plugin_url"] == running["app"] + "/salesrender-plugin/"
        yield running


def cdr_of(stack, call_id: str):
    return next((c for c in requests.get(stack["sandbox"] + "/_sandbox/cdrs", timeout=5).json()
                 if c["callId"] == call_id), None)


def test_a_tilda_leads_callback_ends_as_a_cdr_in_salesrender(stack):
    tranid = f"e2e-plugin:{uuid.uuid4().hex[:12]}"
    form = {"Name": "Вера", "Phone": "+7 999 333 44 55", "tranid": tranid, "formid": "form493249737"}
    response = requests.post(stack["app"] + "/webhooks/tilda", data=urlencode(form), timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded",
                                      "X-Api-Key": "local-tilda-key"})
    assert response.status_code == 200
    call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{tranid}"), 1)
    got = wait_until(lambda: cdr_of(stack, call_id), 120, "the callback's CDR in the SalesRender sandbox")
    assert got["direction"] == "outgoing" and got["phone"] == "+79993334455"
    assert got["bill_sec"] == 75 and got["pricing"]["provider"] == {"amount": "400", "currency": "RUB"}
    # The sandbox fetched the link and found an MP3 before it answered 202.
    assert got["record"] is True and f"/v1/recordings/{call_id}?sig=" in got["call_record_url"]
    assert requests.get(stack["sandbox"] + "/_sandbox/plugin", timeout=5).json()["rejected"] == []


def test_call_pressed_in_the_crm_dials_the_order_at_once_and_ends_as_a_cdr(stack):
    orders = requests.get(stack["sandbox"] + "/_sandbox/orders", timeout=5).json()
    assert orders, "the Tilda test made an order"
    order = orders[-1]
    pressed = requests.post(stack["sandbox"] + "/_sandbox/plugin/call", json={"order_id": order["id"]},
                            timeout=30).json()
    assert pressed["status"] == 200, pressed
    call_id = pressed["body"]["call_id"]
    auth = {"Authorization": "Bearer local-api-token"}

    def ended():
        call = requests.get(f"{stack['app']}/v1/calls/{call_id}", headers=auth, timeout=5).json()
        return call if call.get("state") == "ended" else None

    call = wait_until(ended, 60, "the manual call to end")
    assert call["outcome"] == "answered"
    got = wait_until(lambda: cdr_of(stack, call_id), 120, "the manual call's CDR")
    assert got["phone"] == order["data"]["phoneFields"][0]["value"] and got["record"] is True
    assert requests.get(stack["sandbox"] + "/_sandbox/plugin", timeout=5).json()["rejected"] == []


def test_make_demo_has_the_plugin_loop(stack):
    ports = stack["ports"]
    env = {k: v for k, v in os.environ.items() if k not in CONFTEST_KEYS}
    env.update({"CALLBRIDGE_PORT": str(ports["CALLBRIDGE_PORT"]),
                "SALESRENDER_SANDBOX_PORT": str(ports["SALESRENDER_SANDBOX_PORT"]), "DEMO_TIMEOUT_SECONDS": "150"})
    done = subprocess.run(["make", "--no-print-directory", "demo", "CRM_PLUGIN=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plugin registered in SalesRender" in done.stdout
    assert "callback's CDR in SalesRender" in done.stdout and "manual call's CDR in SalesRender" in done.stdout
