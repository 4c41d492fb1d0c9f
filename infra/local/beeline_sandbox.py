"""A strict Beeline Cloud PBX ("Облачная АТС") portal API sandbox for the local stack (`make run`) and for tests.

It serves the slice of the portal API that callbridge uses (see /work/shared/providers/beeline.md) under
`/apis/portal/`: the directory (abonents, numbers, agent status, recording switch), click-to-call, event
subscriptions, call recordings and statistics. It is deliberately strict: every request needs the
`X-MPBX-API-AUTH-TOKEN` header, the call endpoint takes exactly 10 national digits (`+7...`, `7...`, `8...`
are rejected), subscription bodies are validated, dates must be ISO-8601 in UTC with `Z`, `//` in a path is
refused the way Spring's firewall refuses it, a trailing slash is a different (unknown) path, and the
originate answer is an empty 200 so that nothing can come to depend on an undocumented body.

Calls are simulated: each originate starts a thread that plays the click-to-call sequence of beeline.md and
posts BroadWorks Xsi-Events XML to the URL of every live subscription (one worker per subscription, so each
subscription receives its events in the order they were generated). Waits are multiplied by `time_scale`
(0.01 turns a 75 s conversation into 0.75 s); the epoch-millisecond timestamps inside events are simulated
time (the wall clock at accept plus the simulated durations), so durations computed from events are the
simulated ones. Subscription lifetimes count down in simulated time as well.

Inbound calls are simulated on request (`inbound()`, `POST /_sandbox/inbound`): a caller dials one of the
company numbers (`GET numbers`) and it rings an abonent. All events share one new extTrackingId and carry
personality Terminator, the caller as remoteParty and the dialled company number as the last
`redirections/redirection/party/address`: `CallReceivedEvent` (Alerting), then `CallAnsweredEvent` (Active) and
`CallReleasedEvent` (Released, with answerTime) when answered, or only `CallReleasedEvent` without answerTime
(`Request Timeout` after the no-answer ring time) when missed. They count as calls in flight, obey hold and
wait_idle, give statistics rows (INBOUND, RECIEVED/MISSED) and, when answered with recording on, an INBOUND record.

Outcomes per customer number: an explicit mapping (`set_outcome`, `POST /_sandbox/outcomes`) or, by
default, the last two digits: 01 busy, 02 no_answer, 03 operator_missed, 04 failed, anything else answered.

Control endpoints under `/_sandbox/` (no auth) let tests inspect calls, subscriptions, deliveries and
recordings, choose outcomes, place inbound calls (`POST /_sandbox/inbound`), inject faults (HTTP statuses,
delays), hold calls ringing, terminate a subscription early and reset everything. Phone numbers are never
written to the log in full.

Run: `python -m infra.local.beeline_sandbox --host 127.0.0.1 --port 8102 --token X --time-scale 1.0`.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import json
import math
import os
import random
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from infra.local.sandbox_http import (
    SandboxError,
    SandboxHandler,
    SandboxServer,
    allow_methods,
    json_object,
    serve_until_signalled,
)

DEFAULT_TOKEN = "sandbox-beeline-token"
API_PREFIX = "/apis/portal/"
TOKEN_HEADER = "X-MPBX-API-AUTH-TOKEN"
XSI_NS = "http://schema.broadsoft.com/xsi"
XSI1_NS = "http://www.w3.org/2001/XMLSchema-instance"
# The subscriber that owns the API token (envelope `userId`) and the group targeted by pattern-less subscriptions.
SUBSCRIBER_USER_ID = "admin_sandbox@mpbx.sip.beeline.ru"
GROUP_ID = "mpbx_group_sandbox@mpbx.sip.beeline.ru"
EXTERNAL_APPLICATION_ID = "portal"

DEFAULT_ABONENTS: list[dict[str, Any]] = [
    {"userId": "SIP0343PU049QK@ip.beeline.ru", "phone": "9001000200", "firstName": "Ольга",
     "lastName": "Оператор", "email": None, "department": "Sales", "extension": "200"},
    {"userId": "9215453939@vol.nw.ims.mnc099.mcc250.3gppnetwork.org", "phone": "9215453939",
     "firstName": "Иван", "lastName": "Петров", "email": "ivan.petrov@example.com", "department": "Sales",
     "extension": "201"},
    {"userId": "SIP0343PU07RT2@ip.beeline.ru", "phone": "9001000202", "firstName": "Мария", "lastName": None,
     "email": None, "department": None, "extension": "202"},
]
DEFAULT_NUMBERS: list[dict[str, Any]] = [
    {"numberId": "1001", "phone": "4951234567"},
    {"numberId": "1002", "phone": "4951234568"},
]
ABONENT_KEYS = ("userId", "phone", "firstName", "lastName", "email", "department", "extension")

OUTCOMES = ("answered", "busy", "no_answer", "operator_missed", "operator_rejected", "failed")
INBOUND_OUTCOMES = ("answered", "missed")
INBOUND_KEYS = {"from", "to", "extension", "outcome", "talk_seconds"}
OUTCOME_BY_LAST_TWO_DIGITS = {"01": "busy", "02": "no_answer", "03": "operator_missed", "04": "failed"}
AGENT_STATUSES = ("ONLINE", "OFFLINE", "BREAK")
SUBSCRIPTION_TYPES = ("BASIC_CALL", "ADVANCED_CALL")
# Names a fault's `operation` may take (None = any API request).
FAULT_OPERATIONS = ("call", "subscription", "subscription_get", "subscription_delete", "abonents", "numbers",
                    "agent", "recording", "records", "record_reference", "record_download", "record_delete",
                    "statistics")
ORIGINATE_BODIES = ("empty", "text")

# Simulated durations (seconds, multiplied by time_scale for the wall clock).
DEFAULT_TALK_SECONDS = 75.0
DEFAULT_RING_SECONDS = 5.0        # the operator's phone rings, then the customer's phone rings, this long each
DEFAULT_NO_ANSWER_SECONDS = 30.0  # how long a phone rings before the PBX gives up
BUSY_SECONDS = 2.0                # from dialling the customer to the busy signal
REJECT_SECONDS = 3.0              # the operator declines the click-to-dial ring
FAILURE_SECONDS = 1.0             # the PBX fails to set up the operator leg

DELIVERY_TIMEOUT = 5.0
REFERENCE_TTL_SECONDS = 3600.0    # real seconds a records/{id}/reference link stays valid
MAX_RECORDS_PAGE = 100
MAX_STATISTICS_PAGE_SIZE = 100
MAX_BODY_BYTES = 1 << 20
MAX_DELIVERY_LOG = 2000
MP3_MAX_SECONDS = 10.0            # recordings are silent MP3s of at most this length (metadata keeps the real duration)

ISO_Z_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z")
TEN_DIGITS_RE = re.compile(r"\d{10}")
LONG_DIGITS_RE = re.compile(r"\+?\d{10,11}")
NGINX_503 = (b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
             b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n"
             b"</body>\r\n</html>\r\n")


class ApiError(Exception):
    """A portal API error: answered as `{"errorCode", "description"}` with `status`."""

    def __init__(self, status: int, code: str, description: str):
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description


def mask_phone(value: str) -> str:
    """`9991112233` / `+79991112233` -> `+7 999 ***-**-33`; anything else -> `***`."""
    digits = re.sub(r"\D", "", value or "")
    if len(digits) == 11 and digits[0] in "78":
        digits = digits[1:]
    if len(digits) != 10:
        return "***"
    return f"+7 {digits[:3]} ***-**-{digits[-2:]}"


def _mask_text(text: str) -> str:
    return LONG_DIGITS_RE.sub(lambda m: mask_phone(m.group()), text)


def _log(message: str) -> None:
    sys.stderr.write(f"beeline sandbox: {message}\n")
    sys.stderr.flush()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _now_ms() -> int:
    return int(time.time() * 1000)


def silent_mp3(seconds: float) -> bytes:
    """A valid MP3 of silence: MPEG-1 Layer III frames, 32 kbit/s, 48 kHz, mono, no CRC.

    At 32 kbit/s and 48 kHz every frame is exactly 144 * 32000 / 48000 = 96 bytes (no padding) and holds
    1152 samples (24 ms). The 17-byte side information and the main data are all zero: no Huffman data,
    global gain 0, i.e. silence that any decoder accepts.
    """
    header = bytes((0xFF, 0xFB, 0x14, 0xC0))  # sync, MPEG-1, Layer III, no CRC | 32 kbit/s, 48 kHz | mono
    frames = max(1, round(min(max(seconds, 0.0), MP3_MAX_SECONDS) / 0.024))
    return (header + bytes(92)) * frames


def _parse_iso_z(value: str, name: str) -> int:
    """`2026-05-28T00:00:00.000Z` -> epoch ms. Anything but UTC with `Z` is a BadRequest."""
    if not ISO_Z_RE.fullmatch(value):
        raise ApiError(400, "BadRequest", f"{name} must be ISO-8601 UTC like 2026-05-28T00:00:00.000Z")
    main, _, fraction = value[:-1].partition(".")
    try:
        moment = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise ApiError(400, "BadRequest", f"{name} is not a valid date") from None
    return int(moment.timestamp()) * 1000 + int((fraction + "000")[:3])


def _single(query: Mapping[str, list[str]], name: str, *, required: bool = False) -> str | None:
    values = query.get(name) or []
    if len(values) > 1:
        raise ApiError(400, "BadRequest", f"parameter {name} is given more than once")
    value = values[0] if values else None
    if required and not value:
        raise ApiError(400, "BadRequest", f"Required parameter '{name}' is not present")
    return value or None


def _int_param(query: Mapping[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    raw = _single(query, name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,9}", raw):
        raise ApiError(400, "BadRequest", f"{name} must be a non-negative integer")
    value = int(raw)
    if not low <= value <= high:
        raise ApiError(400, "BadRequest", f"{name} must be between {low} and {high}")
    return value


def _json_body(headers: Mapping[str, str], body: bytes) -> Any:
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "UnsupportedMediaType", "Content-Type must be application/json")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "BadRequest", "Request body is not valid JSON") from None


def _validate_fault(count: Any = 1, status: Any = None, delay_seconds: Any = None, operation: Any = None,
                    proceed: Any = None) -> dict[str, Any]:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    if status is None and delay_seconds is None:
        raise ValueError("a fault needs status or delay_seconds")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599):
        raise ValueError("status must be an HTTP error status (400-599)")
    if delay_seconds is not None and (isinstance(delay_seconds, bool) or not isinstance(delay_seconds, int | float)
                                      or delay_seconds < 0):
        raise ValueError("delay_seconds must be a non-negative number")
    if operation is not None and operation not in FAULT_OPERATIONS:
        raise ValueError(f"operation must be one of {', '.join(FAULT_OPERATIONS)}")
    if proceed is not None and not isinstance(proceed, bool):
        raise ValueError("proceed must be a boolean")
    fault: dict[str, Any] = {"count": count}
    for key, value in (("status", status), ("delay_seconds", delay_seconds), ("operation", operation)):
        if value is not None:
            fault[key] = value
    # With a status the request is not carried out unless `proceed` says so (a 500 after the PBX took the call);
    # a pure delay always carries the request out and answers late (the call rings although the client timed out).
    fault["proceed"] = proceed if proceed is not None else status is None
    return fault


def _validate_outcome(phone: Any, outcome: Any, talk_seconds: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(phone, str) or not TEN_DIGITS_RE.fullmatch(phone):
        raise ValueError("phone must be 10 national digits")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if talk_seconds is not None and (isinstance(talk_seconds, bool) or not isinstance(talk_seconds, int | float)
                                     or talk_seconds <= 0):
        raise ValueError("talk_seconds must be a positive number")
    entry: dict[str, Any] = {"outcome": outcome}
    if talk_seconds is not None:
        entry["talk_seconds"] = float(talk_seconds)
    return phone, entry


class _Response:
    __slots__ = ("body", "close", "content_type", "status")

    def __init__(self, status: int, body: Any = None, *, raw: bytes | None = None,
                 content_type: str | None = "application/json;charset=UTF-8", close: bool = False):
        self.status = status
        if raw is not None:
            self.body = raw
        elif body is None:
            self.body, content_type = b"", None
        else:
            self.body = json.dumps(body, ensure_ascii=False).encode()
        self.content_type = content_type
        self.close = close


def _error(status: int, code: str, description: str) -> _Response:
    return _Response(status, {"errorCode": code, "description": description})


def _party_xml(party: Mapping[str, Any]) -> str:
    parts = []
    for key in ("name", "address", "userId", "userDN", "callType"):
        if party.get(key):
            parts.append(f"<xsi:{key}>{escape(str(party[key]))}</xsi:{key}>")
    return f"<xsi:remoteParty>{''.join(parts)}</xsi:remoteParty>"


def _call_xml(call: Mapping[str, Any], *, personality: str, state: str, remote: Mapping[str, Any],
              start_ms: int, answer_ms: int | None = None, release_ms: int | None = None,
              releasing_party: str | None = None, internal_cause: str | None = None, cdr_cause: str | None = None,
              recording_state: str | None = None) -> str:
    redirections: list[str] = call.get("redirections") or []
    out = [
        "<xsi:call>",
        f"<xsi:callId>{escape(call['call_id'])}</xsi:callId>",
        f"<xsi:extTrackingId>{escape(call['ext_tracking_id'])}</xsi:extTrackingId>",
        f"<xsi:networkCallId>{escape(call['network_call_id'])}</xsi:networkCallId>",
        f"<xsi:personality>{personality}</xsi:personality>",
        f"<xsi:state>{state}</xsi:state>",
    ]
    if releasing_party:
        out.append(f"<xsi:releasingParty>{releasing_party}</xsi:releasingParty>")
    if internal_cause or cdr_cause:
        out.append("<xsi:releaseCause>")
        if internal_cause:
            out.append(f"<xsi:internalReleaseCause>{escape(internal_cause)}</xsi:internalReleaseCause>")
        if cdr_cause:
            out.append(f"<xsi:cdrTerminationCause>{escape(cdr_cause)}</xsi:cdrTerminationCause>")
        out.append("</xsi:releaseCause>")
    out.append(_party_xml(remote))
    out.append('<xsi:endpoint xsi1:type="xsi:AccessEndpoint">'
               f"<xsi:addressOfRecord>{escape(call['abonent_user_id'])}</xsi:addressOfRecord></xsi:endpoint>")
    out.append("<xsi:appearance>1</xsi:appearance>")
    out.append(f"<xsi:startTime>{start_ms}</xsi:startTime>")
    if answer_ms is not None:
        out.append(f"<xsi:answerTime>{answer_ms}</xsi:answerTime>")
    if release_ms is not None:
        out.append(f"<xsi:releaseTime>{release_ms}</xsi:releaseTime>")
    if redirections:  # inbound calls: the last redirection's party is the company number dialled
        out.append("<xsi:redirections>")
        for address in redirections:
            out.append(f"<xsi:redirection><xsi:party><xsi:address>{escape(address)}</xsi:address></xsi:party>"
                       "</xsi:redirection>")
        out.append("</xsi:redirections>")
    if recording_state:
        out.append(f"<xsi:recordingState>{recording_state}</xsi:recordingState>")
    out.append("</xsi:call>")
    return "".join(out)


def event_document(*, event_id: str, sequence: int, subscription_id: str, url: str, target_id: str,
                   event_type: str, event_data: str = "") -> bytes:
    """One Xsi-Events document exactly as beeline.md shows it (prefix `xsi`, type attribute prefix `xsi1`)."""
    data = (f'<xsi:eventData xsi1:type="xsi:{event_type}">{event_data}</xsi:eventData>' if event_data
            else f'<xsi:eventData xsi1:type="xsi:{event_type}"/>')
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<xsi:Event xmlns:xsi="{XSI_NS}" xmlns:xsi1="{XSI1_NS}" xsi1:type="xsi:SubscriptionEvent">'
        f"<xsi:eventID>{event_id}</xsi:eventID>"
        f"<xsi:sequenceNumber>{sequence}</xsi:sequenceNumber>"
        f"<xsi:userId>{escape(SUBSCRIBER_USER_ID)}</xsi:userId>"
        f"<xsi:externalApplicationId>{EXTERNAL_APPLICATION_ID}</xsi:externalApplicationId>"
        f"<xsi:subscriptionId>{escape(subscription_id)}</xsi:subscriptionId>"
        f"<xsi:httpContact><xsi:uri>{escape(url)}</xsi:uri></xsi:httpContact>"
        f"<xsi:targetId>{escape(target_id)}</xsi:targetId>"
        f"{data}"
        "</xsi:Event>"
    ).encode()


def _masked_url(url: str) -> str:
    """The webhook URL without its path: the path holds the secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…"


