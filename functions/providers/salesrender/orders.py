"""A callbridge lead as SalesRender's AddOrderInput (R-7): field names, cart and source from the offer.

Every order carries its lead id where SalesRender keeps it and `ordersFetcher` returns it: a last line
of the comment field and a `callbridge_lead` parameter of the referer. After a lost answer the intake
worker finds the order by it (`made_for_lead`) instead of creating a second one. An offer with neither
a comment field nor a landing URL cannot be found that way (`findable`).

The other way round (R-21), an order read back by the order webhook tells its lead (`lead_id_of`), its
phone and name, and the tracking tags on its source (`source_tags`: UTM and the CPA `subid`), so an order
made outside callbridge gets a lead with the same facts as a Tilda one.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from functions.core.config import Offer

KOPECKS = 100
COMMENT_MAX_CHARS = 4000
LEAD_PARAM = "callbridge_lead"
LEAD_LINE = "callbridge lead: "
SUBID_PARAM = "subid"
# The names a CPA network's click id travels under (any case), on a Tilda post or an order's referer.
SUBID_NAMES = ("subid", "sub_id", "clickid", "click_id")
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")
_LEAD_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _referer(landing_url: str | None, utm: dict, lead_id: str | None, subid: str = "") -> str | None:
    if not landing_url:
        return None
    params = {**utm, **({SUBID_PARAM: subid} if subid else {}), **({LEAD_PARAM: lead_id} if lead_id else {})}
    if not params:
        return landing_url
    parts = urlsplit(landing_url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


def findable(offer: Offer) -> bool:
    """True when this offer's orders carry the lead id (a comment field or a referer)."""
    return bool(offer.salesrender.fields.comment or offer.landing_url)


def made_for_lead(order: dict, lead_id: str) -> bool:
    """Whether an order as `ordersFetcher` returns it carries this lead id (comment line or referer)."""
    source = order.get("source") or {}
    referer = source.get("refererUri") if isinstance(source, dict) else None
    if isinstance(referer, str) and lead_id in parse_qs(urlsplit(referer).query).get(LEAD_PARAM, []):
        return True
    data = order.get("data")
    fields = data.get("stringFields") if isinstance(data, dict) else None
    line = LEAD_LINE + lead_id
    return any(isinstance(f, dict) and line in str(f.get("value") or "").splitlines() for f in fields or [])


def _cart(lead: dict, offer: Offer) -> tuple[list[dict], list[str]]:
    """Cart items for the mapped Tilda products; unmapped ones are returned as comment lines."""
    mapping = offer.salesrender.items
    items, unmapped = [], []
    for product in lead.get("products", []):
        item = mapping.get(product.get("sku", ""))
        price = product.get("price_rub") or (item.price_rub if item else 0) or 0
        if item is None:
            unmapped.append(f"{product.get('name') or product.get('sku') or 'товар'} × {product['quantity']}"
                            f" — {price:g} ₽")
            continue
        items.append({"itemId": item.item_id, "variation": item.variation, "quantity": product["quantity"],
                      "price": round(price * KOPECKS)})
    default = offer.salesrender.default_item
    if not items and default is not None:
        price = lead.get("amount_rub") or default.price_rub or 0
        items.append({"itemId": default.item_id, "variation": default.variation, "quantity": 1,
                      "price": round(price * KOPECKS)})
    return items, unmapped


