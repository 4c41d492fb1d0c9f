"""`make demo CRM_STATUS=1`: the CRM status loop of R-21 on the running local stack (`make run`).

A lead whose customer does not answer (the Beeline sandbox's `02` ending) is called once and gets a retry;
the order is then approved in the SalesRender sandbox as a manager would, the sandbox's order trigger posts
the webhook to the app, the lead is finished (its retry will not ring), and the offer's postback reaches
the sandbox's tracker, once.
"""

from __future__ import annotations

import os
import sys
import uuid
from urllib.parse import urlencode

import requests

from infra.local.demo_timeline import Timeline

PHONE = "+79994445502"  # "02": the Beeline sandbox lets it ring unanswered
APPROVED = "2"


def main(app: str, crm: str) -> int:
    from functions.records import calls, leads

    token = os.environ.get("CALLBRIDGE_API_TOKEN", "local-api-token")
    auth = {"Authorization": f"Bearer {token}"}
    tranid = f"demo-status:{uuid.uuid4().hex[:10]}"
    timeline = Timeline()
    say, wait = timeline.say, timeline.wait

    form = {"Name": "Демо", "Phone": PHONE, "tranid": tranid, "formid": "form493249737", "utm_source": "demo",
            "subid": "demo-click-1"}
    try:
        response = requests.post(app + "/webhooks/tilda", data=urlencode(form), timeout=10,
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "X-Api-Key": os.environ.get("TILDA_API_KEY", "local-tilda-key")})
    except requests.ConnectionError:
        print(f"nothing answers at {app}: start `make run` first", file=sys.stderr)
        return 1
    say(f"Tilda post (subid demo-click-1) answered {response.status_code} {response.text!r}")
    lead_id = leads.lead_id_for("tilda", f"tranid:{tranid}")
    try:
        order = wait(lambda: next((o for o in requests.get(crm + "/_sandbox/orders", timeout=5).json()
                                   if lead_id in (o.get("source") or {}).get("refererUri", "")
                                   or lead_id in str(o.get("orderData"))), None), "the order")
        say(f"SalesRender order {order['id']} created")
        call_id = calls.call_id_for(lead_id, 1)

        def ended():
            call = requests.get(f"{app}/v1/calls/{call_id}", headers=auth, timeout=5)
            return call.json() if call.status_code == 200 and call.json()["state"] == "ended" else None

        call = wait(ended, "the first call to end")
        say(f"call ended: {call['outcome']}: a retry is scheduled")
        moved = requests.post(f"{crm}/_sandbox/orders/{order['id']}/status", json={"status_id": APPROVED}, timeout=30)
        say(f"approved in SalesRender ({moved.status_code}); the order trigger posts the webhook")
        delivery = [d for d in requests.get(crm + "/_sandbox/webhooks", timeout=5).json()
                    if d["order_id"] == order["id"] and d["event"] == "status"][-1]
        outcome = ((delivery.get("answer") or {}).get("orders") or {}).get(order["id"]) \
            if isinstance(delivery.get("answer"), dict) else None
        say(f"webhook answered {delivery['status']}: {outcome} (the retry will not ring)")
        hit = wait(lambda: next((h for h in requests.get(crm + "/_sandbox/tracker", timeout=5).json()
                                 if h["query"].get("order") == order["id"]), None), "the postback")
        query = "&".join(f"{k}={v}" for k, v in hit["query"].items())
        say(f"postback fired: {hit['method']} {hit['path']}?{query}")
        listed = requests.get(f"{app}/v1/postbacks", params={"order_id": order["id"]}, headers=auth, timeout=5).json()
        say(f"GET /v1/postbacks?order_id={order['id']}: {len(listed['attempts'])} attempt(s), "
            f"{[p['state'] for p in listed['postbacks']]}")
    except TimeoutError as exc:
        print(f"timed out waiting for {exc}", file=sys.stderr)
        return 1
    say("done")
    return 0
