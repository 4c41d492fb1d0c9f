"""The configuration document of R-1: one YAML file per stage, validated at load.

Validation errors name the bad key as a dotted path (`offers.0.callback_delay_seconds`) so that a
wrong document fails the deploy or the first request loudly instead of misbehaving at 3 a.m.
The path comes from `CALLBRIDGE_CONFIG` (relative paths are taken from the project root, which is
also the root of the Lambda package); the parsed document is cached per container.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

# Cold start: pydantic would look up installed plugins (an importlib.metadata scan of the package) when the first
# model is built; callbridge uses none. Set before the models below are defined.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# libyaml's safe loader where the wheel has it (the Lambda package does): ~50 ms less than pure Python per load.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DEFAULT_CONFIG = "config/local.yaml"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]|24:00")


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


class ConfigError(ValueError):
    """The configuration document is missing or invalid; the message names the key."""


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them so they are named.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Model):
    monthly_rub: float = Field(gt=0)
    alert_thresholds: list[Annotated[float, Field(gt=0, le=1)]] = [0.8, 1.0]
    stop_auto_callbacks_at_limit: bool = True
    manual_calls_at_limit: bool = True
    # The budget month is this zone's calendar month: a call at 01:00 Moscow on the 1st is the new month's.
    timezone: str = "Europe/Moscow"

    _tz = field_validator("timezone")(classmethod(lambda cls, value: _zone(value)))


class Provider(_Model):
    name: str = "Beeline_Main"
    channel_limit: int = Field(default=5, ge=1, le=100)
    # The owner is alerted (SNS, once per episode) when this share of the channels is busy.
    channel_alert_ratio: float = Field(default=0.8, gt=0, le=1)
    recording: bool = True
    retention_days: int = Field(default=30, ge=1, le=3650)
    webhook_cidrs: list[str] = ["0.0.0.0/0", "::/0"]
    # Regions whose numbers are dialled automatically. Beeline's click-to-call takes 10 national digits,
    # so only +7 numbers (Russia, Kazakhstan) can be dialled at all; this list can narrow it, e.g. [RU].
    dialable_regions: list[Literal["RU", "KZ"]] = ["RU", "KZ"]

    @field_validator("webhook_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError naming the bad value
        return value


class SalesRenderFields(_Model):
    phone: str = "phone"
    name: str | None = "name"
    email: str | None = "email"
    comment: str | None = "comment"
    call_log: str | None = None


class CartItem(_Model):
    item_id: int
    variation: int = 1
    price_rub: float | None = Field(default=None, ge=0)


class SalesRenderOffer(_Model):
    project_id: str
    status_id: str
    fields: SalesRenderFields = SalesRenderFields()
    # Tilda product sku/externalid -> SalesRender catalogue item; unmapped products go to the comment.
    items: dict[str, CartItem] = {}
    default_item: CartItem | None = None

    @field_validator("project_id", "status_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value):
        return str(value) if isinstance(value, int) else value


class TildaFields(_Model):
    """Tilda posts fields under the block's variable names; these are tried case-insensitively."""

    phone: list[str] = ["phone", "tel", "телефон"]
    name: list[str] = ["name", "имя"]
    email: list[str] = ["email", "e-mail", "почта"]
    comment: list[str] = ["comments", "comment", "message", "комментарий"]


class WorkingHours(_Model):
    timezone: str = "Europe/Moscow"
    # day -> "HH:MM-HH:MM"; a missing day is closed. "00:00-24:00" is the whole day.
    days: dict[str, str] = {d: "09:00-21:00" for d in DAYS}

    _tz = field_validator("timezone")(classmethod(lambda cls, value: _zone(value)))

    @field_validator("days")
    @classmethod
    def _days(cls, value: dict[str, str]) -> dict[str, str]:
        for day, span in value.items():
            if day not in DAYS:
                raise ValueError(f"unknown day {day!r}: use {', '.join(DAYS)}")
            start, sep, end = span.partition("-")
            if not sep or not _HHMM.fullmatch(start) or not _HHMM.fullmatch(end) or start >= end:
                raise ValueError(f"{day}: {span!r} is not HH:MM-HH:MM with start < end")
        if not value:
            raise ValueError("at least one day must be open")
        return value

    def window(self, day: str) -> tuple[dt.time, dt.time | None] | None:
        """(start, end) for a weekday; end None means midnight (24:00)."""
        span = self.days.get(day)
        if span is None:
            return None
        start, _, end = span.partition("-")
        return dt.time.fromisoformat(start), None if end == "24:00" else dt.time.fromisoformat(end)


class RetryRule(_Model):
    interval_seconds: int = Field(default=600, ge=30, le=86400)
    max_attempts: int = Field(default=3, ge=1, le=10)


class RetryPolicy(_Model):
    operator_missed: RetryRule = RetryRule()
    busy: RetryRule = RetryRule()
    no_answer: RetryRule = RetryRule()
    failed: RetryRule = RetryRule()

    @property
    def max_attempts(self) -> int:
        return max(r.max_attempts for r in (self.operator_missed, self.busy, self.no_answer, self.failed))


STATUS_GROUPS = ("PROCESSING", "CANCELED", "APPROVED", "SHIPPED", "DELIVERED", "UNDELIVERED", "REFUNDED", "SPAM",
                 "DOUBLE")
