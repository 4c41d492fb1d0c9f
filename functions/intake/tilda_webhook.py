"""Lead intake from Tilda (R-4..R-6): authenticate, parse, validate, store once, queue for the CRM.

The webhook does the minimum that makes the lead durable (one conditional DynamoDB write and one SQS
message) and answers "ok"; the CRM order is created by the intake worker, so Tilda's 5-second limit
never depends on SalesRender. Every copy of a submission maps to one lead id, so Tilda's retries and
concurrent copies create nothing twice. If the first copy dies between the two writes it answers 5xx,
Tilda retries a minute later, and that copy finds the lead never queued and queues it (the worker is
idempotent per lead too), so nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

from functions.core import config, queues, secrets, text, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise
from functions.core.replies import Reply, error
from functions.intake import tilda_form
from functions.records import leads, rejected

# Longer than the API Lambda's timeout, shorter than Tilda's one-minute retry interval.
REQUEUE_AFTER_SECONDS = 20
RAW_BYTES = 100_000  # the lead's copy of the post; with the clipped fields the item stays far below 400 KB
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _reject(data: dict, field_name: str, message: str) -> Reply:
    rejected_id = rejected.keep("tilda", message, field_name, data)
    logger.warning("tilda post rejected", extra={"field": field_name, "reason": message, "rejected_id": rejected_id})
    metric("LeadsRejected", source="tilda")
    return error(422, field_name, message, rejected_id=rejected_id)


def _stale(created_at: str) -> bool:
    """A lead still "received" this long after creation may have lost its enqueue (the first copy died
    mid-request): queue it again. Younger ones are being queued by a concurrent copy right now."""
    created = times.parse(created_at)
    if created is None:
        return True
    return (dt.datetime.now(dt.UTC) - created).total_seconds() > REQUEUE_AFTER_SECONDS


def receive_tilda(body: bytes, content_type: str | None, headers: dict[str, str], query: dict[str, str]) -> Reply:
    """`headers` with lower-case names, `query` the query-string parameters."""
    try:
        data = tilda_form.parse_body(body, content_type)
    except tilda_form.BadPost as exc:
        outside_key = headers.get("x-api-key") or query.get("key")
        if not secrets.matches("TILDA_API_KEY", outside_key):
            return error(exc.status, exc.field, str(exc))  # nobody vouches for it: not worth storing
        # The key outside the body vouches for a post we cannot read: keep it as it came.
        rejected_id = rejected.keep("tilda", str(exc), exc.field, body)
        logger.warning("tilda post unreadable", extra={"field": exc.field, "reason": str(exc),
                                                        "rejected_id": rejected_id})
        metric("LeadsRejected", source="tilda")
        return error(exc.status, exc.field, str(exc), rejected_id=rejected_id)
    if tilda_form.is_test(data):
        return Reply(200, "ok")  # Tilda's connection check, with or without a key

    presented = headers.get("x-api-key") or query.get("key") or data.get("api_key")
    if not isinstance(presented, str) or not secrets.matches("TILDA_API_KEY", presented):
        return error(401, "api_key", "missing or wrong API key")
    data.pop("api_key", None)  # never store the credential with the lead

    cfg = config.load()
    formid = data.get("formid") if isinstance(data.get("formid"), str) else None
    offer = cfg.offer_for_form(formid)
    if offer is None:
        shown = text.clip(formid, 100) if formid else ""
        return _reject(data, "formid", f"form {shown!r} feeds no offer" if formid else "formid is missing")
    post = tilda_form.extract(data, offer.tilda_fields)
    phone_field = post.phone_field or offer.tilda_fields.phone[0]
    if not post.phone_raw:
        return _reject(data, phone_field, "phone is missing")
    try:
        phone = normalise(post.phone_raw)
    except InvalidPhone as exc:
        return _reject(data, phone_field, str(exc))

    dedupe_key = post.dedupe_key or "body:" + hashlib.sha256(
        json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    lead_id = leads.lead_id_for("tilda", dedupe_key)
    email_ok = bool(_EMAIL.match(post.email))
    raw = json.dumps(data, ensure_ascii=False)
    truncated = list(post.truncated)
    if len(raw.encode()) > RAW_BYTES:
        raw = text.clip(raw, RAW_BYTES)
        truncated.append("raw")
    lead = {
        "lead_id": lead_id,
        "source": "tilda",
        "dedupe_key": dedupe_key,
        "state": "received",
        "offer_id": offer.id,
        "phone": phone,
        "phone_key": phone,  # the by_phone index: an inbound call finds this lead
        "name": post.name,
        "email": post.email if email_ok else "",
        "email_rejected": "" if email_ok or not post.email else post.email,
        "comment": post.comment,
        "utm": post.utm,
        "subid": post.subid,  # the CPA click id: on the order's referer and in its postbacks
        "formid": post.formid,
        "formname": post.formname,
        "tranid": post.tranid,
        "payment_orderid": post.order_ref,
        "amount_rub": post.amount_rub,
        "products": [p.__dict__ for p in post.products],
        "raw": raw,
        "created_at": times.now_iso(),
    }
    if truncated:
        lead["truncated_fields"] = truncated  # stored cut to their byte limits (a 4xx would lose the lead)
    log = {"lead_id": lead_id, "offer_id": offer.id, "phone": mask(phone), "formid": post.formid,
           "tranid": post.tranid, **({"truncated_fields": truncated} if truncated else {})}
    if leads.create(lead):
        logger.info("lead accepted", extra=log)
        metric("LeadsAccepted", offer=str(offer.id))
    else:
        existing = leads.get(lead_id) or {}
        logger.info("duplicate submission", extra={**log, "state": existing.get("state")})
        metric("LeadsDuplicate", offer=str(offer.id))
        if existing.get("state") != "received" or not _stale(existing.get("created_at", "")):
            return Reply(200, "ok")
    # No second write to mark it queued: the worker moves the lead on, and a re-queue is harmless.
    queues.send("intake", {"lead_id": lead_id})
    return Reply(200, "ok")
