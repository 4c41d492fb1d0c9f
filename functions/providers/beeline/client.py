"""Beeline Cloud PBX portal API client (providers/beeline.md).

Every request carries `X-MPBX-API-AUTH-TOKEN`. Errors come as `{"errorCode", "description"}` and are
raised as BeelineError with that code. Reads are retried on 5xx and connection errors. Originating
a call is never retried blindly: only when the request surely did not reach Beeline (connection
refused, 429/503). A timeout after sending raises `OriginateUncertain`: the call may be ringing, so
the caller must settle it from events or statistics, never by dialling again.

A 401/403 (a rejected or missing token) emits `ProviderAuthFailed` at once. `default_client()` is
rebuilt whenever the token's value changes, so a rotated token is used as soon as the secret's
cache (5 minutes for SSM) hands it out.
"""

from __future__ import annotations

import os

import requests
import urllib3

from functions.core import http
from functions.core.observability import logger, metric

DEFAULT_URL = "https://cloudpbx.beeline.ru/apis/portal/"
TIMEOUT = (3.05, 10)
AGENT_STATUSES = ("ONLINE", "OFFLINE", "BREAK")


class BeelineError(Exception):
    def __init__(self, message: str, *, code: str, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.code = code
        self.status = status
        self.transient = transient


class OriginateUncertain(BeelineError):
    """The originate request may or may not have been taken: do not dial this attempt again."""


class BeelineClient:
    def __init__(self, base_url: str, token: str):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self._headers = {"X-MPBX-API-AUTH-TOKEN": token, "Accept": "application/json"}
        # One client-side rate limit for every request to Beeline from this container (core/http.py).
        self._reads = http.session(http.idempotent_retry(), limiter=http.limiter("beeline"))
        self._writes = http.session(http.connect_only_retry(), limiter=http.limiter("beeline"))

    def _request(self, session: requests.Session, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = session.request(method, self.base_url + path, headers=self._headers, timeout=TIMEOUT,
                                       **kwargs)
        except requests.ConnectionError as exc:
            raise BeelineError(f"Beeline unreachable: {type(exc).__name__}", code="NETWORK", transient=True) from None
        except requests.Timeout:
            raise BeelineError("Beeline timed out", code="TIMEOUT", transient=True) from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, path: str, **params):
        response = self._request(self._reads, "GET", path, params=params or None)
        return response.json() if response.content else None

    def originate(self, pattern: str, phone_digits: str) -> str | None:
        """Ring the operator abonent, then the customer (10 national digits). Returns the response
        text when Beeline sends one (possibly the extTrackingId; not relied upon)."""
        if len(phone_digits) != 10 or not phone_digits.isdigit():
            raise ValueError("phoneNumber must be 10 national digits")
        try:
            response = self._writes.post(self.base_url + f"abonents/{pattern}/call",
                                         params={"phoneNumber": phone_digits}, headers=self._headers,
                                         timeout=TIMEOUT)
        except requests.ConnectionError as exc:
            if _never_sent(exc):
                raise BeelineError("Beeline unreachable", code="NETWORK", transient=True) from None
            raise OriginateUncertain("originate: connection lost after sending", code="UNCERTAIN") from None
        except requests.Timeout:
            raise OriginateUncertain("originate: no answer in time", code="UNCERTAIN") from None
        if response.status_code >= 500 and response.status_code != 503:
            # A 500/502/504 after the request reached the PBX: the call may be ringing.
            raise OriginateUncertain(f"originate: HTTP {response.status_code}", code="UNCERTAIN",
                                     status=response.status_code)
        if response.status_code >= 400:
            raise _error(response)
        return response.text.strip() or None

    def abonents(self) -> list[dict]:
        return self._json("abonents") or []

    def agent_status(self, pattern: str) -> str:
        value = self._json(f"abonents/{pattern}/agent")
        if isinstance(value, dict):  # tolerate {"agentStatus": "..."} as well as a bare string
            value = value.get("agentStatus") or value.get("status")
        return str(value or "").upper()

    def recording(self, pattern: str) -> str:
        return str(self._json(f"abonents/{pattern}/recording") or "").upper()

    # Event subscriptions. PUT creates one; there is no refresh: renew by creating anew.
    def subscribe(self, url: str, expires: int, subscription_type: str = "BASIC_CALL",
                  pattern: str | None = None) -> dict:
        body = {"expires": int(expires), "subscriptionType": subscription_type, "url": url}
        if pattern:
            body["pattern"] = pattern
        # Not retried on 5xx: a PUT that created a subscription and then failed would leave a second one.
        response = self._request(self._writes, "PUT", "subscription", json=body)
        return response.json()

    def subscription(self, subscription_id: str) -> dict:
        return self._json("subscription", subscriptionId=subscription_id) or {}

    def unsubscribe(self, subscription_id: str) -> None:
        self._request(self._reads, "DELETE", "subscription", params={"subscriptionId": subscription_id})

    # Records and statistics (the reconciler).
    def download_record(self, ext_tracking_id: str, user_id: str) -> bytes:
        """The MP3 of a call; BeelineError (e.g. 404 RecordNotFound) while it is not ready."""
        response = self._request(self._reads, "GET", f"v2/records/{ext_tracking_id}/{user_id}/download")
        if "json" in response.headers.get("Content-Type", ""):
            body = response.json()
            raise BeelineError(f"Beeline {body.get('errorCode')}: {body.get('description', '')}",
                               code=str(body.get("errorCode") or "NOT_AUDIO"), status=response.status_code)
        return response.content

    def download_record_by_id(self, record_id: str) -> bytes:
        return self._request(self._reads, "GET", f"v2/records/{record_id}/download").content

    def records(self, date_from: str, date_to: str, user_id: str | None = None, after_id: str | None = None) -> list:
        params = {"dateFrom": date_from, "dateTo": date_to}
        if user_id:
            params["userId"] = user_id
        if after_id:
            params["id"] = after_id
        return self._json("records", **params) or []

    def statistics(self, date_from: str, date_to: str, page: int = 0, page_size: int = 100) -> list:
        return self._json("v2/statistics", dateFrom=date_from, dateTo=date_to, page=page, pageSize=page_size) or []


def _never_sent(exc: requests.ConnectionError) -> bool:
    """True when the connection failed before the request went out (refused, DNS, connect timeout)."""
    if isinstance(exc, http.RateLimited):  # our own limiter held it back
        return True
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return isinstance(exc, requests.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
        | urllib3.exceptions.NameResolutionError)


def _error(response: requests.Response) -> BeelineError:
    status = response.status_code
    if status in (401, 403):  # a person must fix the token: alarm now, not after hours of failures
        logger.error("Beeline rejected the API token", extra={"status": status})
        metric("ProviderAuthFailed", provider="beeline")
    try:
        body = response.json()
    except ValueError:
        body = None
    code = body.get("errorCode") if isinstance(body, dict) else None
    description = body.get("description", "") if isinstance(body, dict) else ""
    transient = status >= 500 or status == 429
    return BeelineError(f"Beeline {code or 'HTTP ' + str(status)}: {description}"[:500],
                        code=code or f"HTTP_{status}", status=status, transient=transient)


def api_url() -> str:
    return os.environ.get("BEELINE_API_URL") or DEFAULT_URL


default_client = http.client_per_credentials(BeelineClient, api_url, "BEELINE_API_TOKEN")
