"""EMF metrics through Powertools, one flush per invocation (issue 11 item 4; functions/core/observability.py)."""

from __future__ import annotations

import json

from conftest import EVENTS, TILDA_KEY

from functions.core.observability import invocation_context, metric
from infra.local.runner import LambdaContext, schedule_event


def emf(text: str) -> list[dict]:
    docs = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "_aws" in doc:
            docs.append(doc)
    return docs


def test_an_invocation_flushes_its_metrics_once_when_it_ends(capsys):
    printed_inside = []

    def handler(event, context):
        metric("CallsOriginated", offer="101")
        metric("CallsOriginated", offer="101")
        metric("CallsOriginated", offer="102")
        metric("TalkSeconds", 75, unit="Seconds")
        printed_inside.append(capsys.readouterr().out)
        return "done"

    capsys.readouterr()
    assert invocation_context(handler)(schedule_event("x", "us-east-1"), LambdaContext("callbridge-test-x")) == "done"
    assert emf(printed_inside[0]) == []  # nothing while it runs
    docs = emf(capsys.readouterr().out)
    assert len(docs) == 3  # one document per dimension set
    by_dims = {tuple(d["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]): d for d in docs}
    assert set(by_dims) == {("stage", "offer"), ("stage",)}  # no Powertools `service` dimension
    offers = sorted((d["offer"], d["CallsOriginated"]) for d in docs if "offer" in d)
    assert offers == [("101", [1.0, 1.0]), ("102", [1.0])]
    [talk] = [d for d in docs if "TalkSeconds" in d]
    assert talk["TalkSeconds"] == [75.0] and talk["stage"] == "test"
    assert talk["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "callbridge"


def test_a_failing_invocation_still_flushes(capsys):
    def handler(event, context):
        metric("MessageRetries", queue="intake")
        raise RuntimeError("boom")

    capsys.readouterr()
    try:
        invocation_context(handler)({}, LambdaContext("callbridge-test-x"))
    except RuntimeError:
        pass
    [doc] = emf(capsys.readouterr().out)
    assert doc["MessageRetries"] == [1.0] and doc["queue"] == "intake"


def test_outside_an_invocation_a_metric_is_written_at_once(capsys):
    capsys.readouterr()
    metric("AlertsSent", kind="budget")
    [doc] = emf(capsys.readouterr().out)
    assert doc["AlertsSent"] == [1.0] and doc["kind"] == "budget"


def test_a_route_flushes_at_the_end_of_its_request(client, capsys):
    capsys.readouterr()
    response = client.http.post("/webhooks/tilda", body=(EVENTS / "tilda_form_urlencoded.txt").read_text().strip(),
                                headers={"Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": TILDA_KEY})
    assert response.status_code == 200
    [accepted] = [d for d in emf(capsys.readouterr().out) if "LeadsAccepted" in d]
    assert accepted["LeadsAccepted"] == [1.0] and accepted["offer"] == "101"
