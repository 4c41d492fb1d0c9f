"""`POST /webhooks/salesrender/{secret}` (R-21): SalesRender's order triggers, the CRM's word on an order.

SalesRender signs nothing, so the secret in the path is the only credential (wrong: 404, as if the URL
did not exist) and the body is a hint: only the order ids are taken from it, in whichever nesting the
trigger used (`data.ordersFetcher.orders[]`, `data.order`, `data` as the order, `orders[]`, `order`, an
order or a list of orders at the top level), and each order is read again with `ordersFetcher`. Then:
- an order callbridge knows (linked in records/orders, or carrying its lead id) that left PROCESSING
  finishes its lead (`state: closed`, `crm_closed_at`): the dialer skips a finished lead, so its
  queued callback, its retries and anything waiting for it are no-ops when they come up (SQS messages
  cannot be taken back; the dialer also re-reads the status itself before each call);
- an order first seen in PROCESSING that did not come through callbridge (made in the CRM, imported,
  from a CPA network) gets a lead keyed on the order id and its first callback, like a Tilda lead, once;
- each status group seen is handed to records/postbacks.status_seen (the offer's postbacks, once each).
Every step is a create-if-absent or a once-only flag, so the same webhook twice or twenty times
changes nothing more. An order id SalesRender does not know is acknowledged (200) and logged.

Failure while reading or applying an order: the webhook does not trust SalesRender to retry (its trigger
retries are not documented), so the order id is queued for a re-read (a `{"job": "order"}` message on
the postbacks queue, worked by functions/crm/postbacks.py with the queues' backoff) and the answer is
still 200. Only when that send fails too is the answer 503, so a retrying sender may try again. The
inline read has a short timeout: the answer never waits long for the CRM.
"""

from __future__ import annotations

import re

from functions.core import config, queues, safe_json, secrets, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise
from functions.core.queues import Poison, Transient
from functions.core.replies import Reply, error
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender import orders as sr_orders
from functions.records import daily, leads, postbacks
from functions.records import orders as order_links

MAX_BODY_BYTES = 1024 * 1024  # a trigger's order is a few KB; a batch of 100 stays far below this
MAX_ORDERS = 100
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
INLINE_TIMEOUT = (3.05, 8.0)  # (connect, read) s: the webhook answers soon; the queue has the patience
QUEUE = "postbacks"  # order re-reads share the CRM side's queue with the postback jobs (see module doc)
FOREIGN_SOURCE = "salesrender"


class BadBody(ValueError):
    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field_name
        self.status = status


def _orders_in(document) -> list[tuple[str, object]]:
    """(where, order object) for each order in any nesting SalesRender's triggers use."""
    if isinstance(document, list):
        return _listed(document, "")
    if not isinstance(document, dict):
        raise BadBody("body", "the body must be a JSON object or a list of orders")
    data = document.get("data")
    if isinstance(data, dict):
        fetcher = data.get("ordersFetcher")
        if fetcher is not None:
            if not isinstance(fetcher, dict):
                raise BadBody("data.ordersFetcher", "data.ordersFetcher must be an object with orders")
            return _listed(fetcher.get("orders"), "data.ordersFetcher.orders")
        if "order" in data:
            return [("data.order", data["order"])]
        if "orders" in data:
            return _listed(data["orders"], "data.orders")
        if "id" in data:
            return [("data", data)]
    elif data is not None and "id" not in document:
        raise BadBody("data", "data must be an object")
    if "orders" in document:
        return _listed(document["orders"], "orders")
    if "order" in document:
        return [("order", document["order"])]
    if "id" in document:
        return [("", document)]
    raise BadBody("id", "no order in the body: expected data.ordersFetcher.orders, data.order, orders or an "
                        "order with an id")


def _listed(value, path: str) -> list[tuple[str, object]]:
    if not isinstance(value, list):
        raise BadBody(path or "body", f"{path or 'the body'} must be a list of orders")
    if len(value) > MAX_ORDERS:
        raise BadBody(path or "body", f"more than {MAX_ORDERS} orders in one webhook", status=413)
    return [(f"{path}.{i}" if path else str(i), order) for i, order in enumerate(value)]


