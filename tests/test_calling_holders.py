"""Only the holder releases (issue 8 item 4): a duplicate callback that loses the claim frees only
what it took itself, never the winner's channel or operator."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from conftest import TILDA_KEY, deliver, receive

from functions.calling import channels, dialer
from functions.core import store
from functions.records import calls, leads
from functions.tracking import tracker

FORM = "application/x-www-form-urlencoded"
PROVIDER = "Beeline_Main"


@pytest.fixture
def stack(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "0")
    beeline_sandbox.hold(True)  # the winner's call stays up
    yield {"client": client, "crm": salesrender_sandbox, "pbx": beeline_sandbox}
    beeline_sandbox.hold(False)


def operator_state(pattern: str = "200") -> dict:
    return store.get({"pk": "OPERATORS", "sk": pattern}) or {}


@pytest.mark.parametrize("channel_limit", [1, 2])
def test_a_duplicate_that_loses_the_claim_leaves_the_winner_its_channel_and_operator(
        stack, use_config, monkeypatch, channel_limit):
    use_config(lambda doc: (doc["provider"].update(channel_limit=channel_limit),
                            doc["offers"][0].update(operators=["200"])))
    body = urlencode({"Name": "Анна", "Phone": "+7 999 111 2233", "tranid": "h:1", "formid": "form493249737"})
    stack["client"].http.post("/webhooks/tilda", body=body, headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
    assert deliver("intake", "intake_worker") == [True]
    [message] = receive("callbacks")
    callback = json.loads(message["Body"])
    assert dialer.process(callback) == "originated"  # the winner
    call_id = calls.call_id_for(leads.lead_id_for("tilda", "tranid:h:1"), 1)
    winner = calls.get(call_id)
    assert winner["holder"].startswith("dispatch#") and winner["holder"] != call_id  # the dispatch pass's token

    # The second copy read the call before the winner claimed it, so it goes on to take a channel.
    real_get = calls.get
    monkeypatch.setattr(calls, "get", lambda cid: None if cid == call_id else real_get(cid))
    assert dialer.process(callback) == "waiting"  # no channel (limit 1) or no operator (limit 2): it waits
    monkeypatch.setattr(calls, "get", real_get)

    assert channels.busy(PROVIDER, channel_limit) == 1  # the winner's lease is still taken
    held = operator_state()
    assert held["busy_call"] == call_id and held["busy_holder"] == winner["holder"]
    assert len(stack["pbx"].calls()) == 1

    # The call ends: the tracker releases with the token stored at the claim.
    assert tracker.finalize(call_id, "busy")
    assert channels.busy(PROVIDER, channel_limit) == 0 and "busy_call" not in operator_state()


def test_a_holder_releases_only_its_own_reservation(aws):
    from functions.calling import operators

    assert operators.reserve("200", "call-1", holder="call-1#a")
    assert not operators.reserve("200", "call-1", holder="call-1#b")  # the same call, another delivery
    assert not operators.release("200", "call-1#b") and not operators.release("200", "call-1")
    assert operators.release("200", "call-1#a") and "busy_call" not in operator_state()