class _SimClock:
    """Simulated epoch-ms time of one call: `wait()` sleeps the scaled wall time, then moves `now` on."""

    __slots__ = ("_generation", "_sandbox", "now")

    def __init__(self, sandbox: BeelineSandbox, generation: int, now: int):
        self._sandbox = sandbox
        self._generation = generation
        self.now = now

    def wait(self, seconds: float) -> bool:
        """False (and `now` unchanged) when the sandbox was reset or stopped meanwhile."""
        if not self._sandbox._sleep(self._generation, seconds):
            return False
        self.now += round(seconds * 1000)
        return True


class BeelineSandbox(SandboxServer):
    """In-memory Beeline Cloud PBX served over HTTP. Use `start()`/`stop()` or `with BeelineSandbox() as pbx`."""

    fault_keys = frozenset({"count", "status", "delay_seconds", "operation", "proceed"})
    fault_methods = ("GET", "POST", "DELETE")
    json_response = _Response
    unquote_control_path = True  # abonent patterns such as userIds (with "@") come percent-encoded

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = DEFAULT_TOKEN, time_scale: float = 1.0,
                 max_expires: int = 86400, originate_body: str = "empty", recording_delay_seconds: float = 0.0,
                 verbose: bool = False, *, abonents: list[dict[str, Any]] | None = None,
                 numbers: list[dict[str, Any]] | None = None, talk_seconds: float = DEFAULT_TALK_SECONDS,
                 ring_seconds: float = DEFAULT_RING_SECONDS, no_answer_seconds: float = DEFAULT_NO_ANSWER_SECONDS,
                 noise_events: bool = False, talk_range: tuple[float, float] | None = None, extra_abonents: int = 0):
        if isinstance(time_scale, bool) or not isinstance(time_scale, int | float) or not time_scale > 0:
            raise ValueError("time_scale must be a positive number")
        if isinstance(max_expires, bool) or not isinstance(max_expires, int) or max_expires < 1:
            raise ValueError("max_expires must be a positive integer")
        if originate_body not in ORIGINATE_BODIES:
            raise ValueError(f"originate_body must be one of {ORIGINATE_BODIES}")
        if recording_delay_seconds < 0 or talk_seconds <= 0 or ring_seconds < 0 or no_answer_seconds <= 0:
            raise ValueError("durations must not be negative")
        super().__init__(host, port, handler=_Handler, thread_name="beeline-sandbox")
        self.token = token
        self.time_scale = float(time_scale)
        self.max_expires = max_expires
        self.originate_body = originate_body
        self.recording_delay_seconds = float(recording_delay_seconds)
        self.verbose = verbose
        self.talk_seconds = float(talk_seconds)
        self.ring_seconds = float(ring_seconds)
        self.no_answer_seconds = float(no_answer_seconds)
        self.noise_events = noise_events
        # The bench: talk times drawn per call from [low, high] simulated seconds (1-3 minutes), and more
        # operators than the three default abonents (extensions 300, 301, ...).
        if talk_range is not None and not 0 < talk_range[0] <= talk_range[1]:
            raise ValueError("talk_range must be 0 < low <= high")
        self.talk_range = talk_range
        self._seed_abonents = [{k: a.get(k) for k in ABONENT_KEYS}
                               for a in (abonents if abonents is not None else DEFAULT_ABONENTS)]
        self._seed_abonents += [{"userId": f"SIPBENCH{i:04d}@ip.beeline.ru", "phone": f"90020{i:05d}",
                                 "firstName": f"Оператор {300 + i}", "lastName": None, "email": None,
                                 "department": "Bench", "extension": str(300 + i)} for i in range(extra_abonents)]
        for a in self._seed_abonents:
            if not a["userId"]:
                raise ValueError("every abonent needs a userId")
        self._numbers = [dict(n) for n in (numbers if numbers is not None else DEFAULT_NUMBERS)]
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._stopping = False
        self._generation = 0
        self._worker_subs: set[str] = set()  # ids of subscriptions whose delivery worker still runs
        self._all_subs: dict[str, dict[str, Any]] = {}  # every subscription with a worker, live or not
        self._init_state()

    def _init_state(self) -> None:
        self._abonents: list[dict[str, Any]] = [dict(a) for a in self._seed_abonents]
        self._agent: dict[str, str] = {a["userId"]: "ONLINE" for a in self._abonents}
        self._recording: dict[str, bool] = {a["userId"]: True for a in self._abonents}
        self._calls: list[dict[str, Any]] = []
        self._in_flight: set[str] = set()
        self._originates = 0
        self._max_in_flight = 0
        self._api_requests: dict[str, int] = {}  # portal API requests by operation (the bench's provider count)
        self._next_tracking = random.randint(40_000_000, 49_999_999)
        self._next_call_half = random.randint(700_000_000, 799_999_999)
        self._subs: dict[str, dict[str, Any]] = {}
        self._records: dict[str, dict[str, Any]] = {}
        self._next_record_id = 1_000_001
        self._references: dict[str, tuple[str, float]] = {}
        self._outcomes: dict[str, dict[str, Any]] = {}
        self._faults: list[dict[str, Any]] = []
        self._api_log: deque[dict[str, Any]] = deque(maxlen=MAX_DELIVERY_LOG * 5)  # api_requests(): each request
        self._hold = False
        self._deliveries: deque[dict[str, Any]] = deque(maxlen=MAX_DELIVERY_LOG)

    # ---- lifecycle: start()/stop()/port/base_url come from SandboxServer -------------------------------

    def _before_start(self) -> None:
        self._stopping = False

    def _before_shutdown(self) -> None:
        with self._cv:  # end every simulated call and delivery worker before the server goes away
            self._stopping = True
            self._generation += 1
            self._in_flight.clear()
            self._cv.notify_all()

    @property
    def api_url(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    # ---- Python control API ----------------------------------------------------------------------------

    def calls(self) -> list[dict[str, Any]]:
        """The calls log, oldest first: direction, pattern, abonent, phone, accepted_at, outcome, state, events, ..."""
        with self._lock:
            return [{k: copy.deepcopy(v) for k, v in c.items() if not k.startswith("_")} for c in self._calls]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"originates": self._originates, "max_in_flight": self._max_in_flight,
                    "in_flight": len(self._in_flight), "api_requests": dict(self._api_requests)}

    def set_outcome(self, phone10: str, outcome: str, talk_seconds: float | None = None) -> dict[str, Any]:
        """Decide what happens when `phone10` is called (overrides the last-two-digits rule)."""
        phone, entry = _validate_outcome(phone10, outcome, talk_seconds)
        with self._lock:
            self._outcomes[phone] = entry
            return dict(entry)

    def outcomes(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._outcomes)

    def outcome_for(self, phone10: str) -> tuple[str, float]:
        """(outcome, talk seconds) for a customer number: the mapping, else the last two digits, else answered."""
        with self._lock:
            entry = self._outcomes.get(phone10)
        talk = random.uniform(*self.talk_range) if self.talk_range else self.talk_seconds
        if entry is not None:
            return entry["outcome"], entry.get("talk_seconds", talk)
        return OUTCOME_BY_LAST_TWO_DIGITS.get(phone10[-2:], "answered"), talk

    def inbound(self, caller_phone10: str, number10: str, extension: str = "200", outcome: str = "answered",
                talk_seconds: float | None = None) -> dict[str, Any]:
        """Simulate a customer (`caller_phone10`) dialling the company number `number10`, ringing `extension`.

        `outcome`: "answered" (rings `ring_seconds`, talk `talk_seconds` or the default, the caller hangs up) or
        "missed" (rings `no_answer_seconds`, then the PBX gives up). Returns the call view (with ext_tracking_id).
        Raises ValueError for numbers that are not 10 digits, a number that is not the company's, an unknown
        abonent, an unknown outcome or a bad talk_seconds."""
        for name, value in (("from", caller_phone10), ("to", number10)):
            if not isinstance(value, str) or not TEN_DIGITS_RE.fullmatch(value):
                raise ValueError(f"{name} must be 10 national digits")
        if outcome not in INBOUND_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(INBOUND_OUTCOMES)}")
        if talk_seconds is not None:
            if isinstance(talk_seconds, bool) or not isinstance(talk_seconds, int | float) or talk_seconds <= 0:
                raise ValueError("talk_seconds must be a positive number")
            if outcome != "answered":
                raise ValueError("talk_seconds only applies to answered calls")
        if not isinstance(extension, str) or not extension:
            raise ValueError("extension must be an abonent's extension")
        with self._cv:
            if number10 not in {n.get("phone") for n in self._numbers}:
                raise ValueError("to must be one of the company numbers (GET numbers)")
            abonent = self._find_abonent(extension)
            if abonent is None:
                raise ValueError(f"abonent {_mask_text(extension)} not found")
            talk = float(talk_seconds) if talk_seconds is not None else self.talk_seconds
            call, generation = self._register_call(
                abonent, extension, caller_phone10, outcome, talk if outcome == "answered" else None,
                direction="INBOUND", number=number10, redirections=[f"tel:+7{number10}"])
            view = {k: copy.deepcopy(v) for k, v in call.items() if not k.startswith("_")}
        if self.verbose:
            _log(f"inbound {mask_phone(caller_phone10)} -> {mask_phone(number10)} ext {abonent['extension']}: "
                 f"{call['ext_tracking_id']} ({outcome})")
        threading.Thread(target=self._simulate, args=(call, generation),
                         name=f"beeline-call-{call['ext_tracking_id']}", daemon=True).start()
        return view

    def add_fault(self, count: int = 1, *, status: int | None = None, delay_seconds: float | None = None,
                  operation: str | None = None, proceed: bool | None = None) -> dict[str, Any]:
        """Queue a fault for the next `count` authorised API requests (optionally only `operation` ones).

        `status`: answer that HTTP status (503 gets nginx's HTML page, others an errorCode body) without carrying
        the request out, unless `proceed=True` (e.g. a 500 after the PBX took the call). `delay_seconds`: sleep
        (real seconds, not scaled) before answering; with a delay alone the request is carried out first."""
        fault = _validate_fault(count, status, delay_seconds, operation, proceed)
        with self._lock:
            self._faults.append(fault)
        return dict(fault)

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def subscriptions(self) -> list[dict[str, Any]]:
        """Live (unexpired) subscriptions with the seconds left and how many events each was sent."""
        with self._lock:
            return [self._subscription_view(s, control=True) for s in self._live_subscriptions()]

    def terminate_subscription(self, subscription_id: str) -> dict[str, Any]:
        """End a subscription early as Beeline does: post `SubscriptionTerminatedEvent` to it, then drop it."""
        with self._cv:
            sub = self._subs.get(subscription_id)
            if sub is None or self._expired(sub):
                raise SandboxError(404, f"subscription {subscription_id} not found")
            self._enqueue(sub, "SubscriptionTerminatedEvent", str(uuid.uuid4()), sub["target_id"], "", force=True)
            self._drop_subscription(sub)
            return self._subscription_view(sub, control=True)

    def set_agent_status(self, pattern: str, status: str) -> str:
        if status not in AGENT_STATUSES:
            raise ValueError(f"status must be one of {', '.join(AGENT_STATUSES)}")
        with self._lock:
            abonent = self._find_abonent(pattern)
            if abonent is None:
                raise SandboxError(404, f"abonent {_mask_text(pattern)} not found")
            self._agent[abonent["userId"]] = status
            return status

    def agent_status(self, pattern: str) -> str:
        with self._lock:
            abonent = self._find_abonent(pattern)
            if abonent is None:
                raise SandboxError(404, f"abonent {_mask_text(pattern)} not found")
            return self._agent[abonent["userId"]]

    def set_recording(self, pattern: str, on: bool) -> None:
        with self._lock:
            abonent = self._find_abonent(pattern)
            if abonent is None:
                raise SandboxError(404, f"abonent {_mask_text(pattern)} not found")
            self._recording[abonent["userId"]] = bool(on)

    def records(self, *, include_pending: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            return [{**self._record_view(r), "available": now >= r["_available_at"]}
                    for r in self._records.values() if include_pending or now >= r["_available_at"]]

    def api_requests(self, operation: str | None = None) -> list[dict[str, Any]]:
        """Authorised API requests as they arrived, oldest first: method, operation (FAULT_OPERATIONS' names)
        and abonent pattern; never the query (it carries phone numbers). `operation` filters."""
        with self._lock:
            return [dict(r) for r in self._api_log if operation is None or r["operation"] == operation]

    def deliveries(self) -> list[dict[str, Any]]:
        """Delivery attempts, oldest first: subscription, event, HTTP status or error (no URL: it holds a secret)."""
        with self._lock:
            return copy.deepcopy(list(self._deliveries))

    def hold(self, on: bool = True) -> None:
        """While on, calls stay ringing on the operator leg (in flight, not released) until hold is turned off."""
        with self._cv:
            self._hold = bool(on)
            self._cv.notify_all()

    def reset(self) -> None:
        """Forget calls, subscriptions, recordings, outcomes and faults; calls in progress stop without events."""
        with self._cv:
            self._generation += 1
            for sub in self._all_subs.values():
                sub["live"] = False
                sub["queue"].clear()
            self._init_state()
            self._cv.notify_all()

    def state(self) -> dict[str, Any]:
        """What `make run` keeps across restarts: calls, recordings (their audio is made again from the duration),
        live subscriptions, outcomes, agent and recording switches, and the id counters. A call still in
        progress is kept as far as it got; faults, hold and the delivery log are per run."""
        def public(item: Mapping[str, Any]) -> dict[str, Any]:
            return {k: copy.deepcopy(v) for k, v in item.items() if not k.startswith("_")}

        now = time.monotonic()
        with self._lock:
            subs = [{**{k: sub[k] for k in ("id", "url", "type", "pattern", "target_type", "target_id",
                                             "requested", "granted", "created_at", "sequence")},
                     "seconds_left": self._seconds_left(sub)} for sub in self._live_subscriptions()]
            return {
                "calls": [public(c) for c in self._calls],
                "records": [{**public(r), "available_in": max(0.0, r["_available_at"] - now)}
                            for r in self._records.values()],
                "references": {key: [record_id, max(0.0, until - now)]
                               for key, (record_id, until) in self._references.items() if until > now},
                "subscriptions": subs, "outcomes": copy.deepcopy(self._outcomes), "agent": dict(self._agent),
                "recording": dict(self._recording), "originates": self._originates,
                "max_in_flight": self._max_in_flight, "next_tracking": self._next_tracking,
                "next_call_half": self._next_call_half, "next_record_id": self._next_record_id,
            }

    def load_state(self, state: Mapping[str, Any]) -> None:
        now = time.monotonic()
        with self._cv:
            self._init_state()
            for call in state["calls"]:
                abonent = self._abonent_by_user_id(call["abonent_user_id"]) or {"userId": call["abonent_user_id"]}
                self._calls.append({**copy.deepcopy(call), "_abonent": abonent})
            for record in state["records"]:
                record = copy.deepcopy(record)
                available_in = record.pop("available_in", 0.0)
                record.pop("available", None)
                self._records[record["id"]] = {**record, "_audio": silent_mp3(record["duration"] / 1000),
                                               "_available_at": now + available_in}
            self._references = {key: (record_id, now + left) for key, (record_id, left) in state["references"].items()}
            for sub in state["subscriptions"]:
                sub = dict(sub)
                left = sub.pop("seconds_left")
                self._subs[sub["id"]] = {**sub, "created_mono": now - (sub["granted"] - left) * self.time_scale,
                                         "queue": deque(), "busy": False, "live": True}
            self._outcomes = copy.deepcopy(state["outcomes"])
            self._agent.update(state["agent"])
            self._recording.update(state["recording"])
            self._originates = state["originates"]
            self._max_in_flight = state["max_in_flight"]
            self._next_tracking = state["next_tracking"]
            self._next_call_half = state["next_call_half"]
            self._next_record_id = state["next_record_id"]

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no simulated call is in progress and every queued event has been posted. True if idle."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._idle():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    def _idle(self) -> bool:
        if self._in_flight:
            return False
        return not any(s["queue"] or s["busy"] for s in self._all_subs.values() if s["id"] in self._worker_subs)

    # ---- state helpers (call with the lock held) -------------------------------------------------------

    def _find_abonent(self, pattern: str) -> dict[str, Any] | None:
        for abonent in self._abonents:
            if pattern in (abonent["userId"], abonent["extension"], abonent["phone"]):
                return abonent
        return None

    def _abonent_by_user_id(self, user_id: str) -> dict[str, Any] | None:
        return next((a for a in self._abonents if a["userId"] == user_id), None)

    def _seconds_left(self, sub: Mapping[str, Any]) -> float:
        return sub["granted"] - (time.monotonic() - sub["created_mono"]) / self.time_scale

    def _expired(self, sub: Mapping[str, Any]) -> bool:
        return self._seconds_left(sub) <= 0

    def _live_subscriptions(self) -> list[dict[str, Any]]:
        for sub in list(self._subs.values()):
            if self._expired(sub):
                self._drop_subscription(sub)  # expiry sends nothing: clients must renew before it
        return list(self._subs.values())

    def _drop_subscription(self, sub: dict[str, Any]) -> None:
        sub["live"] = False
        self._subs.pop(sub["id"], None)
        self._cv.notify_all()

    def _subscription_view(self, sub: Mapping[str, Any], *, control: bool = False) -> dict[str, Any]:
        view = {"subscriptionId": sub["id"], "targetType": sub["target_type"], "targetId": sub["target_id"],
                "subscriptionType": sub["type"], "expires": max(0, math.ceil(self._seconds_left(sub))),
                "url": sub["url"]}
        if control:
            view.update(pattern=sub["pattern"], granted=sub["granted"], requested=sub["requested"],
                        live=sub["live"] and not self._expired(sub), events_sent=sub["sequence"],
                        queued=len(sub["queue"]))
        return view

    def _record_view(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in record.items() if not k.startswith("_")}

    def _public_abonent(self, abonent: Mapping[str, Any]) -> dict[str, Any]:
        return {k: abonent.get(k) for k in ABONENT_KEYS}

    def _take_fault(self, operation: str) -> dict[str, Any] | None:
        with self._lock:
            for fault in self._faults:
                if fault.get("operation") in (None, operation):
                    fault["count"] -= 1
                    if fault["count"] <= 0:
                        self._faults.remove(fault)
                    return dict(fault)
        return None

    # ---- event delivery --------------------------------------------------------------------------------

    def _emit(self, call: dict[str, Any], event_type: str, event_data: str, *, advanced_only: bool = False,
              **summary: Any) -> None:
        """Queue one event for every live subscription that covers the call's abonent (lock held)."""
        event_id = str(uuid.uuid4())
        targeted = 0
        for sub in self._live_subscriptions():
            if sub["target_type"] == "ABONENT" and sub["target_id"] != call["abonent_user_id"]:
                continue
            if advanced_only and sub["type"] != "ADVANCED_CALL":
                continue
            self._enqueue(sub, event_type, event_id, call["abonent_user_id"], event_data)
            targeted += 1
        call["events"].append({"type": event_type, "event_id": event_id, "subscriptions": targeted, **summary})

    def _enqueue(self, sub: dict[str, Any], event_type: str, event_id: str, target_id: str, event_data: str,
                 *, force: bool = False) -> None:
        sub["sequence"] += 1
        document = event_document(event_id=event_id, sequence=sub["sequence"], subscription_id=sub["id"],
                                  url=sub["url"], target_id=target_id, event_type=event_type, event_data=event_data)
        sub["queue"].append({"event_id": event_id, "type": event_type, "document": document, "force": force,
                             "sequence": sub["sequence"]})
        if sub["id"] not in self._worker_subs and not self._stopping:
            self._worker_subs.add(sub["id"])
            self._all_subs[sub["id"]] = sub
            threading.Thread(target=self._deliver_loop, args=(sub,), name=f"beeline-deliver-{sub['id'][:8]}",
                             daemon=True).start()
        self._cv.notify_all()

    def _deliver_loop(self, sub: dict[str, Any]) -> None:
        """One worker per subscription: posts its queue in order, one event at a time, until it ends."""
        while True:
            with self._cv:
                while not sub["queue"] and sub["live"] and not self._stopping:
                    if self._expired(sub):
                        self._drop_subscription(sub)
                        break
                    self._cv.wait(0.5)
                if self._stopping or not sub["queue"]:
                    # Decide to exit and deregister under one lock hold, so _enqueue never counts on a leaving worker.
                    sub["queue"].clear()
                    self._worker_subs.discard(sub["id"])
                    self._all_subs.pop(sub["id"], None)
                    self._cv.notify_all()
                    return
                item = sub["queue"].popleft()
                deliverable = item["force"] or (sub["live"] and not self._expired(sub))
                sub["busy"] = True
            try:
                if deliverable:
                    self._post(sub, item)
                else:
                    self._record_delivery(sub, item, error="dropped: subscription ended")
            except Exception as exc:  # never let one bad delivery end the worker with events queued
                _log(f"delivery of {item['type']} failed: {type(exc).__name__}")
            finally:
                with self._cv:
                    sub["busy"] = False
                    self._cv.notify_all()

    def _post(self, sub: Mapping[str, Any], item: Mapping[str, Any]) -> None:
        request = urllib.request.Request(sub["url"], data=item["document"], method="POST",
                                         headers={"Content-Type": "application/xml; charset=UTF-8",
                                                  "User-Agent": "BroadWorks-Xsi-Events"})
        # No proxies: the receiver is whatever URL the client subscribed, usually on this machine.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=DELIVERY_TIMEOUT) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:
            self._record_delivery(sub, item, error=type(exc).__name__)
            _log(f"delivery of {item['type']} to {_masked_url(sub['url'])} failed: {type(exc).__name__}")
            return
        self._record_delivery(sub, item, status=status)
        if not 200 <= status < 300:
            _log(f"delivery of {item['type']} to {_masked_url(sub['url'])} answered HTTP {status}")
        elif self.verbose:
            _log(f"delivered {item['type']} #{item['sequence']} to {_masked_url(sub['url'])}")

    def _record_delivery(self, sub: Mapping[str, Any], item: Mapping[str, Any], *, status: int | None = None,
                         error: str | None = None) -> None:
        with self._lock:
            self._deliveries.append({"at": _now_iso(), "subscription_id": sub["id"], "event_id": item["event_id"],
                                     "type": item["type"], "sequence": item["sequence"], "status": status,
                                     "error": error})

    # ---- call simulation -------------------------------------------------------------------------------

    def _cancelled(self, generation: int) -> bool:
        return self._stopping or generation != self._generation

    def _sleep(self, generation: int, simulated_seconds: float) -> bool:
        """Wait `simulated_seconds * time_scale` of wall time; False when the sandbox was reset or stopped."""
        deadline = time.monotonic() + simulated_seconds * self.time_scale
        with self._cv:
            while not self._cancelled(generation):
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                self._cv.wait(left)
        return False

    def _wait_hold(self, generation: int) -> float | None:
        """Real seconds spent held (0 when not held); None when cancelled."""
        started = time.monotonic()
        with self._cv:
            if not self._hold:
                return None if self._cancelled(generation) else 0.0
            while self._hold and not self._cancelled(generation):
                self._cv.wait(0.5)
            if self._cancelled(generation):
                return None
        return time.monotonic() - started

    def _simulate(self, call: dict[str, Any], generation: int) -> None:
        try:
            if call["direction"] == "INBOUND":
                self._play_inbound(call, generation)
            else:
                self._play(call, generation)
        except Exception as exc:  # a bug here must not kill the server quietly
            _log(f"call simulation failed: {type(exc).__name__}: {exc}")
        finally:
            with self._cv:
                if generation == self._generation:
                    self._in_flight.discard(call["ext_tracking_id"])
                self._cv.notify_all()

    def _step(self, call: dict[str, Any], generation: int, event_type: str, *, personality: str, state: str,
              remote: Mapping[str, Any], at_ms: int, call_state: str, advanced_only: bool = False,
              **fields: Any) -> bool:
        with self._cv:
            if self._cancelled(generation):
                return False
            data = _call_xml(call, personality=personality, state=state, remote=remote, **fields)
            self._emit(call, event_type, data, advanced_only=advanced_only, personality=personality, state=state,
                       at_ms=at_ms)
            call["state"] = call_state
            return True

    def _play(self, call: dict[str, Any], generation: int) -> None:
        abonent = call["_abonent"]
        outcome = call["outcome"]
        start = call["start_time"]
        # The click-to-dial call half belongs to the operator: one callId whose personality turns from
        # Click-to-Dial (the operator's phone rings) into Originator (the customer is dialled) once the operator
        # answers. The operator leg is reported as CallOriginatedEvent: the PBX originates it on the API's behalf
        # (BroadWorks reports click-to-dial this way; inbound ringing would be CallReceivedEvent/Terminator).
        own_number = f"tel:+7{abonent['phone']}" if abonent.get("phone") else f"sip:{abonent['userId']}"
        name = " ".join(p for p in (abonent.get("firstName"), abonent.get("lastName")) if p) or None
        operator_party = {"name": name, "address": own_number, "userId": abonent["userId"],
                          "userDN": f"{own_number};ext={abonent['extension']}" if abonent.get("extension") else None,
                          "callType": "Group"}
        customer_party = {"address": f"tel:+7{call['phone']}", "callType": "Network"}
        ctd = {"personality": "Click-to-Dial", "remote": operator_party, "start_ms": start}
        if not self._step(call, generation, "CallOriginatedEvent", state="Alerting", at_ms=start,
                          call_state="operator_alerting", **ctd):
            return
        clock = self._clock_after_hold(generation, start)
        if clock is None:
            return

        def release_ctd(seconds: float, releasing: str, cause: str, cdr: str) -> None:
            self._release_after(call, generation, clock, seconds, ctd, releasing, cause, cdr)

        if outcome == "operator_missed":
            return release_ctd(self.no_answer_seconds, "localRelease", "Request Timeout", "111")
        if outcome == "operator_rejected":
            return release_ctd(REJECT_SECONDS, "remoteRelease", "Forbidden", "021")
        if outcome == "failed":
            return release_ctd(FAILURE_SECONDS, "localRelease", "Server Failure", "041")

        if not clock.wait(self.ring_seconds):  # the operator answers; the PBX dials the customer
            return
        self._emit_off_hook(call, generation)
        leg = {"personality": "Originator", "remote": customer_party, "start_ms": start}
        if not self._step(call, generation, "CallOriginatedEvent", state="Alerting", at_ms=clock.now,
                          call_state="customer_alerting", **leg):
            return
        if outcome == "busy":
            return self._release_after(call, generation, clock, BUSY_SECONDS, leg, "remoteRelease", "Busy", "017")
        if outcome == "no_answer":
            return self._release_after(call, generation, clock, self.no_answer_seconds, leg, "localRelease",
                                       "Temporarily Unavailable", "019")

        if not clock.wait(self.ring_seconds):  # the customer answers
            return
        self._play_answered(call, generation, leg, clock)

    def _play_inbound(self, call: dict[str, Any], generation: int) -> None:
        """A caller dialled a company number and it rings the abonent: the Terminator leg, one extTrackingId."""
        start = call["start_time"]
        leg = {"personality": "Terminator", "remote": {"address": f"tel:+7{call['phone']}", "callType": "Network"},
               "start_ms": start}
        if not self._step(call, generation, "CallReceivedEvent", state="Alerting", at_ms=start,
                          call_state="alerting", **leg):
            return
        clock = self._clock_after_hold(generation, start)
        if clock is None:
            return

        if call["outcome"] == "missed":  # nobody picks up: the PBX gives up ringing
            return self._release_after(call, generation, clock, self.no_answer_seconds, leg, "localRelease",
                                       "Request Timeout", "111")

        if not clock.wait(self.ring_seconds):  # the abonent answers
            return
        self._emit_off_hook(call, generation)
        self._play_answered(call, generation, leg, clock)

    def _play_answered(self, call: dict[str, Any], generation: int, leg: Mapping[str, Any], clock: _SimClock) -> None:
        """The answered leg of a call in either direction, from `clock.now`: CallAnsweredEvent, the recording start
        when the abonent records, the talk, the caller's hang-up, then the stored recording."""
        abonent = call["_abonent"]
        answer = clock.now
        with self._lock:
            recording = self._recording.get(abonent["userId"], False)
        call["answer_time"] = answer
        if not self._step(call, generation, "CallAnsweredEvent", state="Active", at_ms=answer, call_state="active",
                          answer_ms=answer, recording_state="Started" if recording else None, **leg):
            return
        if recording:
            with self._cv:
                if not self._cancelled(generation):
                    self._emit(call, "CallRecordingStartedEvent",
                               f"<xsi:callId>{escape(call['call_id'])}</xsi:callId>"
                               f"<xsi:extTrackingId>{escape(call['ext_tracking_id'])}</xsi:extTrackingId>"
                               "<xsi:recordingState>Started</xsi:recordingState>", advanced_only=True)
        if not clock.wait(call["talk_seconds"]):
            return
        release = clock.now
        self._finish(call, generation, "CallReleasedEvent", state="Released", at_ms=release, answer_ms=answer,
                     release_ms=release, releasing_party="remoteRelease", cdr_cause="016",
                     recording_state="Stopped" if recording else None, **leg)
        if recording:
            with self._cv:
                if not self._cancelled(generation):
                    self._store_recording(call, abonent, answer, release)

    def _clock_after_hold(self, generation: int, start_ms: int) -> _SimClock | None:
        """The call's clock once any hold is over (the time held counts as simulated time); None when cancelled."""
        held = self._wait_hold(generation)
        if held is None:
            return None
        return _SimClock(self, generation, start_ms + round(held / self.time_scale * 1000))

    def _release_after(self, call: dict[str, Any], generation: int, clock: _SimClock, seconds: float,
                       leg: Mapping[str, Any], releasing_party: str, internal_cause: str, cdr_cause: str) -> None:
        """Release a leg nobody answered after `seconds` of simulated time, unless the call was cancelled meanwhile."""
        if clock.wait(seconds):
            self._finish(call, generation, "CallReleasedEvent", state="Released", at_ms=clock.now,
                         release_ms=clock.now, releasing_party=releasing_party, internal_cause=internal_cause,
                         cdr_cause=cdr_cause, **leg)

    def _emit_off_hook(self, call: dict[str, Any], generation: int) -> None:
        """With `noise_events`, the HookStatusEvent of a phone going off-hook (an answer)."""
        if self.noise_events:
            with self._cv:
                if not self._cancelled(generation):
                    self._emit(call, "HookStatusEvent", "<xsi:hookStatus>Off-Hook</xsi:hookStatus>")

    def _finish(self, call: dict[str, Any], generation: int, event_type: str, **kwargs: Any) -> None:
        with self._cv:
            if self._step(call, generation, event_type, call_state="released", **kwargs):
                call["release_time"] = kwargs["release_ms"]
                call["released_at"] = _now_iso()
                self._in_flight.discard(call["ext_tracking_id"])
                self._cv.notify_all()

    def _store_recording(self, call: dict[str, Any], abonent: Mapping[str, Any], answer_ms: int,
                         release_ms: int) -> None:
        duration_ms = release_ms - answer_ms
        audio = silent_mp3(duration_ms / 1000)
        record_id = str(self._next_record_id)
        self._next_record_id += 1
        self._records[record_id] = {
            "id": record_id, "externalId": call["ext_tracking_id"], "phone": call["phone"],
            "direction": call["direction"], "date": call["start_time"], "duration": duration_ms,
            "fileSize": len(audio), "comment": None,
            "abonent": self._public_abonent(abonent),
            "_audio": audio,
            "_available_at": time.monotonic() + self.recording_delay_seconds * self.time_scale,
        }
        call["record_id"] = record_id

    # ---- portal API ------------------------------------------------------------------------------------

    def _authorized(self, headers: Mapping[str, str]) -> str | None:
        """None when the token is right, else the errorCode to answer."""
        given = headers.get(TOKEN_HEADER)
        if given is None or not given.strip():
            return "AuthTokenNotFoundInRequest"
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return "AuthTokenNotFound"
        return None

    def handle_api(self, method: str, raw_path: str, query_string: str, headers: Mapping[str, str],
                   body: bytes) -> _Response:
        rest = raw_path[len(API_PREFIX):]
        if "//" in raw_path:
            return _error(400, "BadRequest", 'The request was rejected because the URL contained "//"')
        auth_error = self._authorized(headers)
        if auth_error == "AuthTokenNotFoundInRequest":
            return _error(403, auth_error, f"Header {TOKEN_HEADER} is required")
        if auth_error is not None:
            return _error(403, auth_error, "Auth token not found")
        segments = [unquote(s) for s in rest.split("/")]
        query = parse_qs(query_string, keep_blank_values=True)
        try:
            route = self._route(method, segments)
            with self._lock:
                name = route[0] if route else "unknown"
                self._api_requests[name] = self._api_requests.get(name, 0) + 1
            if route is None:
                return _error(404, "NotFound", "No such API method")
            operation, allowed, handler = route
            with self._lock:  # counted on the wire: what a client really sent, faults included
                self._api_log.append({"method": method, "operation": operation, "at": time.time(),
                                           "pattern": segments[1] if segments[0] == "abonents" and len(segments) > 1
                                           else None})
            if method not in allowed:
                return _error(405, "MethodNotAllowed", f"Request method '{method}' is not supported")
            fault = self._take_fault(operation)
            if fault is None:
                return handler(method, segments, query, headers, body)
            response: _Response | None = None
            if fault["proceed"]:
                response = handler(method, segments, query, headers, body)
            if fault.get("delay_seconds"):
                time.sleep(fault["delay_seconds"])
            if "status" in fault:
                if fault["status"] == 503:
                    return _Response(503, raw=NGINX_503, content_type="text/html")
                return _error(fault["status"], "InternalError" if fault["status"] >= 500 else "BadRequest",
                              "Sandbox fault")
            assert response is not None
            return response
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.description)

    def _route(self, method: str, s: list[str]) -> tuple[str, tuple[str, ...], Any] | None:
        n = len(s)
        if s == ["abonents"]:
            return "abonents", ("GET",), self._api_abonents
        if n == 2 and s[0] == "abonents" and s[1]:
            return "abonents", ("GET",), self._api_abonent
        if n == 3 and s[0] == "abonents" and s[1]:
            if s[2] == "agent":
                return "agent", ("GET", "PUT"), self._api_agent
            if s[2] == "recording":
                return "recording", ("GET", "PUT", "DELETE"), self._api_recording
            if s[2] == "call":
                return "call", ("POST",), self._api_call
        if s == ["numbers"]:
            return "numbers", ("GET",), self._api_numbers
        if s == ["subscription"]:
            operation = {"GET": "subscription_get", "DELETE": "subscription_delete"}.get(method, "subscription")
            return operation, ("PUT", "GET", "DELETE"), self._api_subscription
        if s == ["records"]:
            return "records", ("GET",), self._api_records
        if n == 3 and s[0] == "records" and s[1] and s[2] == "reference":
            return "record_reference", ("GET",), self._api_record_reference
        if n >= 3 and s[:2] == ["v2", "records"]:
            if n == 4 and s[2] and s[3] == "download":
                return "record_download", ("GET",), self._api_record_download
            if n == 5 and s[2] and s[3] and s[4] == "download":
                return "record_download", ("GET",), self._api_record_download
            if n == 3 and s[2]:
                return "record_delete", ("DELETE",), self._api_record_delete
        if s == ["v2", "statistics"]:
            return "statistics", ("GET",), self._api_statistics
        return None

    def _abonent_or_404(self, pattern: str) -> dict[str, Any]:
        abonent = self._find_abonent(pattern)
        if abonent is None:
            raise ApiError(404, "AbonentNotFound", "Abonent not found")
        return abonent

    def _api_abonents(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            return _Response(200, [self._public_abonent(a) for a in self._abonents])

    def _api_abonent(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            return _Response(200, self._public_abonent(self._abonent_or_404(segments[1])))

    def _api_numbers(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            return _Response(200, copy.deepcopy(self._numbers))

    def _api_agent(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            abonent = self._abonent_or_404(segments[1])
            if method == "GET":
                return _Response(200, self._agent[abonent["userId"]])
        value = _json_body(headers, body)
        if isinstance(value, dict):
            if set(value) != {"agentStatus"}:
                raise ApiError(400, "BadRequest", 'Body must be {"agentStatus": "ONLINE|OFFLINE|BREAK"}')
            value = value["agentStatus"]
        if value not in AGENT_STATUSES:
            raise ApiError(400, "BadRequest", "agentStatus must be ONLINE, OFFLINE or BREAK")
        with self._lock:
            self._agent[abonent["userId"]] = value
        return _Response(200)

    def _api_recording(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            abonent = self._abonent_or_404(segments[1])
            if method == "GET":
                return _Response(200, "ON" if self._recording[abonent["userId"]] else "OFF")
            self._recording[abonent["userId"]] = method == "PUT"
            return _Response(200)

    def _register_call(self, abonent: dict[str, Any], pattern: str, phone: str, outcome: str,
                       talk_seconds: float | None, *, direction: str, number: str | None = None,
                       redirections: list[str] | None = None) -> tuple[dict[str, Any], int]:
        """Log a new call in flight with a fresh extTrackingId (lock held); returns it and the generation."""
        tracking = f"{self._next_tracking}:1"
        self._next_tracking += 1
        call_half = self._next_call_half
        self._next_call_half += 2
        in_flight = len(self._in_flight)
        call: dict[str, Any] = {
            "ext_tracking_id": tracking,
            "call_id": f"callhalf-{call_half}:0",
            "network_call_id": f"BW{call_half}{secrets.randbelow(10**9):09d}@10.48.1.20",
            "direction": direction,
            "pattern": pattern,
            "abonent_user_id": abonent["userId"],
            "extension": abonent["extension"],
            "phone": phone,  # the customer: called (OUTBOUND) or calling (INBOUND)
            "outcome": outcome,
            "talk_seconds": talk_seconds,
            "state": "accepted",
            "accepted_at": _now_iso(),
            "accepted_ts": time.time(),
            "in_flight_at_accept": in_flight,
            "start_time": _now_ms(),
            "answer_time": None,
            "release_time": None,
            "released_at": None,
            "record_id": None,
            "events": [],
            "_abonent": abonent,
        }
        if direction == "INBOUND":
            call["number"] = number  # the company number dialled
            call["redirections"] = list(redirections or [])
        self._calls.append(call)
        self._in_flight.add(tracking)
        self._max_in_flight = max(self._max_in_flight, len(self._in_flight))
        return call, self._generation

    def _api_call(self, method, segments, query, headers, body) -> _Response:
        pattern = segments[1]
        phone = _single(query, "phoneNumber", required=True)
        with self._cv:
            abonent = self._abonent_or_404(pattern)
            if phone is None or not TEN_DIGITS_RE.fullmatch(phone):
                raise ApiError(400, "BadRequest", "phoneNumber must be 10 digits without country code")
            outcome, talk = self.outcome_for(phone)
            call, generation = self._register_call(abonent, pattern, phone, outcome,
                                                   talk if outcome == "answered" else None, direction="OUTBOUND")
            self._originates += 1
            tracking = call["ext_tracking_id"]
        if self.verbose:
            _log(f"originate ext {abonent['extension']} -> {mask_phone(phone)}: {tracking} ({outcome})")
        threading.Thread(target=self._simulate, args=(call, generation), name=f"beeline-call-{tracking}",
                         daemon=True).start()
        if self.originate_body == "text":
            return _Response(200, raw=tracking.encode(), content_type="text/plain;charset=UTF-8")
        return _Response(200)

    def _api_subscription(self, method, segments, query, headers, body) -> _Response:
        if method == "PUT":
            return self._create_subscription(headers, body)
        subscription_id = _single(query, "subscriptionId", required=True)
        with self._cv:
            self._live_subscriptions()
            sub = self._subs.get(subscription_id or "")
            if sub is None:
                raise ApiError(400, "GetSubscriptionInfoError", "Subscription not found or expired")
            if method == "GET":
                return _Response(200, self._subscription_view(sub))
            self._drop_subscription(sub)
            return _Response(200)

    def _create_subscription(self, headers: Mapping[str, str], body: bytes) -> _Response:
        spec = _json_body(headers, body)
        if not isinstance(spec, dict):
            raise ApiError(400, "BadRequest", "Body must be a JSON object")
        url, expires, kind, pattern = spec.get("url"), spec.get("expires"), spec.get("subscriptionType"), \
            spec.get("pattern")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "BadRequest", "url is required")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(400, "BadRequest", "url must be an absolute http(s) URL")
        if isinstance(expires, bool) or not isinstance(expires, int) or expires <= 0:
            raise ApiError(400, "BadRequest", "expires must be a positive integer (seconds)")
        if kind not in SUBSCRIPTION_TYPES:
            raise ApiError(400, "BadRequest", "subscriptionType must be BASIC_CALL or ADVANCED_CALL")
        if pattern is not None and (not isinstance(pattern, str) or not pattern):
            raise ApiError(400, "BadRequest", "pattern must be a non-empty string when given")
        with self._cv:
            if pattern is not None:
                target_type, target_id = "ABONENT", self._abonent_or_404(pattern)["userId"]
            else:
                target_type, target_id = "GROUP", GROUP_ID
            granted = min(expires, self.max_expires)
            sub = {"id": str(uuid.uuid4()), "url": url, "type": kind, "pattern": pattern,
                   "target_type": target_type, "target_id": target_id, "requested": expires, "granted": granted,
                   "created_mono": time.monotonic(), "created_at": _now_iso(), "sequence": 0, "queue": deque(),
                   "busy": False, "live": True}
            self._subs[sub["id"]] = sub
        if self.verbose:
            _log(f"subscription {sub['id']} ({kind}, {granted} s) -> {_masked_url(url)}")
        return _Response(200, {"subscriptionId": sub["id"], "expires": granted})

    def _api_records(self, method, segments, query, headers, body) -> _Response:
        date_from = _parse_iso_z(_single(query, "dateFrom", required=True) or "", "dateFrom")
        date_to = _parse_iso_z(_single(query, "dateTo", required=True) or "", "dateTo")
        if date_from > date_to:
            raise ApiError(400, "BadRequest", "dateFrom is after dateTo")
        user_id = _single(query, "userId")
        after = _single(query, "id")
        if after is not None and not after.isdigit():
            raise ApiError(400, "BadRequest", "id must be a record id")
        now = time.monotonic()
        with self._lock:
            found = [r for r in self._records.values()
                     if now >= r["_available_at"] and date_from <= r["date"] <= date_to
                     and (user_id is None or r["abonent"]["userId"] == user_id)
                     and (after is None or int(r["id"]) > int(after))]
            found.sort(key=lambda r: int(r["id"]))
            return _Response(200, [self._record_view(r) for r in found[:MAX_RECORDS_PAGE]])

    def _ready_record(self, record_id: str) -> dict[str, Any]:
        record = self._records.get(record_id)
        if record is None or time.monotonic() < record["_available_at"]:
            raise ApiError(404, "RecordNotFound", "Record not found")
        return record

    def _api_record_reference(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            record = self._ready_record(segments[1])
            key = secrets.token_urlsafe(24)
            self._references[key] = (record["id"], time.monotonic() + REFERENCE_TTL_SECONDS)
        return _Response(200, {"url": f"{self.base_url}/files/records/{key}"})

    def _api_record_download(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            if len(segments) == 4:
                record = self._ready_record(segments[2])
            else:
                tracking, user_id = segments[2], segments[3]
                record = next((r for r in self._records.values()
                               if r["externalId"] == tracking and r["abonent"]["userId"] == user_id), None)
                if record is None or time.monotonic() < record["_available_at"]:
                    raise ApiError(404, "RecordNotFound", "Record not found (it may not be ready yet)")
            return _Response(200, raw=record["_audio"], content_type="audio/mpeg")

    def _api_record_delete(self, method, segments, query, headers, body) -> _Response:
        with self._lock:
            self._ready_record(segments[2])
            del self._records[segments[2]]
        return _Response(200)

    def _api_statistics(self, method, segments, query, headers, body) -> _Response:
        date_from = _parse_iso_z(_single(query, "dateFrom", required=True) or "", "dateFrom")
        date_to = _parse_iso_z(_single(query, "dateTo", required=True) or "", "dateTo")
        if date_from > date_to:
            raise ApiError(400, "BadRequest", "dateFrom is after dateTo")
        page = _int_param(query, "page", 0, 0, 10**6)
        size = _int_param(query, "pageSize", 100, 1, MAX_STATISTICS_PAGE_SIZE)
        with self._lock:
            rows = []
            for call in sorted(self._calls, key=lambda c: c["start_time"]):
                if call["release_time"] is None or not date_from <= call["start_time"] <= date_to:
                    continue
                answered = call["answer_time"] is not None
                duration = call["release_time"] - call["answer_time"] if answered else 0
                if call["direction"] == "INBOUND":
                    rows.append({"startDate": call["start_time"], "direction": "INBOUND", "duration": duration,
                                 "status": "RECIEVED" if answered else "MISSED",  # sic, as Beeline spells it
                                 "phone_from": call["phone"], "abonent": self._public_abonent(call["_abonent"])})
                    continue
                # PLACED: the customer was dialled (answered or not: duration tells); MISSED: the operator leg
                # never turned into a call to the customer.
                customer_dialled = call["outcome"] in ("answered", "busy", "no_answer")
                rows.append({"startDate": call["start_time"], "direction": "OUTBOUND", "duration": duration,
                             "status": "PLACED" if customer_dialled else "MISSED", "phone_to": call["phone"],
                             "abonent": self._public_abonent(call["_abonent"])})
            return _Response(200, rows[page * size:(page + 1) * size])

    def handle_file(self, method: str, path: str) -> _Response:
        key = path.rsplit("/", 1)[-1]
        if method != "GET":
            return _error(405, "MethodNotAllowed", "Use GET")
        with self._lock:
            entry = self._references.get(key)
            if entry is None or time.monotonic() > entry[1] or entry[0] not in self._records:
                return _error(404, "RecordNotFound", "Link expired or unknown")
            return _Response(200, raw=self._records[entry[0]]["_audio"], content_type="audio/mpeg")

    # ---- control endpoints -----------------------------------------------------------------------------

    def _control_views(self) -> dict[str, Callable[[], Any]]:
        return {"calls": self.calls, "stats": self.stats, "subscriptions": self.subscriptions,
                "records": self.records, "deliveries": self.deliveries}

    def _control_route(self, method: str, parts: list[str], body: bytes) -> _Response | None:
        if parts == ["outcomes"]:
            allow_methods(method, "GET", "POST", "DELETE")
            if method == "POST":
                for phone, spec in json_object(body).items():
                    if isinstance(spec, str):
                        spec = {"outcome": spec}
                    if not isinstance(spec, dict) or set(spec) - {"outcome", "talk_seconds"}:
                        raise SandboxError(400, 'each value must be {"outcome": ..., "talk_seconds"?: ...}')
                    try:
                        _validate_outcome(phone, spec.get("outcome"), spec.get("talk_seconds"))
                    except ValueError as exc:
                        raise SandboxError(400, str(exc)) from None
                    self.set_outcome(phone, spec["outcome"], spec.get("talk_seconds"))
            elif method == "DELETE":
                with self._lock:
                    self._outcomes.clear()
            return _Response(200, self.outcomes())
        if parts == ["inbound"]:
            allow_methods(method, "POST")
            spec = json_object(body)
            unknown = set(spec) - INBOUND_KEYS
            if unknown:
                raise SandboxError(400, f"unknown inbound keys: {sorted(unknown)}")
            try:
                view = self.inbound(spec.get("from"), spec.get("to"), spec.get("extension", "200"),
                                    spec.get("outcome", "answered"), spec.get("talk_seconds"))
            except ValueError as exc:
                raise SandboxError(400, str(exc)) from None
            return _Response(200, view)
        if len(parts) == 3 and parts[0] == "subscriptions" and parts[2] == "terminate":
            allow_methods(method, "POST")
            return _Response(200, self.terminate_subscription(parts[1]))
        if len(parts) == 2 and parts[0] == "agent":
            allow_methods(method, "GET", "PUT")
            if method == "PUT":
                # Not json_object: the body may also be a bare JSON string ("BREAK").
                try:
                    value = json.loads(body) if body else None
                except ValueError:
                    raise SandboxError(400, "body is not valid JSON") from None
                if isinstance(value, dict):
                    value = value.get("agentStatus", value.get("status"))
                try:
                    self.set_agent_status(parts[1], value)
                except ValueError as exc:
                    raise SandboxError(400, str(exc)) from None
            return _Response(200, {"agentStatus": self.agent_status(parts[1])})
        if parts == ["hold"]:
            allow_methods(method, "GET", "POST")
            if method == "POST":
                value = json_object(body).get("hold")
                if not isinstance(value, bool):
                    raise SandboxError(400, 'body must be {"hold": true|false}')
                self.hold(value)
            return _Response(200, {"hold": self._hold})
        if parts == ["wait-idle"]:
            allow_methods(method, "POST")
            timeout = json_object(body).get("timeout", 10)
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 300:
                raise SandboxError(400, "timeout must be 0-300 seconds")
            return _Response(200, {"idle": self.wait_idle(timeout)})
        return None


class _Handler(SandboxHandler):
    server_version = "BeelineSandbox/1.0"
    log_name = "beeline sandbox"
    max_body_bytes = MAX_BODY_BYTES
    sandbox: BeelineSandbox

    def _masked_path(self, path: str) -> str:
        return _mask_text(path)  # never the query: it holds the customer's number

    def _bad_request(self, status: int, message: str) -> _Response:
        return _error(status, "BadRequest", message)  # SandboxHandler closes the connection after it

    def _route(self, method: str, url: SplitResult, body: bytes) -> _Response:
        sandbox = self.sandbox
        if url.path.startswith(API_PREFIX):
            return sandbox.handle_api(method, url.path, url.query, self.headers, body)
        if url.path.startswith("/files/records/"):
            return sandbox.handle_file(method, url.path)
        return _error(404, "NotFound", "Not found")

    def _internal_error(self, exc: Exception) -> _Response:
        sys.stderr.write(f"beeline sandbox: internal error {type(exc).__name__}\n")
        return _error(500, "InternalError", "Internal sandbox error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Strict Beeline Cloud PBX portal API sandbox.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--token", default=os.environ.get("BEELINE_API_TOKEN") or DEFAULT_TOKEN)
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every simulated wait by this (0.01: a 75 s call takes 0.75 s)")
    parser.add_argument("--max-expires", type=int, default=86400, help="longest subscription granted, seconds")
    parser.add_argument("--originate-body", choices=ORIGINATE_BODIES, default="empty")
    parser.add_argument("--recording-delay", type=float, default=0.0,
                        help="simulated seconds before a recording can be downloaded")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    parser.add_argument("--state-file", help="keep calls, recordings and subscriptions in this JSON file")
    parser.add_argument("--talk-seconds", default=str(DEFAULT_TALK_SECONDS),
                        help="simulated talk time of an answered call: SECONDS, or LOW-HIGH drawn per call")
    parser.add_argument("--extra-abonents", type=int, default=0, help="operators beyond the default three")
    args = parser.parse_args(argv)
    low, _, high = args.talk_seconds.partition("-")
    try:
        talk_range = (float(low), float(high or low))
    except ValueError:
        parser.error("--talk-seconds: SECONDS or LOW-HIGH")

    try:
        sandbox = BeelineSandbox(host=args.host, port=args.port, token=args.token, time_scale=args.time_scale,
                                 max_expires=args.max_expires, originate_body=args.originate_body,
                                 recording_delay_seconds=args.recording_delay, verbose=not args.quiet,
                                 talk_seconds=talk_range[0], talk_range=talk_range if high else None,
                                 extra_abonents=args.extra_abonents)
    except ValueError as exc:
        print(f"beeline sandbox: {exc}", file=sys.stderr)
        return 2
    return serve_until_signalled(sandbox, "beeline sandbox", args.state_file)

if __name__ == "__main__":
    sys.exit(main())
