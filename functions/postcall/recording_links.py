"""Stable recording links (R-19): `{PUBLIC_BASE_URL}/v1/recordings/{call_id}?sig=...` (made by core/links.py).

The link written into the CRM never expires and never exposes the bucket: it carries an HMAC-SHA256
of the call id (secret RECORDING_LINK_SECRET), and the app answers it with a 302 to a presigned S3
GET valid PRESIGNED_SECONDS. The bucket itself stays private with public access blocked. API clients
may use the bearer token instead of the signature.
"""

from __future__ import annotations

import functools
import hmac
import os

from functions.core import auth, resources
from functions.core.links import signature
from functions.core.replies import Reply, error
from functions.records import calls

PRESIGNED_SECONDS = 300


def _signed(call_id: str, sig) -> bool:
    if not isinstance(sig, str) or not sig:
        return False
    return hmac.compare_digest(sig.encode(), signature(call_id).encode())


@functools.cache
def _presigner(_endpoint: str | None, _region: str | None):
    """An S3 client that signs with SigV4: botocore presigns with the deprecated SigV2 in us-east-1 by
    default. Presigning is offline; the arguments only key the cache to the environment."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))


def presigned_url(key: str) -> str:
    client = _presigner(os.environ.get("AWS_ENDPOINT_URL"),
                        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    return client.generate_presigned_url("get_object", Params={"Bucket": resources.bucket_name(), "Key": key},
                                         ExpiresIn=PRESIGNED_SECONDS)


def redirect(call_id: str, query: dict, headers: dict[str, str]) -> Reply:
    """`headers` with lower-case names. Authorisation first, so unknown ids reveal nothing."""
    if not (_signed(call_id, query.get("sig")) or auth.bearer_ok(headers)):
        return error(403, "sig", "missing or wrong link signature")
    call = calls.get(call_id)
    key = (call or {}).get("recording_key")
    if not key:
        return error(404, "call_id", "no stored recording for this call")
    url = presigned_url(key)
    # no-store: the redirect target expires in minutes, so nobody may cache it under the stable link.
    return Reply(302, "", {"Location": url, "Cache-Control": "no-store"})
