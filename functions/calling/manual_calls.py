"""`POST /v1/calls` and `GET /v1/calls/{call_id}` (R-13): dial now, and read a call's state.

Auth is `Authorization: Bearer <CALLBRIDGE_API_TOKEN>`. A POST creates a lead (source "api") and its
queued call, and puts the callback on the queue with no delay; the dialer does the rest, skipping
working hours (a person asked for this call now) but not the channel limit, the do-not-call list or
the budget rule for manual calls. An `Idempotency-Key` header makes a retried POST return the same call.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

from functions.calling import schedule
from functions.core import auth, config, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise, show
from functions.core.replies import Reply, error
from functions.records import calls, leads

API_NAMESPACE = uuid.UUID("7a1f6c2e-2d3b-4e5f-8a9b-0c1d2e3f4a5b")


def create(body: bytes, headers: dict[str, str]) -> Reply:
    if not auth.bearer_ok(headers):
        return error(401, "Authorization", "missing or wrong bearer token")
    try:
        data = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
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

    key = headers.get("idempotency-key")
    lead_id = str(uuid.uuid5(API_NAMESPACE, key)) if key else str(uuid.uuid4())
    call_id = calls.call_id_for(lead_id, 1)
    now = times.now_iso()
    created = leads.create({"lead_id": lead_id, "source": "api", "state": "callback_scheduled", "offer_id": offer.id,
                            "phone": phone, "name": str(data.get("name") or "")[:200], "created_at": now})
    if created:
        calls.create_queued({"call_id": call_id, "lead_id": lead_id, "offer_id": offer.id, "attempt": 1,
                             "phone": phone, "manual": True, "created_at": now})
        schedule.schedule(lead_id, 1, dt.datetime.now(dt.UTC), "manual", extra={"call_id": call_id, "manual": True})
        logger.info("manual call queued", extra={"lead_id": lead_id, "call_id": call_id, "phone": mask(phone)})
        metric("ManualCallsQueued", offer=str(offer.id))
    call = calls.get(call_id) or {}
    return Reply(202, {"call_id": call_id, "status": call.get("state", "queued")})


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
        "created_at": call.get("created_at") or call.get("dialing_at"),
        "answered_at": call.get("answered_at"),
        "ended_at": call.get("ended_at"),
        "talk_seconds": call.get("talk_seconds"),
        "cost_rub": call.get("cost_rub"),
        "recording_url": call.get("recording_url"),
    })
