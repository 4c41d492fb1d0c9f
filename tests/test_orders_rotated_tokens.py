"""Rotated tokens are picked up; a rejected token raises an alarm at once (issue 8, item 9).

Provider clients live no longer than their secret's value: when the value changes (an environment
variable locally; an SSM parameter in AWS once Powertools' 5-minute cache hands out the new one),
`default_client()` is a new client with the new token. A 401/403 from SalesRender or Beeline emits
`ProviderAuthFailed` on the first failure; the intake message is retried (not parked), so the lead's
order lands as soon as the token is fixed.
"""

from __future__ import annotations

import json

import pytest
import responses
from conftest import EVENTS, TILDA_KEY, deliver, receive

from functions.core import queues, resources
from functions.providers.beeline import client as beeline
from functions.providers.salesrender import client as salesrender
from functions.records import leads

FORM = "application/x-www-form-urlencoded"


def emitted(capsys, name: str) -> list[dict]:
    """The EMF metrics called `name` that were printed (Powertools writes EMF to stdout)."""
    found = []
    for line in capsys.readouterr().out.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and name in doc and "_aws" in doc:
            found.append(doc)
    return found


def test_a_rotated_salesrender_token_is_used_without_a_restart(salesrender_sandbox, monkeypatch):
    client = salesrender.default_client()
    assert client.get_order("1") is None
    salesrender_sandbox.token = "rotated-token"  # SalesRender now accepts only the new token
    monkeypatch.setenv("SALESRENDER_API_TOKEN", "rotated-token")  # ...and the secret holds it
    assert salesrender.default_client().get_order("1") is None
    assert salesrender.default_client() is salesrender.default_client()  # still one pooled client per token


def test_a_rotated_beeline_token_is_used_without_a_restart(beeline_sandbox, monkeypatch):
    assert beeline.default_client().abonents()
    beeline_sandbox.token = "rotated-beeline-token"
    monkeypatch.setenv("BEELINE_API_TOKEN", "rotated-beeline-token")
    assert beeline.default_client().abonents()


def test_a_token_rotated_in_ssm_is_used_once_the_parameter_cache_expires(aws, monkeypatch):
    from aws_lambda_powertools.utilities import parameters

    monkeypatch.delenv("SALESRENDER_API_TOKEN")
    ssm = resources.client("ssm")
    name = "/callbridge/test/salesrender_api_token"
    ssm.put_parameter(Name=name, Value="old-token", Type="SecureString", Overwrite=True)
    parameters.clear_caches()
    try:
        assert salesrender.default_client()._token == "old-token"
        ssm.put_parameter(Name=name, Value="new-token", Type="SecureString", Overwrite=True)
        assert salesrender.default_client()._token == "old-token"  # within the 5 minutes of the cache
        parameters.clear_caches()  # the 5 minutes are over
        assert salesrender.default_client()._token == "new-token"
    finally:
        parameters.clear_caches()


def test_a_rejected_salesrender_token_alarms_at_once_and_the_lead_waits_for_the_fix(
        client, salesrender_sandbox, monkeypatch, capsys):
    monkeypatch.setattr(queues, "backoff_seconds", lambda receive_count: 0)
    response = client.http.post("/webhooks/tilda", body=(EVENTS / "tilda_form_urlencoded.txt").read_text().strip(),
                                headers={"Content-Type": FORM, "X-Api-Key": TILDA_KEY})
    assert response.status_code == 200
    lead_id = leads.lead_id_for("tilda", "tranid:1234567:8901234567")
    salesrender_sandbox.token = "the-new-token-nobody-deployed"
    capsys.readouterr()
    assert deliver("intake", "intake_worker") == [False]  # retried, not parked
    [alarm] = emitted(capsys, "ProviderAuthFailed")
    assert alarm["provider"] == "salesrender"
    assert receive("intake", dlq=True) == []
    monkeypatch.setenv("SALESRENDER_API_TOKEN", "the-new-token-nobody-deployed")  # the fix
    assert deliver("intake", "intake_worker") == [True]
    [order] = salesrender_sandbox.orders()
    assert leads.get(lead_id)["order_id"] == order["id"]


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_beeline_token_alarms_at_once(status, capsys):
    url = "https://beeline.test/apis/portal/"
    with responses.RequestsMock() as rsps:
        rsps.get(url + "abonents", status=status,
                 json={"errorCode": "AuthTokenNotFoundInRequest", "description": "no token"})
        capsys.readouterr()
        with pytest.raises(beeline.BeelineError) as info:
            beeline.BeelineClient(url, "stale").abonents()
    assert info.value.status == status
    [alarm] = emitted(capsys, "ProviderAuthFailed")
    assert alarm["provider"] == "beeline"


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_salesrender_token_is_transient_and_alarms(status, capsys):
    url = "https://salesrender.test/companies/1/CRM"
    with responses.RequestsMock() as rsps:
        rsps.post(url, status=status, json={"errors": [{"message": "Unauthorized",
                                                        "extensions": {"code": "ERR_UNAUTHORIZED"}}]})
        capsys.readouterr()
        with pytest.raises(salesrender.SalesRenderError) as info:
            salesrender.SalesRenderClient(url, "stale").get_order("1")
    assert info.value.transient is True  # the leads survive until the token is fixed
    assert [m["provider"] for m in emitted(capsys, "ProviderAuthFailed")] == ["salesrender"]
