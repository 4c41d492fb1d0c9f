"""Tilda form webhooks (R-4..R-6): body parsing, bracket keys, test posts, field and UTM extraction.

Pure functions over bytes and dicts: no AWS, no HTTP framework, so every shape Tilda sends can be
tested directly and through the route alike.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_plus

from functions.core.config import TildaFields

MAX_FIELDS = 500  # a real form has a few dozen; more is abuse, not a lead
MAX_DEPTH = 6  # payment[products][0][options][0][variant] is the deepest Tilda goes
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class BadPost(ValueError):
    """The post cannot be understood; `field` names what was wrong."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def parse_body(raw: bytes, content_type: str | None) -> dict:
    """Tilda's body as a dict: urlencoded (bracket keys nested) or JSON."""
    mime = (content_type or "").split(";")[0].strip().lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPost("body", "body is not UTF-8") from None
    if mime == "application/json":
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            raise BadPost("body", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadPost("body", "JSON body must be an object")
        return data
    if mime in ("application/x-www-form-urlencoded", ""):
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:
            raise BadPost("body", f"more than {MAX_FIELDS} fields") from None
        return nest(pairs)
    raise BadPost("Content-Type", f"unsupported content type {mime!r}")


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

    @property
    def dedupe_key(self) -> str | None:
        if self.tranid:
            return f"tranid:{self.tranid}"
        if self.order_ref:
            return f"orderid:{self.order_ref}"
        return None


def _number(value, default: float = 0) -> float:
    try:
        number = float(str(value).replace(" ", "").replace(",", "."))
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) and abs(number) < 1e9 else default


def extract(data: dict, fields: TildaFields) -> TildaLead:
    payment = data.get("payment") if isinstance(data.get("payment"), dict) else {}
    products = []
    raw_products = payment.get("products")
    for item in raw_products if isinstance(raw_products, list) else []:
        if isinstance(item, dict):
            products.append(
                Product(
                    name=_text(item.get("name")),
                    quantity=min(1000, max(1, int(_number(item.get("quantity"), 1)))),
                    price_rub=_number(item.get("price")),
                    sku=_text(item.get("sku")) or _text(item.get("externalid")),
                )
            )
    phone_field, phone_raw = find_field(data, fields.phone)
    amount = payment.get("amount")
    return TildaLead(
        formid=_text(data.get("formid")),
        formname=_text(data.get("formname")),
        tranid=_text(data.get("tranid")),
        phone_field=phone_field,
        phone_raw=phone_raw,
        name=find_field(data, fields.name)[1][:200],
        email=find_field(data, fields.email)[1][:200],
        comment=find_field(data, fields.comment)[1][:2000],
        utm=parse_utm(data),
        order_ref=_text(payment.get("orderid")),
        amount_rub=_number(amount) if amount not in (None, "") else None,
        products=products,
    )
