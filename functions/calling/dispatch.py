"""Dispatch on release (R-10): waiting callbacks are dialled when capacity frees, oldest first.

A due callback that finds no free channel or operator is not re-sent to itself: it joins its offer's
waiting list (functions/records/waiting.py, ordered by due time, manual calls ahead) and its SQS message is
acknowledged. While it waits it costs nothing: no message, no provider request. A *dispatch pass* (`run`)
hands free capacity to the oldest eligible entries:
- it reads the heads of the lists (one Query per offer): nothing waits, and it stops (the usual end of a
  pass once the backlog is served, so it costs no channel read);
- then it looks for a free channel (one Query over the slots): none, and it stops at once, touching no
  entry; so a burst of arrivals that all find the channels busy never locks the head of a list;
- then the oldest entry across the offers (heads of each list, by sort key) whose offer has an operator free
  in DynamoDB (not on a call, past the wrap-up of the last one); an offer with none is skipped for this pass.
  The dial chooses its operator from the same read (a reservation is conditional);
- it takes the channel lease *before* the entry (the pass holds it under a token of its own), so of racing
  passes only those holding a channel take entries, and each takes the oldest one nobody holds: the oldest
  waiting leads are the ones dialled;
- it locks that entry (conditional write), runs the dialer on its message with that lease and then removes
  the entry (after the dial's effect: the call is claimed, with the lease, before the entry goes, so a crash
  in between leaves an entry whose redial is a duplicate the claim refuses), or puts it back in its place
  when no operator was free after all (a race, or the agent status said BREAK/OFFLINE). A lease no call took
  is given back at the end of the pass.

What starts a pass:
- a fresh due callback (`dialer.process`), not stored first: the pass sees it where it would stand in its
  offer's list (`Fresh`, by its sort key, beside the heads it reads anyway). The oldest, with a free channel
  and operator, it is dialled with no entry written (no join, lock or removal: three writes saved); else it
  joins at the moment the pass finds it cannot be dialled (no channel, no operator, an older entry first),
  and the pass reads again after that join, as it did after a join before the pass, so a release whose own
  pass ran before the join cannot leave it unseen. Of two fresh callbacks at once, the channel lease and the
  operator reservation decide as for two entries (the loser joins); a crash before the join leaves its SQS
  message to be redelivered, one after its claim a redelivery the claim refuses;
- a call's release (`released`, from the call tracker, after the lease and operator are freed): a dispatch
  message on the callbacks queue with DelaySeconds = the offer's `wrap_up_seconds`. A message and not a
  pass in-process: the release runs inside the Beeline webhook, which must answer at once and cannot wait
  out the wrap-up, and the queue gives the pass its retries and its DLQ like any callback;
- the safety net (`sweep`, every minute): when anything waits and a channel is free it sends a dispatch
  message. It catches a lost trigger, a channel lease that expired (its release event lost) and an operator
  back from BREAK/OFFLINE: Beeline sends no event for agent status changes (providers/beeline.md lists only
  call and subscription events), so that is found by looking, at most once a minute per waiting offer.

Oldest first: within an offer no entry is passed over by a younger one, except an entry another dispatcher
is dialling at that moment, one backing off after a transient failure, or one skipped by an operator rule
(status) or working hours. Each (lead, attempt) is still dialled once: the dialer's claim on the call id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable

from functions.calling import alerts, channels, operators
from functions.core import config, queues, times
from functions.core.observability import logger, metric
from functions.core.queues import Poison
from functions.records import waiting

QUEUE = "callbacks"
PASS_SECONDS = 30      # the callbacks Lambda has 60 s: a longer pass hands on to a fresh message
MAX_STEPS = 100        # entries looked at per pass (dials, and leads found finished meanwhile)
# An operator whose wrap-up ends this soon is waited for, not skipped: a release's message that comes a
# little early (clocks) must not leave the operator to the sweep. Not a head start to sleep through: a
# Lambda waiting is billed, and the measured gap from release to the next dial was no shorter for it.
SLACK_SECONDS = 0.5


@dataclasses.dataclass
class Lease:
    """A channel lease a pass took for the entry it dials. `claimed`: a call took it over with its claim
    (from then on its release is the call's: the tracker's, or the dialer's after an originate that failed)."""

    provider: str
    slot: int
    holder: str
    claimed: bool = False
    operator_states: dict | None = None  # the offer's operator states the pass read for the entry it dials


def is_dispatch(message: dict) -> bool:
    return "dispatch" in message


def trigger(reason: str, offer_ids: list[int] | None = None, delay_seconds: int = 0) -> None:
    """Ask for a dispatch pass on the callbacks queue (all offers, or only these)."""
    body = {"dispatch": reason, **({"offers": sorted(offer_ids)} if offer_ids is not None else {})}
    queues.send(QUEUE, body, delay_seconds=delay_seconds)


def released(call: dict) -> None:
    """A call's channel and operator were just freed: dispatch when its operator's wrap-up is over. The
    freed channel may serve any offer, so the pass looks at all of them."""
    offer = config.load().offer(call.get("offer_id"))
    wrap_up = offer.wrap_up_seconds if offer else 0
    trigger("released", None, max(0, math.ceil(wrap_up)))  # whole seconds in SQS


def sweep(now: float | None = None) -> dict:
    """The safety net (a schedule, each minute): a dispatch message when anything waits, a channel is free
    and an operator of a waiting offer is not on a call. DynamoDB reads only; no provider request."""
    now = time.time() if now is None else now
    cfg = config.load()
    waiting_offers = [o for o in cfg.offers if waiting.waiting(o.id)]
    summary = {"waiting_offers": len(waiting_offers), "triggered": False}
    if waiting_offers:
        busy = channels.busy(cfg.provider.name, cfg.provider.channel_limit, now)
        ready = [o.id for o in waiting_offers if operators.free_in(o, now) is not None]
        summary.update(busy_channels=busy, ready_offers=len(ready))
        if ready and busy < cfg.provider.channel_limit:
            trigger("sweep", ready)
            summary["triggered"] = True
    logger.info("dispatch sweep", extra=summary)
    return summary


@dataclasses.dataclass
class Fresh:
    """A due callback not on its offer's list, for the pass its own delivery runs: `entry` is where it would
    stand (waiting.entry), `join` stores it there."""

    entry: dict
    join: Callable[[], object]


def run(dial: Callable[[dict, Lease], str], offer_ids: list[int] | None = None,
        reason: str = "", fresh: Fresh | None = None) -> list[tuple[str, str]]:
    """One dispatch pass: free capacity to the oldest eligible waiting entries. `dial(message, lease)` is the
    dialer on an entry's message with a channel lease this pass holds (returns what happened;
    "no_free_operator" when it took no operator). Returns (call_id, result) per entry dealt with. A transient
    failure puts the entry back with its own backoff and is raised, so the message that started the pass is
    retried.

    `fresh`: the due callback whose delivery runs this pass, not yet on its list. It stands among the heads
    by its sort key: the oldest, and capacity free, it is dialled with no entry written (no join, lock or
    removal); else it joins the moment the pass finds it cannot be dialled, and the pass reads again after
    the join (as a pass after a join always did), so a release the pass did not see still finds it listed.
    Its dial's failure is raised with nothing stored: its own SQS message is retried (or parked)."""
    cfg = config.load()
    provider, limit = cfg.provider.name, cfg.provider.channel_limit
    offers = [o for o in cfg.offers if offer_ids is None or o.id in offer_ids]
    token = f"dispatch#{uuid.uuid4().hex[:12]}"
    started, blocked, done = time.monotonic(), set(), []
    lease: Lease | None = None
    fresh_offer = next((o for o in offers if fresh is not None and o.id == fresh.entry["offer_id"]), None)
    pending = fresh if fresh_offer is not None else _join(fresh)
    try:
        for step in range(MAX_STEPS):
            if time.monotonic() - started > PASS_SECONDS:
                pending = _join(pending)  # listed before the hand-on: the fresh pass reads after it
                trigger("continued", [o.id for o in offers])  # the rest in a fresh Lambda
                break
            now = time.time()
            heads = []
            for offer in offers:
                if offer.id not in blocked:
                    free, seen = waiting.look(offer.id, now)
                    if pending is not None and offer is fresh_offer and pending.entry["call_id"] in seen:
                        pending = None  # listed already (a redelivery after its join): dialled from the list
                    heads += [(free[0], offer)] if free else []
            if pending is not None:  # never blocked: its offer is blocked only after it joined
                heads.append((pending.entry, fresh_offer))
            if not heads:
                break  # nothing waits (the usual end of a pass): no need to look at the channels
            if lease is None:
                free_slots = channels.free(provider, limit, now)
                if not free_slots:
                    if pending is not None:
                        pending = _join(pending)
                        continue  # read again after the join: a channel freed meanwhile is not missed
                    break  # the next release (or the sweep, for a lease that expired) comes back
            entry, offer = min(heads, key=lambda head: head[0]["sk"])
            is_fresh = pending is not None and entry is pending.entry
            if pending is not None and not is_fresh:
                pending = _join(pending)  # an older entry goes first: the fresh one waits behind it
            known = operators.states(offer.operators)
            wait = operators.free_in(offer, now, known)
            if wait is None or wait > SLACK_SECONDS:
                if is_fresh:
                    pending = _join(pending)
                    continue  # read again after the join (an operator released meanwhile is not missed)
                blocked.add(offer.id)  # all on calls or wrapping up: their releases dispatch again
                continue
            if wait > 0:
                time.sleep(wait)  # a wrap-up ending within the slack (clocks)
            if lease is None:
                holder = f"{token}#{step}"
                slot = channels.acquire(provider, limit, holder, candidates=free_slots)
                if slot is None:
                    if is_fresh:
                        pending = _join(pending)
                        continue  # read again after the join
                    break  # taken meanwhile by another pass: it dials the oldest
                lease = Lease(provider, slot, holder)
                _channel_use(limit - len(free_slots) + 1, limit)
            if not is_fresh and not waiting.take(entry, token):
                continue  # another dispatcher has it: look at the heads again
            lease.operator_states = known  # the dial chooses from these (the reservation is conditional)
            # The fresh one is dialled with nothing stored: its failure is raised, and its own message retried.
            result = dial(entry["message"], lease) if is_fresh else _dial_entry(dial, entry, token, reason, lease)
            if lease.claimed:
                lease = None
            if is_fresh:
                pending = _join(pending) if result == "no_free_operator" else None
            if result == "no_free_operator":
                blocked.add(offer.id)  # a listed entry was put back, the fresh one joined: releases dispatch
                continue
            done.append((entry["call_id"], result))
        else:
            if pending is not None:  # out of steps: listed, and a fresh pass reads after the join
                pending = _join(pending)
                trigger("continued", [o.id for o in offers])
    finally:
        if lease is not None and not lease.claimed:
            channels.release(provider, lease.slot, lease.holder)  # no call took it
    return done


def _join(fresh: Fresh | None) -> None:
    """The fresh callback joins its list (the pass does not dial it now); None: nothing pending any more."""
    if fresh is not None:
        fresh.join()
    return None


def _channel_use(busy: int, limit: int) -> None:
    """The saturation alert's call site (R-23), after a lease is taken: `busy` is the pass's own read plus its
    lease (a lease another pass took since counts at the next dial). An alert that fails never fails a dial."""
    try:
        alerts.channel_use(busy, limit)
    except Exception:  # noqa: BLE001
        logger.warning("channel use alert failed", exc_info=True)


def _dial_entry(dial: Callable[[dict, Lease], str], entry: dict, token: str, reason: str, lease: Lease) -> str:
    message = entry["message"]
    try:
        result = dial(message, lease)
    except Poison as exc:
        _park(entry, token, str(exc), exc.code)
        return "parked"
    except Exception as exc:
        failures = int(entry.get("failures") or 0) + 1
        if failures >= queues.MAX_RECEIVES:
            _park(entry, token, f"gave up after {failures} tries: {exc}", "exhausted")
            return "parked"
        waiting.put_back(entry, token, backoff_seconds=queues.backoff_seconds(failures))
        raise
    if result == "no_free_operator":
        waiting.put_back(entry, token)
        return result
    # After the dial's effect (the call claimed, or the lead settled): the entry has done its work.
    waiting.remove(entry, token)
    due = times.parse(message.get("due_at"))
    waited = max(0, int(time.time() - due.timestamp())) if due else None
    logger.info("waiting callback dispatched", extra={"lead_id": message.get("lead_id"), "call_id": entry["call_id"],
                                                      "attempt": message.get("attempt"), "result": result,
                                                      "waited_seconds": waited, "trigger": reason})
    metric("WaitingDispatched", result=result)
    return result


def _park(entry: dict, token: str, reason: str, code: str) -> None:
    """An entry that will never dial goes to the DLQ with its reason (`make replay-dlq` sends it back)."""
    queues.send_to_dlq(QUEUE, json.dumps(entry["message"], separators=(",", ":")), reason, code,
                       int(entry.get("failures") or 0) + 1)
    waiting.remove(entry, token)
    logger.error("waiting callback parked in DLQ", extra={"call_id": entry["call_id"], "reason": reason, "code": code})
    metric("MessagesParked", queue=QUEUE)
