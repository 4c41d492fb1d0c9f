"""A strict SalesRender CRM sandbox for the local stack (`make run`) and for tests.

It serves the slice of SalesRender's GraphQL API that callbridge uses (see
/work/shared/providers/salesrender.md): `POST /companies/{companyId}/CRM` with orders, statuses, projects and
order fields. It is deliberately strict: the document is parsed and validated by graphql-core against a
schema subset, so an unknown field, a missing required argument or a wrong type fails here exactly as it
would on the real server, and business rules (unknown project or status, archived status, unknown order
field, a field of the wrong kind, a phone that is not E.164, an email without "@") answer the same
`errors[].extensions.code` values. Code that passes against this sandbox should not be rejected by
SalesRender for the shape of its requests; loosening a check here hides bugs until production.

Control endpoints under `/_sandbox/` (no auth) let tests inspect orders and received calls, inject faults
(HTTP statuses, GraphQL errors, delays, a dropped connection) and move an order to another status as a
manager would. A fault with `carry_out` first carries the request out and then spoils only the answer
(answers late, drops the connection, answers a 5xx): the lost answer after which a client must find out
what happened before it tries again.

The company's order trigger (R-21): with a webhook URL set (`--webhook-url`, or `POST /_sandbox/webhook`),
an order created (through addOrder or `POST /_sandbox/orders/new`, an order made in the CRM or by a CPA
network) and an order moved to another status (`POST /_sandbox/orders/{id}/status`, or updateOrder with a
statusId) is posted there as JSON in one of the nestings real triggers use (`shape`: ordersFetcher =
`{"data": {"ordersFetcher": {"orders": [order]}}}`, data = `{"data": order}`, orders = `{"orders": [order]}`,
order = the order itself); `GET /_sandbox/webhooks` lists the deliveries. A postback tracker answers any
`GET|POST /tracker/...` and records it (`GET /_sandbox/tracker`; `POST /_sandbox/tracker/faults` with
`{count, status | delay_seconds}` makes it fail), so "fired once" can be checked on the wire.

Run: `python -m infra.local.salesrender_sandbox --host 127.0.0.1 --port 8101 --token X --company-id 1`.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    build_schema,
    execute,
    parse,
    validate,
)
from graphql.execution import Executor
from graphql.utilities import get_operation_ast

from infra.local import salesrender_plugin_side  # the PBX plugin protocol's SalesRender side
from infra.local.sandbox_http import (
    SandboxError,
    SandboxHandler,
    SandboxServer,
    allow_methods,
    json_object,
    serve_until_signalled,
)

DEFAULT_TOKEN = "sandbox-salesrender-token"

SDL = '''
"Status groups are fixed by SalesRender; status ids and names are per company."
enum OrderStatusGroup { PROCESSING CANCELED APPROVED SHIPPED DELIVERED UNDELIVERED REFUNDED SPAM DOUBLE }

type Status { id: ID! name: String! group: OrderStatusGroup! archived: Boolean! }
type Project { id: ID! name: String! }

type HumanName { firstName: String lastName: String }
type PhoneFieldValue { field: String! value: String! }
type HumanNameFieldValue { field: String! value: HumanName! }
type EmailFieldValue { field: String! value: String! }
type StringFieldValue { field: String! value: String! }
type OrderData {
  phoneFields: [PhoneFieldValue!]!
  humanNameFields: [HumanNameFieldValue!]!
  emailFields: [EmailFieldValue!]!
  stringFields: [StringFieldValue!]!
}

"Money is in minor units (kopecks)."
type CartItem { itemId: Int! variation: Int! quantity: Int! price: Int! }
type Cart { total: Int! items: [CartItem!]! }
type Source {
  refererUri: String ip: String
  utm_source: String utm_medium: String utm_campaign: String utm_content: String utm_term: String
}

type Order {
  id: ID!
  status: Status!
  project: Project!
  data: OrderData!
  cart: Cart!
  source: Source
  "ISO-8601, UTC."
  createdAt: String!
}

type PageInfo { pagesCount: Int! }
type OrdersFetcher { orders: [Order!]! pageInfo: PageInfo! }
type StatusesFetcher { statuses: [Status!]! }
type ProjectsFetcher { projects: [Project!]! }

interface OrderField { name: String! label: String! }
type PhoneOrderField implements OrderField { name: String! label: String! }
type HumanNameOrderField implements OrderField { name: String! label: String! }
type EmailOrderField implements OrderField { name: String! label: String! }
type StringOrderField implements OrderField { name: String! label: String! }
type OrderFieldsFetcher { fields: [OrderField!]! }

input PaginationInput { pageNumber: Int! pageSize: Int! }
input OrderIncludeFilter { ids: [ID!] }
input OrderSearchFilter { include: OrderIncludeFilter }

type Query {
  ordersFetcher(pagination: PaginationInput, filters: OrderSearchFilter): OrdersFetcher!
  statusesFetcher: StatusesFetcher!
  projectsFetcher: ProjectsFetcher!
  orderFieldsFetcher: OrderFieldsFetcher!
}

input PhoneFieldInput { field: String! value: String! }
input HumanNameInput { firstName: String lastName: String }
input HumanNameFieldInput { field: String! value: HumanNameInput! }
input EmailFieldInput { field: String! value: String! }
input StringFieldInput { field: String! value: String! }
input OrderDataInput {
  phoneFields: [PhoneFieldInput!]
  humanNameFields: [HumanNameFieldInput!]
  emailFields: [EmailFieldInput!]
  stringFields: [StringFieldInput!]
}
"Money is in minor units (kopecks)."
input CartItemInput { itemId: Int! variation: Int! quantity: Int! price: Int! }
input CartInput { items: [CartItemInput!]! }
input SourceInput { refererUri: String ip: String }
input AddOrderInput {
  projectId: ID!
  statusId: ID!
  orderData: OrderDataInput!
  cart: CartInput
  source: SourceInput
}
"orderData entries replace the values of the fields they name; other fields keep theirs."
input UpdateOrderInput { id: ID! statusId: ID orderData: OrderDataInput }

type OrderMutation {
  addOrder(input: AddOrderInput!): Order!
  updateOrder(input: UpdateOrderInput!): Order!
}

type Mutation { orderMutation: OrderMutation! }
'''

SCHEMA = build_schema(SDL)

DEFAULT_PROJECTS: list[dict[str, Any]] = [
    {"id": "1", "name": "Demo offer"},
    {"id": "2", "name": "Second offer"},
]
DEFAULT_STATUSES: list[dict[str, Any]] = [
    {"id": "1", "name": "Новый", "group": "PROCESSING"},
    {"id": "2", "name": "Подтверждён", "group": "APPROVED"},
    {"id": "3", "name": "Отменён", "group": "CANCELED"},
    {"id": "4", "name": "Старый", "group": "PROCESSING", "archived": True},
]
# kind: phone | humanName | email | string
DEFAULT_ORDER_FIELDS: list[dict[str, Any]] = [
    {"name": "phone", "label": "Телефон", "kind": "phone"},
    {"name": "name", "label": "Имя", "kind": "humanName"},
    {"name": "email", "label": "Email", "kind": "email"},
    {"name": "comment", "label": "Комментарий", "kind": "string"},
    {"name": "call_log", "label": "Журнал звонков", "kind": "string"},
]

STATUS_GROUPS = frozenset(SCHEMA.type_map["OrderStatusGroup"].values)  # type: ignore[attr-defined]
# orderData list name -> field kind, and field kind -> GraphQL __typename of the order field
DATA_LISTS = {"phoneFields": "phone", "humanNameFields": "humanName", "emailFields": "email",
              "stringFields": "string"}
KIND_TYPENAMES = {"phone": "PhoneOrderField", "humanName": "HumanNameOrderField", "email": "EmailOrderField",
                  "string": "StringOrderField"}
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")
PHONE_RE = re.compile(r"\+\d{10,15}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})
MAX_BODY_BYTES = 1 << 20
UNAUTHORIZED_BODY = {"errors": [{"message": "Unauthorized", "extensions": {"code": "ERR_UNAUTHORIZED"}}]}
WEBHOOK_SHAPES = ("ordersFetcher", "data", "orders", "order")
WEBHOOK_EVENTS = frozenset({"created", "status", "updated"})
WEBHOOK_TIMEOUT_SECONDS = 15
ADD_ORDER_MUTATION = "mutation($input: AddOrderInput!) { orderMutation { addOrder(input: $input) { id } } }"


def _business_error(code: str, message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code})


def _validation_failed(message: str) -> GraphQLError:
    return _business_error("ERR_ORDER_VALIDATION_FAILED", f"Order validation failed: {message}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _error_body(message: str, code: str) -> dict[str, Any]:
    return {"errors": [{"message": message, "extensions": {"code": code}}]}


def _iter_fields(selection_set: SelectionSetNode | None,
                 fragments: Mapping[str, FragmentDefinitionNode], seen: frozenset[str] = frozenset()
                 ) -> Iterator[FieldNode]:
    """Fields of a selection set with fragments expanded (cycles are the validator's business)."""
    if selection_set is None:
        return
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _iter_fields(selection.selection_set, fragments, seen)
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            if name in fragments and name not in seen:
                yield from _iter_fields(fragments[name].selection_set, fragments, seen | {name})


def _fragments(document: DocumentNode) -> dict[str, FragmentDefinitionNode]:
    return {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}


def _selected_operations(document: DocumentNode, operation_name: str | None) -> list[OperationDefinitionNode]:
    op = get_operation_ast(document, operation_name)
    if op is not None:
        return [op]
    # Ambiguous or unknown operation name: look at all of them (execution will reject the request anyway).
    return [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]


def operation_names(document: DocumentNode, operation_name: str | None = None) -> list[str]:
    """Top-level field names of the operation; mutations one level deeper ("orderMutation.addOrder")."""
    fragments = _fragments(document)
    names: list[str] = []
    for op in _selected_operations(document, operation_name):
        for field in _iter_fields(op.selection_set, fragments):
            top = field.name.value
            children = list(_iter_fields(field.selection_set, fragments))
            if op.operation == OperationType.MUTATION and children:
                names.extend(f"{top}.{child.name.value}" for child in children if child.name.value != "__typename")
            else:
                names.append(top)
    return list(dict.fromkeys(names))


def is_introspection_only(document: DocumentNode, operation_name: str | None = None) -> bool:
    """True when the selected operation asks only for `__schema`/`__type` (SalesRender serves it without a token)."""
    fragments = _fragments(document)
    ops = _selected_operations(document, operation_name)
    if not ops:
        return False
    for op in ops:
        top = {f.name.value for f in _iter_fields(op.selection_set, fragments)}
        if not top & INTROSPECTION_FIELDS or not top <= INTROSPECTION_FIELDS | {"__typename"}:
            return False
    return True


def _fault_matches(fault: Mapping[str, Any], operations: list[str]) -> bool:
    wanted = fault.get("operation")
    if not wanted:
        return True
    return any(op == wanted or op.endswith(f".{wanted}") for op in operations)


def _validate_fault(count: Any = 1, status: Any = None, graphql_error: Any = None, delay_seconds: Any = None,
                    operation: Any = None, message: Any = None, drop_connection: Any = None,
                    carry_out: Any = None) -> dict[str, Any]:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    for name, flag in (("drop_connection", drop_connection), ("carry_out", carry_out)):
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{name} must be true or false")
    if status is None and graphql_error is None and delay_seconds is None and not drop_connection:
        raise ValueError("a fault needs status, graphql_error, delay_seconds or drop_connection")
    if sum(x is not None and x is not False for x in (status, graphql_error, drop_connection)) > 1:
        raise ValueError("status, graphql_error and drop_connection are mutually exclusive")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599):
        raise ValueError("status must be an HTTP status code")
    if graphql_error is not None and (not isinstance(graphql_error, str) or not graphql_error):
        raise ValueError("graphql_error must be an error code such as ERR_ORDER_LOCKED")
    if delay_seconds is not None and (isinstance(delay_seconds, bool) or not isinstance(delay_seconds, int | float)
                                      or delay_seconds < 0):
        raise ValueError("delay_seconds must be a non-negative number")
    if operation is not None and (not isinstance(operation, str) or not operation):
        raise ValueError("operation must be a field name such as addOrder")
    if message is not None and not isinstance(message, str):
        raise ValueError("message must be a string")
    fault: dict[str, Any] = {"count": count}
    for key, value in (("status", status), ("graphql_error", graphql_error), ("delay_seconds", delay_seconds),
                       ("operation", operation), ("message", message), ("drop_connection", drop_connection or None),
                       ("carry_out", carry_out or None)):
        if value is not None:
            fault[key] = value
    return fault


