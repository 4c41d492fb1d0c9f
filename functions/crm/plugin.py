"""The SalesRender PBX plugin of class WEBHOOK served by this app (R-20): the "Call" button in the lead card.

- `GET /salesrender-plugin/info`: what SalesRender shows when the plugin is added (type PBX, class WEBHOOK,
  name, currency RUB, pricing).
- `PUT /salesrender-plugin/registration` (param `registration`, form or JSON): SalesRender's RS512 token with
  the company (`cid`), the plugin's id and alias, the cluster (`iss`) and the HPT secret. Stored per company
  in DynamoDB, the HPT encrypted (records/plugins.py). A company other than the one callbridge serves
  (SALESRENDER_API_URL) is refused: its orders are not ours to call.
- `POST /salesrender-plugin/special/call` (param `request`): a manager pressed "Call" on an order. The
  token's body gives the phone and the order id (and perhaps the user who pressed it). The call goes
  through the same path as POST /v1/calls (calling/manual_calls.queue): at once, past the callback delay
  and the working hours, but through the channel limit, the leases and the operator rules. It is tied to
  the order: to the number's lead when that lead has this order, else to a lead of the order (created
  here for an order callbridge has not seen; its offer is the one of the order's project).

Every token is verified before anything is read or written (providers/salesrender/plugin_tokens.py):
forged, expired, `alg: none`, HS-signed-with-the-public-key or for another audience is 401 and does
nothing. The audience is this plugin's URL, `{PUBLIC_BASE_URL}/salesrender-plugin/` (with or without the
last slash), from the environment and never from the request, so a forged Host cannot move it.
A repeated request (the same token) is the same call: its id is derived from the token's `jti` (or hash).
"""

from __future__ import annotations

import hashlib
import uuid
from urllib.parse import parse_qs

from functions.calling import dialable, manual_calls
from functions.core import config, links, safe_json, times
from functions.core.config import Config, Offer
from functions.core.observability import logger, metric
from functions.core.phones import InvalidPhone, mask, normalise
from functions.core.replies import Reply, error
from functions.providers.salesrender import client as salesrender
from functions.providers.salesrender import plugin_tokens as tokens
from functions.records import calls, leads, plugins
from functions.records import orders as order_links

PATH = "/salesrender-plugin"
PLUGIN_NAMESPACE = uuid.UUID("9b7c2f4e-1a3d-4c5b-8e6f-7a8b9c0d1e2f")
MAX_BODY_BYTES = 256 * 1024
MAX_ORDER_ID_BYTES = 64
LEAD_SOURCE = "salesrender"


def plugin_url() -> str:
    """This plugin's URL as SalesRender knows it (the `aud` of its tokens, the `iss` of the CDRs)."""
    base = links.base_url()
    return f"{base}{PATH}/"


def _audiences() -> list[str]:
    url = plugin_url()
    return [url, url.rstrip("/")]


def info() -> Reply:
    cfg = config.load()
    pricing = {"pbx": cfg.tariff_rub_per_minute, "record": 0}
    extra = {"class": "WEBHOOK", "currency": "RUB", "pricing": pricing}
    return Reply(200, {
        "name": "callbridge: Beeline",
        "description": "Звонок из карточки заказа через Облачную АТС Билайн (callbridge): оператор, потом клиент; "
                       "записи и CDR возвращаются в SalesRender.",
        "type": "PBX",
        "class": "WEBHOOK",
        "currency": "RUB",
        "pricing": pricing,
        "extra": extra,
        "languages": {"current": "ru_RU", "default": "ru_RU", "available": {"ru_RU": "Русский"}},
        "developer": {"name": "callbridge", "email": "", "hostname": ""},
    })


def _param(name: str, body: bytes, content_type: str | None, query: dict) -> tuple[str | None, Reply | None]:
    """The named parameter from a form or JSON body (or the query string): (value, None) or (None, 4xx)."""
    if len(body or b"") > MAX_BODY_BYTES:
        return None, error(413, "body", f"the body is over {MAX_BODY_BYTES} bytes")
    kind = (content_type or "").split(";")[0].strip().lower()
    value = None
    if body and kind == "application/json":
        try:
            data = safe_json.loads(body)
        except safe_json.BadJson as exc:
            return None, error(400, "body", str(exc))
        value = data.get(name) if isinstance(data, dict) else None
    elif body:
        try:
            form = parse_qs(body.decode("utf-8"), max_num_fields=50, strict_parsing=False)
        except UnicodeDecodeError:
            return None, error(400, "body", "the body is not UTF-8")
        except ValueError:
            return None, error(400, "body", "too many form fields")
        value = (form.get(name) or [None])[0]
    if value is None:
        value = query.get(name)
    if not isinstance(value, str) or not value.strip():
        return None, error(400, name, f"the parameter {name!r} (a JWT) is required")
    return value.strip(), None


