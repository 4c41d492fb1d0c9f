"""`POST /v1/calls` and `GET /v1/calls/{call_id}` (R-13): dial now, and read a call's state.

Auth is `Authorization: Bearer <CALLBRIDGE_API_TOKEN>`. A POST for a number the provider cannot dial
is a 422 naming `phone` (nothing is created). Otherwise the call belongs to the number's lead of that
offer when there is one (the call is written to its CRM order's call log), else to a new lead (source
"api") whose CRM order comes through the intake worker like a Tilda lead's. The callback goes on the
queue with no delay; the dialer does the rest, skipping working hours (a person asked for this call
now) but not the channel limit, the do-not-call list or the budget rule for manual calls. A call that
will not be dialled (do-not-call, budget) is never shown "queued": it ends at once with outcome
"not_dialled" and its reason. An `Idempotency-Key` header makes a retried POST return the same call.
"""

from __future__ import annotations

import datetime as dt
import uuid

from functions.calling import budget, dialable, dnc, schedule
from functions.core import auth, config, links, queues, safe_json, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise, show
from functions.core.replies import Reply, error
from functions.records import calls, leads

API_NAMESPACE = uuid.UUID("7a1f6c2e-2d3b-4e5f-8a9b-0c1d2e3f4a5b")


def create(body: bytes, headers: dict[str, str]) -> Reply:
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    try:
        data = safe_json.loads(body or b"")
    except safe_json.BadJson:
        return error(400, "body", "body must be a JSON object")
    if not isinstance(data, dict):
        return error(400, "body", "body must be a JSON object")
    raw_phone = data.get("phone")
    if not isinstance(raw_phone, str) or not raw_phone.strip():
        return error(422, "phone", "phone is required")
    try:
        phone = normalise(raw_phone)
    except InvalidPhone as exc:
        return error(422, "phone", str(exc))
    offer_id = data.get("offer_id")
    if isinstance(offer_id, str) and offer_id.isdigit():
        offer_id = int(offer_id)
    if not isinstance(offer_id, int) or isinstance(offer_id, bool):
        return error(422, "offer_id", "offer_id must be an integer")
    offer = config.load().offer(offer_id)
    if offer is None:
        return error(422, "offer_id", f"no offer with id {offer_id}")

    cfg = config.load()
    refusal = dialable.refusal(phone, cfg)
    if refusal:  # nothing is created: the caller asked for a call the provider cannot place
        return error(422, "phone", f"the provider cannot dial this number: {refusal}")

    key = headers.get("idempotency-key")
    call_id = str(uuid.uuid5(API_NAMESPACE, "call:" + key)) if key else str(uuid.uuid4())
    call = calls.get(call_id)
    if call is None:
        call = _queue(call_id, key, phone, offer, str(data.get("name") or "")[:200])
    return Reply(202, {"call_id": call_id, "status": call.get("state", "queued"),
                       **({"outcome": call["outcome"], "reason": call.get("not_dialled_reason")}
                          if call.get("outcome") == "not_dialled" else {})})


def _lead_for(phone: str, offer_id: int, key: str | None, name: str, now: str) -> dict:
    """The lead the call belongs to. A number with a lead of this offer that has (or is getting) its
    CRM order: that lead, so the call is written to its order's call log. Otherwise a new lead of
    source "api" whose order comes through the intake worker like a Tilda lead's."""
    known = leads.latest_by_phone(phone)
    if known and known.get("offer_id") == offer_id and known.get("state") != "failed":
        return known
    lead_id = str(uuid.uuid5(API_NAMESPACE, key)) if key else str(uuid.uuid4())
    lead = {"lead_id": lead_id, "source": "api", "state": "callback_scheduled", "offer_id": offer_id,
            "phone": phone, "phone_key": phone, "name": name, "comment": "Звонок через API", "utm": {},
            "products": [], "created_at": now,
            # The manual call is this lead's callback: the intake worker must not schedule another.
            "callback_scheduled_at": now, "order_via": "intake"}
    if leads.create(lead):
        queues.send("intake", {"lead_id": lead_id})  # a re-queue by a retried POST is harmless
    return leads.get(lead_id) or lead


def _queue(call_id: str, key: str | None, phone: str, offer, name: str) -> dict:
    lead = _lead_for(phone, offer.id, key, name, times.now_iso())
    return queue(call_id, lead, offer)


def queue(call_id: str, lead: dict, offer, *, attributes: dict | None = None, operator: str | None = None,
          source: str = "api") -> dict:
    """Dial `lead` now, as a manual call `call_id` (both POST /v1/calls and the CRM plugin's "Call" come
    here): the callback goes on the queue with no delay and the dialer skips working hours and the CRM
    status, but not the channel limit, the leases, the operator rules, the do-not-call list or the budget
    rule for manual calls. `attributes` are stored on the call (e.g. the CRM order and user who asked);
    `operator` is a hint for the dialer (an operator of the offer). Repeating it with the same call id
    changes nothing. Returns the call record."""
    now = times.now_iso()
    phone = lead["phone"]
    call = {**(attributes or {}), "call_id": call_id, "lead_id": lead["lead_id"], "offer_id": offer.id,
            "attempt": 1, "phone": phone, "manual": True, "created_at": now,
            **({"operator_hint": operator} if operator else {})}
    reason = ("do_not_call" if dnc.listed(phone)
              else None if budget.allows_call(config.load(), manual=True) else "budget_exhausted")
    if reason:
        # It would not be dialled: say so now instead of showing "queued" (the dialer re-checks anyway).
        calls.settle_not_dialled(call_id, reason, call)
        logger.info("manual call not dialled", extra={"call_id": call_id, "phone": mask(phone), "reason": reason,
                                                      "source": source})
        metric("CallsNotDialled", reason=reason)
        return calls.get(call_id) or call
    if calls.create_queued(call):
        hint = {"operator_hint": operator} if operator else {}
        schedule.schedule(lead["lead_id"], 1, dt.datetime.now(dt.UTC), "manual",
                          extra={"call_id": call_id, "manual": True, **hint})
        logger.info("manual call queued", extra={"lead_id": lead["lead_id"], "call_id": call_id, "phone": mask(phone),
                                                 "known_lead": lead.get("source") != "api", "source": source})
        metric("ManualCallsQueued", offer=str(offer.id))
    return calls.get(call_id) or call


def read(call_id: str, headers: dict[str, str]) -> Reply:
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    call = calls.get(call_id)
    if call is None:
        return error(404, "call_id", "no such call")
    offer = config.load().offer(call.get("offer_id"))
    visibility = offer.phone_visibility if offer else "partial"
    return Reply(200, {
        "call_id": call_id,
        "lead_id": call.get("lead_id"),
        "phone": show(call["phone"], visibility) if call.get("phone") else None,
        "operator": call.get("operator"),
        "state": call.get("state", "queued"),
        "outcome": call.get("outcome") if call.get("state") == "ended" else None,
        # Why a call ended without being placed ("not_dialled"): do_not_call, budget_exhausted, or why the
        # provider cannot dial the number (e.g. "number outside +7"); null otherwise.
        "reason": call.get("not_dialled_reason"),
        "created_at": call.get("created_at") or call.get("dialing_at"),
        "answered_at": call.get("answered_at"),
        "ended_at": call.get("ended_at"),
        "talk_seconds": call.get("talk_seconds"),
        "cost_rub": call.get("cost_rub"),
        "recording_url": links.stored_recording_link(call_id, call),
    })
