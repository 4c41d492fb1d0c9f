"""Fuzzing every route and every queue handler (issue 8, item 15): hypothesis-generated bodies
(urlencoded, JSON, XML, junk bytes, huge, wrong types, deep nesting) never get a 5xx (only a storage
failure may, and moto does not fail) and never crash a worker: a queue handler either handles a
message or parks it in its DLQ with a reason; an exception would make SQS deliver it again and again.

Bounded: a few dozen examples a target, so the file runs in well under a minute. Examples of one test
share its moto account (the `client` fixture): what one example stores, the next may meet.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

import pytest
from conftest import TILDA_KEY
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from functions.core import resources

FORM = "application/x-www-form-urlencoded"
SECRET = "test-beeline-secret"
BEARER = {"Authorization": "Bearer test-api-token"}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# --- bodies ----------------------------------------------------------------------------------------------------

# Precomputed, so the huge cases cost no generation time: each broke a route or a worker once.
HUGE = [
    b'{"Phone": "+79991112233", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"Phone": "+79991112233", "x": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
    b'{"Phone": "+79991112233", "n": ' + b"9" * 5_000 + b"}",
    ("Phone=%2B79991112233&formid=form493249737&tranid=" + "7" * 1_000_000).encode(),
    ("Phone=%2B79991112233&payment[orderid]=1&payment[products][0][name]=" + quote("😀" * 60_000)).encode(),
    ("Phone=bad&Comments=" + quote("Ж" * 250_000)).encode(),
    b"<a>" * 30_000 + b"</a>" * 30_000,
    b"\xff" * 300_000,
    b"a" * (4 * 1024 * 1024 + 1),
]
PHONES = st.sampled_from(["+7 (999) 111-22-33", "89991112233", "+1 212 736 5000", "123", "²", "+7" + "9" * 50, ""])
ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "😀" * 50, "Ж" * 300, "[0]", "%00"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40), PHONES, ODD_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
PRODUCTS = st.lists(st.dictionaries(st.sampled_from(["name", "quantity", "price", "sku", "externalid", "options"]),
                                    JSON_VALUES, max_size=6), max_size=3)
PAYMENT = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "orderid": JSON_VALUES, "amount": JSON_VALUES, "products": PRODUCTS | JSON_VALUES}))
TILDA_DOC = st.fixed_dictionaries({}, optional={
    "Phone": PHONES | JSON_VALUES, "Name": JSON_VALUES, "Email": JSON_VALUES, "Comments": JSON_VALUES,
    "tranid": st.text(max_size=20) | JSON_VALUES, "formid": st.sampled_from(["form493249737", "form000"]) | JSON_VALUES,
    "payment": PAYMENT, "COOKIES": st.text(max_size=60), "utm_source": JSON_VALUES, "test": JSON_VALUES,
    "api_key": st.sampled_from([TILDA_KEY, "wrong"]) | JSON_VALUES})
_KEY_CHARS = st.one_of(st.sampled_from("[][][]0123 ab"), st.characters())
FORM_PAIRS = st.lists(st.tuples(st.text(_KEY_CHARS, max_size=30), st.text(max_size=30)), max_size=15)


def _flat(doc, prefix=""):
    """A JSON document as Tilda's bracket keys (`payment[products][0][name]`), values as text."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _flat(v, f"{prefix}[{k}]" if prefix else str(k))]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _flat(v, f"{prefix}[{i}]")]
    return [(prefix or "x", "" if doc is None else str(doc))]


def _json(doc) -> bytes:
    """JSON with every non-ASCII character escaped: a lone surrogate arrives as `\\ud800`, as it can."""
    return json.dumps(doc).encode()


def _json_utf8(doc) -> bytes:
    """JSON in UTF-8 (a lone surrogate becomes bytes that are not UTF-8)."""
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


XML_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
XML_FIELD = st.one_of(XML_TEXT, st.sampled_from(["", "²", "9" * 5000, "7" * 3000, "-1", "1.5", "48123999:1"]))


@st.composite
def xsi_events(draw) -> bytes:
    """XSI-shaped documents whose every element may be missing, empty, odd or absurd."""
    fields = draw(st.fixed_dictionaries({}, optional={
        name: XML_FIELD for name in ("eventID", "sequenceNumber", "subscriptionId", "targetId")}))
    call = draw(st.fixed_dictionaries({}, optional={
        name: XML_FIELD for name in ("callId", "extTrackingId", "personality", "state", "startTime", "answerTime",
                                     "releaseTime", "releasingParty", "recordingState")}))
    kind = draw(st.sampled_from(["CallAnsweredEvent", "CallReleasedEvent", "CallReceivedEvent",
                                 "SubscriptionTerminatedEvent", "HookStatusEvent", ""]))
    if draw(st.booleans()):
        fields.setdefault("eventID", str(uuid.uuid4()))
    if draw(st.booleans()):
        call.setdefault("extTrackingId", f"{draw(st.integers(1, 10**8))}:1")
    inner = "".join(f"<x:{k}>{escape(v)}</x:{k}>" for k, v in call.items())
    remote = escape(draw(XML_TEXT | PHONES))
    data = f'<x:eventData t:type="x:{kind}"><x:call>{inner}<x:remoteParty><x:address>{remote}</x:address>' \
           f"</x:remoteParty></x:call></x:eventData>" if call or draw(st.booleans()) else ""
    head = "".join(f"<x:{k}>{escape(v)}</x:{k}>" for k, v in fields.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?><x:Event xmlns:x="http://schema.broadsoft.com/xsi" '
            f'xmlns:t="http://www.w3.org/2001/XMLSchema-instance">{head}{data}</x:Event>').encode()


