"""The Beeline event subscription (R-16): created, checked and renewed by a schedule every 5 minutes,
and replaced at once when Beeline terminates it.

Beeline has no refresh call: a subscription lives for the `expires` it was *granted* (possibly less
than the 86400 s asked for) and is renewed by creating a new one, storing it, then deleting the old
one. During the overlap an event may arrive twice; the webhook dedupes by eventID.

The current subscription is one item of the state table, pk=SUBSCRIPTION#beeline sk=CURRENT:
subscription_id, url (the secret masked), url_sha256, granted_expires, expires_at (epoch s),
created_at. The full URL holds the webhook secret, so only its hash is kept for the "did
PUBLIC_BASE_URL (or the secret) change?" comparison: the table is not a secret store.

A failed `PUT subscription` (Beeline has been seen answering 503) never loses the stored record and
never fails the schedule for a transient error: the next tick, 5 minutes later, tries again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
import uuid
from urllib.parse import urlsplit

from functions.core import resources, secrets, store, times
from functions.core.observability import logger, metric
from functions.providers.beeline import client as beeline

SUBSCRIPTION_TYPE = "BASIC_CALL"
REQUESTED_EXPIRES = 86400
MIN_MARGIN_SECONDS = 15 * 60  # renew with at least this much left: three keeper ticks of slack
MARGIN_SHARE = 0.25           # ... or a quarter of the granted lifetime, when that is longer
LOCK_SECONDS = 200            # longer than a keeper run can take (its Lambda timeout is 180 s)

_PK = "SUBSCRIPTION#beeline"
CURRENT = {"pk": _PK, "sk": "CURRENT"}
LOCK = {"pk": _PK, "sk": "LOCK"}


class NotConfigured(RuntimeError):
    pass


def webhook_url() -> str:
    base = (os.environ.get("PUBLIC_BASE_URL") or "").strip().rstrip("/")
    if not base:
        raise NotConfigured("PUBLIC_BASE_URL is not set: Beeline cannot be told where to send events")
    return f"{base}/webhooks/beeline/{secrets.get('BEELINE_WEBHOOK_SECRET')}"


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _masked(url: str) -> str:
    """The URL without its last path segment (the secret), for logs and the stored record."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}/…"


def current() -> dict | None:
    return store.get(CURRENT)


# --- the keeper's lock ---------------------------------------------------------------------------------
# Why a lock item and not only a conditional write of CURRENT: the expensive, visible step is the
# `PUT subscription` at Beeline, which happens *before* the record can be written. Two keepers that
# both PUT and then race on the record would leave a surplus live subscription (every event twice
# until it expires). The lock (conditional put, expiring by itself so a crashed keeper cannot wedge
# it) lets only one keeper talk to Beeline at a time. The record write is still conditional on the
# subscription it replaces (compare-and-set), so a keeper whose lock expired mid-run (a frozen
# Lambda) cannot overwrite a newer record: it deletes its own subscription instead.

def _lock() -> str | None:
    token = str(uuid.uuid4())
    now = time.time()  # wall clock even when keep() is given a logical `now`: this is real concurrency
    taken = store.update(LOCK, {"holder": token, "expires_at": int(now + LOCK_SECONDS),
                                "ttl": int(now + 86400)},
                         condition="attribute_not_exists(holder) OR expires_at < :now", values={":now": int(now)})
    return token if taken else None


def _unlock(token: str) -> None:
    from botocore.exceptions import ClientError

    try:
        resources.table().delete_item(Key=LOCK, ConditionExpression="holder = :h",
                                      ExpressionAttributeValues={":h": token})
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise  # ConditionalCheckFailed: the lock expired and another keeper holds it now


# --- Beeline steps -------------------------------------------------------------------------------------

def _delete_quietly(subscription_id: str) -> None:
    """Deleting an old subscription is best effort: if it fails it simply expires."""
    try:
        beeline.default_client().unsubscribe(subscription_id)
    except beeline.BeelineError as exc:
        logger.info("old subscription not deleted (it will expire)",
                    extra={"subscription_id": subscription_id, "error": str(exc)})


