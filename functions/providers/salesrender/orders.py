"""A callbridge lead as SalesRender's AddOrderInput (R-7): field names, cart and source from the offer.

Every order carries its lead id where SalesRender keeps it and `ordersFetcher` returns it: a last line
of the comment field and a `callbridge_lead` parameter of the referer. After a lost answer the intake
worker finds the order by it (`made_for_lead`) instead of creating a second one. An offer with neither
a comment field nor a landing URL cannot be found that way (`findable`).
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from functions.core.config import Offer

KOPECKS = 100
COMMENT_MAX_CHARS = 4000
LEAD_PARAM = "callbridge_lead"
LEAD_LINE = "callbridge lead: "


def _referer(landing_url: str | None, utm: dict, lead_id: str | None) -> str | None:
    if not landing_url:
        return None
    params = {**utm, **({LEAD_PARAM: lead_id} if lead_id else {})}
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
    if lead.get("utm"):
        comment_lines.append(" ".join(f"{k}={v}" for k, v in sorted(lead["utm"].items())))
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
    referer = _referer(offer.landing_url, lead.get("utm") or {}, lead_id)
    if referer:
        order_input["source"] = {"refererUri": referer}
    return order_input
