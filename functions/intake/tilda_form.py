"""Tilda form webhooks (R-4..R-6): body parsing, bracket keys, test posts, field and UTM extraction.

Pure functions over bytes and dicts: no AWS, no HTTP framework, so every shape Tilda sends can be
tested directly and through the route alike.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_plus

from functions.core import safe_json
from functions.core.config import TildaFields
from functions.core.text import clip

MAX_FIELDS = 500  # a real form has a few dozen; more is abuse, not a lead
MAX_DEPTH = 6  # payment[products][0][options][0][variant] is the deepest Tilda goes
MAX_BODY_BYTES = 4 * 1024 * 1024  # a real post is a few KB; API Gateway itself stops at 10 MB
MAX_PRODUCTS = 100
# Byte (UTF-8) limits per stored field: together they keep a lead far below DynamoDB's 400 KB item limit.
FIELD_BYTES = {"tranid": 256, "formid": 256, "formname": 512, "name": 512, "email": 320, "comment": 8192,
               "orderid": 256, "utm": 512, "product_name": 1024, "sku": 256, "subid": 256}
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")
# A CPA network's click id, passed through the landing's form to the order and to its postbacks.
SUBID_FIELDS = ["subid", "sub_id", "clickid", "click_id"]
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class BadPost(ValueError):
    """The post cannot be understood; `field` names what was wrong, `status` is the HTTP answer."""

    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field_name
        self.status = status


def parse_body(raw: bytes, content_type: str | None) -> dict:
    """Tilda's body as a dict: urlencoded (bracket keys nested) or JSON."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if len(raw) > MAX_BODY_BYTES:
        raise BadPost("body", f"body is larger than {MAX_BODY_BYTES} bytes", status=413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPost("body", "body is not UTF-8") from None
    if mime == "application/json":
        try:
            data = safe_json.loads(text) if text.strip() else {}
        except safe_json.BadJson as exc:
            raise BadPost("body", f"body is {exc}" if str(exc) == "not valid JSON" else str(exc)) from None
        if not isinstance(data, dict):
            raise BadPost("body", "JSON body must be an object")
        return data
    if mime in ("application/x-www-form-urlencoded", ""):
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:
            raise BadPost("body", f"more than {MAX_FIELDS} fields") from None
        return nest(pairs)
    raise BadPost("Content-Type", f"unsupported content type {clip(mime, 100)!r}", status=415)


def nest(pairs: list[tuple[str, str]]) -> dict:
    """`payment[products][0][name]=X` -> {"payment": {"products": [{"name": "X"}]}}.

    Repeated plain keys are joined with "; " (Tilda's multi-choice fields); a key that is both a
    value and a container keeps the first meaning seen rather than failing the lead.
    """
    root: dict = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        path = [head] + (_BRACKETS.findall("[" + rest) if rest else [])
        if len(path) > MAX_DEPTH or not head:
            continue
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            leaf = path[-1]
            if leaf in node and isinstance(node[leaf], str):
                node[leaf] = f"{node[leaf]}; {value}"
            elif leaf not in node:
                node[leaf] = value
    return {k: _lists(v) for k, v in root.items()}  # the root stays a dict whatever its keys


def _lists(node):
    """Dicts keyed 0..n become lists (in index order), recursively."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and all(k.isascii() and k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def is_test(data: dict) -> bool:
    """Tilda's connection check: `test=test` (form or JSON)."""
    return str(data.get("test", "")).strip().lower() == "test"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def find_field(data: dict, candidates: list[str]) -> tuple[str | None, str]:
    """The first top-level field whose name matches a candidate case-insensitively: (name, value)."""
    lowered = {k.lower(): k for k in data if isinstance(k, str)}
    for candidate in candidates:
        key = lowered.get(candidate.lower())
        if key is not None and _text(data[key]):
            return key, _text(data[key])
    # Report the field as Tilda named it even when it is empty, so a 422 points at the right input.
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()], ""
    return None, ""


