"""Inbound calls (R-18): a call to an offer's number becomes a call record, and a lead when the
number is new (its order then comes through the intake worker like a Tilda lead's).

A known number attaches to its newest lead (the by_phone index). The call id is derived from the
provider's call id, so every copy of the first event names the same call.
"""

from __future__ import annotations

import uuid

from functions.core import config, queues, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise
from functions.providers.beeline.events import XsiEvent
from functions.records import calls, leads

INBOUND_NAMESPACE = uuid.UUID("3e9b8a7c-6d5e-4f3a-9b2c-1d0e9f8a7b6c")


def start(event: XsiEvent) -> str | None:
    """A Terminator leg with no callbridge call: the inbound call's record (and lead, for a new number)."""
    leg = event.call
    try:
        caller = normalise(leg.remote_address.removeprefix("tel:"))
    except InvalidPhone:
        return None
    cfg = config.load()
    offer = None
    for address in reversed(leg.redirect_addresses):  # the last redirection is the number dialled
        try:
            dialled = normalise(address.removeprefix("tel:"))
        except InvalidPhone:
            continue
        offer = next((o for o in cfg.offers if o.caller_id == dialled), None)
        if offer:
            break
    offer = offer or (cfg.offer(cfg.default_offer_id) if cfg.default_offer_id is not None else None)
    if offer is None:
        logger.info("inbound call to no offer's number: ignored", extra={"phone": mask(caller)})
        return None
    ext = leg.ext_tracking_id
    call_id = str(uuid.uuid5(INBOUND_NAMESPACE, ext))
    known = leads.latest_by_phone(caller)
    if known:
        lead_id = known["lead_id"]
    else:
        lead_id = leads.lead_id_for("inbound", ext)
        now = times.now_iso()
        if leads.create({"lead_id": lead_id, "source": "inbound_call", "state": "received", "offer_id": offer.id,
                         "phone": caller, "phone_key": caller, "name": "", "comment": "Входящий звонок",
                         "created_at": now, "utm": {}, "products": []}):
            queues.send("intake", {"lead_id": lead_id})
            metric("InboundLeads", offer=str(offer.id))
    calls.create({
        "call_id": call_id, "lead_id": lead_id, "offer_id": offer.id, "attempt": 0, "phone": caller,
        "direction": "inbound", "state": "ringing", "operator": event.target_id, "created_at": times.now_iso(),
    })
    calls.mark_open(call_id)
    logger.info("inbound call", extra={"call_id": call_id, "lead_id": lead_id, "phone": mask(caller),
                                       "known_lead": bool(known)})
    return call_id