def order_ids(document) -> list[str]:
    """The order ids a webhook body names (each once, in order); BadBody naming the field otherwise."""
    found = _orders_in(document)
    ids: list[str] = []
    for where, order in found:
        if not isinstance(order, dict):
            raise BadBody(where or "body", f"{where or 'the body'} must be an order object")
        value = order.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        field = f"{where}.id" if where else "id"
        if not isinstance(value, str) or not _ORDER_ID.fullmatch(value.strip()):
            raise BadBody(field, f"{field} must be an order id (1-64 letters, digits, '-' or '_')")
        ids.append(value.strip())
    if not ids:
        raise BadBody("orders", "the body lists no order")
    return list(dict.fromkeys(ids))


def receive(secret: str, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    """`headers` with lower-case names (unused today: SalesRender's triggers send nothing to check)."""
    if not secrets.matches("SALESRENDER_WEBHOOK_SECRET", secret):
        return Reply(404, {"error": "not found"})
    try:
        if len(body) > MAX_BODY_BYTES:
            raise BadBody("body", f"body is larger than {MAX_BODY_BYTES} bytes", status=413)
        if not body.strip():
            raise BadBody("body", "body is empty")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadBody("body", "body is not UTF-8") from None
        try:
            document = safe_json.loads(text)
        except safe_json.BadJson as exc:
            raise BadBody("body", f"body is {exc}" if str(exc) == "not valid JSON" else str(exc)) from None
        ids = order_ids(document)
    except BadBody as exc:
        logger.warning("salesrender webhook rejected", extra={"field": exc.field, "reason": str(exc)})
        metric("CrmWebhooksRejected")
        return error(exc.status, exc.field, str(exc))
    results = {}
    for order_id in ids:
        try:
            results[order_id] = apply(order_id, timeout=INLINE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the re-read from the queue does it again
            logger.warning("order not applied now: queued for a re-read",
                           extra={"order_id": order_id, "error": str(exc)[:300], "error_type": type(exc).__name__})
            try:
                queues.send(QUEUE, {"job": "order", "order_id": order_id})
            except Exception:  # noqa: BLE001
                logger.exception("order re-read not queued", extra={"order_id": order_id})
                return Reply(503, {"error": "try again later", "order_id": order_id})
            results[order_id] = "queued"
    metric("CrmWebhooks")
    return Reply(200, {"ok": True, "orders": results})


def reread(message: dict) -> str:
    """The queued re-read of one order (`{"job": "order", "order_id"}`), with the queue's retries."""
    order_id = message.get("order_id")
    if not isinstance(order_id, str) or not _ORDER_ID.fullmatch(order_id):
        raise Poison("order job needs an order_id", code="malformed")
    try:
        return apply(order_id)
    except salesrender.SalesRenderError as exc:
        if exc.transient:
            raise Transient(str(exc)) from None
        raise Poison(str(exc), code=exc.code) from None


def apply(order_id: str, *, timeout: tuple[float, float] | None = None) -> str:
    """Read the order from SalesRender and act on what it says; returns what happened."""
    order = salesrender.default_client().read_order(order_id, timeout=timeout)
    log = {"order_id": order_id}
    if order is None:
        logger.info("order webhook for an order SalesRender does not know: acknowledged", extra=log)
        metric("CrmWebhookUnknownOrder")
        return "unknown_order"
    status = order.get("status") if isinstance(order.get("status"), dict) else {}
    group, status_name = str(status.get("group") or ""), str(status.get("name") or "")
    log["group"] = group
    cfg = config.load()
    lead = _known_lead(order_id, order, cfg)
    outcome = "seen"
    if lead is None:
        if group != "PROCESSING":
            logger.info("order from outside callbridge, not in processing: nothing to do", extra=log)
            return "foreign_not_processing"
        lead = _adopt(order_id, order, cfg, log)
        if lead is None:
            return "foreign_ignored"
        outcome = "adopted"
    order_links.note_status(order_id, group, status_name)
    if group != "PROCESSING" and _close(lead, group, {**log, "lead_id": lead["lead_id"]}):
        outcome = "closed"
    postbacks.status_seen(order_id, group, status_name, lead_id=lead["lead_id"], offer_id=lead.get("offer_id"))
    daily.order_status_seen(order_id, lead.get("offer_id"), group)
    return outcome


def _offer_of(order: dict, cfg: config.Config) -> config.Offer | None:
    project = order.get("project") if isinstance(order.get("project"), dict) else {}
    return next((o for o in cfg.offers if o.salesrender.project_id == str(project.get("id"))), None)


def _known_lead(order_id: str, order: dict, cfg: config.Config) -> dict | None:
    """The lead of an order callbridge made (or adopted before), or None for an order from outside."""
    lead_id = order_links.lead_of(order_id)
    if lead_id is None:
        candidate = sr_orders.lead_id_of(order)  # ours even when the intake worker has not linked it yet
        lead = leads.get(candidate) if candidate else None
        if lead is not None:
            lead_id = order_links.link(order_id, candidate, "callbridge")
            if lead_id == candidate:
                return lead  # read just now: only the order's item was written since
    if lead_id is None:
        lead_id, lead = _lead_in_flight(order_id, order, cfg)
        if lead is not None:
            return lead
    return leads.get(lead_id) if lead_id else None


def _lead_in_flight(order_id: str, order: dict, cfg: config.Config) -> tuple[str | None, dict | None]:
    """The lead of the order's phone when it is this order's: it names this order (a lead from before the
    orders were linked), or its offer's orders cannot carry the lead id (no comment field, no landing_url)
    and its addOrder is under way right now, so this order is the one being made. (lead id, the lead as
    read here when the order is now linked to it, else None: a link that was already there may name another)."""
    offer = _offer_of(order, cfg)
    if offer is None:
        return None, None
    try:
        phone = normalise(sr_orders.phone_of(order, offer) or "")
    except InvalidPhone:
        return None, None
    known = leads.latest_by_phone(phone)
    if not known:
        return None, None
    in_flight = (not sr_orders.findable(offer) and known.get("offer_id") == offer.id
                 and known.get("order_attempted_at") and not known.get("order_id"))
    if str(known.get("order_id") or "") == order_id or in_flight:
        lead_id = order_links.link(order_id, known["lead_id"], "callbridge")
        return lead_id, known if lead_id == known["lead_id"] else None
    return None, None


def _adopt(order_id: str, order: dict, cfg: config.Config, log: dict) -> dict | None:
    """A lead for an order made outside callbridge, and its first callback (through the intake worker's own
    step, so the delay and the once-only flag are a Tilda lead's). Repeats find the same lead."""
    offer = _offer_of(order, cfg)
    if offer is None:
        logger.info("order from outside callbridge in a project no offer uses: nothing to do", extra=log)
        metric("CrmOrdersIgnored", reason="no_offer")
        return None
    raw_phone = sr_orders.phone_of(order, offer)
    try:
        phone = normalise(raw_phone or "")
    except InvalidPhone as exc:
        logger.warning("order from outside callbridge without a usable phone", extra={**log, "reason": str(exc)})
        metric("CrmOrdersIgnored", reason="phone")
        return None
    lead_id = leads.lead_id_for(FOREIGN_SOURCE, order_id)
    utm, subid = sr_orders.source_tags(order)
    now = times.now_iso()
    created = leads.create({
        "lead_id": lead_id, "source": FOREIGN_SOURCE, "dedupe_key": f"order:{order_id}", "state": "received",
        "offer_id": offer.id, "phone": phone, "phone_key": phone, "name": sr_orders.name_of(order, offer)[:512],
        "email": "", "comment": "", "utm": utm, "subid": subid, "products": [], "order_id": order_id,
        "order_state": "created", "ordered_at": now, "created_at": now,
    })
    lead_id = order_links.link(order_id, lead_id, "crm")
    from functions.intake import order_worker  # deferred: its idempotency layer is only built when used

    order_worker.process({"lead_id": lead_id})  # the first callback, once; the order exists, so no addOrder
    if created:
        logger.info("order from outside callbridge: lead and callback",
                    extra={**log, "lead_id": lead_id, "offer_id": offer.id, "phone": mask(phone)})
        metric("CrmOrdersAdopted", offer=str(offer.id))
    return leads.get(lead_id)


def _close(lead: dict, group: str, log: dict) -> bool:
    """Finish a lead whose order left PROCESSING, once; a lead finished otherwise (answered, exhausted) keeps
    its own ending. True when this call finished it."""
    from functions.calling.dialer import FINAL_LEAD_STATES  # deferred: the API Lambda needs only this tuple

    if lead.get("crm_closed_at") or lead.get("state") in FINAL_LEAD_STATES:
        return False
    now = times.now_iso()
    closed = leads.update(lead["lead_id"], only_if_missing="crm_closed_at", state="closed",
                          finished_reason=f"crm_status_{group.lower()}", finished_at=now, crm_closed_at=now,
                          crm_status_group=group)
    if closed:
        logger.info("order left processing: pending callbacks cancelled", extra=log)
        metric("CrmCallbacksCancelled", group=group)
    return closed
