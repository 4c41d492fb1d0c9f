"""Log audit (issue 8 items 13 and 16): every line any process of `make run` writes, during a whole lead's
life, is free of full phone numbers and of secrets.

The flow: a Tilda post (key in the header) and one with `?key=` in the query, the callback, Beeline's
events posted to `/webhooks/beeline/{secret}`, the recording stored and its `?sig=` link fetched (and the
presigned S3 link it redirects to), a manual `POST /v1/calls` with the API token. Then every line of make
run's stdout/stderr and of every log file in its local directory is scanned.
"""

from __future__ import annotations

import json
import re
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from functions.records import calls, leads
from tests.test_e2e_local_stack import make_run, stop_make_run, wait_until

pytestmark = pytest.mark.e2e

SECRETS = {  # make run's built-in local credentials (infra/local/run.py LOCAL_DEFAULTS)
    "Tilda key": "local-tilda-key",
    "SalesRender token": "sandbox-salesrender-token",
    "Beeline token": "sandbox-beeline-token",
    "Beeline webhook secret": "local-beeline-secret",
    "SalesRender webhook secret": "local-salesrender-secret",
    "API token": "local-api-token",
    "recording link secret": "local-recording-link-secret",
}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def phone_forms(national: str) -> list[str]:
    """The ways a lead's ten national digits can show up once separators are squeezed out of a line."""
    return ["+7" + national, "8" + national, "7" + national, national]


def squeezed(line: str) -> str:
    return re.sub(r"[\s\-().]", "", line)


def test_no_log_line_of_make_run_holds_a_phone_or_a_secret(tmp_path):
    header_phone, query_phone, api_phone = "9994445566", "9994445577", "9994445588"
    seen_secrets = dict(SECRETS)
    with make_run(tmp_path / "local", FRESH="1") as stack:
        app, auth = stack["app"], {"Authorization": "Bearer local-api-token"}
        tranid = f"audit:{uuid.uuid4().hex[:12]}"
        posted = requests.post(app + "/webhooks/tilda", headers={**FORM, "X-Api-Key": "local-tilda-key"}, timeout=10,
                               data=urlencode({"Name": "Вера", "Phone": "+7 (999) 444-55-66", "tranid": tranid,
                                               "formid": "form493249737", "Comments": "звоните 8 999 444 55 66"}))
        assert (posted.status_code, posted.text) == (200, "ok")
        queried = requests.post(app + "/webhooks/tilda?key=local-tilda-key", headers=FORM, timeout=10,
                                data=urlencode({"Phone": "8 999 444 55 77", "tranid": f"audit:{uuid.uuid4().hex[:12]}",
                                                "formid": "form493249737"}))
        assert (queried.status_code, queried.text) == (200, "ok")
        manual = requests.post(app + "/v1/calls", json={"phone": "+7" + api_phone, "offer_id": 101}, timeout=10,
                               headers={**auth, "Idempotency-Key": uuid.uuid4().hex})
        assert manual.status_code == 202, manual.text

        call_id = calls.call_id_for(leads.lead_id_for("tilda", f"tranid:{tranid}"), 1)

        def recorded():
            call = requests.get(f"{app}/v1/calls/{call_id}", headers=auth, timeout=5)
            return call.json()["recording_url"] if call.status_code == 200 else None

        link = wait_until(recorded, 90, "the recording of the Tilda lead's call")
        [sig] = parse_qs(urlsplit(link).query)["sig"]
        seen_secrets["recording link sig"] = sig
        redirect = requests.get(link, timeout=5, allow_redirects=False)  # the link as a CRM user opens it
        assert redirect.status_code == 302
        presigned = redirect.headers["Location"]
        for name, values in parse_qs(urlsplit(presigned).query).items():
            if "signature" in name.lower():
                seen_secrets[f"S3 {name}"] = values[0]
        assert requests.get(presigned, timeout=5).status_code == 200

        def written_back():  # the write-back to the order logs too: wait for it
            orders = requests.get(stack["sandbox"] + "/_sandbox/orders", timeout=5).json()
            return any("/v1/recordings/" in f["value"] for o in orders for f in o["data"].get("stringFields", [])
                       if f["field"] == "call_log")

        wait_until(written_back, 90, "the call log on the order")
        stop_make_run(stack["proc"])  # every process flushes and exits: the logs are complete
        stack["reader"].join(timeout=10)
        sources = {"make run output": list(stack["lines"])}
        for log in sorted((tmp_path / "local").glob("*.log")):
            sources[log.name] = log.read_text(errors="replace").splitlines()

    assert any("/webhooks/beeline/" in line for line in sources["make run output"]), "the webhook was not logged"
    assert any("/webhooks/tilda?key=" in line for line in sources["make run output"]), "the ?key= post not logged"
    leaks = []
    for source, lines in sources.items():
        for number, line in enumerate(lines, 1):
            for what, value in seen_secrets.items():
                if value in line:
                    leaks.append(f"{source}:{number}: {what}: {line[:300]}")
            flat = squeezed(line)
            for phone in (header_phone, query_phone, api_phone):
                if any(form in flat for form in phone_forms(phone)):
                    leaks.append(f"{source}:{number}: phone {phone[:3]}…: {line[:300]}")
    assert not leaks, "\n".join(leaks)

    # Each line names the function that wrote it, though the runner runs the workers side by side.
    written_by = {"order created": "intake_worker", "call originated": "callback_worker",
                  "recording stored": "recording_worker", "lead accepted": "api_handler"}
    records = [json.loads(line) for line in sources["make run output"] if line.startswith('{"level"')]
    named = [(r["message"], r.get("function_name", "")) for r in records if r["message"] in written_by]
    assert {message for message, _ in named} == set(written_by)
    assert all(function.endswith(written_by[message]) for message, function in named), named