ANY_BODY = st.one_of(
    TILDA_DOC.map(_json),
    TILDA_DOC.map(_json_utf8),
    TILDA_DOC.map(lambda d: urlencode(_flat(d), errors="surrogatepass").encode()),
    FORM_PAIRS.map(lambda pairs: urlencode(pairs).encode()),
    JSON_VALUES.map(_json),
    JSON_VALUES.map(_json_utf8),
    xsi_events(),
    st.text(alphabet="<>/=\"' ax:?!&;[]{}", max_size=100).map(str.encode),
    st.binary(max_size=300),
    st.sampled_from(HUGE),
)
CONTENT_TYPES = st.sampled_from([FORM, "application/json", "application/json; charset=utf-8", "text/plain",
                                 "multipart/form-data; boundary=x", "application/xml", "text/xml",
                                 "application/octet-stream", "image/png", ""])


def assert_not_5xx(response):
    assert response.status_code < 500, response.body[:500]


def with_examples(cases):
    """Every case in `cases` (dicts of arguments) is tried on every run, before the generated ones."""
    def apply(test):
        for case in reversed(cases):
            test = example(**case)(test)
        return test
    return apply


# Each huge body as JSON and as a form, with the key: they must reach the parser, not stop at the auth.
TILDA_HUGE = [{"body": body, "content_type": ctype, "key": TILDA_KEY, "in_query": False}
              for body in HUGE for ctype in ("application/json", FORM)]


# --- routes ----------------------------------------------------------------------------------------------------


@FUZZ
@with_examples(TILDA_HUGE)
@given(body=ANY_BODY, content_type=CONTENT_TYPES, key=st.sampled_from([TILDA_KEY, TILDA_KEY, "wrong", None]),
       in_query=st.booleans())
def test_tilda_webhook(client, body, content_type, key, in_query):
    headers, path = {"Content-Type": content_type}, "/webhooks/tilda"
    if key and in_query:
        path += "?key=" + quote(key)
    elif key:
        headers["X-Api-Key"] = key
    assert_not_5xx(client.http.post(path, body=body, headers=headers))


CALL_DOC = st.fixed_dictionaries({}, optional={"phone": PHONES | JSON_VALUES, "offer_id": st.sampled_from([101, "101"])
                                               | JSON_VALUES, "name": JSON_VALUES})


def post_call(client, body: bytes, headers: dict | None = None):
    return client.http.post("/v1/calls", body=body, headers={"Content-Type": "application/json", **BEARER,
                                                             **(headers or {})})


@FUZZ
@with_examples([{"body": body, "content_type": "application/json", "auth": True, "idempotency_key": None}
                for body in HUGE])
@given(body=st.one_of(CALL_DOC.map(_json_utf8), CALL_DOC.map(_json), ANY_BODY),
       content_type=CONTENT_TYPES, auth=st.booleans(),
       idempotency_key=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126)))
def test_create_call(client, body, content_type, auth, idempotency_key):
    headers = {"Content-Type": content_type, **(BEARER if auth else {})}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    assert_not_5xx(client.http.post("/v1/calls", body=body, headers=headers))


