"""SalesRender GraphQL client (providers/salesrender.md).

A GraphQL `errors` array is a failure even in an HTTP 200. Failures are classified so workers can
decide: `transient` ones (5xx, 429, timeouts, ERR_ORDER_LOCKED, a rejected token that someone may fix)
are retried with backoff; the rest (validation, unknown status/project, malformed query) will not
succeed by retrying and go to the DLQ with their reason.

A rejected token (401/403) stays transient, so no lead is lost while someone fixes it, but it emits
`ProviderAuthFailed` at once (an alarm, not hours of quiet retries). `default_client()` is rebuilt
whenever the token's value changes, so a rotated token is used as soon as the secret's cache
(5 minutes for SSM) hands it out.

`addOrder` is retried inline only when the request surely did not land (connection refused before
sending, 429). A timeout, a dropped connection or any 5xx may follow a created order: the caller
looks for the order (`find_order`) before it adds it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import requests

from functions.core import http
from functions.core.observability import logger, metric

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
AUTH_STATUSES = (401, 403)
AUTH_CODES = {"ERR_UNAUTHORIZED", "ERR_FORBIDDEN", "UNAUTHENTICATED", "FORBIDDEN"}
# The look-up after a lost answer reads this many of the newest orders (pages of LOOKUP_PAGE_SIZE).
LOOKUP_PAGES = 3
LOOKUP_PAGE_SIZE = 100

ADD_ORDER = """
mutation AddOrder($input: AddOrderInput!) {
  orderMutation { addOrder(input: $input) { id } }
}"""

UPDATE_ORDER = """
mutation UpdateOrder($input: UpdateOrderInput!) {
  orderMutation { updateOrder(input: $input) { id status { id } } }
}"""

# ordersFetcher's documented filter is `include.ids` only: recent orders are read by page and matched here.
RECENT_ORDERS = """
query RecentOrders($pageNumber: Int!, $pageSize: Int!) {
  ordersFetcher(pagination: {pageNumber: $pageNumber, pageSize: $pageSize}) {
    orders { id data { stringFields { field value } } source { refererUri } }
    pageInfo { pagesCount }
  }
}"""

GET_ORDER = """
query Order($ids: [ID!]) {
  ordersFetcher(pagination: {pageNumber: 1, pageSize: 1}, filters: {include: {ids: $ids}}) {
    orders { id status { id name group } project { id } }
  }
}"""


# The whole order, for the order webhook: the webhook's body is only a hint, this is the truth.
ORDER_DETAILS = """
query OrderDetails($ids: [ID!]) {
  ordersFetcher(pagination: {pageNumber: 1, pageSize: 1}, filters: {include: {ids: $ids}}) {
    orders {
      id status { id name group } project { id }
      data { phoneFields { field value } humanNameFields { field value { firstName lastName } }
             stringFields { field value } }
      source { refererUri utm_source utm_medium utm_campaign utm_content utm_term }
    }
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
        # Reads and updates (idempotent) may retry a 503 inline; creating an order must not happen
        # twice, so addOrder retries only what surely did not land (refused, 429): a 503 may come
        # from a proxy after SalesRender acted. Everything else is retried by the worker.
        self._session = session or http.session(http.connect_only_retry(), limiter=http.limiter("salesrender"))
        self._create_session = session or http.session(http.connect_only_retry(statuses=(429,)),
                                                       limiter=http.limiter("salesrender"))

    def execute(self, query: str, variables: dict | None = None, *, session: requests.Session | None = None,
                timeout: tuple[float, float] | None = None) -> dict:
        try:
            response = (session or self._session).post(
                self.url,
                json={"query": query, "variables": variables or {}},
                headers={"Authorization": self._token, "Accept": "application/json"},
                timeout=timeout or TIMEOUT,  # read at call time: tests and callers may change TIMEOUT
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
            if status in AUTH_STATUSES or code in AUTH_CODES:
                _auth_failed(status, code)
            raise SalesRenderError(f"SalesRender {code}: {message[:500]}", code=code,
                                   transient=_transient(code, status), status=status)
        if status in AUTH_STATUSES:
            _auth_failed(status, f"HTTP_{status}")
        if status != 200 or not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            # A 200 without data (a proxy's page, a truncated body) says nothing definite: retry it.
            raise SalesRenderError(f"SalesRender answered HTTP {status} without data", code=f"HTTP_{status}",
                                   transient=status == 200 or _transient("", status), status=status)
        return payload["data"]

    def add_order(self, order_input: dict) -> str:
        data = self.execute(ADD_ORDER, {"input": order_input}, session=self._create_session)
        try:
            return str(data["orderMutation"]["addOrder"]["id"])
        except (KeyError, TypeError):
            raise SalesRenderError("addOrder answered without an id", code="NO_ID", transient=True) from None

    def update_order(self, order_input: dict) -> dict:
        return self.execute(UPDATE_ORDER, {"input": order_input})["orderMutation"]["updateOrder"]

    def get_order(self, order_id: str) -> dict | None:
        orders = self.execute(GET_ORDER, {"ids": [str(order_id)]})["ordersFetcher"]["orders"]
        return orders[0] if orders else None

    def read_order(self, order_id: str, timeout: tuple[float, float] | None = None) -> dict | None:
        """The whole order (status, project, data, source) by id, or None when SalesRender has no such order.
        An answer naming another order (a filter the server ignored) counts as none, never as this one."""
        fetched = self.execute(ORDER_DETAILS, {"ids": [str(order_id)]}, timeout=timeout).get("ordersFetcher") or {}
        orders = fetched.get("orders")
        if not isinstance(orders, list):
            raise SalesRenderError("ordersFetcher answered without orders", code="NO_ORDERS", transient=True)
        return next((o for o in orders if isinstance(o, dict) and str(o.get("id")) == str(order_id)), None)

    def find_order(self, match: Callable[[dict], bool]) -> str | None:
        """The id of the first of the newest orders that `match`es, or None (SalesRenderError when
        SalesRender cannot be read: then nobody knows, and the caller must not add the order)."""
        return next((str(o["id"]) for o in self.recent_orders() if isinstance(o, dict) and match(o)), None)

    def recent_orders(self, pages: int = LOOKUP_PAGES, page_size: int = LOOKUP_PAGE_SIZE) -> Iterator[dict]:
        """The newest `pages` pages of orders. The API's sort order is not documented, so it is read
        from the ids of the first page: newest first, or oldest first (then the last pages are read)."""
        first, pages_count = self._orders_page(1, page_size)
        yield from first
        if pages_count <= 1:
            return
        direction = _direction([o.get("id") for o in first if isinstance(o, dict)])
        numbers = []
        if direction in ("newest_first", None):
            numbers += range(2, min(pages, pages_count) + 1)
        if direction in ("oldest_first", None):
            numbers += range(pages_count, max(1, pages_count - pages), -1)
        for number in dict.fromkeys(numbers):
            yield from self._orders_page(number, page_size)[0]

    def _orders_page(self, number: int, size: int) -> tuple[list, int]:
        fetched = self.execute(RECENT_ORDERS, {"pageNumber": number, "pageSize": size}).get("ordersFetcher") or {}
        orders = fetched.get("orders")
        if not isinstance(orders, list):
            raise SalesRenderError("ordersFetcher answered without orders", code="NO_ORDERS", transient=True)
        pages_count = (fetched.get("pageInfo") or {}).get("pagesCount")
        return orders, pages_count if isinstance(pages_count, int) else 1


def _direction(ids: list) -> str | None:
    """Which way a page's numeric ids run ("newest_first" or "oldest_first"), None when they do not tell."""
    numbers = [int(i) for i in ids if str(i).isdigit()]
    if len(numbers) < 2 or len(numbers) != len(ids) or numbers[0] == numbers[-1]:
        return None
    return "newest_first" if numbers[0] > numbers[-1] else "oldest_first"


def _auth_failed(status: int | None, code: str) -> None:
    # A person must fix the token: alarm now. The failure stays transient so the leads wait for the fix.
    logger.error("SalesRender rejected the API token", extra={"status": status, "code": code})
    metric("ProviderAuthFailed", provider="salesrender")


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


default_client = http.client_per_credentials(SalesRenderClient, api_url, "SALESRENDER_API_TOKEN")
