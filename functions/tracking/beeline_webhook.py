"""`POST /webhooks/beeline/{secret}` (R-15): Beeline's XSI events, acknowledged fast.

Checks in order: the secret in the path (wrong: 404, as if the URL did not exist, nothing stored),
the caller's address against the configured CIDR allowlist (403), a hardened parse (400 naming the
element at fault; the document is kept with the rejected posts), then the event is stored once by its
eventID. Only a failure to store answers 5xx (so a retrying sender can try again); a failure after
that is logged and acknowledged, because the stored event is applied again by the next event of the
call or by the reconciler.
"""

from __future__ import annotations

import ipaddress

from functions.core import config, secrets
from functions.core.observability import logger, metric
from functions.core.replies import Reply, error
from functions.providers.beeline.events import BadEvent, parse
from functions.records import call_events, rejected


def _allowed(source_ip: str | None, cidrs: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(source_ip or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(c, strict=False) for c in cidrs)


def receive(secret: str, body: bytes, source_ip: str | None) -> Reply:
    if not secrets.matches("BEELINE_WEBHOOK_SECRET", secret):
        return Reply(404, {"error": "not found"})
    if not _allowed(source_ip, config.load().provider.webhook_cidrs):
        logger.warning("beeline webhook from outside the allowlist", extra={"source_ip": source_ip})
        return error(403, "source_ip", "caller not allowed")
    try:
        event = parse(body)
    except BadEvent as exc:
        # The caller passed the secret and the allowlist: keep what it sent for a person to look at.
        rejected_id = rejected.keep("beeline", str(exc), exc.field, body)
        logger.warning("beeline event rejected", extra={"field": exc.field, "reason": str(exc),
                                                        "rejected_id": rejected_id})
        metric("EventsRejected")
        return error(400, exc.field, str(exc), rejected_id=rejected_id)

    from functions.tracking import tracker  # deferred: only real events pay for the tracker's imports

    if event.event_type == "SubscriptionTerminatedEvent":
        if call_events.mark_seen(event.event_id, event.event_type):
            from functions.tracking import subscriptions

            try:
                subscriptions.on_terminated(event.subscription_id)
            except Exception:
                call_events.unmark_seen(event.event_id)  # let the sender's retry count again
                raise
        return Reply(200, "ok")
    if event.call is None or not event.call.ext_tracking_id:
        metric("EventsIgnored", type=event.event_type or "unknown")
        return Reply(200, "ok")  # HookStatusEvent and other types without a call: acknowledged
    if not call_events.store_event(event):
        return Reply(200, "ok")  # a copy (overlapping subscriptions, a retry)
    try:
        result = tracker.process(event)
    except Exception:  # noqa: BLE001 - stored: the next event or the reconciler applies it again
        logger.exception("event stored but not applied", extra={"event_type": event.event_type,
                                                                "ext_tracking_id": event.call.ext_tracking_id})
        metric("EventsNotApplied")
        return Reply(200, "ok")
    logger.info("call event", extra={"event_type": event.event_type, "ext_tracking_id": event.call.ext_tracking_id,
                                     "personality": event.call.personality, "result": result})
    return Reply(200, "ok")