def test_create_call_deeply_nested_body(client):
    assert_not_5xx(post_call(client, b'{"phone": "+79991112233", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"))


def test_create_call_lone_surrogate_in_name(client):
    assert_not_5xx(post_call(client, b'{"phone": "+79991112233", "offer_id": 101, "name": "\\ud800"}'))


PATH_IDS = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from([str(uuid.uuid4()), "x" * 3000, "Ж" * 1100]))


@FUZZ
@given(call_id=PATH_IDS, auth=st.booleans())
def test_read_call(client, call_id, auth):
    assert_not_5xx(client.http.get("/v1/calls/" + quote(call_id, safe=""), headers=BEARER if auth else {}))


@pytest.fixture
def link_secret(monkeypatch):
    monkeypatch.setenv("RECORDING_LINK_SECRET", "test-link-secret")


@FUZZ
@given(call_id=PATH_IDS, sig=st.none() | st.text(max_size=70), auth=st.booleans())
def test_recording_link(client, link_secret, call_id, sig, auth):
    path = "/v1/recordings/" + quote(call_id, safe="") + ("" if sig is None else "?sig=" + quote(sig))
    assert_not_5xx(client.http.get(path, headers=BEARER if auth else {}))


@pytest.fixture
def beeline_secret(monkeypatch):
    monkeypatch.setenv("BEELINE_WEBHOOK_SECRET", SECRET)


def _xsi(sequence="1", ext="48123999:1", answer="1779987809455") -> bytes:
    return (f'<x:Event xmlns:x="http://schema.broadsoft.com/xsi"><x:eventID>{uuid.uuid4()}</x:eventID>'
            f"<x:sequenceNumber>{sequence}</x:sequenceNumber><x:eventData><x:call><x:extTrackingId>{ext}"
            f"</x:extTrackingId><x:answerTime>{answer}</x:answerTime></x:call></x:eventData></x:Event>").encode()


XSI_HOSTILE = [_xsi(sequence="9" * 5000), _xsi(sequence="²"), _xsi(answer="1²"), _xsi(ext="7" * 3000),
               _xsi(ext="Ж" * 1100)]


@FUZZ
@with_examples([{"body": body, "content_type": "application/xml; charset=UTF-8"} for body in XSI_HOSTILE + HUGE])
@given(body=st.one_of(xsi_events(), xsi_events(), ANY_BODY),
       content_type=st.sampled_from(["application/xml; charset=UTF-8", "text/xml", "application/octet-stream"]))
def test_beeline_webhook(client, beeline_secret, body, content_type):
    response = client.http.post(f"/webhooks/beeline/{SECRET}", body=body, headers={"Content-Type": content_type})
    assert_not_5xx(response)


# --- queue handlers ------------------------------------------------------------------------------------------

# Lambda only ever gets what SQS accepted: text of the characters SQS allows, at most 256 KB.
SQS_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\x01\x02\x03\x04\x05\x06"
                                 "\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e"
                                 "\x1f\ufffe\uffff"), max_size=60)
MESSAGE = st.fixed_dictionaries({}, optional={
    "lead_id": st.sampled_from([str(uuid.uuid4()), "x" * 3000, ""]) | JSON_VALUES,
    "call_id": st.sampled_from([str(uuid.uuid4()), "x" * 3000, ""]) | JSON_VALUES,
    "attempt": st.integers() | JSON_VALUES,
    "due_at": st.sampled_from(["2020-01-01T00:00:00+00:00", "2999-01-01T00:00:00+00:00", "not a time"]) | JSON_VALUES,
    "job": st.sampled_from(["recording", "writeback", "other"]) | JSON_VALUES,
    "manual": JSON_VALUES, "reason": JSON_VALUES})
SQS_HOSTILE = ["[" * 10_000 + "]" * 10_000, '{"lead_id": ' + "[" * 10_000 + "]" * 10_000 + "}",
               '{"lead_id": ' + "9" * 5000 + "}", "{" * 100_000, "", "null",
               json.dumps({"lead_id": "\ud800", "call_id": "\udfff", "attempt": 1, "job": "writeback",
                           "due_at": "2020-01-01T00:00:00+00:00"}),
               json.dumps({"lead_id": "x" * 3000, "call_id": "x" * 3000, "attempt": 1, "job": "recording",
                           "due_at": "2020-01-01T00:00:00+00:00"})]
SQS_BODIES = st.one_of(
    MESSAGE.map(lambda m: json.dumps(m, ensure_ascii=True)),  # ASCII: \\ud800-style escapes are valid SQS text
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=True)),
    SQS_TEXT,
    st.sampled_from(SQS_HOSTILE),
)


def _dlq_size(kind: str) -> int:
    attributes = resources.client("sqs").get_queue_attributes(QueueUrl=resources.queue_url(kind, dlq=True),
                                                             AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


def _deliver_one(kind: str, handler_name: str, body: str, receive_count: int) -> None:
    """Call an app.py handler with a Lambda SQS event of one record, as infra/local/runner.py does."""
    import app
    from infra.local.runner import LambdaContext, sqs_event

    message = {"MessageId": str(uuid.uuid4()), "ReceiptHandle": "fuzz-" + str(uuid.uuid4()), "Body": body,
               "Attributes": {"ApproximateReceiveCount": str(receive_count)}}
    arn = f"arn:aws:sqs:us-east-1:123456789012:{resources.queue_name(kind)}"
    getattr(app, handler_name)(sqs_event(message, arn, "us-east-1"), LambdaContext(handler_name))


def _not_an_object(body: str) -> bool:
    try:
        return not isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return True


@pytest.mark.parametrize("kind,handler_name", [("intake", "intake_worker"), ("callbacks", "callback_worker"),
                                               ("recordings", "recording_worker")])
def test_queue_handler(client, kind, handler_name):
    @FUZZ
    @with_examples([{"body": body, "receive_count": 1} for body in SQS_HOSTILE])
    @given(body=SQS_BODIES, receive_count=st.sampled_from([1, 1, 3]))
    def check(body, receive_count):
        before = _dlq_size(kind)
        _deliver_one(kind, handler_name, body, receive_count)  # raising is the failure: SQS would loop it
        if _not_an_object(body):
            assert _dlq_size(kind) == before + 1, "a malformed body goes to the DLQ"

    check()
