"""`make demo`: send a sample lead to the running local stack (`make run`) and print its timeline
until the recording is stored and the call log is on the SalesRender order.

Run `make run` first (in another terminal, ideally with CALLBACK_DELAY_SECONDS=0 and
BEELINE_SANDBOX_TIME_SCALE=0.1 so the demo takes seconds, not minutes).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import requests

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    app = f"http://127.0.0.1:{os.environ.get('CALLBRIDGE_PORT', '8000')}"
    crm = f"http://127.0.0.1:{os.environ.get('SALESRENDER_SANDBOX_PORT', '8101')}"
    token = os.environ.get("CALLBRIDGE_API_TOKEN", "local-api-token")
    sys.path.insert(0, str(ROOT))
    if os.environ.get("CRM_PLUGIN", "") not in ("", "0"):  # make demo CRM_PLUGIN=1: the SalesRender plugin's loop
        from infra.local import crm_plugin_demo

        return crm_plugin_demo.main(app, crm)
    if os.environ.get("CRM_STATUS", "") not in ("", "0"):  # make demo CRM_STATUS=1: approved in the CRM -> postback
        from infra.local import crm_status_demo

        return crm_status_demo.main(app, crm)
    from functions.records import calls, leads

    def orders_of_sample() -> int:
        orders = requests.get(crm + "/_sandbox/orders", timeout=5).json()
        return sum(o["orderData"]["phoneFields"][0]["value"] == "+79991112233" for o in orders)

    fields = dict(parse_qsl((ROOT / "events" / "tilda_form_urlencoded.txt").read_text().strip()))
    fields["tranid"] = f"demo:{uuid.uuid4().hex[:10]}"
    try:
        orders_before = orders_of_sample()
    except requests.ConnectionError:
        print(f"nothing answers at {crm}: start `make run` first", file=sys.stderr)
        return 1
    start = time.monotonic()

    def say(text: str) -> None:
        print(f"{time.monotonic() - start:7.1f} s  {text}", flush=True)

    try:
        response = requests.post(app + "/webhooks/tilda", data=urlencode(fields), timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "X-Api-Key": os.environ.get("TILDA_API_KEY", "local-tilda-key")})
    except requests.ConnectionError:
        print(f"nothing answers at {app}: start `make run` first", file=sys.stderr)
        return 1
    say(f"Tilda post answered {response.status_code} {response.text!r}")
    call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{fields['tranid']}"), 1)
    seen: set[str] = set()
    deadline = time.monotonic() + float(os.environ.get("DEMO_TIMEOUT_SECONDS", "900"))
    while time.monotonic() < deadline:
        if "order" not in seen and orders_of_sample() > orders_before:
            seen.add("order")
            say("SalesRender order created")
        call = requests.get(f"{app}/v1/calls/{call_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        if call.status_code == 200:
            c = call.json()
            for label, happened in (
                (f"dialing: operator {c['operator']} rings first, then {c['phone']}", c["state"] != "queued"),
                ("customer answered", c["answered_at"] is not None),
                (f"call ended: {c['outcome']}, {c['talk_seconds']} s, {c['cost_rub']} RUB", c["state"] == "ended"),
                (f"recording stored: {c['recording_url']}", c["recording_url"] is not None),
            ):
                if happened and label not in seen:
                    seen.add(label)
                    say(label)
        if any(label.startswith("recording stored") for label in seen):
            say("done")
            return 0
        if any(label.startswith("call ended") and "answered" not in label for label in seen):
            say("done (no recording for an unanswered call)")
            return 0
        time.sleep(0.5)
    print("timed out", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
