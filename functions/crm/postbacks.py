"""The postbacks queue's worker (R-21): a tracker is told, once, that an order reached a status group.

Jobs on the queue:
- `{"job": "postback", order_id, group, postback_id, attempt, [due_at]}`, queued by
  records/postbacks.status_seen: one try of one postback. The attempt is claimed on its marker first
  (a lease, conditional on the attempt number), so copies of a message send at most one request per
  attempt, and a marker already `sent` makes every later copy a no-op. The URL and body are rendered at
  send time from the offer's template: placeholders URL-encoded in `url`, JSON-escaped in `body`.
  A 2xx answer marks it sent. A non-2xx answer, a timeout or a refused connection is retried on our own
  schedule, not the queue's (its 20 deliveries last ~2.8 h): the next attempt is a new message carrying
  `attempt + 1` and its `due_at`, after 1, 2, 4, ... 32 min, then hourly, until 24 h after the first
  attempt; the attempt after that, if it fails, is the last: the job goes to the DLQ with its reason
  (`make replay-dlq QUEUE=postbacks` tries once more). Delays beyond SQS's 900 s hop like callbacks do.
  Every attempt (time, URL with secrets masked, status code or error) is stored and listed by
  `GET /v1/postbacks?order_id=`. A request whose answer was lost (a timeout after the tracker counted it)
  is sent again: a tracker has no way to be asked whether it got it, and trackers deduplicate on the
  click id and status, so a second request is the lesser harm than a lost conversion.
- `{"job": "order", order_id}`: an order webhook that could not be applied at once (crm/order_webhook),
  retried with the queue's backoff.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import time
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from functions.core import auth, config, http, queues, times
from functions.core.observability import logger, metric
from functions.core.phones import redact
from functions.core.queues import Poison, Transient
from functions.core.replies import Reply, error
from functions.records import leads
from functions.records import postbacks as records

QUEUE = "postbacks"
TIMEOUT = (3.05, 10.0)  # (connect, read) s per attempt
LEASE_SECONDS = 120  # longer than one attempt (timeouts + inline connect retries), shorter than a redelivery
FIRST_RETRY_SECONDS = 60
MAX_RETRY_SECONDS = 3600
RETRY_FOR_SECONDS = 24 * 3600
_SECRET_NAME = re.compile(r"token|key|secret|pass|auth|sig|hash|hmac|credential", re.IGNORECASE)
_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@functools.cache
def _session() -> requests.Session:
    # Inline, only what surely did not land (refused before sending, 429); everything else is the next attempt.
    return http.session(http.connect_only_retry(total=2, statuses=(429,)))


def process(message: dict) -> str:
    job = message.get("job")
    if job == "postback":
        return send(message)
    if job == "order":
        from functions.crm import order_webhook

        return order_webhook.reread(message)
    raise Poison(f"unknown job {str(job)[:50]!r}", code="malformed")


def payout_text(value: float) -> str:
    """900.0 -> "900", 12.5 -> "12.5"."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def placeholder_values(marker: dict, lead: dict, offer: config.Offer) -> dict[str, str]:
    utm = lead.get("utm") if isinstance(lead.get("utm"), dict) else {}
    values = {
        "order_id": str(marker.get("order_id") or ""),
        "lead_id": str(marker.get("lead_id") or lead.get("lead_id") or ""),
        "status": str(marker.get("group") or "").lower(),
        "status_name": str(marker.get("status_name") or ""),
        "payout": payout_text(offer.payout_rub),
        "subid": str(lead.get("subid") or ""),
    }
    for key in ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term"):
        values[key] = str(utm.get(key) or "")
    return values


def render(template: str, values: dict[str, str], *, in_url: bool) -> str:
    """One pass over `{name}` placeholders (a value is never read as a template): URL-encoded or JSON-escaped."""
    def one(match: re.Match) -> str:
        value = values.get(match.group(1))
        if value is None:
            return match.group(0)
        return quote(value, safe="") if in_url else json.dumps(value, ensure_ascii=False)[1:-1]

    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", one, template)


