"""After a call (R-19): its recording into S3; then the write-back (postcall/write_back.py).

The recordings queue carries two jobs, both safe to repeat (`process` is its handler):
- `{"job": "recording", "call_id"}` (answered calls): fetch the MP3 from Beeline, by extTrackingId and
  the operator's userId, else through the `records` list. Files appear minutes after the call, so a
  missing file is `Transient` (the queue backs off: 30 s doubling) for RECORDING_WAIT after the call
  ended; after that the call is marked `recording_state="missing"` and the write-back goes ahead
  anyway. The file is stored privately (SSE AES256); its stable app link is derived from the call id
  where it is shown (core/links.py), not stored.
- `{"job": "writeback", "call_id"}`: the lead's call log to the CRM (write_back.write_back). Every finished
  call passes here (the recording job ends in it, unanswered calls start with it), so this job also hands
  the call to the `cdrs` queue when the company has the SalesRender PBX plugin registered (crm/cdr.py sends
  it; this module only queues: postcall never imports crm). Calls never placed (not_dialled) get no CDR.
"""

from __future__ import annotations

import datetime as dt

from functions.core import config, links, queues, resources, times
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, national_digits
from functions.core.queues import Poison, Transient
from functions.postcall import write_back
from functions.providers.beeline import client as beeline
from functions.providers.salesrender.company import company_id
from functions.records import calls, plugins

# Beeline publishes files minutes late: keep asking this long after the call ended.
RECORDING_WAIT = dt.timedelta(minutes=30)
# A Beeline outage (5xx, network) is not "no file": keep retrying longer, but give up before the
# queue's last delivery (about 2 h of backoff at the earliest) so the write-back is never parked.
OUTAGE_WAIT = dt.timedelta(minutes=90)
RECORDS_MATCH = dt.timedelta(minutes=2)  # a records-list entry with the call's phone this close counts
RECORDS_SEARCH_BEFORE = dt.timedelta(minutes=15)  # the record's date is the call's start, before the answer
RECORDS_SEARCH_AFTER = dt.timedelta(minutes=5)
RECORDS_MAX_PAGES = 10


def process(message: dict) -> None:
    """The recordings-queue handler (run through queues.run)."""
    call_id = message.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Poison("message has no call_id", code="malformed")
    job = message.get("job")
    if job == "recording":
        fetch_recording(call_id)
    elif job == "writeback":
        call = calls.get(call_id)  # read once for both steps (nothing of the call changes in between)
        if call is None:
            raise Poison(f"call {call_id} does not exist", code="unknown_call")
        # Before the write-back: a write-back that fails for good must not cost the CDR. The CDR job is sent
        # now, its flag rides on the write-back's own update of the call (one write, not two); a write-back
        # that fails flags it alone, so its retries do not send it again.
        flags = {"cdr_queued": times.now_iso()} if queue_cdr(call_id, call, flag=False) else {}
        try:
            write_back.write_back(call_id, call, also=flags)
        except BaseException:
            if flags:
                calls.flag_once(call_id, "cdr_queued")
            raise
    else:
        raise Poison(f"unknown job {job!r}", code="unknown_job")


def is_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync: anything else (a JSON error, an HTML page) is not a file."""
    return data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _find_record(client: beeline.BeelineClient, call: dict) -> dict | None:
    """The call's entry in the `records` list: the same extTrackingId, else the same phone with a date
    within RECORDS_MATCH of the answer (the closest one)."""
    answered = times.parse(call.get("answered_at")) or times.parse(call.get("ended_at"))
    ended = times.parse(call.get("ended_at")) or answered
    if answered is None:
        return None
    try:
        phone = national_digits(call["phone"]) if call.get("phone") else None
    except (InvalidPhone, ValueError):
        phone = None
    date_from = times.iso(answered - RECORDS_SEARCH_BEFORE, "milliseconds")
    date_to = times.iso(ended + RECORDS_SEARCH_AFTER, "milliseconds")
    best, best_gap, after = None, None, None
    for _ in range(RECORDS_MAX_PAGES):
        page = client.records(date_from, date_to, after_id=after)
        for record in page:
            if not isinstance(record, dict):
                continue
            if call.get("ext_tracking_id") and record.get("externalId") == call["ext_tracking_id"]:
                return record
            if phone and str(record.get("phone") or "")[-10:] == phone and isinstance(record.get("date"), int | float):
                gap = abs(record["date"] / 1000 - answered.timestamp())
                if gap <= RECORDS_MATCH.total_seconds() and (best_gap is None or gap < best_gap):
                    best, best_gap = record, gap
        if len(page) < 100:  # a full page (100) may have more after its last id
            break
        after = str(page[-1].get("id"))
    return best


def _download(call: dict, log: dict) -> tuple[bytes | None, bool]:
    """The call's MP3, or None when it is not there; and whether a failure looked like an outage."""
    client = beeline.default_client()
    outage = False
    ext = call.get("ext_tracking_id")
    user_id = call.get("target_id") or call.get("operator")
    if ext and user_id:
        try:
            audio = client.download_record(ext, user_id)
            if is_mp3(audio):
                return audio, False
            logger.info("recording download is not an MP3", extra={**log, "bytes": len(audio)})
        except beeline.BeelineError as exc:
            outage = outage or exc.transient
            logger.info("recording not downloadable yet", extra={**log, "code": exc.code})
    try:
        record = _find_record(client, call)
        if record is not None:
            audio = client.download_record_by_id(str(record["id"]))
            if is_mp3(audio):
                return audio, False
    except beeline.BeelineError as exc:
        outage = outage or exc.transient
        logger.info("records list fallback failed", extra={**log, "code": exc.code})
    return None, outage


