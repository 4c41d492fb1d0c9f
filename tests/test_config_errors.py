"""A configuration error in a deployed function is a loud alarm, not a quiet retry (issue 12 item 8).

The API answers 503 naming the key; a worker keeps the message (a fixed document lets it through) and both
emit `ConfigErrors` at once, once per failure, which infra/template.yaml alarms on (functions/core/queues.py,
app.py's guard, functions/core/observability.py)."""

from __future__ import annotations

import json

import pytest
from conftest import EVENTS, TILDA_KEY, deliver, post_lead, receive

from functions.core import queues
from functions.records import leads

FORM = "application/x-www-form-urlencoded"


def broken(doc):
    doc["offers"][0]["caller_id"] = "84951234567"  # not +7XXXXXXXXXX


def config_errors(capsys) -> list[dict]:
    found = []
    for line in capsys.readouterr().out.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "_aws" in doc and "ConfigErrors" in doc:
            found.append(doc)
    return found


def test_the_api_answers_503_naming_the_key_and_alarms(client, use_config, capsys):
    use_config(broken)
    capsys.readouterr()
    response = client.http.post("/webhooks/tilda", body=(EVENTS / "tilda_form_urlencoded.txt").read_text().strip(),
                                headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "300"
    body = json.loads(response.body)
    assert body["field"] == "config" and "offers.0.caller_id" in body["error"]
    [metric] = config_errors(capsys)
    assert metric["ConfigErrors"] == [1.0] and metric["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["stage"]]
    assert client.http.get("/v1/health").status_code == 200  # what needs no configuration still answers


def test_a_worker_keeps_the_message_alarms_and_lets_it_through_once_fixed(client, salesrender_sandbox, use_config,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    lead_id = post_lead(client)
    path = use_config(broken)
    capsys.readouterr()
    assert deliver("intake", "intake_worker") == [False]  # retried, not parked
    assert len(config_errors(capsys)) == 1  # once, though queues.run and the invocation both saw it
    assert receive("intake", dlq=True) == []
    text = path.read_text(encoding="utf-8").replace("84951234567", "+74951234567")  # the fix
    path.write_text(text, encoding="utf-8")
    from functions.core import config

    config.load.cache_clear()  # a new deploy: a new container
    assert deliver("intake", "intake_worker") == [True]
    assert leads.get(lead_id)["order_state"] == "created"


def test_after_the_last_retry_it_is_parked_saying_it_was_the_configuration(aws, use_config):
    use_config(broken)

    class Record:
        body = json.dumps({"lead_id": "L1"})
        receipt_handle = "r"

        def to_dict(self):
            return {"messageId": "m1", "attributes": {"ApproximateReceiveCount": str(queues.MAX_RECEIVES)}}

    def handler(body):
        from functions.core import config

        config.load()

    queues.run("intake", Record(), handler)  # parked: returns instead of raising
    [parked] = receive("intake", dlq=True)
    assert parked["MessageAttributes"]["code"]["StringValue"] == "config"
    assert "offers.0.caller_id" in parked["MessageAttributes"]["reason"]["StringValue"]


def test_a_schedule_with_a_broken_configuration_fails_loudly(aws, use_config, capsys):
    from functions.core import config
    from functions.core.observability import invocation_context
    from infra.local.runner import LambdaContext, schedule_event

    use_config(broken)
    capsys.readouterr()
    # What app.py's middleware does around every scheduled handler (Lambda then counts the error too).
    handler = invocation_context(lambda event, context: config.load())
    with pytest.raises(config.ConfigError, match="caller_id"):
        handler(schedule_event("call_reconciler", "us-east-1"), LambdaContext("callbridge-test-call_reconciler"))
    assert len(config_errors(capsys)) == 1