def masked(url: str) -> str:
    """The URL as it may be stored and logged: a password in it and the values of query parameters named
    like credentials (token, key, secret, sig, ...) replaced by ***; phone numbers masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = "&".join(
        f"{name}=***" if sep and _SECRET_NAME.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item))
    return redact(urlunsplit(parts._replace(netloc=netloc, query=query)))


def _job(message: dict) -> tuple[str, str, str, int]:
    order_id, group, pid, attempt = (message.get(k) for k in ("order_id", "group", "postback_id", "attempt"))
    if not (isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id) and group in config.STATUS_GROUPS
            and isinstance(pid, str) and isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1):
        raise Poison("postback job needs order_id, group, postback_id and a positive attempt", code="malformed")
    return order_id, group, pid, attempt


def send(message: dict, now: dt.datetime | None = None) -> str:
    """One attempt of one postback; returns what happened (for logs and tests)."""
    now = now or times.utcnow()
    order_id, group, pid, attempt = _job(message)
    due = times.parse(message.get("due_at"))
    if due is not None and due > now + dt.timedelta(seconds=1):
        queues.send(QUEUE, message, delay_seconds=min(queues.SQS_MAX_DELAY, int((due - now).total_seconds() + 0.999)))
        return "hopped"
    log = {"order_id": order_id, "group": group, "postback_id": pid, "attempt": attempt}
    marker = records.marker(order_id, group, pid)
    if marker is None:
        logger.warning("postback job without its marker: nothing to send", extra=log)
        return "unknown"
    if marker.get("state") == "sent":
        return "already_sent"
    if int(marker.get("attempt") or 0) != attempt:
        return "stale"  # a copy of an attempt that is over
    offer = config.load().offer(int(marker.get("offer_id") or 0))
    postback = next((p for p in (offer.postbacks if offer else []) if records.postback_id(p) == pid), None)
    if offer is None or postback is None:
        logger.warning("postback no longer configured: not sent", extra=log)
        metric("PostbacksDropped", reason="unconfigured")
        return "unconfigured"
    if not records.claim(order_id, group, pid, attempt, LEASE_SECONDS, time.time()):
        again = records.marker(order_id, group, pid) or {}
        if again.get("state") == "sent" or int(again.get("attempt") or 0) != attempt:
            return "duplicate"
        raise Transient("this postback attempt is being sent by another worker")
    try:
        first_at = times.parse(records.first_attempt_at(order_id, group, pid, times.iso(now, "milliseconds"))) or now
        lead = leads.get(str(marker.get("lead_id") or "")) or {}
        values = placeholder_values(marker, lead, offer)
        url = render(postback.url, values, in_url=True)
        body = render(postback.body, values, in_url=False) if postback.body is not None else None
    except Exception:
        records.release(order_id, group, pid, attempt)
        raise
    shown = masked(url)
    status_code, failure = _request(postback.method, url, body)
    records.record_attempt(order_id, group, pid, attempt, method=postback.method, url=shown,
                           status_code=status_code, error=failure)
    log.update(url=shown, status_code=status_code)
    if status_code is not None and 200 <= status_code < 300:
        records.mark_sent(order_id, group, pid, attempt, status_code)
        logger.info("postback sent", extra=log)
        metric("PostbacksSent", offer=str(offer.id))
        return "sent"
    reason = f"HTTP {status_code}" if status_code is not None else failure or "no answer"
    metric("PostbackFailures", offer=str(offer.id))
    if (now - first_at).total_seconds() >= RETRY_FOR_SECONDS:
        records.give_up(order_id, group, pid, attempt, reason)
        logger.error("postback given up after 24 h of retries", extra={**log, "reason": reason})
        raise Poison(f"postback to {shown} given up after {attempt} attempts over 24 h: {reason}",
                     code="postback_gave_up")
    delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(attempt - 1, 20))
    next_due = times.iso(now + dt.timedelta(seconds=delay))
    # The next attempt's message first, then the count on the marker: a crash in between leaves this attempt
    # open, so the redelivery (after the lease) tries it again instead of the chain ending unseen.
    queues.send(QUEUE, {"job": "postback", "order_id": order_id, "group": group, "postback_id": pid,
                        "attempt": attempt + 1, "due_at": next_due}, delay_seconds=min(queues.SQS_MAX_DELAY, delay))
    records.advance(order_id, group, pid, attempt, next_due)
    logger.warning("postback failed: retry scheduled", extra={**log, "reason": reason, "retry_at": next_due})
    return "retry_scheduled"


def _request(method: str, url: str, body: str | None) -> tuple[int | None, str | None]:
    headers = {"User-Agent": "callbridge-postback/1"}
    data = None
    if method == "POST" and body is not None:
        data = body.encode()
        headers["Content-Type"] = "application/json" if body.lstrip()[:1] in ("{", "[") else "text/plain"
    try:
        response = _session().request(method, url, data=data, headers=headers, timeout=TIMEOUT,
                                      allow_redirects=False)
    except requests.Timeout:
        return None, "timeout"
    except requests.ConnectionError as exc:  # urllib3 reports a read timeout after its retries as one of these
        return None, "timeout" if "timed out" in str(exc).lower() else "connection failed"
    except requests.RequestException as exc:
        return None, type(exc).__name__
    return response.status_code, None


def listing(query: dict[str, str], headers: dict[str, str]) -> Reply:
    """`GET /v1/postbacks?order_id=` (Bearer): the order's postbacks and every attempt."""
    if not auth.bearer_ok(headers):
        return error(401, "authorization", "missing or wrong bearer token")
    order_id = (query or {}).get("order_id")
    if not order_id:
        return error(400, "order_id", "order_id is required")
    if not _ORDER_ID.fullmatch(order_id):
        return error(400, "order_id", "order_id must be 1-64 letters, digits, '-' or '_'")
    found = records.of_order(order_id)
    return Reply(200, {"order_id": order_id, **found})
