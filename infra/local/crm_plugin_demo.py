"""`make demo CRM_PLUGIN=1`: the SalesRender PBX plugin's whole loop on the running local stack (`make run`).

1. The SalesRender sandbox registers the plugin with the app (PUT /salesrender-plugin/registration, RS512).
2. A Tilda lead becomes an order and its automatic callback; the call's CDR reaches the sandbox (HS512,
   checked strictly, its recording link fetched and found to be an MP3).
3. A manager presses "Call" on that order (POST /salesrender-plugin/special/call): the call is dialled at
   once, and its CDR arrives too.
Each step prints one timeline line, like `make demo`.
"""

from __future__ import annotations

import os
import sys
import uuid
from urllib.parse import urlencode

import requests

from infra.local.demo_timeline import Timeline


def main(app: str, crm: str) -> int:
    from functions.records import calls, leads

    timeline = Timeline()
    say, wait = timeline.say, timeline.wait

    def cdr_of(call_id: str):
        return next((c for c in requests.get(crm + "/_sandbox/cdrs", timeout=5).json() if c["callId"] == call_id),
                    None)

    try:
        registered = requests.post(crm + "/_sandbox/plugin/register", json={}, timeout=30).json()
    except requests.ConnectionError:
        print(f"nothing answers at {crm}: start `make run` first", file=sys.stderr)
        return 1
    if registered.get("status") != 200:
        print(f"registration failed: {registered}", file=sys.stderr)
        return 1
    say(f"plugin registered in SalesRender: {registered['plugin_url']}")

    tranid = f"demo-plugin:{uuid.uuid4().hex[:10]}"
    form = {"Name": "Анна", "Phone": "+7 999 111-22-33", "tranid": tranid, "formid": "form493249737"}
    response = requests.post(app + "/webhooks/tilda", data=urlencode(form), timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded",
                                      "X-Api-Key": os.environ.get("TILDA_API_KEY", "local-tilda-key")})
    say(f"Tilda post answered {response.status_code} {response.text!r}")
    lead_id = leads.lead_id_for("tilda", f"tranid:{tranid}")
    auth = {"Authorization": f"Bearer {os.environ.get('CALLBRIDGE_API_TOKEN', 'local-api-token')}"}
    try:
        callback = calls.call_id_for(lead_id, 1)
        got = wait(lambda: cdr_of(callback), "the callback's CDR")
        say(f"callback's CDR in SalesRender: {got['direction']}, {got['bill_sec']} s, "
            f"{got['pricing']['provider']['amount']} kopecks, record {got['record']}")
        order_id = wait(lambda: _order_of(crm, lead_id), "the order")
        pressed = requests.post(crm + "/_sandbox/plugin/call", json={"order_id": order_id}, timeout=30).json()
        say(f"manager pressed Call on order {order_id}: {pressed['status']} {pressed['body']}")
        manual = pressed["body"]["call_id"]
        ended = wait(lambda: (lambda c: c if c.get("state") == "ended" else None)(
            requests.get(f"{app}/v1/calls/{manual}", headers=auth, timeout=5).json()), "the manual call to end")
        say(f"call ended: {ended['outcome']}, {ended['talk_seconds']} s")
        got = wait(lambda: cdr_of(manual), "the manual call's CDR")
        say(f"manual call's CDR in SalesRender: {got['bill_sec']} s, record {got['record']}: {got['call_record_url']}")
    except TimeoutError as exc:
        print(f"timed out waiting for {exc}", file=sys.stderr)
        return 1
    say("done")
    return 0


def _order_of(crm: str, lead_id: str) -> str | None:
    """The order carrying the lead's id (the intake worker writes it into the comment and the referer)."""
    for order in requests.get(crm + "/_sandbox/orders", timeout=5).json():
        if lead_id in str(order.get("source") or "") or any(lead_id in str(f["value"])
                                                            for f in order["data"].get("stringFields", [])):
            return order["id"]
    return None
