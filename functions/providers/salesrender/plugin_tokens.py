"""SalesRender's PBX plugin protocol on the wire (providers/salesrender.md, "PBX plugins"): the tokens
SalesRender signs for the plugin, the tokens the plugin signs for SalesRender, and the CDR format.

Inbound (registration, special requests): RS512 JWTs. The key is SalesRender's public key, fetched from
`{iss scheme+host}/pkey/{hash}` (`hash` = the JWT header `pkey`) and cached per (host, hash): a hash names
one key, so a cached key never goes stale. The issuer's host must be SalesRender's
(`backend.salesrender.com` or a subdomain, over https) or the host of SALESRENDER_API_URL (the local
sandbox signs as itself). PyJWT checks the signature, `exp` and `aud`; it is told RS512 only, so a token
with `alg: none`, or an HS512 token "signed" with the public key as the HMAC secret, fails before any key
is used (PyJWT also refuses a PEM key as an HMAC secret). The issuer check and the `pkey` header are read
before the signature is verified only to decide where the key comes from; nothing else is trusted.

Outbound (CDRs): `PUT {cluster}companies/{cid}/CRM/plugin/pbx/cdr` with `{"request": <HS512 JWT>}`, signed
with the registration's HPT: iss = the plugin's URL, aud = the cluster, cid, plugin {alias, id}, body =
the CDR list, iat/exp/jti. SalesRender answers 202 when it took them. No AWS here.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
import uuid
import warnings
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.warnings import InsecureKeyLengthWarning

from functions.core import http
from functions.providers.salesrender.company import company_id  # noqa: F401 - part of this protocol's surface

SALESRENDER_HOST = "backend.salesrender.com"
INBOUND_ALGORITHM = "RS512"
CDR_ALGORITHM = "HS512"
LEEWAY_SECONDS = 30  # clock skew between SalesRender and Lambda
KEY_TIMEOUT = (3.05, 10)
CDR_TIMEOUT = (3.05, 20)
CDR_TOKEN_SECONDS = 3600  # each attempt signs afresh: a short life for a token that carries call data
MAX_TOKEN_BYTES = 64 * 1024
_PKEY_HASH = re.compile(r"(?!\.+$)[A-Za-z0-9._~-]{1,200}")  # one path segment, never "." or ".."


class TokenRejected(Exception):
    """The token is not one SalesRender issued for this plugin (forged, expired, wrong audience, ...)."""


class KeyUnavailable(Exception):
    """SalesRender's public key could not be fetched (network, 5xx): nobody can tell whether the token is good."""


class CdrNotAccepted(Exception):
    """SalesRender did not answer 202 to a CDR upload; `status` is None when no answer came."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


def _api_host() -> str | None:
    url = os.environ.get("SALESRENDER_API_URL")
    return urlsplit(url).netloc.lower() if url else None


def issuer_origin(iss) -> str:
    """`scheme://host[:port]` of an accepted issuer, or TokenRejected. A bare host means https."""
    if not isinstance(iss, str) or not iss.strip():
        raise TokenRejected("the token has no issuer")
    parts = urlsplit(iss if "://" in iss else f"https://{iss}")
    host = (parts.hostname or "").lower()
    netloc = parts.netloc.lower()
    if parts.username or parts.password:
        raise TokenRejected("the issuer is not SalesRender")
    if parts.scheme == "https" and (host == SALESRENDER_HOST or host.endswith("." + SALESRENDER_HOST)):
        return f"https://{netloc}"
    if netloc and netloc == _api_host() and parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{netloc}"
    raise TokenRejected("the issuer is not SalesRender")


@functools.lru_cache(maxsize=1)
def _key_session(_pid: int) -> requests.Session:
    return http.session(http.idempotent_retry())


@functools.lru_cache(maxsize=64)
def public_key(origin: str, key_hash: str) -> RSAPublicKey:
    """SalesRender's RSA public key named by `key_hash` (failures are not cached: lru_cache keeps results only)."""
    url = f"{origin}/pkey/{key_hash}"
    try:
        response = _key_session(os.getpid()).get(url, timeout=KEY_TIMEOUT)
    except requests.RequestException as exc:
        raise KeyUnavailable(f"public key unreachable: {type(exc).__name__}") from None
    if response.status_code == 404:
        raise TokenRejected("the issuer has no such key")
    if response.status_code != 200:
        raise KeyUnavailable(f"public key answered HTTP {response.status_code}")
    text = response.text.strip()
    if text.startswith("{"):  # the key may come as JSON: {"publicKey"|"key"|"pkey": "-----BEGIN ..."}
        try:
            document = response.json()
        except ValueError:
            document = {}
        text = next((str(document[k]) for k in ("publicKey", "public_key", "key", "pkey") if document.get(k)), "")
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError):
        raise TokenRejected("the issuer's key is not a PEM public key") from None
    if not isinstance(key, RSAPublicKey):
        raise TokenRejected("the issuer's key is not an RSA key")
    return key


def verify(token, audiences: list[str]) -> dict:
    """The claims of a SalesRender-signed RS512 token for this plugin, or TokenRejected / KeyUnavailable."""
    if not isinstance(token, str) or not token.strip():
        raise TokenRejected("no token")
    token = token.strip()
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise TokenRejected("the token is too long")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenRejected("not a JWT") from None
    if header.get("alg") != INBOUND_ALGORITHM:
        raise TokenRejected(f"the token must be {INBOUND_ALGORITHM}")
    key_hash = header.get("pkey")
    if not isinstance(key_hash, str) or not _PKEY_HASH.fullmatch(key_hash):
        raise TokenRejected("the token names no public key (header pkey)")
    origin = issuer_origin(unverified.get("iss"))
    key = public_key(origin, key_hash)
    try:
        return jwt.decode(token, key, algorithms=[INBOUND_ALGORITHM], audience=audiences, leeway=LEEWAY_SECONDS,
                          options={"require": ["exp", "iss", "aud"]})
    except jwt.ExpiredSignatureError:
        raise TokenRejected("the token has expired") from None
    except jwt.InvalidAudienceError:
        raise TokenRejected("the token is for another plugin (aud)") from None
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"the token is not valid: {type(exc).__name__}") from None


