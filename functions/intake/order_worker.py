"""The intake worker (R-7, R-8): a queued lead becomes exactly one SalesRender order, then a callback.

Steps, each safe to repeat after a crash or a duplicate message:
1. the order is created through Powertools idempotency keyed on the lead id: a concurrent copy sees
   the attempt in progress and retries later; a later copy gets the stored order id back;
2. the order id is written on the lead;
3. the first callback is sent with DelaySeconds = the offer's delay (CALLBACK_DELAY_SECONDS overrides),
   then marked on the lead. A crash between send and mark can send it twice; the dialer dials each
   (lead, attempt) once, so that costs nothing.
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
from functions.providers.salesrender.orders import add_order_input
from functions.records import leads

ORDER_RECORD_DAYS = 30


def _create_order(lead: dict) -> str:
    offer = config.load().offer(lead["offer_id"])
    order_id = salesrender.default_client().add_order(add_order_input(lead, offer))
    return order_id


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


def process(message: dict, lambda_context=None) -> None:
    from aws_lambda_powertools.utilities.idempotency.exceptions import IdempotencyAlreadyInProgressError

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

    order_id = lead.get("order_id")
    if not order_id:
        idem_config, create_once = _create_order_once()
        if lambda_context is not None:
            idem_config.register_lambda_context(lambda_context)
        try:
            order_id = create_once(lead=lead)
        except IdempotencyAlreadyInProgressError:
            raise Transient("order creation for this lead is in progress elsewhere") from None
        except salesrender.SalesRenderError as exc:
            leads.update(lead_id, last_error=str(exc), last_error_at=times.now_iso())
            metric("OrderFailures", offer=str(offer.id), code=exc.code)
            if not exc.transient:
                leads.update(lead_id, state="failed", error=str(exc))
                raise Poison(str(exc), code=exc.code) from None
            raise Transient(str(exc)) from None
        leads.update(lead_id, order_id=order_id, state="ordered", ordered_at=times.now_iso())
        logger.info("order created", extra={**log, "order_id": order_id})
        metric("OrdersCreated", offer=str(offer.id))

    if not lead.get("callback_scheduled_at"):
        now = dt.datetime.now(dt.UTC)
        delay = config.callback_delay(offer)
        due = now + dt.timedelta(seconds=delay)
        schedule.schedule(lead_id, attempt=1, due_at=due, reason="new_lead", now=now)
        leads.update(lead_id, only_if_missing="callback_scheduled_at", callback_scheduled_at=times.now_iso(),
                     callback_due_at=due.isoformat(timespec="seconds"), state="callback_scheduled")
        logger.info("callback scheduled", extra={**log, "order_id": order_id, "delay_seconds": delay})