def _install(url: str, now: float, previous: dict | None, outcome: str, *, delete_previous: bool,
             raise_permanent: bool) -> str:
    """Create a subscription and make it the current one; the previous record stays if this fails."""
    try:
        answer = beeline.default_client().subscribe(url, REQUESTED_EXPIRES, SUBSCRIPTION_TYPE)
    except beeline.BeelineError as exc:
        log = {"error": str(exc), "code": exc.code, "intended": outcome,
               "kept_subscription_id": (previous or {}).get("subscription_id")}
        metric("SubscriptionRenewFailed", code=exc.code)
        if exc.transient:
            logger.warning("subscription not created: will retry on the next tick", extra=log)
            return "retry_later"
        logger.error("subscription refused by Beeline", extra=log)
        if raise_permanent:
            raise  # a wrong URL or token does not heal by itself: fail the schedule loudly
        return "retry_later"
    answer = answer if isinstance(answer, dict) else {}
    subscription_id = str(answer.get("subscriptionId") or "")
    if not subscription_id:
        logger.error("subscription answer without subscriptionId", extra={"intended": outcome})
        metric("SubscriptionRenewFailed", code="NO_ID")
        return "retry_later"
    granted = answer.get("expires")
    # Beeline may grant less than asked: the answer decides. Absent or odd: assume what was asked.
    granted = int(granted) if isinstance(granted, int | float) and granted > 0 else REQUESTED_EXPIRES
    record = {"subscription_id": subscription_id, "url": _masked(url), "url_sha256": _digest(url),
              "subscription_type": SUBSCRIPTION_TYPE, "granted_expires": granted, "expires_at": int(now + granted),
              "created_at": times.iso(dt.datetime.fromtimestamp(now, dt.UTC))}
    if previous is None:
        stored = store.put_new(CURRENT, record)
    else:
        stored = store.update(CURRENT, record, condition="subscription_id = :old",
                              values={":old": previous["subscription_id"]})
    if not stored:
        # Someone installed a newer subscription meanwhile: theirs stands, ours would be a duplicate.
        logger.warning("subscription record changed under us: ours deleted", extra={"subscription_id": subscription_id})
        _delete_quietly(subscription_id)
        return "retry_later"
    if previous is not None and delete_previous:
        _delete_quietly(previous["subscription_id"])
    if granted < MIN_MARGIN_SECONDS:
        logger.warning("Beeline grants short subscriptions: renewed every tick", extra={"granted_expires": granted})
    logger.info("subscription " + outcome, extra={"subscription_id": subscription_id, "granted_expires": granted,
                                                  "url": _masked(url),
                                                  "replaced": (previous or {}).get("subscription_id")})
    metric("SubscriptionsCreated", reason=outcome)
    return outcome


def _alive(record: dict, url: str) -> tuple[bool | None, int | None]:
    """(alive, seconds left per Beeline). alive None: could not tell (Beeline unreachable)."""
    subscription_id = record["subscription_id"]
    try:
        info = beeline.default_client().subscription(subscription_id)
    except beeline.BeelineError as exc:
        if exc.transient:
            logger.warning("subscription check failed", extra={"subscription_id": subscription_id, "error": str(exc)})
            metric("SubscriptionCheckFailed", code=exc.code)
            return None, None
        return False, None  # an errorCode (GetSubscriptionInfoError): unknown or expired
    if not isinstance(info, dict) or info.get("errorCode"):
        return False, None  # some deployments answer errors with 200
    if str(info.get("subscriptionId") or subscription_id) != subscription_id:
        return False, None
    if info.get("url") and info["url"] != url:
        return False, None
    left = info.get("expires")
    if isinstance(left, int | float):
        if left <= 0:
            return False, None
        return True, int(left)
    return True, None


# --- the schedule and the webhook's hook ---------------------------------------------------------------

def keep(now: float | None = None) -> str:
    """One keeper tick: "created" | "renewed" | "recreated" | "ok" | "retry_later"."""
    now = time.time() if now is None else now
    url = webhook_url()
    token = _lock()
    if token is None:
        logger.info("another subscription keeper is running: skipped")
        return "retry_later"
    try:
        return _keep(url, now)
    finally:
        _unlock(token)


def _keep(url: str, now: float) -> str:
    record = current()
    if record is None:
        return _install(url, now, None, "created", delete_previous=False, raise_permanent=True)
    if record.get("url_sha256") != _digest(url):
        # PUBLIC_BASE_URL or the secret changed: events must go to the new URL, the old one is dead.
        return _install(url, now, record, "recreated", delete_previous=True, raise_permanent=True)
    alive, left = _alive(record, url)
    if alive is False:
        logger.warning("subscription gone at Beeline: recreating", extra={"subscription_id": record["subscription_id"]})
        return _install(url, now, record, "recreated", delete_previous=False, raise_permanent=True)
    expires_at = float(record["expires_at"])
    if left is not None:
        expires_at = min(expires_at, now + left)  # Beeline's own count wins when it is shorter
    margin = max(MIN_MARGIN_SECONDS, MARGIN_SHARE * float(record["granted_expires"]))
    if expires_at - now < margin:
        return _install(url, now, record, "renewed", delete_previous=True, raise_permanent=True)
    return "ok" if alive else "retry_later"


def on_terminated(subscription_id: str, now: float | None = None) -> str:
    """Beeline ended a subscription (SubscriptionTerminatedEvent). The current one (or none stored):
    replace it now. An old, already replaced one: nothing ("ignored"). Never raises for Beeline
    errors: the webhook has already marked the event as seen, and the keeper retries in 5 minutes."""
    now = time.time() if now is None else now
    record = current()
    if record is not None and record.get("subscription_id") != subscription_id:
        logger.info("terminated subscription was already replaced", extra={"subscription_id": subscription_id})
        return "ignored"
    try:
        url = webhook_url()
    except NotConfigured as exc:  # raising would answer Beeline 5xx for an event already marked as seen
        logger.error("subscription terminated and cannot be replaced", extra={"error": str(exc)})
        return "retry_later"
    token = _lock()
    if token is None:
        logger.info("keeper busy: the terminated subscription is left to it",
                    extra={"subscription_id": subscription_id})
        return "retry_later"
    try:
        record = current()  # re-read under the lock: a keeper may have replaced it meanwhile
        if record is not None and record.get("subscription_id") != subscription_id:
            return "ignored"
        metric("SubscriptionsTerminated")
        if record is None:
            return _install(url, now, None, "created", delete_previous=False, raise_permanent=False)
        return _install(url, now, record, "recreated", delete_previous=False, raise_permanent=False)
    finally:
        _unlock(token)