POSTBACK_PLACEHOLDERS = ("order_id", "lead_id", "status", "status_name", "payout", "subid", "utm_source",
                         "utm_medium", "utm_campaign", "utm_content", "utm_term")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Postback(_Model):
    """`{on: [GROUP, ...], method, url, body}`: fired once per order and status group (R-21)."""

    on: list[Literal[STATUS_GROUPS]] = Field(min_length=1)  # type: ignore[valid-type]
    method: Literal["GET", "POST"] = "GET"
    url: str
    body: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value):
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean True: take it back as "on".
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if k is True else k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _templates(self):
        if not re.match(r"https?://[^/\s]+", self.url):
            raise ValueError("url must start with http:// or https://")
        if self.body is not None and self.method != "POST":
            raise ValueError("body is for method POST only")
        for name, template in (("url", self.url), ("body", self.body or "")):
            unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(POSTBACK_PLACEHOLDERS))
            if unknown:
                raise ValueError(f"{name}: unknown placeholder {{{unknown[0]}}}; use "
                                 + ", ".join(f"{{{p}}}" for p in POSTBACK_PLACEHOLDERS))
        return self


class Baseline(_Model):
    """The offer's figures before callbridge (R-22): the report shows the change against them and the
    seed's relative goals (+50% calls-to-leads, -20% CPA). Ratios as fractions (0.14 = 14%)."""

    calls_to_leads: float | None = Field(default=None, ge=0)
    cpa_rub: float | None = Field(default=None, gt=0)
    approval_rate: float | None = Field(default=None, ge=0, le=1)
    avg_talk_seconds: float | None = Field(default=None, ge=0)
    roas: float | None = Field(default=None, ge=0)


class Offer(_Model):
    id: int
    name: str
    tilda_form_ids: list[str] = []
    tilda_fields: TildaFields = TildaFields()
    landing_url: str | None = None
    salesrender: SalesRenderOffer
    caller_id: str
    operators: list[str] = Field(min_length=1)
    distribution: Literal["round_robin", "least_recently_called"] = "round_robin"
    skip_unavailable_operators: bool = True
    callback_delay_seconds: int = Field(default=300, ge=0, le=900)
    # After-call work (seed §6.2): an operator is not rung again until this long after their call ended.
    wrap_up_seconds: int = Field(default=15, ge=0, le=600)
    working_hours: WorkingHours = WorkingHours()
    retry: RetryPolicy = RetryPolicy()
    phone_visibility: Literal["full", "partial"] = "partial"
    payout_rub: float = Field(default=0, ge=0)
    postbacks: list[Postback] = []
    baseline: Baseline | None = None

    @field_validator("caller_id")
    @classmethod
    def _caller_id(cls, value: str) -> str:
        if not re.fullmatch(r"\+7[0-9]{10}", value):
            raise ValueError("caller_id must be +7XXXXXXXXXX")
        return value


class Crm(_Model):
    """The SalesRender side (crm/). `call_log_write_back`: the call log in the order's string field
    (postcall/write_back.py): "always" (the default), "never", or "auto": only while no PBX plugin is
    registered for the company, whose CDRs then show the calls in the lead card instead."""

    call_log_write_back: Literal["auto", "always", "never"] = "always"
    # The PBX plugin's "Call" may name the SalesRender user who pressed it: user id -> Beeline operator.
    plugin_operators: dict[str, str] = {}


class Config(_Model):
    tariff_rub_per_minute: float = Field(gt=0)
    budget: Budget
    provider: Provider = Provider()
    # Leads, calls, their events and bindings expire (DynamoDB TTL) this long after they are written; at
    # least a week, so a lead is never deleted while its retries are still being called.
    data_retention_days: int = Field(default=90, ge=7, le=3650)
    default_offer_id: int | None = None
    crm: Crm = Crm()
    offers: list[Offer] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self):
        ids = [o.id for o in self.offers]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"offers: duplicate offer id {duplicates[0]}")
        seen: dict[str, int] = {}
        for offer in self.offers:
            for form in offer.tilda_form_ids:
                if form in seen:
                    raise ValueError(f"offers: formid {form!r} feeds both offer {seen[form]} and {offer.id}")
                seen[form] = offer.id
        if self.default_offer_id is not None and self.default_offer_id not in ids:
            raise ValueError(f"default_offer_id: no offer with id {self.default_offer_id}")
        return self

    def offer(self, offer_id: int) -> Offer | None:
        return next((o for o in self.offers if o.id == offer_id), None)

    def offer_for_form(self, formid: str | None) -> Offer | None:
        """The offer a Tilda form feeds, else the default offer, else None (the post is rejected)."""
        for offer in self.offers:
            if formid and formid in offer.tilda_form_ids:
                return offer
        return self.offer(self.default_offer_id) if self.default_offer_id is not None else None


def parse(text: str, source: str = "<config>") -> Config:
    try:
        document = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader (libyaml's SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the document must be a mapping")
    try:
        return Config.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def config_path() -> Path:
    path = Path(os.environ.get("CALLBRIDGE_CONFIG", DEFAULT_CONFIG))
    return path if path.is_absolute() else PROJECT_ROOT / path


@functools.cache
def load() -> Config:
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"CALLBRIDGE_CONFIG: cannot read {path}: {exc.strerror}") from None
    return parse(text, str(path))


def callback_delay(offer: Offer) -> int:
    """The offer's delay, unless CALLBACK_DELAY_SECONDS overrides every offer (demos, tests)."""
    override = os.environ.get("CALLBACK_DELAY_SECONDS")
    if override is None or override == "":
        return offer.callback_delay_seconds
    try:
        value = int(override)
    except ValueError:
        raise ConfigError("CALLBACK_DELAY_SECONDS: not an integer") from None
    if value < 0:
        raise ConfigError("CALLBACK_DELAY_SECONDS: must be >= 0")
    return value
