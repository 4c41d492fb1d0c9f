"""A callbridge lead as SalesRender's AddOrderInput (R-7): field names, cart and source from the offer."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

from functions.core.config import Offer

KOPECKS = 100


def _referer(landing_url: str | None, utm: dict) -> str | None:
    if not landing_url:
        return None
    if not utm:
        return landing_url
    parts = urlsplit(landing_url)
    query = "&".join(q for q in (parts.query, urlencode(utm)) if q)
    return urlunsplit(parts._replace(query=query))


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
    if fields.comment and comment:
        order_data["stringFields"] = [{"field": fields.comment, "value": comment[:4000]}]
    order_input: dict = {
        "projectId": offer.salesrender.project_id,
        "statusId": offer.salesrender.status_id,
        "orderData": order_data,
    }
    if items:
        order_input["cart"] = {"items": items}
    # Tilda posts from its own servers: the customer's IP is not known, so source carries the referer only.
    referer = _referer(offer.landing_url, lead.get("utm") or {})
    if referer:
        order_input["source"] = {"refererUri": referer}
    return order_input
