"""The records' time and lifetime (issue 8, items 11 and 12): the budget month is the configured zone's
(Moscow by default), and leads, calls, their bindings and events expire after the configured retention."""

from __future__ import annotations

import datetime as dt
import time
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY

from functions.calling import budget
from functions.core import config, resources
from functions.records import spend

SECRET = "test-beeline-secret"
NEW_YEAR_MOSCOW = dt.datetime(2031, 12, 31, 21, 30, tzinfo=dt.UTC)  # 00:30 on 1 January 2032 in Moscow


def test_the_budget_month_is_moscow_s_by_default():
    assert config.load().budget.timezone == "Europe/Moscow"
    assert spend.month(NEW_YEAR_MOSCOW) == "2032-01"
    assert spend.month(NEW_YEAR_MOSCOW - dt.timedelta(hours=1)) == "2031-12"  # 23:30 on the 31st in Moscow
    assert spend.month(NEW_YEAR_MOSCOW.replace(tzinfo=None)) == "2032-01"  # naive means UTC


def test_the_budget_month_follows_the_configured_zone(use_config):
    use_config(lambda doc: doc["budget"].update(timezone="Asia/Yekaterinburg"))  # UTC+5
    assert spend.month(dt.datetime(2031, 12, 31, 19, 30, tzinfo=dt.UTC)) == "2032-01"
    with pytest.raises(config.ConfigError, match=r"budget\.timezone"):
        use_config(lambda doc: doc["budget"].update(timezone="Mars/Olympus"))
        config.load()


def test_the_budget_stops_calls_by_the_moscow_month(aws):
    cfg = config.load()
    spend.add(cfg.budget.monthly_rub, "2032-01")  # January (Moscow) is spent; December is not
    assert not budget.allows_call(cfg, manual=False, now=NEW_YEAR_MOSCOW)
    assert budget.allows_call(cfg, manual=False, now=NEW_YEAR_MOSCOW - dt.timedelta(hours=1))


def test_data_retention_is_configured_with_a_safe_default(use_config):
    assert config.load().data_retention_days == 90
    with pytest.raises(config.ConfigError, match="data_retention_days"):
        use_config(lambda doc: doc.update(data_retention_days=1))  # leads would vanish mid-retries
        config.load()


def _event(event_type: str, state: str, *, release: bool = False) -> bytes:
    times_xml = "<xsi:startTime>1779987800000</xsi:startTime>"
    if release:
        times_xml += "<xsi:releaseTime>1779987850000</xsi:releaseTime>"
    return ('<?xml version="1.0" encoding="UTF-8"?><xsi:Event xmlns:xsi="http://schema.broadsoft.com/xsi" '
            'xmlns:xsi1="http://www.w3.org/2001/XMLSchema-instance" xsi1:type="xsi:SubscriptionEvent">'
            f"<xsi:eventID>{event_type}-{state}-0001</xsi:eventID><xsi:sequenceNumber>1</xsi:sequenceNumber>"
            "<xsi:subscriptionId>sub-1</xsi:subscriptionId><xsi:targetId>SIP0343PU200QK@ip.beeline.ru</xsi:targetId>"
            f'<xsi:eventData xsi1:type="xsi:{event_type}"><xsi:call><xsi:callId>callhalf-1:0</xsi:callId>'
            "<xsi:extTrackingId>87000001:1</xsi:extTrackingId><xsi:personality>Terminator</xsi:personality>"
            f"<xsi:state>{state}</xsi:state><xsi:remoteParty><xsi:address>tel:+79997770051</xsi:address>"
            "</xsi:remoteParty><xsi:redirections><xsi:redirection><xsi:party><xsi:address>tel:+74951234567"
            f"</xsi:address></xsi:party></xsi:redirection></xsi:redirections>{times_xml}</xsi:call></xsi:eventData>"
            "</xsi:Event>").encode()


def test_leads_calls_bindings_and_events_expire_after_the_retention(client, beeline_sandbox, use_config,
                                                                     monkeypatch):
    use_config(lambda doc: doc.update(data_retention_days=45))
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)
    form = urlencode({"Name": "Анна", "Phone": "+79991118888", "tranid": "ttl:1", "formid": "form493249737"})
    assert client.http.post("/webhooks/tilda", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Api-Key": TILDA_KEY}).status_code == 200
    xml = {"Content-Type": "application/xml; charset=UTF-8"}
    for body in (_event("CallReceivedEvent", "Alerting"), _event("CallReleasedEvent", "Released", release=True)):
        assert client.http.post(f"/webhooks/beeline/{SECRET}", body=body, headers=xml).status_code == 200

    items = resources.table().scan()["Items"]
    personal = {kind: [i for i in items if i["pk"].startswith(prefix) and i["sk"].startswith(sk)]
                for kind, prefix, sk in (("lead", "LEAD#", "LEAD"), ("call log", "LEAD#", "CALLLOG#"),
                                         ("call", "CALL#", "CALL"), ("binding", "TRACK#", "CALL"),
                                         ("event", "TRACK#", "EVENT#"))}
    assert {kind: len(found) for kind, found in personal.items()} == {
        "lead": 2, "call log": 1, "call": 1, "binding": 1, "event": 2}  # the Tilda lead and the caller's
    expected = time.time() + 45 * 86400
    for kind, found in personal.items():
        for item in found:
            assert abs(int(item.get("ttl", 0)) - expected) < 300, (kind, item["pk"], item["sk"])
