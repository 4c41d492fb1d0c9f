"""The stable recording link (R-19): `GET /v1/recordings/{call_id}?sig=...` answers a 302 to a presigned
S3 URL valid 5 minutes; the bucket itself is never public."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from functions.core import links, resources, store
from functions.records import calls

SECRET = "test-link-secret"
AUDIO = bytes((0xFF, 0xFB, 0x14, 0xC0)) + bytes(92)


@pytest.fixture
def stored(aws, monkeypatch):
    """A call with its recording in the bucket, as the recording job leaves it."""
    monkeypatch.setenv("RECORDING_LINK_SECRET", SECRET)
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://calls.example.test/")
    s3 = resources.client("s3")
    call_id = str(uuid.uuid4())
    key = f"recordings/2026/11/25/lead-L1/call-{call_id}.mp3"
    s3.put_object(Bucket=resources.bucket_name(), Key=key, Body=AUDIO, ContentType="audio/mpeg",
                  ServerSideEncryption="AES256")
    store.put_new({"pk": f"CALL#{call_id}", "sk": "CALL"}, {
        "call_id": call_id, "lead_id": "L1", "state": "ended", "outcome": "answered", "recording_key": key,
        "recording_state": "stored"})
    return {"call_id": call_id, "key": key}


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def get(client, call_id: str, query: str = "", headers: dict | None = None):
    return client.http.get(f"/v1/recordings/{call_id}" + (f"?{query}" if query else ""), headers=headers or {})


def test_link_is_the_app_url_with_an_hmac_of_the_call_id(stored):
    call_id = stored["call_id"]
    expected = hmac.new(SECRET.encode(), call_id.encode(), hashlib.sha256).hexdigest()
    assert links.recording_link(call_id) == f"https://calls.example.test/v1/recordings/{quote(call_id)}?sig={expected}"
    assert links.stored_recording_link(call_id, calls.get(call_id)) == links.recording_link(call_id)


API = {"Authorization": "Bearer test-api-token"}


@pytest.mark.parametrize("stale", [None, "https://old-host.example.test/v1/recordings/x?sig=0"])
def test_get_call_derives_the_link_of_a_stored_recording_and_it_redirects(client, stored, stale):
    """the calls API shows the link derived from the call id (core/links.py), whatever
    a call stored before the link was derived still carries."""
    call_id = stored["call_id"]
    if stale:
        calls.update(call_id, recording_url=stale)
    document = client.http.get(f"/v1/calls/{call_id}", headers=API).json_body
    assert document["recording_url"] == links.recording_link(call_id)
    response = client.http.get(path_of(document["recording_url"]))
    assert response.status_code == 302 and stored["key"] in response.headers["Location"]


def test_get_call_shows_no_link_until_the_recording_is_stored(client, stored):
    call_id = stored["call_id"]
    store.put_new({"pk": "CALL#c-pending", "sk": "CALL"}, {"call_id": "c-pending", "state": "ended",
                                                           "outcome": "answered"})
    calls.update(call_id, recording_state="missing", recording_url="https://old-host.example.test/x")
    for shown in ("c-pending", call_id):
        assert client.http.get(f"/v1/calls/{shown}", headers=API).json_body["recording_url"] is None


def test_get_call_link_uses_the_default_base_url_as_the_stored_link_does(client, stored, monkeypatch):
    monkeypatch.delenv("PUBLIC_BASE_URL")
    document = client.http.get(f"/v1/calls/{stored['call_id']}", headers=API).json_body
    assert document["recording_url"] == links.recording_link(stored["call_id"])
    assert document["recording_url"].startswith("http://127.0.0.1:8000/")


def test_default_base_url_is_the_local_app(monkeypatch):
    monkeypatch.setenv("RECORDING_LINK_SECRET", SECRET)
    monkeypatch.delenv("PUBLIC_BASE_URL", raising=False)
    assert links.recording_link("c1").startswith("http://127.0.0.1:8000/v1/recordings/c1?sig=")


def test_signed_link_redirects_to_a_short_lived_presigned_url(client, stored):
    response = client.http.get(path_of(links.recording_link(stored["call_id"])))
    assert response.status_code == 302
    assert response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    parts = urlsplit(location)
    query = parse_qs(parts.query)
    bucket = resources.bucket_name()
    assert parts.scheme == "https"
    assert f"{parts.netloc}{parts.path}" in (f"{bucket}.s3.amazonaws.com/{stored['key']}",
                                             f"s3.amazonaws.com/{bucket}/{stored['key']}")
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert 0 < int(query["X-Amz-Expires"][0]) <= 300
    assert requests.get(location, timeout=5).content == AUDIO  # the URL works (moto serves it)


def test_bearer_token_works_without_a_signature(client, stored):
    response = get(client, stored["call_id"], headers={"Authorization": "Bearer test-api-token"})
    assert response.status_code == 302 and stored["key"] in response.headers["Location"]


def test_bad_signature_or_token_is_403(client, stored):
    other_call = links.recording_link(str(uuid.uuid4())).split("?", 1)[1]
    for query, headers in [
        ("", {}),
        ("sig=", {}),
        ("sig=" + "0" * 64, {}),
        ("sig=%D0%AF", {}),  # not ASCII
        (other_call, {}),  # a valid signature, of another call
        ("", {"Authorization": "Bearer wrong-token"}),
        ("", {"Authorization": "test-api-token"}),  # no "Bearer"
    ]:
        response = get(client, stored["call_id"], query, headers)
        assert response.status_code == 403, query
        assert response.json_body["field"] == "sig" and response.json_body["error"]
        assert "Location" not in response.headers


def test_unknown_call_or_no_stored_recording_is_404(client, stored):
    unknown = str(uuid.uuid4())
    response = client.http.get(path_of(links.recording_link(unknown)))
    assert response.status_code == 404 and response.json_body["field"] == "call_id"
    pending = str(uuid.uuid4())
    store.put_new({"pk": f"CALL#{pending}", "sk": "CALL"}, {"call_id": pending, "state": "ended",
                                                            "outcome": "answered"})
    response = get(client, pending, headers={"Authorization": "Bearer test-api-token"})
    assert response.status_code == 404 and response.json_body["field"] == "call_id"


def test_the_bucket_is_not_public(stored):
    s3 = resources.client("s3")
    bucket = resources.bucket_name()
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                     "RestrictPublicBuckets": True}
    encryption = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert encryption["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    # Without a signature the object cannot be read.
    assert requests.get(f"https://{bucket}.s3.amazonaws.com/{stored['key']}", timeout=5).status_code == 403
