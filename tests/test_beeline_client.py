"""The Beeline portal client on the wire (responses): headers, paths, error bodies, and which
failures may be retried — an originate that may have gone through is never sent again."""

from __future__ import annotations

import pytest
import requests
import responses

from functions.providers.beeline.client import BeelineClient, BeelineError, OriginateUncertain

BASE = "https://pbx.test/apis/portal/"


@pytest.fixture
def client():
    return BeelineClient(BASE, "token-123")


@responses.activate
def test_originate_posts_ten_digits_with_the_token_and_no_body(client):
    responses.post(BASE + "abonents/200/call", body="")
    assert client.originate("200", "9991112233") is None
    [call] = responses.calls
    assert call.request.url == BASE + "abonents/200/call?phoneNumber=9991112233"
    assert call.request.headers["X-MPBX-API-AUTH-TOKEN"] == "token-123"
    assert not call.request.body


@pytest.mark.parametrize("digits", ["+79991112233", "79991112233", "999111223", "99911122aa"])
def test_originate_refuses_anything_but_ten_digits(client, digits):
    with pytest.raises(ValueError):
        client.originate("200", digits)


@responses.activate
def test_error_code_bodies_become_clear_errors(client):
    responses.post(BASE + "abonents/999/call", status=404,
                   json={"errorCode": "AbonentNotFound", "description": "no such abonent"})
    with pytest.raises(BeelineError) as caught:
        client.originate("999", "9991112233")
    assert caught.value.code == "AbonentNotFound" and not caught.value.transient
    assert "no such abonent" in str(caught.value)


@pytest.mark.parametrize("failure", [requests.ReadTimeout(), requests.ConnectionError("Connection aborted.")])
@responses.activate
def test_originate_that_may_have_landed_is_uncertain_and_sent_once(client, failure):
    responses.post(BASE + "abonents/200/call", body=failure)
    with pytest.raises(OriginateUncertain):
        client.originate("200", "9991112233")
    assert len(responses.calls) == 1


@responses.activate
def test_originate_500_is_uncertain(client):
    responses.post(BASE + "abonents/200/call", status=500)
    with pytest.raises(OriginateUncertain):
        client.originate("200", "9991112233")


def test_originate_to_a_closed_port_is_transient_not_uncertain():
    with pytest.raises(BeelineError) as caught:
        BeelineClient("http://127.0.0.1:9/apis/portal/", "t").originate("200", "9991112233")
    assert caught.value.transient and not isinstance(caught.value, OriginateUncertain)


@responses.activate
def test_agent_status_accepts_a_bare_string_or_an_object(client):
    responses.get(BASE + "abonents/200/agent", json="BREAK")
    responses.get(BASE + "abonents/201/agent", json={"agentStatus": "online"})
    assert client.agent_status("200") == "BREAK"
    assert client.agent_status("201") == "ONLINE"


@responses.activate
def test_missing_token_answer_is_an_error(client):
    responses.get(BASE + "abonents", status=403, json={"errorCode": "AuthTokenNotFoundInRequest"})
    with pytest.raises(BeelineError) as caught:
        client.abonents()
    assert caught.value.code == "AuthTokenNotFoundInRequest" and caught.value.status == 403
