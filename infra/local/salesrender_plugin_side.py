"""SalesRender's side of the PBX plugin protocol, for the SalesRender sandbox (infra/local/salesrender_sandbox.py
mounts it): what the real CRM does with a plugin of class WEBHOOK, as strictly as the real one would.

- It has its own RS512 key pair and serves the public key at `GET /pkey/{hash}` (the `pkey` header of every
  token it signs names the hash), as SalesRender does.
- It registers the plugin with the app (`PUT {plugin}registration`, form param `registration`: RS512 JWT with
  cid, plugin {alias, id}, HPT, iss = this cluster, aud = the plugin's URL) and presses "Call" for an order
  (`POST {plugin}special/call`, param `request`: RS512 JWT with cid, plugin and body {phone, orderId}).
- It receives CDRs at `PUT /companies/{cid}/CRM/plugin/pbx/cdr` and checks them strictly: `{"request": JWT}`,
  HS512 signed with the HPT it handed out, iss = the registered plugin URL, aud = this cluster, its cid and
  plugin, a live exp (at most 24 h ahead), and each CDR's fields with their units: seconds as integers,
  `pricing.provider.amount` a digit string of kopecks with currency RUB, a phone in E.164, a direction, and
  (unless switched off) a `call_record_url` that really serves an MP3. A bad one is answered 400/401 with
  the problems, a good one 202.

Control (no auth), under /_sandbox/: `POST plugin/register` {plugin_url?}, `POST plugin/call` {order_id,
phone?, operator?, phone_key?, order_key?}, `GET cdrs` (accepted CDRs), `GET plugin` (registration, pressed
calls, rejected CDRs, faults), `POST plugin/faults` {count, status, carry_out?}, `POST plugin/reset`.
Python: `side(sandbox)` gives the same object (tests sign their own tokens with it, forged ones included).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import threading
import time
import uuid
import warnings
from typing import Any
from urllib.parse import SplitResult

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.warnings import InsecureKeyLengthWarning

from infra.local.sandbox_http import SandboxError, allow_methods, json_object

PLUGIN = {"alias": "callbridge-beeline", "id": "42"}
PHONE_RE = re.compile(r"\+\d{10,15}")
CDR_FIELDS = {"phone", "callId", "call_start", "early_media_duration", "bill_sec", "call_record_url", "record",
              "pricing", "sip_fail_status", "sip_fail_phrase", "hangup_cause_status", "hangup_cause_phrase",
              "caller", "callee", "plugin", "direction"}
MAX_CDR_TOKEN_SECONDS = 24 * 3600
_lock = threading.Lock()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_plugin_url() -> str:
    base = os.environ.get("PUBLIC_BASE_URL") or f"http://127.0.0.1:{os.environ.get('CALLBRIDGE_PORT', '8000')}"
    return base.rstrip("/") + "/salesrender-plugin/"


class PluginSide:
    def __init__(self, sandbox: Any):
        self.sandbox = sandbox
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.key_hash = hashlib.sha256(self.public_pem).hexdigest()[:32]
        self.plugin = dict(PLUGIN)
        self.plugin_url: str | None = None
        self.hpt: str | None = None
        self.check_recordings = True
        self._lock = threading.Lock()
        self._cdrs: list[dict[str, Any]] = []
        self._rejected: list[dict[str, Any]] = []
        self._pressed: list[dict[str, Any]] = []
        self._faults: list[dict[str, Any]] = []

    @property
    def cluster_uri(self) -> str:
        return self.sandbox.base_url + "/"

    @property
    def company_id(self) -> str:
        return str(self.sandbox.company_id)

    # ---- signing, as SalesRender does (tests use these to forge tokens too) ------------------------------

    def sign(self, claims: dict[str, Any], *, ttl: int = 300, key: Any = None, algorithm: str = "RS512",
             headers: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        full = {"iss": self.cluster_uri, "aud": self.plugin_url or default_plugin_url(), "iat": now, "exp": now + ttl,
                "jti": str(uuid.uuid4()), "cid": self.company_id, "plugin": dict(self.plugin), **claims}
        return jwt.encode(full, key if key is not None else self.private_key, algorithm=algorithm,
                          headers={"pkey": self.key_hash, **(headers or {})})

    def registration_token(self, hpt: str, **claims: Any) -> str:
        return self.sign({"HPT": hpt, **claims})

    def call_token(self, body: dict[str, Any], **claims: Any) -> str:
        return self.sign({"body": body, **claims})

    # ---- the plugin's endpoints, called as SalesRender calls them --------------------------------------

    def register(self, plugin_url: str | None = None, timeout: float = 30) -> dict[str, Any]:
        url = plugin_url or self.plugin_url or default_plugin_url()
        hpt = secrets.token_urlsafe(48)
        with self._lock:
            self.plugin_url = url
        token = self.registration_token(hpt)
        response = requests.put(url + "registration", data={"registration": token}, timeout=timeout)
        if response.status_code == 200:
            with self._lock:
                self.hpt = hpt
        return {"status": response.status_code, "body": _body(response), "plugin_url": url}

    def press_call(self, order_id: str, phone: str | None = None, operator: str | None = None,
                   phone_key: str = "phone", order_key: str = "orderId", timeout: float = 30) -> dict[str, Any]:
        """What the "Call" button in the order card sends (the phone read from the order when not given)."""
        if phone is None:
            phone = self._order_phone(order_id)
        body: dict[str, Any] = {phone_key: phone}
        if order_key == "order.id":
            body["order"] = {"id": str(order_id)}
        else:
            body[order_key] = str(order_id)
        if operator is not None:
            body["operator"] = operator
        url = (self.plugin_url or default_plugin_url()) + "special/call"
        response = requests.post(url, data={"request": self.call_token(body)}, timeout=timeout)
        answer = {"status": response.status_code, "body": _body(response), "order_id": str(order_id)}
        with self._lock:
            self._pressed.append({"at": _now(), **answer})
        return answer

    def _order_phone(self, order_id: str) -> str:
        order = next((o for o in self.sandbox.orders() if o["id"] == str(order_id)), None)
        if order is None:
            raise SandboxError(404, f"order {order_id} not found")
        phones = order["data"].get("phoneFields") or []
        if not phones:
            raise SandboxError(400, f"order {order_id} has no phone")
        return phones[0]["value"]

    # ---- CDRs ----------------------------------------------------------------------------------------

    def cdrs(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._cdrs)

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"registered": self.hpt is not None, "plugin_url": self.plugin_url, "plugin": dict(self.plugin),
                    "cluster_uri": self.cluster_uri, "key_hash": self.key_hash, "check_recordings":
                    self.check_recordings, "pressed": copy.deepcopy(self._pressed),
                    "rejected": copy.deepcopy(self._rejected), "faults": copy.deepcopy(self._faults),
                    "cdrs": len(self._cdrs)}

    def add_fault(self, count: Any = 1, status: Any = 500, carry_out: Any = False) -> dict[str, Any]:
        if not _is_int(count) or count < 1:
            raise SandboxError(400, "count must be a positive integer")
        if not _is_int(status) or not 100 <= status <= 599 or status == 202:
            raise SandboxError(400, "status must be an HTTP status other than 202")
        if not isinstance(carry_out, bool):
            raise SandboxError(400, "carry_out must be true or false")
        fault = {"count": count, "status": status, "carry_out": carry_out}
        with self._lock:
            self._faults.append(fault)
        return dict(fault)

    def reset(self) -> None:
        with self._lock:
            self._cdrs.clear()
            self._rejected.clear()
            self._pressed.clear()
            self._faults.clear()

    def _take_fault(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault["count"] -= 1
            if fault["count"] <= 0:
                self._faults.pop(0)
            return dict(fault)

    def receive_cdr(self, method: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if method != "PUT":
            return 405, {"error": "use PUT"}
        fault = self._take_fault()
        if fault and not fault["carry_out"]:
            return fault["status"], {"error": "sandbox fault"}
        status, answer, accepted = self._check_cdr(headers, body)
        with self._lock:
            if status == 202:
                self._cdrs.extend({"received_at": _now(), **c} for c in accepted)
            else:
                self._rejected.append({"at": _now(), "status": status, **answer})
        if fault and status == 202:
            return fault["status"], {"error": "sandbox fault after the CDR was taken"}
        return status, answer

    def _check_cdr(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        if (headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            return 415, {"error": "Content-Type must be application/json"}, []
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "body is not JSON"}, []
        if not isinstance(payload, dict) or set(payload) != {"request"} or not isinstance(payload["request"], str):
            return 400, {"error": 'body must be {"request": "<JWT>"}'}, []
        with self._lock:
            hpt, plugin_url = self.hpt, self.plugin_url
        if hpt is None:
            return 401, {"error": "no plugin is registered"}, []
        try:
            if jwt.get_unverified_header(payload["request"]).get("alg") != "HS512":
                return 401, {"error": "the request must be HS512"}, []
            with warnings.catch_warnings():  # the HPT is ours and random; its length is SalesRender's choice
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                claims = jwt.decode(payload["request"], hpt, algorithms=["HS512"], audience=self.cluster_uri,
                                    issuer=plugin_url, options={"require": ["exp", "iss", "aud", "iat"]})
        except jwt.PyJWTError as exc:
            return 401, {"error": f"request token rejected: {type(exc).__name__}: {exc}"}, []
        problems = []
        if str(claims.get("cid")) != self.company_id or not isinstance(claims.get("cid"), str | int):
            problems.append(f"cid must be {self.company_id}")
        if claims.get("plugin") != self.plugin:
            problems.append(f"plugin must be {self.plugin}")
        if claims["exp"] > time.time() + MAX_CDR_TOKEN_SECONDS + 60:
            problems.append("exp is more than 24 h ahead")
        cdrs = claims.get("body")
        if not isinstance(cdrs, list) or not cdrs:
            problems.append("body must be a non-empty list of CDRs")
            cdrs = []
        for n, record in enumerate(cdrs):
            problems += [f"body[{n}]: {p}" for p in self._cdr_problems(record)]
        if problems:
            return 400, {"error": "CDR rejected", "problems": problems}, []
        return 202, {"accepted": len(cdrs)}, cdrs

    def _cdr_problems(self, record: Any) -> list[str]:
        if not isinstance(record, dict):
            return ["not an object"]
        problems = []
        missing, unknown = CDR_FIELDS - set(record), set(record) - CDR_FIELDS
        if missing:
            problems.append(f"missing {sorted(missing)}")
        if unknown:
            problems.append(f"unknown {sorted(unknown)}")
        if missing:
            return problems
        if not isinstance(record["phone"], str) or not PHONE_RE.fullmatch(record["phone"]):
            problems.append("phone must be E.164")
        if not isinstance(record["callId"], str) or not 0 < len(record["callId"]) <= 128:
            problems.append("callId must be a string of 1..128")
        for name in ("call_start", "early_media_duration", "bill_sec", "sip_fail_status", "hangup_cause_status"):
            if not _is_int(record[name]) or record[name] < 0:
                problems.append(f"{name} must be a non-negative integer")
        if _is_int(record["call_start"]) and not time.time() - 7 * 86400 < record["call_start"] < time.time() + 300:
            problems.append("call_start must be epoch seconds of the last week")
        for name in ("sip_fail_phrase", "hangup_cause_phrase"):
            if not isinstance(record[name], str):
                problems.append(f"{name} must be a string")
        if not isinstance(record["record"], bool):
            problems.append("record must be true or false")
        url = record["call_record_url"]
        if not isinstance(url, str):
            problems.append("call_record_url must be a string")
        elif record["record"] is True:
            if not url.startswith(("http://", "https://")):
                problems.append("call_record_url must be an http(s) URL when record is true")
            elif self.check_recordings:
                problem = _not_an_mp3(url)
                if problem:
                    problems.append(f"call_record_url {problem}")
        elif url:
            problems.append("call_record_url must be empty when record is false")
        pricing = record["pricing"] if isinstance(record["pricing"], dict) else {}
        moneys = [("provider", pricing.get("provider"))]
        if "reward" in pricing:
            moneys.append(("reward", pricing["reward"]))
        for name, money in moneys:
            if (not isinstance(money, dict) or not isinstance(money.get("amount"), str)
                    or not money["amount"].isdigit() or money.get("currency") != "RUB"):
                problems.append(f'pricing.{name} must be {{"amount": "<kopecks as digits>", "currency": "RUB"}}')
        for name in ("caller", "callee"):
            ref = record[name]
            if not isinstance(ref, dict) or set(ref) != {"alias", "id"} or not all(isinstance(v, str) for v in
                                                                                   ref.values()):
                problems.append(f"{name} must be {{alias, id}} strings")
        if record["plugin"] != self.plugin:
            problems.append(f"plugin must be {self.plugin}")
        if record["direction"] not in ("outgoing", "incoming"):
            problems.append("direction must be outgoing or incoming")
        return problems

    # ---- HTTP ----------------------------------------------------------------------------------------

    def route(self, method: str, url: SplitResult, headers: Any, body: bytes):
        response = self.sandbox.json_response
        parts = [p for p in url.path.split("/") if p]
        if len(parts) == 2 and parts[0] == "pkey":
            if method != "GET":
                return response(405, {"error": "use GET"})
            if parts[1] != self.key_hash:
                return response(404, {"error": "no such key"})
            return response(200, None, raw=self.public_pem, content_type="text/plain; charset=utf-8")
        if url.path == f"/companies/{self.company_id}/CRM/plugin/pbx/cdr":
            status, answer = self.receive_cdr(method, headers, body)
            return response(status, answer)
        return None

    def control(self, method: str, parts: list[str], body: bytes):
        response = self.sandbox.json_response
        if parts == ["cdrs"]:
            allow_methods(method, "GET")
            return response(200, self.cdrs())
        if parts == ["plugin"]:
            allow_methods(method, "GET")
            return response(200, self.view())
        if parts[:1] != ["plugin"] or len(parts) != 2:
            return None
        allow_methods(method, "POST")
        spec = json_object(body)
        action = parts[1]
        try:
            if action == "register":
                return response(200, self.register(spec.get("plugin_url")))
            if action == "call":
                if spec.get("order_id") is None:
                    raise SandboxError(400, "order_id is required")
                keys = {k: spec[k] for k in ("phone", "operator", "phone_key", "order_key") if spec.get(k) is not None}
                return response(200, self.press_call(str(spec["order_id"]), **keys))
        except requests.RequestException as exc:
            raise SandboxError(502, f"the plugin did not answer: {type(exc).__name__}") from None
        if action == "faults":
            return response(200, self.add_fault(**{k: spec[k] for k in ("count", "status", "carry_out") if k in spec}))
        if action == "reset":
            self.reset()
            return response(200, {"ok": True})
        if action == "check_recordings":
            if not isinstance(spec.get("on"), bool):
                raise SandboxError(400, "on must be true or false")
            self.check_recordings = spec["on"]
            return response(200, {"check_recordings": self.check_recordings})
        return None


def _not_an_mp3(url: str) -> str | None:
    try:
        answer = requests.get(url, timeout=10)
    except requests.RequestException as exc:
        return f"cannot be fetched ({type(exc).__name__})"
    if answer.status_code != 200:
        return f"answers HTTP {answer.status_code}"
    data = answer.content
    if not (data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)):
        return "does not serve an MP3"
    return None


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def side(sandbox: Any) -> PluginSide:
    """The sandbox's plugin side, made on first use (one per sandbox object)."""
    with _lock:
        found = getattr(sandbox, "_plugin_side", None)
        if found is None:
            found = PluginSide(sandbox)
            sandbox._plugin_side = found
        return found


def route(sandbox: Any, method: str, url: SplitResult, headers: Any, body: bytes):
    """The sandbox's answer for a plugin path (`/pkey/...`, the CDR upload), or None."""
    if not (url.path.startswith("/pkey/") or url.path.endswith("/CRM/plugin/pbx/cdr")):
        return None
    return side(sandbox).route(method, url, headers, body)


def control(sandbox: Any, method: str, parts: list[str], body: bytes):
    """The answer for `/_sandbox/cdrs` and `/_sandbox/plugin/...`, or None."""
    if parts[:1] not in (["cdrs"], ["plugin"]):
        return None
    return side(sandbox).control(method, parts, body)