def _verified(name: str, body: bytes, content_type: str | None, query: dict) -> tuple[dict | None, str, Reply | None]:
    token, problem = _param(name, body, content_type, query)
    if problem:
        return None, "", problem
    try:
        claims = tokens.verify(token, _audiences())
        tokens.claim_cid(claims)  # both named, or the token is no plugin token
        tokens.plugin_ref(claims)
    except tokens.TokenRejected as exc:
        logger.warning("SalesRender plugin token rejected", extra={"param": name, "reason": str(exc)})
        metric("PluginTokensRejected", param=name)
        return None, "", error(401, name, f"token rejected: {exc}")
    except tokens.KeyUnavailable as exc:
        logger.warning("SalesRender public key unavailable", extra={"param": name, "reason": str(exc)})
        return None, "", Reply(503, {"error": f"cannot verify the token now: {exc}", "field": name},
                               {"Retry-After": "10"})
    return claims, token, None


def register(body: bytes, content_type: str | None, query: dict) -> Reply:
    claims, _, problem = _verified("registration", body, content_type, query)
    if problem:
        return problem
    try:
        secret = tokens.hpt(claims)
        cluster = tokens.cluster_uri(claims)
    except tokens.TokenRejected as exc:
        return error(401, "registration", f"token rejected: {exc}")
    cid, plugin = tokens.claim_cid(claims), tokens.plugin_ref(claims)
    ours = tokens.company_id()
    if ours and cid != ours:
        logger.warning("plugin registration for another company refused", extra={"cid": cid, "company": ours})
        return error(403, "cid", f"this callbridge serves SalesRender company {ours}, not {cid}")
    issued = claims.get("iat")
    if isinstance(issued, bool) or not isinstance(issued, int | float):
        issued = times.utcnow().timestamp()
    stored = plugins.save(cid, plugin_id=plugin.id, plugin_alias=plugin.alias, cluster_uri=cluster, hpt=secret,
                          issued_at=int(issued))
    logger.info("SalesRender plugin registered" if stored else "older plugin registration ignored",
                extra={"cid": cid, "plugin_id": plugin.id, "plugin_alias": plugin.alias, "cluster": cluster})
    metric("PluginRegistrations")
    return Reply(200, {"ok": True, "cid": cid})


def special_call(body: bytes, content_type: str | None, query: dict) -> Reply:
    claims, token, problem = _verified("request", body, content_type, query)
    if problem:
        return problem
    cid, plugin = tokens.claim_cid(claims), tokens.plugin_ref(claims)
    registration = plugins.get(cid)
    if registration is None:
        return error(403, "cid", f"the plugin is not registered for company {cid}")
    if str(registration.get("plugin_id")) != plugin.id:
        return error(403, "plugin", "the token names another plugin registration")
    asked = tokens.call_request(claims.get("body"))
    if asked.phone is None:
        return error(422, "body.phone", "the request names no phone (phone or phoneNumber)")
    try:
        phone = normalise(asked.phone)
    except InvalidPhone as exc:
        return error(422, "body.phone", str(exc))
    if isinstance(asked.order_id, bool) or not isinstance(asked.order_id, str | int):
        return error(422, "body.orderId", "the request names no order (orderId, order_id or order.id)")
    order_id = str(asked.order_id).strip()
    if not order_id or len(order_id.encode()) > MAX_ORDER_ID_BYTES:
        return error(422, "body.orderId", f"the order id must be 1..{MAX_ORDER_ID_BYTES} bytes")
    cfg = config.load()
    refusal = dialable.refusal(phone, cfg)
    if refusal:  # nothing is created, as for POST /v1/calls
        return error(422, "body.phone", f"the provider cannot dial this number: {refusal}")

    key = str(claims.get("jti") or hashlib.sha256(token.encode()).hexdigest())
    call_id = str(uuid.uuid5(PLUGIN_NAMESPACE, f"call:{cid}:{key}"))
    call = calls.get(call_id)
    if call is None:
        lead, offer = _lead_for_order(order_id, phone, cfg)
        if lead.get("phone") != phone:
            # The manager asked for this number (the order's phone, perhaps corrected in the CRM since): the
            # dialer dials the lead's, so the lead takes it.
            leads.update(lead["lead_id"], phone=phone, phone_key=phone, phone_before=lead.get("phone"))
            lead = {**lead, "phone": phone}
        user = str(asked.operator) if isinstance(asked.operator, str | int) and not isinstance(asked.operator, bool) \
            else None
        operator = _operator_for(user, offer, cfg)
        attributes = {"crm_order_id": order_id, "source": "salesrender_plugin",
                      **({"crm_user": user[:64]} if user else {})}
        call = manual_calls.queue(call_id, lead, offer, attributes=attributes, operator=operator,
                                  source="salesrender_plugin")
    logger.info("SalesRender Call pressed", extra={"call_id": call_id, "order_id": order_id, "phone": mask(phone),
                                                   "state": call.get("state")})
    return Reply(200, {"ok": True, "call_id": call_id, "status": call.get("state", "queued"),
                       **({"outcome": call["outcome"], "reason": call.get("not_dialled_reason")}
                          if call.get("outcome") == "not_dialled" else {})})


