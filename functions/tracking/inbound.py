"""Inbound calls (R-18): a call to an offer's number becomes a call record, and a lead when the
number is new (its order then comes through the intake worker like a Tilda lead's).

Only an offer's `caller_id` makes a lead: a call to any other company number (a support line, a
number no offer names) creates nothing, whatever `default_offer_id` says (that is for Tilda forms).
The number dialled is the last redirection's address; a call without one names no offer.

A known number attaches to its newest lead (the by_phone index). The call id is derived from the
provider's call id, so every copy of the first event names the same call.

Crash safety (nothing Beeline was told 200 for is lost): the call record is written first and listed
as open, and it says whether it brought a new lead (`new_lead`). `ensure_lead` then creates that lead
and queues it for its order, the send first and the lead's `intake_queued_at` after it. If a crash cuts
this short, the next event of the call (not bound yet, so it comes here again) or the reconciler's pass
over open calls runs `ensure_lead` again; a second intake message is harmless (the worker is idempotent
per lead).
"""

from __future__ import annotations

import time
import uuid

from functions.core import config, queues, times
from functions.core.config import Config, Offer
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise
from functions.providers.beeline.events import CallData, XsiEvent
from functions.records import calls, leads

INBOUND_NAMESPACE = uuid.UUID("3e9b8a7c-6d5e-4f3a-9b2c-1d0e9f8a7b6c")
# An unqueued lead younger than this is being queued by the event that made it: the reconciler leaves it.
REQUEUE_AFTER_SECONDS = 60


def dialled_offer(leg: CallData, cfg: Config) -> Offer | None:
    """The offer whose caller ID the caller dialled, or None (another company number, or none known)."""
    for address in reversed(leg.redirect_addresses):  # the last redirection is the number dialled
        try:
            dialled = normalise(address.removeprefix("tel:"))
        except InvalidPhone:
            continue
        offer = next((o for o in cfg.offers if o.caller_id == dialled), None)
        if offer:
            return offer
    return None


def start(event: XsiEvent) -> str | None:
    """A Terminator leg with no callbridge call: the inbound call's record (and lead, for a new number)."""
    leg = event.call
    try:
        caller = normalise(leg.remote_address.removeprefix("tel:"))
    except InvalidPhone:
        return None
    offer = dialled_offer(leg, config.load())
    if offer is None:
        logger.info("inbound call to no offer's number: nothing created", extra={"phone": mask(caller)})
        metric("InboundIgnored")
        return None
    ext = leg.ext_tracking_id
    call_id = str(uuid.uuid5(INBOUND_NAMESPACE, ext))
    known = leads.latest_by_phone(caller)
    call = {
        "call_id": call_id, "lead_id": known["lead_id"] if known else leads.lead_id_for("inbound", ext),
        "new_lead": known is None, "offer_id": offer.id, "attempt": 0, "phone": caller, "direction": "inbound",
        "state": "ringing", "operator": event.target_id, "ext_tracking_id": ext, "created_at": times.now_iso(),
    }
    if not calls.create(call):
        call = calls.get(call_id) or call  # a copy after a crash: the first one decided the lead
    calls.mark_open(call_id)
    ensure_lead(call)
    logger.info("inbound call", extra={"call_id": call_id, "lead_id": call["lead_id"], "phone": mask(caller),
                                       "known_lead": not call.get("new_lead")})
    return call_id


def ensure_lead(call: dict, *, older_than: float = 0, now: float | None = None) -> bool:
    """The new lead of an inbound call exists and is queued for its CRM order; True when this queued it.
    Each step is skipped once done, so it is safe to repeat; `older_than` spares a lead that is younger
    (its first run is queueing it right now)."""
    if not call.get("new_lead"):
        return False  # attached to a known lead: nothing to create or queue
    lead_id = call["lead_id"]
    if leads.create({"lead_id": lead_id, "source": "inbound_call", "state": "received", "offer_id": call["offer_id"],
                     "phone": call["phone"], "phone_key": call["phone"], "name": "", "comment": "Входящий звонок",
                     "created_at": times.now_iso(), "utm": {}, "products": []}):
        metric("InboundLeads", offer=str(call["offer_id"]))
    else:
        lead = leads.get(lead_id) or {}
        if lead.get("intake_queued_at") or lead.get("state") != "received":
            return False
        created = times.parse(lead.get("created_at"))
        if created and (time.time() if now is None else now) - created.timestamp() < older_than:
            return False
        logger.warning("inbound lead was never queued: queued now", extra={"lead_id": lead_id,
                                                                           "call_id": call.get("call_id")})
        metric("InboundLeadsRequeued")
    queues.send("intake", {"lead_id": lead_id})
    leads.update(lead_id, intake_queued_at=times.now_iso())  # after the send: a crash between re-sends, harmlessly
    return True
