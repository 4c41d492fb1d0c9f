"""The intake worker (R-7, R-8): a queued lead gets its first callback, then exactly one SalesRender order.

Steps, each safe to repeat after a crash or a duplicate message:
1. the first callback is sent, due the offer's delay (CALLBACK_DELAY_SECONDS overrides) after the form
   arrived (`lead.created_at`), then flagged on the lead. Speed to lead never waits for the CRM: the
   dialer calls a lead without an order without reading the CRM, and the write-back waits for the
   order. A crash between send and flag sends it twice; the dialer dials each (lead, attempt) once;
2. the order is created through Powertools idempotency keyed on the lead id: a concurrent copy sees
   the attempt in progress and retries later; a later copy gets the stored order id back. The
   idempotency record is deleted when the attempt raises, so a lost answer (timeout, dropped
   connection, 5xx after SalesRender acted) is covered differently: the lead is marked
   `order_attempted_at` before the first `addOrder`, the order carries the lead id, and every later
   attempt first looks for that order among the newest ones (`ordersFetcher`);
3. the order id is written on the lead (the lead's `state` belongs to the calling stages by then).
A new lead's `order_attempted_at` goes with the callback's flag, in one write (`process`).
"""

from __future__ import annotations

import datetime as dt
import functools

from functions.calling import schedule
from functions.core import config, resources, times
from functions.core.observability import logger, metric
from functions.core.phones import mask
from functions.core.queues import Poison, Transient
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender import orders
from functions.records import leads
from functions.records import orders as order_links

ORDER_RECORD_DAYS = 30


def _create_order(lead: dict, attempt_marked: bool = False) -> str:
    lead_id = lead["lead_id"]
    offer = config.load().offer(lead["offer_id"])
    client = salesrender.default_client()
    if lead.get("order_attempted_at"):
        # An earlier attempt may have created the order and lost the answer: look before adding again.
        # If the look-up itself fails, nothing is added (the error is raised and retried).
        found = client.find_order(lambda order: orders.made_for_lead(order, lead_id))
        if found:
            logger.info("order of an earlier attempt found", extra={"lead_id": lead_id, "order_id": found})
            metric("OrdersFoundAfterLostAnswer", offer=str(offer.id))
            return found
    else:
        if not attempt_marked:
            leads.update(lead_id, only_if_missing="order_attempted_at", order_attempted_at=times.now_iso())
        if not orders.findable(offer):
            logger.warning("offer has no comment field and no landing_url: a lost answer cannot be looked up",
                           extra={"lead_id": lead_id, "offer_id": offer.id})
    return client.add_order(orders.add_order_input(lead, offer))


@functools.cache
def _create_order_once():
    # Built on first use, not at import: the persistence layer makes a boto3 client when constructed.
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer,
        IdempotencyConfig,
        idempotent_function,
    )

    persistence = DynamoDBPersistenceLayer(
        table_name=resources.table_name(),
        key_attr="pk",
        sort_key_attr="sk",
        static_pk_value="IDEMPOTENCY#add_order",
        expiry_attr="ttl",
        boto3_client=resources.client("dynamodb"),
    )
    idem_config = IdempotencyConfig(
        event_key_jmespath="lead_id",
        raise_on_no_idempotency_key=True,
        expires_after_seconds=ORDER_RECORD_DAYS * 86400,
    )
    return idem_config, idempotent_function(
        data_keyword_argument="lead", persistence_store=persistence, config=idem_config
    )(_create_order)


def _schedule_first_callback(lead: dict, offer: config.Offer, log: dict, also: dict | None = None) -> bool:
    """Send the first callback, then flag it (with `also` in the same write); True when this flagged it."""
    now = times.utcnow()
    delay = config.callback_delay(offer)
    # Due `delay` after the form arrived, not after the order: a slow CRM must not delay the call.
    due = (times.parse(lead.get("created_at")) or now) + dt.timedelta(seconds=delay)
    schedule.schedule(lead["lead_id"], attempt=1, due_at=due, reason="new_lead", now=now)
    flagged = leads.update(lead["lead_id"], only_if_missing="callback_scheduled_at",
                           callback_scheduled_at=times.now_iso(), callback_due_at=times.iso(due),
                           state="callback_scheduled", **(also or {}))
    logger.info("callback scheduled", extra={**log, "delay_seconds": delay, "due_at": times.iso(due)})
    return flagged


def _ensure_order(lead: dict, offer: config.Offer, log: dict, lambda_context, attempt_marked: bool = False) -> None:
    from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyAlreadyInProgressError

    lead_id = lead["lead_id"]
    idem_config, create_once = _create_order_once()
    if lambda_context is not None:
        idem_config.register_lambda_context(lambda_context)
    try:
        order_id = create_once(lead=lead, attempt_marked=attempt_marked)  # only `lead_id` keys the record
    except IdempotencyAlreadyInProgressError:
        raise Transient("order creation for this lead is in progress elsewhere") from None
    except salesrender.SalesRenderError as exc:
        failed = {"last_error": str(exc), "last_error_at": times.now_iso()}
        if not exc.transient:
            # `order_state`, not `state`: the lead may be being called already.
            failed.update(order_state="failed", error=str(exc), order_failed_at=times.now_iso())
        leads.update(lead_id, **failed)
        metric("OrderFailures", offer=str(offer.id), code=exc.code)
        if not exc.transient:
            raise Poison(str(exc), code=exc.code) from None
        raise Transient(str(exc)) from None
    order_links.link(order_id, lead_id, "callbridge")  # the order webhook finds its lead by it
    leads.update(lead_id, order_id=order_id, order_state="created", ordered_at=times.now_iso())
    logger.info("order created", extra={**log, "order_id": order_id})
    metric("OrdersCreated", offer=str(offer.id))


def process(message: dict, lambda_context=None) -> None:
    lead_id = message.get("lead_id")
    if not isinstance(lead_id, str):
        raise Poison("message has no lead_id", code="malformed")
    lead = leads.get(lead_id)
    if lead is None:
        raise Poison(f"lead {lead_id} does not exist", code="unknown_lead")
    offer = config.load().offer(lead["offer_id"])
    if offer is None:
        leads.update(lead_id, state="failed", error=f"offer {lead['offer_id']} is not configured")
        raise Poison(f"offer {lead['offer_id']} is not configured", code="unknown_offer")
    log = {"lead_id": lead_id, "offer_id": offer.id, "phone": mask(lead["phone"])}

    attempt_marked = False
    if not lead.get("callback_scheduled_at"):
        # A new lead: its order's attempt marker rides on the callback's flag, one UpdateItem instead of
        # two. Marking before the idempotency lock rather than just before addOrder is on the safe side (a
        # marker without an addOrder costs the next attempt one look-up). The write is conditional on the
        # callback's flag alone, which is enough: order_attempted_at is only ever written after or with that
        # flag, so an absent flag means an absent marker. When the write is refused (a copy flagged it
        # meanwhile), the order step marks on its own as before.
        mark = not lead.get("order_id") and not lead.get("order_attempted_at")
        flagged = _schedule_first_callback(lead, offer, log, {"order_attempted_at": times.now_iso()} if mark else None)
        attempt_marked = mark and flagged
    if not lead.get("order_id"):
        _ensure_order(lead, offer, log, lambda_context, attempt_marked)
