"""Beeline's XSI events (BroadWorks Xsi-Events), parsed by local element names (R-15).

Prefixes and namespace URIs vary between deployments, so elements are matched by local name only.
defusedxml refuses DTDs and entity declarations: an XML bomb is rejected before it expands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

MAX_BYTES = 256 * 1024  # a real event is a few KB
# Identifiers become DynamoDB keys (a sort key holds at most 1024 bytes, a partition key 2048): real ones
# are under 100 bytes (`48123999:1`, a UUID, `SIP0343PU049QK@ip.beeline.ru`).
MAX_ID_BYTES = 256
MAX_NUMBER_DIGITS = 18  # epoch milliseconds and sequence numbers; int64 holds 18 digits safely


class BadEvent(ValueError):
    """The document cannot be used as an event; `field` names the element at fault."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CallData:
    call_id: str = ""
    ext_tracking_id: str = ""
    personality: str = ""
    state: str = ""
    remote_address: str = ""
    remote_call_type: str = ""
    start_ms: int | None = None
    answer_ms: int | None = None
    release_ms: int | None = None
    releasing_party: str = ""
    release_cause: str = ""
    cdr_cause: str = ""
    recording_state: str = ""
    redirect_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class XsiEvent:
    event_id: str
    event_type: str
    subscription_id: str = ""
    target_id: str = ""
    sequence: int | None = None
    call: CallData | None = None
    raw_size: int = field(default=0, compare=False)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(node, name: str):
    if node is None:
        return None
    for child in node:
        if _local(child.tag) == name:
            return child
    return None


def _text(node, *path: str) -> str:
    for name in path:
        node = _child(node, name)
    return (node.text or "").strip() if node is not None else ""


def _int(value: str, name: str) -> int | None:
    """An absent element is None; anything but ASCII digits (`²` passes isdigit) or an absurd length is
    a bad event, not a guess: a wrong answer or release time would bill and settle the call wrongly."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_NUMBER_DIGITS):
        raise BadEvent(f"{name} is not a number of at most {MAX_NUMBER_DIGITS} digits", field=name)
    return int(value)


def _id(value: str, name: str) -> str:
    if len(value.encode()) > MAX_ID_BYTES:
        raise BadEvent(f"{name} is longer than {MAX_ID_BYTES} bytes", field=name)
    return value


def _type_of(node) -> str:
    """The `xsi1:type` attribute's local value: `xsi:CallAnsweredEvent` -> `CallAnsweredEvent`."""
    for key, value in node.attrib.items():
        if _local(key) == "type":
            return value.rsplit(":", 1)[-1]
    return ""


def parse(body: bytes) -> XsiEvent:
    if not body or len(body) > MAX_BYTES:
        raise BadEvent("empty or oversized body")
    try:
        root = SafeET.fromstring(body, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise BadEvent(f"forbidden XML construct: {type(exc).__name__}") from None
    except SafeET.ParseError:
        raise BadEvent("not well-formed XML") from None
    if _local(root.tag) != "Event":
        raise BadEvent("not an XSI Event document")
    event_id = _id(_text(root, "eventID"), "eventID")
    if not event_id:
        raise BadEvent("eventID is missing")  # not an event at all: the body is at fault
    data = _child(root, "eventData")
    event_type = _type_of(data) if data is not None else ""
    call_node = _child(data, "call")
    call = None
    if call_node is not None:
        redirections = _child(call_node, "redirections")
        addresses = tuple(
            _text(r, "party", "address") for r in (redirections if redirections is not None else [])
            if _local(r.tag) == "redirection"
        )
        call = CallData(
            call_id=_id(_text(call_node, "callId"), "callId"),
            ext_tracking_id=_id(_text(call_node, "extTrackingId"), "extTrackingId"),
            personality=_text(call_node, "personality"),
            state=_text(call_node, "state"),
            remote_address=_text(call_node, "remoteParty", "address"),
            remote_call_type=_text(call_node, "remoteParty", "callType"),
            start_ms=_int(_text(call_node, "startTime"), "startTime"),
            answer_ms=_int(_text(call_node, "answerTime"), "answerTime"),
            release_ms=_int(_text(call_node, "releaseTime"), "releaseTime"),
            releasing_party=_text(call_node, "releasingParty"),
            release_cause=_text(call_node, "releaseCause", "internalReleaseCause"),
            cdr_cause=_text(call_node, "releaseCause", "cdrTerminationCause"),
            recording_state=_text(call_node, "recordingState"),
            redirect_addresses=tuple(a for a in addresses if a),
        )
    return XsiEvent(
        event_id=event_id,
        event_type=event_type,
        subscription_id=_id(_text(root, "subscriptionId"), "subscriptionId"),
        target_id=_id(_text(root, "targetId"), "targetId"),
        sequence=_int(_text(root, "sequenceNumber"), "sequenceNumber"),
        call=call,
        raw_size=len(body),
    )