def recording_key(call: dict, call_id: str) -> str:
    day = (times.parse(call.get("ended_at")) or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return f"recordings/{day:%Y/%m/%d}/lead-{call['lead_id']}/call-{call_id}.mp3"


def fetch_recording(call_id: str, now: dt.datetime | None = None) -> str:
    """The recording job; returns what happened. Raises Transient while the file is not ready."""
    now = now or dt.datetime.now(dt.UTC)
    call = calls.get(call_id)
    if call is None:
        raise Poison(f"call {call_id} does not exist", code="unknown_call")
    log = {"call_id": call_id, "lead_id": call.get("lead_id"), "ext_tracking_id": call.get("ext_tracking_id")}
    if call.get("state") != "ended":
        raise Transient(f"call {call_id} has not ended yet")  # a call only moves on to "ended"
    if call.get("outcome") != "answered":
        _queue_writeback(call_id, call)  # nothing was recorded, but the call log still gets the line
        return "not_answered"
    if call.get("recording_key") or call.get("recording_state") == "missing":
        _queue_writeback(call_id, call)  # a repeated job: the file is settled, make sure the write-back went
        return "already_settled"

    audio, outage = _download(call, log)
    if audio is None:
        ended = times.parse(call.get("ended_at")) or now
        waited = now - ended
        if waited < RECORDING_WAIT or (outage and waited < OUTAGE_WAIT):
            raise Transient(f"recording of call {call_id} not ready" + (" (Beeline unavailable)" if outage else ""))
        calls.update(call_id, recording_state="missing", recording_missing_at=times.now_iso())
        logger.warning("recording not found: giving up, writing back without it",
                       extra={**log, "waited_seconds": int(waited.total_seconds())})
        metric("RecordingsMissing")
        _queue_writeback(call_id, call)
        return "missing"

    key = recording_key(call, call_id)
    # Before the upload: a missing link secret fails before any write. The link is not stored (it is derived
    # where it is shown, links.stored_recording_link); recording_key is what says the file is there.
    links.recording_link(call_id)
    resources.client("s3").put_object(
        Bucket=resources.bucket_name(), Key=key, Body=audio, ContentType="audio/mpeg",
        ServerSideEncryption="AES256", StorageClass=storage_class(config.load().provider.retention_days),
        # Identifiers only: object metadata is readable by anyone who may list the bucket; no phone.
        Metadata={"lead_id": str(call["lead_id"]), "call_id": call_id, "offer_id": str(call.get("offer_id", ""))},
    )
    talk = int(call.get("talk_seconds") or 0)
    calls.update(call_id, recording_key=key, recording_state="stored",
                 recording_bytes=len(audio), recording_stored_at=times.now_iso(),
                 short_call=talk < write_back.SHORT_CALL_SECONDS)
    logger.info("recording stored", extra={**log, "key": key, "bytes": len(audio)})
    metric("RecordingsStored")
    _queue_writeback(call_id, call)
    return "stored"


def storage_class(retention_days: int) -> str:
    """Recordings are written once, kept the retention period and seldom played: Standard-IA costs about half
    of Standard per GB-month, but bills at least 30 days, so a shorter retention stays in Standard."""
    return "STANDARD_IA" if retention_days >= 30 else "STANDARD"


# What the write-back job leaves on the call: once one is there, the job has run, so it was queued.
# (`writeback_queued`: the flag calls stored before these marks stood in for it still carry.)
WRITEBACK_MARKS = ("writeback_queued", "written_back_at", "write_back_skipped", "cdr_queued")


def _queue_writeback(call_id: str, call: dict) -> None:
    # No flag of its own (a write of the whole call item, 2 WRU): the write-back job's marks say it ran. Until
    # then a repeated job sends it again, which is harmless (it rebuilds the same text); a crash after the
    # recording update and before this send is repaired by the job's retry (already_settled sends it).
    if any(call.get(mark) for mark in WRITEBACK_MARKS):
        return
    queues.send("recordings", {"job": "writeback", "call_id": call_id})


def queue_cdr(call_id: str, call: dict | None = None, *, flag: bool = True) -> bool:
    """Queue the call's CDR job once (sent, then flagged: a crash in between queues it twice, and the CDR
    worker sends a call's CDR once). True when this queued it. `call`: the call item if just read.
    `flag=False`: the caller writes `cdr_queued` itself, after this returns True (with its next update)."""
    call = call if call is not None else calls.get(call_id)
    if call is None or call.get("cdr_queued") or call.get("state") != "ended" or call.get("outcome") == "not_dialled":
        return False
    if not plugins.registered(company_id()):
        return False
    queues.send("cdrs", {"call_id": call_id, "attempt": 1, "first_at": times.now_iso()})
    if flag:
        calls.flag_once(call_id, "cdr_queued")
    return True
