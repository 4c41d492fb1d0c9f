"""SalesRender GraphQL client (providers/salesrender.md).

A GraphQL `errors` array is a failure even in an HTTP 200. Failures are classified so workers can
decide: `transient` ones (5xx, 429, timeouts, ERR_ORDER_LOCKED, a rejected token that someone may fix)
are retried with backoff; the rest (validation, unknown status/project, malformed query) will not
succeed by retrying and go to the DLQ with their reason.
"""

from __future__ import annotations

import functools
import os

import requests

from functions.core import http, secrets

DEFAULT_URL = "https://de.backend.salesrender.com/companies/{company_id}/CRM"
TIMEOUT = (3.05, 30)
TRANSIENT_CODES = {"ERR_ORDER_LOCKED", "INTERNAL_SERVER_ERROR", "ERR_INTERNAL", "ERR_TOO_MANY_REQUESTS"}
PERMANENT_CODES = {
    "ERR_ORDER_STATUS_NOT_FOUND",
    "ERR_ORDER_STATUS_ARCHIVED",
    "ERR_ORDER_STATUS_MOVE_RESTRICTION",
    "ERR_ORDER_VALIDATION_FAILED",
    "ERR_PROJECT_NOT_FOUND",
    "ERR_ORDER_NOT_FOUND",
    "GRAPHQL_VALIDATION_FAILED",
}

ADD_ORDER = """
mutation AddOrder($input: AddOrderInput!) {
  orderMutation { addOrder(input: $input) { id } }
}"""

UPDATE_ORDER = """
mutation UpdateOrder($input: UpdateOrderInput!) {
  orderMutation { updateOrder(input: $input) { id status { id } } }
}"""

GET_ORDER = """
query Order($ids: [ID!]) {
  ordersFetcher(pagination: {pageNumber: 1, pageSize: 1}, filters: {include: {ids: $ids}}) {
    orders { id status { id name group } project { id } }
  }
}"""


class SalesRenderError(Exception):
    def __init__(self, message: str, *, code: str, transient: bool, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.status = status


class SalesRenderClient:
    def __init__(self, url: str, token: str, session: requests.Session | None = None):
        self.url = url
        self._token = token
        # Creating an order must not happen twice: inline retries only when the request surely
        # did not land (connection refused, 429/503). Everything else is retried by the worker.
        self._session = session or http.session(http.connect_only_retry())

    def execute(self, query: str, variables: dict | None = None) -> dict:
        try:
            response = self._session.post(
                self.url,
                json={"query": query, "variables": variables or {}},
                headers={"Authorization": self._token, "Accept": "application/json"},
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            raise SalesRenderError(f"SalesRender unreachable: {type(exc).__name__}", code="NETWORK",
                                   transient=True) from None
        status = response.status_code
        try:
            payload = response.json()
        except ValueError:
            payload = None
        errors = (payload or {}).get("errors") if isinstance(payload, dict) else None
        if errors:
            first = errors[0] if isinstance(errors[0], dict) else {"message": str(errors[0])}
            code = str((first.get("extensions") or {}).get("code") or f"HTTP_{status}")
            message = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)
            raise SalesRenderError(f"SalesRender {code}: {message[:500]}", code=code,
                                   transient=_transient(code, status), status=status)
        if status != 200 or not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            # A 200 without data (a proxy's page, a truncated body) says nothing definite: retry it.
            raise SalesRenderError(f"SalesRender answered HTTP {status} without data", code=f"HTTP_{status}",
                                   transient=status == 200 or _transient("", status), status=status)
        return payload["data"]

    def add_order(self, order_input: dict) -> str:
        data = self.execute(ADD_ORDER, {"input": order_input})
        try:
            return str(data["orderMutation"]["addOrder"]["id"])
        except (KeyError, TypeError):
            raise SalesRenderError("addOrder answered without an id", code="NO_ID", transient=True) from None

    def update_order(self, order_input: dict) -> dict:
        return self.execute(UPDATE_ORDER, {"input": order_input})["orderMutation"]["updateOrder"]

    def get_order(self, order_id: str) -> dict | None:
        orders = self.execute(GET_ORDER, {"ids": [str(order_id)]})["ordersFetcher"]["orders"]
        return orders[0] if orders else None


def _transient(code: str, status: int) -> bool:
    if code in PERMANENT_CODES:
        return False
    if code in TRANSIENT_CODES or status >= 500 or status in (401, 403, 408, 429):
        return True  # 401/403: a token someone will fix; the leads must survive until then
    if 400 <= status < 500:
        return False
    return bool(code)  # an unknown GraphQL error code: retry, and the DLQ catches it if it persists


def api_url() -> str:
    url = os.environ.get("SALESRENDER_API_URL")
    if url:
        return url
    return DEFAULT_URL.format(company_id=os.environ.get("SALESRENDER_COMPANY_ID", "0"))


@functools.cache
def default_client() -> SalesRenderClient:
    return SalesRenderClient(api_url(), secrets.get("SALESRENDER_API_TOKEN"))