class _Response:
    __slots__ = ("body", "close", "content_type", "drop", "status")

    def __init__(self, status: int, body: Any = None, *, raw: bytes | None = None,
                 content_type: str = "application/json; charset=utf-8", close: bool = False, drop: bool = False):
        self.status = status
        self.body = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
        self.content_type = content_type
        self.close = close
        self.drop = drop  # close the connection without answering


class SalesRenderSandbox(SandboxServer):
    """In-memory SalesRender company served over HTTP. Use `start()`/`stop()` or `with SalesRenderSandbox() as sr`."""

    json_response = _Response
    fault_keys = frozenset({"count", "status", "graphql_error", "delay_seconds", "operation", "message",
                            "drop_connection", "carry_out"})

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = DEFAULT_TOKEN, company_id: str = "1",
                 projects: list[dict[str, Any]] | None = None, statuses: list[dict[str, Any]] | None = None,
                 order_fields: list[dict[str, Any]] | None = None, verbose: bool = False,
                 webhook_url: str | None = None, webhook_shape: str = "ordersFetcher",
                 webhook_events: frozenset[str] = frozenset({"created", "status"})):
        super().__init__(host, port, handler=_Handler, thread_name="salesrender-sandbox")
        self.token = token
        self.company_id = str(company_id)
        self.verbose = verbose
        self._projects = {str(p["id"]): {"id": str(p["id"]), "name": p["name"]}
                          for p in (projects if projects is not None else DEFAULT_PROJECTS)}
        self._statuses: dict[str, dict[str, Any]] = {}
        for s in statuses if statuses is not None else DEFAULT_STATUSES:
            if s["group"] not in STATUS_GROUPS:
                raise ValueError(f"unknown status group {s['group']!r}")
            self._statuses[str(s["id"])] = {"id": str(s["id"]), "name": s["name"], "group": s["group"],
                                            "archived": bool(s.get("archived", False))}
        self._fields: dict[str, dict[str, Any]] = {}
        for f in order_fields if order_fields is not None else DEFAULT_ORDER_FIELDS:
            if f["kind"] not in KIND_TYPENAMES:
                raise ValueError(f"unknown order field kind {f['kind']!r}")
            self._fields[f["name"]] = {"name": f["name"], "label": f.get("label", f["name"]), "kind": f["kind"]}
        # RLock: resolvers take it while the request handler already holds it around execution.
        self._lock = threading.RLock()
        self._orders: dict[str, dict[str, Any]] = {}
        self._next_id = 1
        self._requests: list[dict[str, Any]] = []
        self._faults: list[dict[str, Any]] = []
        self._webhook: dict[str, Any] = {}
        self.configure_webhook(webhook_url, webhook_shape, sorted(webhook_events))
        self._webhooks: list[dict[str, Any]] = []
        self._tracker_hits: list[dict[str, Any]] = []
        self._tracker_faults: list[dict[str, Any]] = []
        self._events: list[tuple[str, str]] = []  # (order id, event) of the requests being answered

    # ---- lifecycle: start()/stop()/port/base_url come from SandboxServer -------------------------------

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/companies/{self.company_id}/CRM"

    # ---- Python control API ----------------------------------------------------------------------------

    def orders(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._order_control_view(o) for o in self._orders.values()]

    def requests_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._requests)

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._faults)

    def add_fault(self, count: int = 1, *, status: int | None = None, graphql_error: str | None = None,
                  delay_seconds: float | None = None, operation: str | None = None,
                  message: str | None = None, drop_connection: bool | None = None,
                  carry_out: bool | None = None) -> dict[str, Any]:
        """Queue a fault for the next `count` authorised GraphQL requests (optionally only `operation` ones).

        Without `carry_out` the request is not carried out (after `delay_seconds`, if given, it is); with
        `carry_out` it is carried out first and then the answer is delayed, replaced by `status` or a
        `graphql_error`, or never sent (`drop_connection`)."""
        fault = _validate_fault(count, status, graphql_error, delay_seconds, operation, message, drop_connection,
                                carry_out)
        with self._lock:
            self._faults.append(fault)
        return dict(fault)

    def set_order_status(self, order_id: str, status_id: str) -> dict[str, Any]:
        """Move an order to another status the way a manager does in the SalesRender UI (the trigger fires;
        this returns once its webhook has been answered, or has failed)."""
        view = self._set_order_status(order_id, status_id)
        with self._lock:
            self._events.append((str(order_id), "status"))
        self._flush_events(wait=True)
        return view

    def _set_order_status(self, order_id: str, status_id: str) -> dict[str, Any]:
        with self._lock:
            order = self._orders.get(str(order_id))
            if order is None:
                raise SandboxError(404, f"order {order_id} not found")
            status = self._statuses.get(str(status_id))
            if status is None:
                raise SandboxError(400, f"status {status_id} not found")
            if status["archived"]:
                raise SandboxError(400, f"status {status_id} is archived")
            order["statusId"] = status["id"]
            order["updatedAt"] = _now()
            order["history"].append({"at": order["updatedAt"], "by": "manager", "statusId": status["id"]})
            return self._order_control_view(order)

    def reset(self) -> None:
        with self._lock:
            self._orders.clear()
            self._requests.clear()
            self._faults.clear()
            self._next_id = 1
            self._webhooks.clear()
            self._tracker_hits.clear()
            self._tracker_faults.clear()

    # ---- the order trigger (webhooks) and the postback tracker -----------------------------------------

    def configure_webhook(self, url: str | None, shape: str = "ordersFetcher",
                          events: list[str] | None = None) -> dict[str, Any]:
        if url is not None and (not isinstance(url, str) or not re.match(r"https?://", url)):
            raise SandboxError(400, "url must be an http(s) URL or null")
        if shape not in WEBHOOK_SHAPES:
            raise SandboxError(400, f"shape must be one of {', '.join(WEBHOOK_SHAPES)}")
        events = sorted({"created", "status"} if events is None else events)
        if not isinstance(events, list) or not set(events) <= WEBHOOK_EVENTS:
            raise SandboxError(400, f"events must be a list of {', '.join(sorted(WEBHOOK_EVENTS))}")
        with self._lock:
            self._webhook = {"url": url, "shape": shape, "events": events}
            return dict(self._webhook)

    def webhook_config(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._webhook)

    def webhooks(self) -> list[dict[str, Any]]:
        """The trigger's deliveries: event, order id, shape, the body sent and the answer (status or error)."""
        with self._lock:
            return copy.deepcopy(self._webhooks)

    def webhook_body(self, order_id: str, shape: str | None = None) -> dict[str, Any]:
        """What the trigger posts for an order now, in `shape` (default: the configured one)."""
        with self._lock:
            view = self._order_view(self._orders[str(order_id)])
            shape = shape or self._webhook["shape"]
        return {"ordersFetcher": {"data": {"ordersFetcher": {"orders": [view]}}}, "data": {"data": view},
                "orders": {"orders": [view]}, "order": view}[shape]

    def _fire_webhook(self, order_id: str, event: str, *, wait: bool = False) -> None:
        with self._lock:
            config = dict(self._webhook)
            if not config.get("url") or event not in config["events"] or str(order_id) not in self._orders:
                return
            body = self.webhook_body(order_id)
            delivery: dict[str, Any] = {"at": _now(), "event": event, "order_id": str(order_id),
                                        "shape": config["shape"], "body": body, "status": None}
            self._webhooks.append(delivery)
        # In a thread: an addOrder's answer must not wait for the app, which reads the order back from here.
        thread = threading.Thread(target=self._deliver, args=(config["url"], body, delivery), daemon=True,
                                  name="salesrender-webhook")
        thread.start()
        if wait:
            thread.join(WEBHOOK_TIMEOUT_SECONDS + 1)

    def _deliver(self, url: str, body: dict[str, Any], delivery: dict[str, Any]) -> None:
        request = urllib.request.Request(url, data=json.dumps(body, ensure_ascii=False).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        answer = b""
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
                status, error, answer = response.status, None, response.read(4096)
        except urllib.error.HTTPError as exc:
            status, error, answer = exc.code, None, exc.read(4096)
        except (OSError, ValueError) as exc:
            status, error = None, type(exc).__name__
        try:
            answered = json.loads(answer) if answer else None
        except ValueError:
            answered = answer.decode("utf-8", "replace")
        with self._lock:
            delivery.update(status=status, error=error, answer=answered, answered_at=_now())

    def tracker_hits(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._tracker_hits)

    def add_tracker_fault(self, count: Any = 1, status: Any = None, delay_seconds: Any = None) -> dict[str, Any]:
        """The next `count` postbacks answer `status` (after `delay_seconds`, if given)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SandboxError(400, "count must be a positive integer")
        if status is None and delay_seconds is None:
            raise SandboxError(400, "a tracker fault needs status or delay_seconds")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)
                                   or not 100 <= status <= 599):
            raise SandboxError(400, "status must be an HTTP status code")
        if delay_seconds is not None and (isinstance(delay_seconds, bool) or not isinstance(delay_seconds, int | float)
                                          or not 0 <= delay_seconds <= 60):
            raise SandboxError(400, "delay_seconds must be a number from 0 to 60")
        fault = {"count": count, **({"status": status} if status is not None else {}),
                 **({"delay_seconds": delay_seconds} if delay_seconds is not None else {})}
        with self._lock:
            self._tracker_faults.append(fault)
        return dict(fault)

    def handle_tracker(self, method: str, url: SplitResult, body: bytes) -> _Response:
        """A postback arriving at the tracker: recorded whatever it says, answered 200 unless a fault says not."""
        hit = {"at": _now(), "method": method, "path": url.path,
               "query": {k: v[0] if len(v) == 1 else v for k, v in parse_qs(url.query, keep_blank_values=True).items()},
               "body": body.decode("utf-8", "replace")}
        with self._lock:
            fault = self._tracker_faults[0] if self._tracker_faults else None
            if fault is not None:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self._tracker_faults.pop(0)
                hit["fault"] = {k: v for k, v in fault.items() if k != "count"}
            hit["status"] = (fault or {}).get("status", 200)
            self._tracker_hits.append(hit)
        if fault and fault.get("delay_seconds"):
            time.sleep(fault["delay_seconds"])
        return _Response(hit["status"], {"ok": hit["status"] < 400})

    def create_crm_order(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """An order made in the CRM itself (by a manager, an import or a CPA network): AddOrderInput as JSON,
        checked as addOrder checks it; the trigger fires "created"."""
        response = self._execute(parse(ADD_ORDER_MUTATION), None, {"input": dict(spec)}, None)
        answer = json.loads(response.body)
        if answer.get("errors"):
            raise SandboxError(400, "; ".join(str(e.get("message")) for e in answer["errors"]))
        order_id = answer["data"]["orderMutation"]["addOrder"]["id"]
        self._flush_events(wait=True)
        with self._lock:
            return self._order_control_view(self._orders[order_id])

    def state(self) -> dict[str, Any]:
        """The orders (what `make run` keeps across restarts; requests and faults are per run)."""
        with self._lock:
            return {"orders": copy.deepcopy(list(self._orders.values())), "next_id": self._next_id}

    def load_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._orders = {str(o["id"]): copy.deepcopy(o) for o in state["orders"]}
            self._next_id = int(state["next_id"])

    # ---- GraphQL resolvers -----------------------------------------------------------------------------

    def _root(self) -> dict[str, Any]:
        # The default field resolver calls callables found in dicts with (info, **args).
        return {
            "ordersFetcher": self._orders_fetcher,
            "statusesFetcher": lambda _info: {"statuses": [dict(s) for s in self._statuses.values()]},
            "projectsFetcher": lambda _info: {"projects": [dict(p) for p in self._projects.values()]},
            "orderFieldsFetcher": lambda _info: {"fields": [
                {"__typename": KIND_TYPENAMES[f["kind"]], "name": f["name"], "label": f["label"]}
                for f in self._fields.values()]},
            "orderMutation": lambda _info: {"addOrder": self._add_order, "updateOrder": self._update_order},
        }

    def _orders_fetcher(self, _info: Any, pagination: dict | None = None, filters: dict | None = None) -> dict:
        page_number = pagination["pageNumber"] if pagination else 1
        page_size = pagination["pageSize"] if pagination else 100
        if page_number < 1 or page_size < 1:
            raise _business_error("BAD_USER_INPUT", "pageNumber and pageSize must be positive")
        ids = ((filters or {}).get("include") or {}).get("ids")
        with self._lock:
            found = [o for o in self._orders.values() if ids is None or o["id"] in ids]
            start = (page_number - 1) * page_size
            return {"orders": [self._order_view(o) for o in found[start:start + page_size]],
                    "pageInfo": {"pagesCount": math.ceil(len(found) / page_size)}}

    def _add_order(self, _info: Any, **args: Any) -> dict:
        data = args["input"]
        with self._lock:
            project_id = str(data["projectId"])
            if project_id not in self._projects:
                raise _business_error("ERR_PROJECT_NOT_FOUND", f"Project {project_id} not found")
            status_id = self._check_status(data["statusId"])
            current = self._check_order_data(data["orderData"])
            cart = data.get("cart")
            if cart is not None:
                for n, item in enumerate(cart["items"]):
                    if item["quantity"] < 1:
                        raise _validation_failed(f"cart item #{n}: quantity must be positive")
                    if item["price"] < 0:
                        raise _validation_failed(f"cart item #{n}: price must not be negative")
            source = data.get("source")
            if source is not None and source.get("ip") is not None:
                try:
                    ipaddress.ip_address(source["ip"])
                except ValueError:
                    raise _validation_failed("source.ip is not an IP address") from None
            order_id = str(self._next_id)
            self._next_id += 1
            now = _now()
            self._orders[order_id] = {
                "id": order_id, "projectId": project_id, "statusId": status_id,
                "orderData": copy.deepcopy(data["orderData"]), "data": current,
                "cart": copy.deepcopy(cart), "source": copy.deepcopy(source),
                "createdAt": now, "updatedAt": now, "history": [],
            }
            self._events.append((order_id, "created"))
            return self._order_view(self._orders[order_id])

    def _update_order(self, _info: Any, **args: Any) -> dict:
        data = args["input"]
        with self._lock:
            order = self._orders.get(str(data["id"]))
            if order is None:
                raise _business_error("ERR_ORDER_NOT_FOUND", f"Order {data['id']} not found")
            entry: dict[str, Any] = {"by": "api"}
            status_id = None
            if data.get("statusId") is not None:
                status_id = self._check_status(data["statusId"])
                entry["statusId"] = status_id
            updates = None
            if data.get("orderData") is not None:
                updates = self._check_order_data(data["orderData"])
                entry["orderData"] = copy.deepcopy(data["orderData"])
            # Everything validated: apply all or nothing, as a transaction would.
            if status_id is not None:
                order["statusId"] = status_id
            if updates is not None:
                for list_name, entries in updates.items():
                    for new in entries:
                        current = order["data"][list_name]
                        current[:] = [e for e in current if e["field"] != new["field"]] + [new]
            order["updatedAt"] = entry["at"] = _now()
            order["history"].append(entry)
            self._events.append((order["id"], "status" if status_id is not None else "updated"))
            return self._order_view(order)

    def _check_status(self, status_id: Any) -> str:
        status = self._statuses.get(str(status_id))
        if status is None:
            raise _business_error("ERR_ORDER_STATUS_NOT_FOUND", f"Order status {status_id} not found")
        if status["archived"]:
            raise _business_error("ERR_ORDER_STATUS_ARCHIVED", f"Order status {status_id} is archived")
        return status["id"]

    def _check_order_data(self, order_data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Validate orderData against the company's order fields; return it normalised (all four lists)."""
        result: dict[str, list[dict[str, Any]]] = {name: [] for name in DATA_LISTS}
        seen: set[str] = set()
        for list_name, kind in DATA_LISTS.items():
            for entry in order_data.get(list_name) or []:
                name, value = entry["field"], entry["value"]
                field = self._fields.get(name)
                if field is None:
                    raise _validation_failed(f'unknown order field "{name}"')
                if field["kind"] != kind:
                    raise _validation_failed(f'field "{name}" is a {field["kind"]} field, not one for {list_name}')
                if name in seen:
                    raise _validation_failed(f'field "{name}" is given more than once')
                seen.add(name)
                # Messages name the field but never echo the value: clients log them and values are personal data.
                if kind == "phone" and not PHONE_RE.fullmatch(value):
                    raise _validation_failed(f'field "{name}": phone must be E.164 ("+" and 10-15 digits)')
                if kind == "email" and not EMAIL_RE.fullmatch(value):
                    raise _validation_failed(f'field "{name}": not an email address')
                if kind == "humanName":
                    value = {"firstName": value.get("firstName"), "lastName": value.get("lastName")}
                result[list_name].append({"field": name, "value": value})
        return result

    def _order_view(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """The order as GraphQL `Order` (statuses resolved now so a manager's change shows up)."""
        cart = order["cart"]
        items = [dict(i) for i in cart["items"]] if cart else []
        source = order["source"]
        source_view = None
        if source is not None:
            query = parse_qs(urlsplit(source.get("refererUri") or "").query)
            source_view = {"refererUri": source.get("refererUri"), "ip": source.get("ip"),
                           **{k: (query.get(k) or [None])[0] for k in UTM_KEYS}}
        return {
            "id": order["id"],
            "status": dict(self._statuses[order["statusId"]]),
            "project": dict(self._projects[order["projectId"]]),
            "data": copy.deepcopy(order["data"]),
            "cart": {"total": sum(i["price"] * i["quantity"] for i in items), "items": items},
            "source": source_view,
            "createdAt": order["createdAt"],
        }

    def _order_control_view(self, order: Mapping[str, Any]) -> dict[str, Any]:
        view = copy.deepcopy(dict(order))
        status = self._statuses[order["statusId"]]
        view["statusGroup"] = status["group"]
        view["status"] = dict(status)
        return view

    # ---- HTTP ------------------------------------------------------------------------------------------

    def _take_fault(self, operations: list[str]) -> dict[str, Any] | None:
        with self._lock:
            for fault in self._faults:
                if _fault_matches(fault, operations):
                    fault["count"] -= 1
                    if fault["count"] <= 0:
                        self._faults.remove(fault)
                    return dict(fault)
        return None

    def _authorized(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> bool:
        candidates = list(query.get("token", []))
        header = headers.get("Authorization")
        if header:
            header = header.strip()
            candidates.append(header)
            if header[:7].lower() == "bearer ":
                candidates.append(header[7:].strip())
        expected = self.token.encode()
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates)

    def handle_graphql(self, headers: Mapping[str, str], query: Mapping[str, list[str]], body: bytes) -> _Response:
        log: dict[str, Any] = {"at": _now(), "operation": [], "operationName": None, "variables": None,
                               "query": None, "authorized": self._authorized(headers, query)}
        with self._lock:  # logged on arrival, so a request whose answer is still delayed shows already
            self._requests.append(log)
        response = self._graphql(headers, body, log)
        with self._lock:  # the entry is visible to requests_log(): change it under the lock
            log["status"] = "dropped" if response.drop else response.status
        self._flush_events()
        return response

    def _flush_events(self, wait: bool = False) -> None:
        with self._lock:
            events, self._events = self._events, []
        for order_id, event in events:
            self._fire_webhook(order_id, event, wait=wait)
            if event == "status":  # SalesRender's "order updated" trigger also sees a status change
                self._fire_webhook(order_id, "updated", wait=wait)

    def _graphql(self, headers: Mapping[str, str], body: bytes, log: dict[str, Any]) -> _Response:
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _Response(415, _error_body("Content-Type must be application/json", "UNSUPPORTED_MEDIA_TYPE"))
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _Response(400, _error_body("Body is not valid JSON", "BAD_REQUEST"))
        if not isinstance(payload, dict):
            return _Response(400, _error_body("Body must be a JSON object", "BAD_REQUEST"))
        source, variables, operation_name = payload.get("query"), payload.get("variables"), payload.get("operationName")
        with self._lock:
            log.update(query=source, variables=copy.deepcopy(variables), operationName=operation_name)
        if not isinstance(source, str) or not source.strip():
            return _Response(400, _error_body("Missing query", "BAD_REQUEST"))
        if variables is not None and not isinstance(variables, dict):
            return _Response(400, _error_body("variables must be an object", "BAD_REQUEST"))
        if operation_name is not None and not isinstance(operation_name, str):
            return _Response(400, _error_body("operationName must be a string", "BAD_REQUEST"))

        document: DocumentNode | None
        syntax_error: GraphQLSyntaxError | None = None
        try:
            document = parse(source)
        except GraphQLSyntaxError as exc:
            document, syntax_error = None, exc
        if document is not None:
            with self._lock:
                log["operation"] = operation_names(document, operation_name)
        if not log["authorized"] and (document is None or not is_introspection_only(document, operation_name)):
            return _Response(401, UNAUTHORIZED_BODY)

        fault = self._take_fault(log["operation"]) if log["authorized"] else None
        if fault is not None:
            with self._lock:
                log["fault"] = fault
            if not fault.get("carry_out"):
                spoiled = _fault_response(fault)
                if spoiled is not None:
                    return spoiled
        response = self._execute(document, syntax_error, variables, operation_name)
        if fault is not None and fault.get("carry_out"):
            with self._lock:
                log["carried_out_status"] = response.status
            return _fault_response(fault) or response
        return response

    def _execute(self, document: DocumentNode | None, syntax_error: GraphQLSyntaxError | None,
                 variables: dict | None, operation_name: str | None) -> _Response:
        if document is None:
            return _Response(400, {"errors": [_formatted(syntax_error, "GRAPHQL_PARSE_FAILED")]})
        errors = validate(SCHEMA, document)
        if errors:
            return _Response(400, {"errors": [_formatted(e, "GRAPHQL_VALIDATION_FAILED") for e in errors]})
        root = self._root()
        # Operation selection and variable coercion are request errors (400), not field errors (200).
        built = Executor.build(SCHEMA, document, root_value=root, raw_variable_values=variables,
                               operation_name=operation_name)
        if isinstance(built, list):
            return _Response(400, {"errors": [_formatted(e, "BAD_USER_INPUT") for e in built]})
        with self._lock:  # one order-changing request at a time, like row locks on the real server
            result = execute(SCHEMA, document, root_value=root, variable_values=variables,
                             operation_name=operation_name)
        body: dict[str, Any] = {}
        if result.errors:
            body["errors"] = [e.formatted for e in result.errors]
        body["data"] = result.data
        return _Response(200, body)

    def _control_views(self) -> dict[str, Callable[[], Any]]:
        return {"orders": self.orders, "requests": self.requests_log, "webhooks": self.webhooks,
                "tracker": self.tracker_hits}

    def _control_route(self, method: str, parts: list[str], body: bytes) -> _Response | None:
        if len(parts) == 3 and parts[0] == "orders" and parts[2] == "status":
            allow_methods(method, "POST")
            spec = json_object(body)
            if spec.get("status_id") is None:
                raise SandboxError(400, "status_id is required")
            return _Response(200, self.set_order_status(parts[1], spec["status_id"]))
        if parts == ["orders", "new"]:
            allow_methods(method, "POST")
            return _Response(200, self.create_crm_order(json_object(body)))
        if parts == ["webhook"]:
            allow_methods(method, "GET", "POST")
            if method == "POST":
                spec = json_object(body)
                unknown = set(spec) - {"url", "shape", "events"}
                if unknown:
                    raise SandboxError(400, f"unknown keys: {sorted(unknown)}")
                current = self.webhook_config()
                return _Response(200, self.configure_webhook(spec.get("url", current["url"]),
                                                             spec.get("shape", current["shape"]),
                                                             spec.get("events", current["events"])))
            return _Response(200, self.webhook_config())
        if parts == ["tracker", "faults"]:
            allow_methods(method, "POST")
            spec = json_object(body)
            unknown = set(spec) - {"count", "status", "delay_seconds"}
            if unknown:
                raise SandboxError(400, f"unknown fault keys: {sorted(unknown)}")
            return _Response(200, self.add_tracker_fault(**spec))
        plugin_side = salesrender_plugin_side.control(self, method, parts, body)  # /_sandbox/cdrs, /_sandbox/plugin/
        if plugin_side is not None:
            return plugin_side
        return None


def _fault_response(fault: Mapping[str, Any]) -> _Response | None:
    """What a fault answers instead of the real answer (after its delay); None: the real answer, late."""
    if fault.get("delay_seconds"):
        time.sleep(fault["delay_seconds"])
    if fault.get("drop_connection"):
        return _Response(0, raw=b"", drop=True)
    if "status" in fault:
        try:
            phrase = HTTPStatus(fault["status"]).phrase
        except ValueError:
            phrase = "Error"
        return _Response(fault["status"], raw=f"{fault['status']} {phrase}\n".encode(),
                         content_type="text/plain; charset=utf-8")
    if "graphql_error" in fault:
        message = fault.get("message") or f"Sandbox fault: {fault['graphql_error']}"
        return _Response(200, {"data": None, **_error_body(message, fault["graphql_error"])})
    return None


def _formatted(error: GraphQLError, code: str) -> dict[str, Any]:
    formatted = dict(error.formatted)
    formatted["extensions"] = {"code": code, **(formatted.get("extensions") or {})}
    return formatted


class _Handler(SandboxHandler):
    server_version = "SalesRenderSandbox/1.0"
    log_name = "salesrender sandbox"
    max_body_bytes = MAX_BODY_BYTES
    sandbox: SalesRenderSandbox

    # The logged path is url.path as is: never the query, which may hold the token.

    def _bad_request(self, status: int, message: str) -> _Response:
        return _Response(status, _error_body(message, "BAD_REQUEST"), close=True)

    def _route(self, method: str, url: SplitResult, body: bytes) -> _Response:
        sandbox = self.sandbox
        if url.path == f"/companies/{sandbox.company_id}/CRM":
            if method != "POST":
                return _Response(405, _error_body("Use POST", "METHOD_NOT_ALLOWED"))
            return sandbox.handle_graphql(self.headers, parse_qs(url.query), body)
        if url.path == "/tracker" or url.path.startswith("/tracker/"):  # the postback tracker
            return sandbox.handle_tracker(method, url, body)
        plugin_side = salesrender_plugin_side.route(sandbox, method, url, self.headers, body)  # /pkey/, CDRs
        if plugin_side is not None:
            return plugin_side
        return _Response(404, _error_body("Not found", "NOT_FOUND"))

    def _internal_error(self, exc: Exception) -> _Response:
        sys.stderr.write(f"salesrender sandbox: internal error {type(exc).__name__}: {exc}\n")
        return _Response(500, _error_body("Internal sandbox error", "INTERNAL_SERVER_ERROR"))

    def _send(self, response: _Response, *, close: bool = False) -> None:  # type: ignore[override]
        if getattr(response, "drop", False):  # the lost answer: close without a byte, as a dying proxy does
            self.close_connection = True
            if self.sandbox.verbose:
                sys.stderr.write(f"{self.log_name}: {self.command} {getattr(self, '_log_path', '?')} dropped\n")
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            super()._send(response, close=close)
        except ConnectionError:  # the client gave up before a late answer (a delay fault): nothing to tell
            self.close_connection = True


def default_webhook_url() -> str | None:
    """SALESRENDER_SANDBOX_WEBHOOK_URL, else the local app (CALLBRIDGE_PORT, default 8000) with the webhook
    secret of the environment (`make run` passes both), else None: no trigger."""
    explicit = os.environ.get("SALESRENDER_SANDBOX_WEBHOOK_URL")
    if explicit:
        return explicit
    secret = os.environ.get("SALESRENDER_WEBHOOK_SECRET")
    if not secret:
        return None
    return f"http://127.0.0.1:{os.environ.get('CALLBRIDGE_PORT') or '8000'}/webhooks/salesrender/{secret}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Strict SalesRender CRM sandbox (GraphQL over HTTP).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--token", default=os.environ.get("SALESRENDER_API_TOKEN") or DEFAULT_TOKEN)
    parser.add_argument("--company-id", default="1")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    parser.add_argument("--state-file", help="keep the orders in this JSON file across restarts")
    parser.add_argument("--webhook-url", default=default_webhook_url(),
                        help="where the order trigger posts (default: the local app's /webhooks/salesrender/"
                             "{SALESRENDER_WEBHOOK_SECRET}; 'none' sends nothing)")
    parser.add_argument("--webhook-shape", default=os.environ.get("SALESRENDER_SANDBOX_WEBHOOK_SHAPE") or
                        "ordersFetcher", choices=WEBHOOK_SHAPES)
    args = parser.parse_args(argv)

    sandbox = SalesRenderSandbox(host=args.host, port=args.port, token=args.token, company_id=args.company_id,
                                 verbose=not args.quiet,
                                 webhook_url=None if args.webhook_url in (None, "", "none") else args.webhook_url,
                                 webhook_shape=args.webhook_shape)
    return serve_until_signalled(sandbox, "salesrender sandbox", args.state_file)


if __name__ == "__main__":
    sys.exit(main())
