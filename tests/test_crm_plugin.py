"""The SalesRender PBX plugin (R-20, issue 10 items 3-4): info, registration and the "Call" button, through
the app's routes, with tokens signed by the SalesRender sandbox's own RS512 key (served at /pkey/{hash})."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import jwt
import pytest
from conftest import bodies, deliver, post_lead, receive
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from functions.calling import dialer
from functions.core import resources
from functions.crm import plugin
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender import plugin_tokens
from functions.records import calls, leads, plugins
from infra.local.salesrender_plugin_side import side

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BASE = "https://callbridge.example.test/api"
PLUGIN_URL = f"{BASE}/salesrender-plugin/"
HPT = "hpt-secret-of-the-registration-0123456789"


@pytest.fixture
def sr(client, salesrender_sandbox, beeline_sandbox, monkeypatch):
    monkeypatch.setenv("PLUGIN_ENCRYPTION_KEY", "test-plugin-encryption-key")
    monkeypatch.setenv("PUBLIC_BASE_URL", BASE)
    plugin_tokens.public_key.cache_clear()
    crm = side(salesrender_sandbox)
    crm.plugin_url = PLUGIN_URL
    return {"client": client, "crm": crm, "sandbox": salesrender_sandbox, "pbx": beeline_sandbox}


def put_registration(client, token: str, json_body: bool = False):
    if json_body:
        return client.http.put("/salesrender-plugin/registration", body=json.dumps({"registration": token}),
                               headers={"Content-Type": "application/json"})
    return client.http.put("/salesrender-plugin/registration", body=urlencode({"registration": token}), headers=FORM)


def press(client, token: str):
    return client.http.post("/salesrender-plugin/special/call", body=urlencode({"request": token}), headers=FORM)


def register(sr) -> None:
    response = put_registration(sr["client"], sr["crm"].registration_token(HPT))
    assert response.status_code == 200, response.body


def test_info_describes_a_pbx_plugin_of_class_webhook_in_rubles(sr):
    info = sr["client"].http.get("/salesrender-plugin/info").json_body
    assert info["type"] == "PBX" and info["class"] == "WEBHOOK" and info["name"]
    assert info["extra"] == {"class": "WEBHOOK", "currency": "RUB", "pricing": {"pbx": 2.0, "record": 0}}
    assert info["currency"] == "RUB"


@pytest.mark.parametrize("json_body", [False, True])
def test_registration_stores_the_company_plugin_cluster_and_the_secret_encrypted(sr, json_body):
    response = put_registration(sr["client"], sr["crm"].registration_token(HPT), json_body=json_body)
    assert response.status_code == 200
    stored = plugins.get("1")
    assert stored["plugin_id"] == "42" and stored["plugin_alias"] == "callbridge-beeline"
    assert stored["cluster_uri"] == sr["sandbox"].base_url + "/"
    raw = resources.table().get_item(Key={"pk": "PLUGIN#1", "sk": "REGISTRATION"})["Item"]
    assert HPT not in json.dumps(raw, default=str)  # encrypted at rest
    assert plugins.secret("1") == HPT


def test_a_newer_registration_replaces_the_old_and_an_older_replay_does_not(sr):
    old = sr["crm"].registration_token("old-secret", iat=int(time.time()) - 60)
    register(sr)
    assert put_registration(sr["client"], old).status_code == 200
    assert plugins.secret("1") == HPT


def test_a_registration_counts_at_once_and_a_yes_is_kept_a_while(sr, monkeypatch):
    """Every write-back job asks whether the plugin is registered. A no is asked again each time (the
    registration arrives in another container, and the next finished call must get its CDR); a yes is kept
    per container for REGISTERED_SECONDS (a registration is replaced, never removed)."""
    import types

    asked = []
    resources.table().meta.client.meta.events.register("provide-client-params.dynamodb.GetItem",
                                                       lambda params, **_: asked.append(params["Key"]["pk"]))
    assert not plugins.registered("1") and not plugins.registered("1")
    assert asked == ["PLUGIN#1", "PLUGIN#1"]
    register(sr)
    assert plugins.registered("1")  # at once after the registration
    asked.clear()
    assert plugins.registered("1") and plugins.registered("1")
    assert asked == []
    later = time.monotonic() + plugins.REGISTERED_SECONDS + 1
    monkeypatch.setattr(plugins, "time", types.SimpleNamespace(monotonic=lambda: later))
    assert plugins.registered("1")
    assert asked == ["PLUGIN#1"]  # asked again after a while


def _other_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _forgeries(crm) -> dict[str, str]:
    now = int(time.time())
    public_pem = crm.public_pem.decode()
    claims = {"iss": crm.cluster_uri, "aud": PLUGIN_URL, "cid": "1", "plugin": crm.plugin, "HPT": "x",
              "body": {"phone": "+79991112233", "orderId": "1"}, "iat": now, "exp": now + 300}
    other = _other_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    hs_with_public = (jwt.utils.base64url_encode(json.dumps({"alg": "HS512", "typ": "JWT",
                                                             "pkey": crm.key_hash}).encode()).decode() + "." +
                      jwt.utils.base64url_encode(json.dumps(claims).encode()).decode())
    signature = hmac.new(public_pem.encode(), hs_with_public.encode(), hashlib.sha512).digest()
    hs_with_public += "." + jwt.utils.base64url_encode(signature).decode()
    none = (jwt.utils.base64url_encode(json.dumps({"alg": "none", "pkey": crm.key_hash}).encode()).decode() + "." +
            jwt.utils.base64url_encode(json.dumps(claims).encode()).decode() + ".")
    return {
        "forged": crm.sign({"HPT": "x", "body": claims["body"]}, key=other),
        "expired": crm.sign({"HPT": "x", "body": claims["body"], "exp": now - 120}),
        "alg_none": none,
        "hs_with_the_public_key": hs_with_public,
        "other_audience": crm.sign({"HPT": "x", "body": claims["body"], "aud": "https://other.example/plugin/"}),
        "foreign_issuer": crm.sign({"HPT": "x", "body": claims["body"], "iss": "https://backend.evil.example/"}),
        "lookalike_issuer": crm.sign({"HPT": "x", "body": claims["body"],
                                      "iss": "https://de.backend.salesrender.com.evil.example/"}),
        "no_pkey": jwt.encode(claims, crm.private_key, algorithm="RS512"),
        "not_a_jwt": "hello.world",
    }


@pytest.mark.parametrize("kind", ["forged", "expired", "alg_none", "hs_with_the_public_key", "other_audience",
                                  "foreign_issuer", "lookalike_issuer", "no_pkey", "not_a_jwt"])
def test_a_bad_token_is_401_and_does_nothing(sr, kind):
    token = _forgeries(sr["crm"])[kind]
    response = put_registration(sr["client"], token)
    assert response.status_code == 401 and response.json_body["field"] == "registration"
    assert plugins.get("1") is None
    register(sr)
    response = press(sr["client"], token)
    assert response.status_code == 401 and response.json_body["field"] == "request"
    assert receive("callbacks") == [] and receive("intake") == []


def test_registration_for_another_company_is_refused(sr):
    response = put_registration(sr["client"], sr["crm"].registration_token(HPT, cid="77"))
    assert response.status_code == 403 and response.json_body["field"] == "cid"
    assert plugins.get("77") is None


def test_a_call_before_registration_is_refused(sr):
    response = press(sr["client"], sr["crm"].call_token({"phone": "+79991112233", "orderId": "1"}))
    assert response.status_code == 403 and receive("callbacks") == []


def test_missing_parameter_and_bad_bodies_are_4xx_naming_the_field(sr):
    register(sr)
    client = sr["client"]
    assert client.http.post("/salesrender-plugin/special/call", body="", headers=FORM).json_body["field"] == "request"
    bad_json = client.http.put("/salesrender-plugin/registration", body=b"{", headers={"Content-Type":
                                                                                      "application/json"})
    assert bad_json.status_code == 400 and bad_json.json_body["field"] == "body"
    for body, field in (({"orderId": "1"}, "body.phone"), ({"phone": "+79991112233"}, "body.orderId"),
                        ({"phone": "не телефон", "orderId": "1"}, "body.phone"),
                        ({"phone": "+12127365000", "orderId": "1"}, "body.phone"),
                        ({"phone": "+79991112233", "orderId": "9" * 100}, "body.orderId")):
        response = press(client, sr["crm"].call_token(body))
        assert (response.status_code, response.json_body["field"]) == (422, field), body
    assert receive("callbacks") == [] and calls.open_calls() == []


def _tilda_lead_with_order(client) -> dict:
    lead_id = post_lead(client)
    assert deliver("intake", "intake_worker") == [True]
    for message in receive("callbacks"):  # the lead's own automatic callback: not what this test dials
        resources.client("sqs").delete_message(QueueUrl=resources.queue_url("callbacks"),
                                               ReceiptHandle=message["ReceiptHandle"])
    return leads.get(lead_id)


def test_call_on_a_known_order_dials_at_once_on_its_lead_even_outside_working_hours(sr, use_config, monkeypatch):
    today = dt.datetime.now(ZoneInfo("Europe/Moscow")).strftime("%a").lower()
    other_day = next(d for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") if d != today)

    def closed_today(doc):
        doc["offers"][0]["working_hours"]["days"] = {other_day: "09:00-09:01"}
        doc["offers"][0]["callback_delay_seconds"] = 900

    use_config(closed_today)
    register(sr)
    lead = _tilda_lead_with_order(sr["client"])
    response = press(sr["client"], sr["crm"].call_token({"phone": lead["phone"], "orderId": lead["order_id"]}))
    assert response.status_code == 200 and response.json_body["status"] == "queued"
    call_id = response.json_body["call_id"]
    [callback] = bodies(receive("callbacks"))
    assert callback["call_id"] == call_id and callback["manual"] is True and callback["lead_id"] == lead["lead_id"]
    assert dt.datetime.fromisoformat(callback["due_at"].replace("Z", "+00:00")) <= dt.datetime.now(dt.UTC)
    call = calls.get(call_id)
    assert call["crm_order_id"] == lead["order_id"] and call["source"] == "salesrender_plugin"
    assert dialer.process(callback) == "originated"  # working hours closed, the order's delay 900 s: dialled now
    assert [c["phone"] for c in sr["pbx"].calls()] == [lead["phone"][-10:]]
    assert calls.get(call_id)["state"] in ("dialing", "ringing", "talking", "ended")


def test_the_same_request_twice_is_one_call(sr):
    register(sr)
    lead = _tilda_lead_with_order(sr["client"])
    token = sr["crm"].call_token({"phone": lead["phone"], "orderId": lead["order_id"]})
    first, second = press(sr["client"], token), press(sr["client"], token)
    assert first.json_body["call_id"] == second.json_body["call_id"]
    assert len(receive("callbacks")) == 1


@pytest.mark.parametrize("body", [
    {"phoneNumber": "+7 912 345-67-89", "order_id": "{order}"},
    {"phone": "89123456789", "order": {"id": "{order}"}},
])
def test_an_order_callbridge_has_not_seen_gets_a_lead_of_its_projects_offer(sr, body):
    register(sr)
    order_id = salesrender.default_client().add_order({
        "projectId": "2", "statusId": "1", "orderData": {"phoneFields": [{"field": "phone", "value": "+79123456789"}]}})
    body = json.loads(json.dumps(body).replace("{order}", order_id))
    response = press(sr["client"], sr["crm"].call_token(body))
    assert response.status_code == 200, response.body
    lead = leads.get(plugin.order_lead_id(order_id))
    assert lead["source"] == "salesrender" and lead["order_id"] == order_id and lead["offer_id"] == 102
    assert lead["phone"] == "+79123456789"
    [callback] = bodies(receive("callbacks"))
    assert callback["lead_id"] == lead["lead_id"] and callback["manual"] is True
    assert receive("intake") == []  # the order exists: nothing to create in the CRM


def test_an_operator_hint_of_the_offer_goes_with_the_callback(sr, use_config):
    use_config(lambda doc: doc.setdefault("crm", {}).update(plugin_operators={"17": "201"}))
    register(sr)
    lead = _tilda_lead_with_order(sr["client"])
    for user, hint in (("17", "201"), ("200", "200"), ("999", None)):
        response = press(sr["client"], sr["crm"].call_token({"phone": lead["phone"], "orderId": lead["order_id"],
                                                             "operator": user}))
        [callback] = bodies(receive("callbacks"))
        assert callback.get("operator_hint") == hint
        assert calls.get(response.json_body["call_id"])["crm_user"] == user


def test_an_unreachable_key_server_is_503_and_does_nothing(sr, monkeypatch, no_http_backoff):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("SALESRENDER_API_URL", f"http://127.0.0.1:{closed}/companies/1/CRM")
    plugin_tokens._key_session.cache_clear()  # built with the backoff-free retry
    token = sr["crm"].registration_token(HPT, iss=f"http://127.0.0.1:{closed}/")
    response = put_registration(sr["client"], token)
    assert response.status_code == 503 and response.json_body["field"] == "registration"
    assert plugins.get("1") is None


def test_a_phone_corrected_in_the_crm_is_the_one_dialled(sr):
    register(sr)
    lead = _tilda_lead_with_order(sr["client"])
    response = press(sr["client"], sr["crm"].call_token({"phone": "+79120000077", "orderId": lead["order_id"]}))
    assert response.status_code == 200
    [callback] = bodies(receive("callbacks"))
    assert callback["lead_id"] == lead["lead_id"]
    assert leads.get(lead["lead_id"])["phone"] == calls.get(response.json_body["call_id"])["phone"] == "+79120000077"


@pytest.mark.parametrize("user, dialled", [("17", "201"), ("200", "200")])
def test_the_operator_who_pressed_call_is_the_one_rung_first(sr, use_config, user, dialled):
    # Round robin alone would ring 200 first; the CRM user's operator goes ahead of the offer's rule.
    use_config(lambda doc: doc.setdefault("crm", {}).update(plugin_operators={"17": "201"}))
    register(sr)
    lead = _tilda_lead_with_order(sr["client"])
    press(sr["client"], sr["crm"].call_token({"phone": lead["phone"], "orderId": lead["order_id"], "operator": user}))
    [callback] = bodies(receive("callbacks"))
    assert dialer.process(callback) == "originated"
    assert [c["pattern"] for c in sr["pbx"].calls()] == [dialled]