def parse_utm(data: dict) -> dict[str, str]:
    """Plain `utm_*` fields win; otherwise the TILDAUTM cookie inside COOKIES (first visit's UTM)."""
    utm = {k: _text(data.get(k)) for k in UTM_KEYS if _text(data.get(k))}
    if utm:
        return utm
    cookies = _text(data.get("COOKIES") or data.get("cookies"))
    for part in cookies.split(";"):
        name, _, value = part.strip().partition("=")
        if name == "TILDAUTM":
            for pair in unquote_plus(value).split("|||"):
                key, _, val = pair.partition("=")
                if key in UTM_KEYS and val:
                    utm[key] = val
    return utm


@dataclass(frozen=True)
class Product:
    name: str
    quantity: int
    price_rub: float
    sku: str


@dataclass(frozen=True)
class TildaLead:
    formid: str
    formname: str
    tranid: str
    phone_field: str | None
    phone_raw: str
    name: str
    email: str
    comment: str
    utm: dict[str, str] = field(default_factory=dict)
    order_ref: str = ""  # payment[orderid]: the dedupe key of carts posted without tranid
    amount_rub: float | None = None
    products: list[Product] = field(default_factory=list)
    # tranid, else payment[orderid], as posted (a digest when too long to store): every copy maps to it.
    dedupe_key: str | None = None
    truncated: tuple[str, ...] = ()  # the fields cut to their byte limits, as Tilda named them
    subid: str = ""  # subid / sub_id / clickid / click_id, any case; empty when absent


def _dedupe_key(kind: str, value: str) -> str | None:
    if not value:
        return None
    if len(value.encode()) <= FIELD_BYTES[kind]:
        return f"{kind}:{value}"
    return f"{kind}-sha256:{hashlib.sha256(value.encode()).hexdigest()}"  # the whole value, stored short


def _number(value, default: float = 0) -> float:
    try:
        number = float(str(value).replace(" ", "").replace(",", "."))
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) and abs(number) < 1e9 else default


def extract(data: dict, fields: TildaFields) -> TildaLead:
    truncated: list[str] = []

    def fit(value: str, kind: str, name: str | None) -> str:
        kept = clip(value, FIELD_BYTES[kind])
        if kept != value:
            truncated.append(name or kind)
        return kept

    payment = data.get("payment") if isinstance(data.get("payment"), dict) else {}
    products = []
    raw_products = payment.get("products")
    raw_products = raw_products if isinstance(raw_products, list) else []
    for i, item in enumerate(raw_products[:MAX_PRODUCTS]):
        if isinstance(item, dict):
            sku_key = "sku" if _text(item.get("sku")) else "externalid"
            products.append(
                Product(
                    name=fit(_text(item.get("name")), "product_name", f"payment[products][{i}][name]"),
                    quantity=min(1000, max(1, int(_number(item.get("quantity"), 1)))),
                    price_rub=_number(item.get("price")),
                    sku=fit(_text(item.get(sku_key)), "sku", f"payment[products][{i}][{sku_key}]"),
                )
            )
    if len(raw_products) > MAX_PRODUCTS:
        truncated.append("payment[products]")
    phone_field, phone_raw = find_field(data, fields.phone)
    name_field, name = find_field(data, fields.name)
    email_field, email = find_field(data, fields.email)
    comment_field, comment = find_field(data, fields.comment)
    subid_field, subid = find_field(data, SUBID_FIELDS)
    utm = {k: fit(v, "utm", k) for k, v in parse_utm(data).items()}
    tranid, order_ref = _text(data.get("tranid")), _text(payment.get("orderid"))
    amount = payment.get("amount")
    return TildaLead(
        formid=fit(_text(data.get("formid")), "formid", "formid"),
        formname=fit(_text(data.get("formname")), "formname", "formname"),
        tranid=fit(tranid, "tranid", "tranid"),
        phone_field=phone_field,
        phone_raw=phone_raw,
        name=fit(name, "name", name_field),
        email=fit(email, "email", email_field),
        comment=fit(comment, "comment", comment_field),
        utm=utm,
        order_ref=fit(order_ref, "orderid", "payment[orderid]"),
        amount_rub=_number(amount) if amount not in (None, "") else None,
        products=products,
        dedupe_key=_dedupe_key("tranid", tranid) or _dedupe_key("orderid", order_ref),
        subid=fit(subid, "subid", subid_field),
        truncated=tuple(truncated),
    )
