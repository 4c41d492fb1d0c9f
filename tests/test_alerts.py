"""Owner alerts (R-23, issue 11 item 5): SNS at each budget threshold once per month, and at channel
saturation once per episode, through the topic of infra/template.yaml (moto) into an SQS subscriber,
as a developer would watch them; the budget rule itself (calling/budget.py) around them."""

from __future__ import annotations

import datetime as dt
import json
import types
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, EventSink, deliver

from functions.calling import alerts, budget
from functions.core import config, resources
from functions.providers.beeline import client as beeline
from functions.records import calls, leads, spend

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def inbox(aws):
    """An SQS queue subscribed to the alerts topic; calling it returns the alerts that arrived since."""
    sqs, sns = resources.client("sqs"), resources.client("sns")
    url = sqs.create_queue(QueueName="alerts-inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=aws["ALERTS_TOPIC_ARN"], Protocol="sqs", Endpoint=arn)

    def read() -> list[dict]:
        got = []
        while True:
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                return got
            for m in messages:
                envelope = json.loads(m["Body"])
                got.append({"subject": envelope.get("Subject"), "message": envelope["Message"]})
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    return read


def check(manual: bool = False, now: dt.datetime | None = None) -> bool:
    return budget.allows_call(config.load(), manual, now)


def test_each_budget_threshold_alerts_once_per_month(inbox, capsys):
    now = dt.datetime.now(dt.UTC)
    month = spend.month(now)
    spend.add(3990.0, month)  # 79.8% of 5000
    assert check(now=now) is True
    assert inbox() == []
    spend.add(20.0, month)  # 80.2%
    assert check(now=now) is True
    [eighty] = inbox()
    assert eighty["subject"] == f"callbridge test: budget 80% reached ({month})"
    assert "4 010 RUB of the 5 000 RUB budget" in eighty["message"]
    assert "4 010 ₽ из 5 000 ₽" in eighty["message"]  # and in Russian
    assert check(now=now) is True and check(now=now) is True
    assert inbox() == []  # once per threshold and month
    spend.add(1000.0, month)  # 100.2%: automatic callbacks stop, manual calls still go
    assert check(now=now) is False and check(manual=True, now=now) is True
    [hundred] = inbox()
    assert hundred["subject"] == f"callbridge test: budget 100% reached ({month})"
    assert "Automatic callbacks are stopped" in hundred["message"]
    assert "manual calls still go" in hundred["message"]
    assert check(now=now) is False
    assert inbox() == []
    # A new month starts from nothing: callbacks go again, and its own thresholds alert again.
    later = now + dt.timedelta(days=40)
    assert check(now=later) is True and inbox() == []
    spend.add(4500.0, spend.month(later))
    assert check(now=later) is True
    assert [a["subject"] for a in inbox()] == [f"callbridge test: budget 80% reached ({spend.month(later)})"]
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"BudgetUsedPercent"' in line]
    assert [d["BudgetUsedPercent"] for d in emf][-1] == [90.0]  # the metric behind the CloudWatch alarms
    assert emf[-1]["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["stage"]]


def test_configured_thresholds_and_one_spend_jump_over_several(inbox, use_config):
    use_config(lambda doc: doc["budget"].update(alert_thresholds=[0.5, 0.9, 1.0], manual_calls_at_limit=False))
    spend.add(4600.0)  # 92%: two thresholds crossed at once, each alerted once
    assert check() is True
    assert [a["subject"].split(": ")[1] for a in inbox()] == [f"budget {p}% reached ({spend.month()})"
                                                              for p in (50, 90)]
    spend.add(400.0)
    assert check() is False and check(manual=True) is False  # manual_calls_at_limit: false
    [hundred] = inbox()
    assert "so are manual calls" in hundred["message"]


def test_a_failed_publish_leaves_the_alert_due_and_never_fails_the_call(inbox, monkeypatch, log_output):
    spend.add(4200.0)
    monkeypatch.setenv("ALERTS_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:no-such-topic")
    assert check() is True  # the alert failed; the budget answer did not
    assert "budget alert failed" in log_output.getvalue()
    assert inbox() == []


def test_the_marker_is_written_only_after_the_publish(inbox, aws, monkeypatch):
    spend.add(4200.0)
    sns = resources.client("sns")

    def down(**kwargs):
        raise ConnectionError("SNS unreachable")

    with monkeypatch.context() as patched:
        patched.setattr(sns, "publish", down)
        assert check() is True
    assert inbox() == []
    assert check() is True  # the next check sends what the failed one could not
    assert [a["subject"] for a in inbox()] == [f"callbridge test: budget 80% reached ({spend.month()})"]


@pytest.fixture
def tracked(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", "alerts-secret")
    sink = EventSink()
    beeline.default_client().subscribe(sink.url, 3600)
    yield beeline_sandbox, sink
    sink.server.shutdown()


def test_the_call_whose_cost_crosses_the_threshold_sends_the_alert(client, tracked, inbox):
    pbx, sink = tracked
    spend.add(3998.0)  # the 75 s sample call costs 4 RUB: 4002 > 4000
    body = urlencode({"Name": "Анна", "Phone": "+79991115555", "tranid": "alerts:1", "formid": "form493249737"})
    assert client.http.post("/webhooks/tilda", body=body,
                            headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY}).status_code == 200
    assert deliver("intake", "intake_worker") == [True]
    assert deliver("callbacks", "callback_worker") == [True]  # its budget check: 79.96%, nothing yet
    assert inbox() == []
    assert pbx.wait_idle(10)
    for event in sink.bodies:
        assert client.http.post("/webhooks/beeline/alerts-secret", body=event,
                                headers={"Content-Type": "application/xml"}).status_code == 200
    call = calls.get(calls.call_id_for(leads.lead_id_for("tilda", "tranid:alerts:1"), 1))
    assert call["state"] == "ended" and call["cost_rub"] == 4.0
    [alert] = inbox()  # sent by the call tracker as the cost was added, not at the next dial
    assert alert["subject"] == f"callbridge test: budget 80% reached ({spend.month()})"
    assert "4 002 RUB" in alert["message"]


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 1_800_000_000.0}
    monkeypatch.setattr(alerts, "time", types.SimpleNamespace(time=lambda: now["t"]))
    return now


def test_channel_saturation_alerts_once_per_episode(inbox, clock, log_output):
    alerts.channel_use(3, 5)
    assert inbox() == []
    alerts.channel_use(4, 5)  # 80%
    [alert] = inbox()
    assert alert["subject"] == "callbridge test: 4 of 5 channels busy"
    assert "Заняты 4 из 5 каналов" in alert["message"]
    assert '"message":"owner alert"' in log_output.getvalue()  # where `make run` shows it locally
    alerts.channel_use(5, 5)
    alerts.channel_use(4, 5)
    assert inbox() == []  # the same episode
    alerts.channel_use(3, 5)  # below: the episode is over
    clock["t"] += alerts.CHANNEL_REALERT_SECONDS - 60
    alerts.channel_use(4, 5)  # a new episode, but only minutes after the last alert: no page
    assert inbox() == []
    alerts.channel_use(2, 5)
    clock["t"] += 120
    alerts.channel_use(5, 5)  # a new episode, the quiet period is over
    assert [a["subject"] for a in inbox()] == ["callbridge test: 5 of 5 channels busy"]


def test_the_channel_share_is_configurable(inbox, use_config, clock):
    use_config(lambda doc: doc["provider"].update(channel_alert_ratio=0.5))
    alerts.channel_use(2, 5)
    assert inbox() == []
    alerts.channel_use(3, 5)
    assert len(inbox()) == 1


def test_without_a_topic_the_alert_is_a_log_line(aws, monkeypatch, log_output, clock):
    monkeypatch.delenv("ALERTS_TOPIC_ARN")
    alerts.channel_use(5, 5)
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    [alert] = [line for line in lines if line["message"] == "owner alert"]
    assert alert["level"] == "WARNING" and alert["subject"] == "callbridge test: 5 of 5 channels busy"


def test_an_unreadable_state_never_fails_the_caller(aws, monkeypatch, log_output):
    monkeypatch.setenv("STATE_TABLE", "no-such-table")
    resources.reset()
    alerts.channel_use(5, 5)
    alerts.spend_changed("2026-12", 4500.0)
    assert "channel alert failed" in log_output.getvalue() and "budget alert failed" in log_output.getvalue()