def add_order_input(lead: dict, offer: Offer) -> dict:
    fields = offer.salesrender.fields
    order_data: dict[str, list] = {"phoneFields": [{"field": fields.phone, "value": lead["phone"]}]}
    if fields.name and lead.get("name"):
        order_data["humanNameFields"] = [{"field": fields.name, "value": {"firstName": lead["name"], "lastName": ""}}]
    if fields.email and lead.get("email"):
        order_data["emailFields"] = [{"field": fields.email, "value": lead["email"]}]
    items, unmapped = _cart(lead, offer)
    comment_lines = [lead.get("comment") or "", *unmapped]
    if lead.get("email_rejected"):
        comment_lines.append(f"e-mail (не принят): {lead['email_rejected']}")
    form = lead.get("formname") or lead.get("formid")
    if form:
        comment_lines.append(f"Tilda: {form}")
    tags = {**(lead.get("utm") or {}), **({SUBID_PARAM: lead["subid"]} if lead.get("subid") else {})}
    if tags:
        comment_lines.append(" ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    comment = "\n".join(line for line in comment_lines if line)
    lead_id = lead.get("lead_id")
    if lead_id:  # last, and kept whole however long the rest is: the look-up after a lost answer reads it
        mark = LEAD_LINE + lead_id
        comment = "\n".join(part for part in (comment[:COMMENT_MAX_CHARS - len(mark) - 1], mark) if part)
    if fields.comment and comment:
        order_data["stringFields"] = [{"field": fields.comment, "value": comment[:COMMENT_MAX_CHARS]}]
    order_input: dict = {
        "projectId": offer.salesrender.project_id,
        "statusId": offer.salesrender.status_id,
        "orderData": order_data,
    }
    if items:
        order_input["cart"] = {"items": items}
    # Tilda posts from its own servers: the customer's IP is not known, so source carries the referer only.
    referer = _referer(offer.landing_url, lead.get("utm") or {}, lead_id, lead.get("subid") or "")
    if referer:
        order_input["source"] = {"refererUri": referer}
    return order_input


def _referer_query(order: dict) -> dict[str, list[str]]:
    source = order.get("source")
    referer = source.get("refererUri") if isinstance(source, dict) else None
    return parse_qs(urlsplit(referer).query) if isinstance(referer, str) else {}


def lead_id_of(order: dict) -> str | None:
    """The callbridge lead an order was made for (its referer parameter or its comment line), or None."""
    for value in _referer_query(order).get(LEAD_PARAM, []):
        if _LEAD_ID.fullmatch(value):
            return value
    data = order.get("data")
    for entry in (data.get("stringFields") if isinstance(data, dict) else None) or []:
        for line in str(entry.get("value") or "").splitlines() if isinstance(entry, dict) else ():
            if line.startswith(LEAD_LINE) and _LEAD_ID.fullmatch(line[len(LEAD_LINE):].strip()):
                return line[len(LEAD_LINE):].strip()
    return None


def _field_values(order: dict, list_name: str, field: str | None) -> list:
    data = order.get("data")
    entries = data.get(list_name) if isinstance(data, dict) else None
    values = [e.get("value") for e in entries or []
              if isinstance(e, dict) and (field is None or e.get("field") == field)]
    return [v for v in values if v]


def phone_of(order: dict, offer: Offer) -> str | None:
    """The order's phone as written: the offer's phone field, else the first phone field of the order."""
    values = _field_values(order, "phoneFields", offer.salesrender.fields.phone) or _field_values(
        order, "phoneFields", None)
    first = values[0] if values else None
    if isinstance(first, dict):  # a structured phone value: take its fullest form
        first = first.get("international") or first.get("raw") or first.get("national")
    return str(first) if first else None


def name_of(order: dict, offer: Offer) -> str:
    field = offer.salesrender.fields.name
    values = _field_values(order, "humanNameFields", field) if field else []
    value = values[0] if values else None
    if isinstance(value, dict):
        return " ".join(str(value.get(k) or "").strip() for k in ("firstName", "lastName")).strip()
    return str(value or "").strip()


def source_tags(order: dict) -> tuple[dict[str, str], str]:
    """(UTM tags, subid) of an order: the source's utm_* fields, else the referer's query; the subid from the
    referer under any of SUBID_NAMES, any case."""
    source = order.get("source") if isinstance(order.get("source"), dict) else {}
    query = _referer_query(order)
    lowered = {k.lower(): v for k, v in query.items()}
    utm = {}
    for key in UTM_KEYS:
        value = source.get(key) or (lowered.get(key) or [""])[0]
        if isinstance(value, str) and value.strip():
            utm[key] = value.strip()[:512]
    subid = next((lowered[n][0].strip() for n in SUBID_NAMES if lowered.get(n) and lowered[n][0].strip()), "")
    return utm, subid[:256]