# --- registration and special requests: what their claims say -------------------------------------------

@dataclasses.dataclass(frozen=True)
class PluginRef:
    alias: str
    id: str

    def wire(self) -> dict:
        return {"alias": self.alias, "id": self.id}


def plugin_ref(claims: dict) -> PluginRef:
    plugin = claims.get("plugin")
    if not isinstance(plugin, dict) or plugin.get("id") in (None, "") or not isinstance(plugin.get("alias"), str):
        raise TokenRejected("the token names no plugin {alias, id}")
    return PluginRef(alias=plugin["alias"], id=str(plugin["id"]))


def claim_cid(claims: dict) -> str:
    cid = claims.get("cid")
    if isinstance(cid, bool) or not isinstance(cid, str | int) or str(cid).strip() == "":
        raise TokenRejected("the token names no company (cid)")
    return str(cid)


def cluster_uri(claims: dict) -> str:
    """The registration's cluster URI (its `iss`), ending in "/" so paths append."""
    origin = issuer_origin(claims.get("iss"))
    path = urlsplit(claims["iss"] if "://" in claims["iss"] else f"https://{claims['iss']}").path
    return origin + (path.rstrip("/") + "/" if path.strip("/") else "/")


def hpt(claims: dict) -> str:
    secret = claims.get("HPT", claims.get("hpt"))
    if not isinstance(secret, str) or not secret:
        raise TokenRejected("the registration carries no HPT secret")
    return secret


def _first(data: dict, *paths: str):
    for path in paths:
        node = data
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, ""):
            return node
    return None


@dataclasses.dataclass(frozen=True)
class CallRequest:
    """What SalesRender's "Call" asks for (its body's names are not public: every spelling seen is read)."""

    phone: object
    order_id: object
    operator: object


def call_request(body) -> CallRequest:
    if not isinstance(body, dict):
        body = {}
    return CallRequest(
        phone=_first(body, "phone", "phoneNumber", "phone_number", "order.phone"),
        order_id=_first(body, "orderId", "order_id", "order.id"),
        operator=_first(body, "operator", "operatorId", "operator.id", "userId", "user_id", "user.id", "user"),
    )


# --- CDRs ---------------------------------------------------------------------------------------------

def sip_cause(code: int, phrase: str) -> dict:
    return {"code": int(code), "phrase": phrase}


def cdr(*, phone: str, call_id: str, call_start: int, early_media_duration: int, bill_sec: int,
        record_url: str | None, provider_kopecks: int, sip_fail: dict, hangup_cause: dict, caller: dict,
        callee: dict, plugin: PluginRef, direction: str) -> dict:
    """One extended CDR as the PUT carries it: seconds as integers, money as a digit string of kopecks."""
    if direction not in ("outgoing", "incoming"):
        raise ValueError(f"direction {direction!r}")
    amount = str(max(0, int(provider_kopecks)))
    return {
        "phone": phone,
        "callId": call_id,
        "call_start": int(call_start),
        "early_media_duration": max(0, int(early_media_duration)),
        "bill_sec": max(0, int(bill_sec)),
        "call_record_url": record_url or "",
        "record": bool(record_url),
        "pricing": {"provider": {"amount": amount, "currency": "RUB"},
                    "reward": {"amount": "0", "currency": "RUB"}},
        "sip_fail_status": sip_fail["code"],
        "sip_fail_phrase": sip_fail["phrase"],
        "hangup_cause_status": hangup_cause["code"],
        "hangup_cause_phrase": hangup_cause["phrase"],
        "caller": caller,
        "callee": callee,
        "plugin": plugin.wire(),
        "direction": direction,
    }


def cdr_request_token(cdrs: list[dict], *, secret: str, plugin_url: str, cluster: str, cid: str,
                      plugin: PluginRef, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"iss": plugin_url, "aud": cluster, "cid": cid, "plugin": plugin.wire(), "body": cdrs,
              "iat": int(now), "exp": int(now) + CDR_TOKEN_SECONDS, "jti": str(uuid.uuid4())}
    with warnings.catch_warnings():
        # The HPT is SalesRender's to choose; PyJWT would warn about one shorter than 64 bytes.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm=CDR_ALGORITHM)


def cdr_url(cluster: str, cid: str) -> str:
    return f"{cluster.rstrip('/')}/companies/{cid}/CRM/plugin/pbx/cdr"


@functools.lru_cache(maxsize=1)
def _cdr_session(_pid: int) -> requests.Session:
    # A PUT that may have landed is not repeated inline (SalesRender would list the call twice unless it
    # dedupes on callId): only what surely did not arrive is retried here; the queue retries the rest.
    return http.session(http.connect_only_retry())


def send_cdrs(cluster: str, cid: str, token: str) -> int:
    """PUT the signed CDR request; returns 202, or CdrNotAccepted with SalesRender's status."""
    try:
        response = _cdr_session(os.getpid()).put(cdr_url(cluster, cid), json={"request": token}, timeout=CDR_TIMEOUT,
                                                 headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise CdrNotAccepted(f"SalesRender unreachable: {type(exc).__name__}", None) from None
    if response.status_code != 202:
        raise CdrNotAccepted(f"SalesRender answered HTTP {response.status_code} to the CDR", response.status_code)
    return 202