def order_lead_id(order_id: str) -> str:
    """The lead of a SalesRender order that did not come through callbridge (one per order): the same id the
    order webhook (crm/order_webhook.py) gives such an order, so whichever comes first makes it."""
    return leads.lead_id_for(LEAD_SOURCE, order_id)


def _lead_for_order(order_id: str, phone: str, cfg: Config) -> tuple[dict, Offer]:
    linked = order_links.lead_of(order_id)  # the order's lead as the intake worker or the webhook tied it
    lead = leads.get(linked) if linked else None
    if lead and cfg.offer(lead.get("offer_id")):
        return lead, cfg.offer(lead["offer_id"])
    known = leads.latest_by_phone(phone)
    if known and str(known.get("order_id") or "") == order_id and cfg.offer(known.get("offer_id")):
        order_links.link(order_id, known["lead_id"], "callbridge")
        return known, cfg.offer(known["offer_id"])
    lead_id = order_lead_id(order_id)
    lead = leads.get(lead_id)
    if lead and cfg.offer(lead.get("offer_id")):
        return lead, cfg.offer(lead["offer_id"])
    offer = _offer_of_order(order_id, cfg, known)
    now = times.now_iso()
    lead = {"lead_id": lead_id, "source": LEAD_SOURCE, "dedupe_key": f"order:{order_id}", "state": "received",
            "offer_id": offer.id, "phone": phone, "phone_key": phone, "name": "",
            "comment": "Звонок из карточки заказа SalesRender", "utm": {},
            "products": [], "created_at": now, "order_id": order_id, "order_state": "created",
            # Not a lead to call back automatically: it exists for the manager's call (and its call log).
            "callback_scheduled_at": now, "order_via": "salesrender"}
    if leads.create(lead):
        logger.info("lead created for a SalesRender order", extra={"lead_id": lead_id, "order_id": order_id,
                                                                  "offer_id": offer.id})
        metric("PluginOrderLeads", offer=str(offer.id))
    lead_id = order_links.link(order_id, lead_id, "crm")  # a racing webhook's link wins: its lead, then
    found = leads.get(lead_id) or lead
    return found, cfg.offer(found.get("offer_id")) or offer


def _offer_of_order(order_id: str, cfg: Config, known: dict | None) -> Offer:
    """The offer of the order's project; failing that the number's lead's offer, the default offer, the first."""
    try:
        order = salesrender.default_client().get_order(order_id)
    except salesrender.SalesRenderError as exc:
        logger.warning("order not readable: offer guessed", extra={"order_id": order_id, "code": exc.code})
        order = None
    project = str(((order or {}).get("project") or {}).get("id") or "")
    found = next((o for o in cfg.offers if project and o.salesrender.project_id == project), None)
    return (found or (cfg.offer(known["offer_id"]) if known and cfg.offer(known.get("offer_id")) else None)
            or (cfg.offer(cfg.default_offer_id) if cfg.default_offer_id is not None else None) or cfg.offers[0])


def _operator_for(user: str | None, offer: Offer, cfg: Config) -> str | None:
    """The Beeline operator the CRM user stands for (crm.plugin_operators, or the same name), when the
    offer has that operator; else None and the offer's rule chooses."""
    if not user:
        return None
    pattern = cfg.crm.plugin_operators.get(user, user)
    return pattern if pattern in offer.operators else None
