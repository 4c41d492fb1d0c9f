"""The configuration document (R-1): every stage's file parses, and a bad document fails loudly with the
dotted key of what is wrong."""

from __future__ import annotations

import copy
import datetime as dt

import pytest
import yaml
from conftest import ROOT

from functions.core import config

LOCAL = yaml.safe_load((ROOT / "config" / "local.yaml").read_text(encoding="utf-8"))


def parse_variant(change) -> config.Config:
    document = copy.deepcopy(LOCAL)
    change(document)
    return config.parse(yaml.safe_dump(document, allow_unicode=True), "variant.yaml")


def error_of(change) -> str:
    with pytest.raises(config.ConfigError) as info:
        parse_variant(change)
    return str(info.value)


@pytest.fixture
def fresh_load():
    """`config.load` is cached per process: start and leave it empty so no other test sees our file."""
    config.load.cache_clear()
    yield config.load
    config.load.cache_clear()


# --- every stage's document ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["local", "dev", "prod"])
def test_stage_documents_parse(stage):
    path = ROOT / "config" / f"{stage}.yaml"
    cfg = config.parse(path.read_text(encoding="utf-8"), str(path))
    assert cfg.tariff_rub_per_minute > 0
    assert [o.id for o in cfg.offers] == [101, 102]
    assert cfg.default_offer_id == 101
    assert cfg.offer(101).caller_id == "+74951234567"
    # ids given as YAML strings stay strings; the cart mapping is typed.
    assert cfg.offer(102).salesrender.items["WATCH-01"].item_id == 7


def test_load_reads_the_file_named_by_callbridge_config(fresh_load, use_config):
    use_config(lambda doc: doc.update(tariff_rub_per_minute=3.5))
    assert fresh_load().tariff_rub_per_minute == 3.5


def test_load_names_callbridge_config_when_the_file_is_missing(fresh_load, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(missing))
    with pytest.raises(config.ConfigError) as info:
        fresh_load()
    assert "CALLBRIDGE_CONFIG" in str(info.value)
    assert str(missing) in str(info.value)


def test_load_reports_the_file_and_key_of_an_invalid_document(fresh_load, use_config):
    path = use_config(lambda doc: doc["offers"][0].update(callback_delay_seconds=901))
    with pytest.raises(config.ConfigError) as info:
        fresh_load()
    assert str(path) in str(info.value)
    assert "offers.0.callback_delay_seconds" in str(info.value)


def test_relative_config_path_is_taken_from_the_project_root(monkeypatch):
    monkeypatch.setenv("CALLBRIDGE_CONFIG", "config/dev.yaml")
    assert config.config_path() == ROOT / "config" / "dev.yaml"


# --- errors name the dotted key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["offers"][0].update(callback_delay_seconds=901), "offers.0.callback_delay_seconds"),
        (lambda d: d["offers"][1].update(callback_delay_seconds=-1), "offers.1.callback_delay_seconds"),
        (lambda d: d["offers"][0].update(caller_id="84951234567"), "offers.0.caller_id"),
        (lambda d: d["offers"][0].update(caller_id="+7495123456"), "offers.0.caller_id"),
        (lambda d: d["offers"][1].update(operators=[]), "offers.1.operators"),
        (lambda d: d["offers"][0].update(distribution="random"), "offers.0.distribution"),
        (lambda d: d["budget"].update(monthly_rub=0), "budget.monthly_rub"),
        (lambda d: d["budget"].update(alert_thresholds=[0.5, 1.5]), "budget.alert_thresholds.1"),
        (lambda d: d["offers"][0]["retry"]["busy"].update(interval_seconds=10),
         "offers.0.retry.busy.interval_seconds"),
        (lambda d: d.pop("budget"), "budget"),
        (lambda d: d.update(offers=[]), "offers"),
    ],
)
def test_field_errors_name_the_dotted_key(change, key):
    message = error_of(change)
    assert message.startswith("variant.yaml: ")
    assert f" {key}: " in message


def test_unknown_key_at_the_root_is_named():
    message = error_of(lambda d: d.update(tarif_rub_per_minute=2.0))
    assert "tarif_rub_per_minute" in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d["offers"][0]["salesrender"].update(projekt_id="1"), "offers.0.salesrender.projekt_id"),
        (lambda d: d["offers"][1].update(calback_delay_seconds=60), "offers.1.calback_delay_seconds"),
        (lambda d: d["offers"][0]["salesrender"]["fields"].update(fone="phone"),
         "offers.0.salesrender.fields.fone"),
        (lambda d: d["provider"].update(chanel_limit=3), "provider.chanel_limit"),
    ],
)
def test_nested_unknown_key_is_named(change, key):
    assert f" {key}: Extra inputs are not permitted" in error_of(change)


def test_duplicate_offer_ids_are_rejected():
    message = error_of(lambda d: d["offers"][1].update(id=101))
    assert "duplicate offer id" in message and "offers" in message


def test_one_formid_in_two_offers_is_rejected_naming_both():
    message = error_of(lambda d: d["offers"][1].update(tilda_form_ids=["form512345678", "form493249737"]))
    assert "'form493249737'" in message and "101" in message and "102" in message


def test_default_offer_must_exist():
    message = error_of(lambda d: d.update(default_offer_id=999))
    assert "default_offer_id" in message and "999" in message


def test_bad_time_zone_is_named():
    message = error_of(lambda d: d["offers"][1]["working_hours"].update(timezone="Europe/Atlantis"))
    assert "offers.1.working_hours.timezone" in message and "Europe/Atlantis" in message


@pytest.mark.parametrize("span", ["21:00-09:00", "09:00-09:00", "9:00-21:00", "09:00", "09:00-24:30", "25:00-26:00"])
def test_bad_working_hours_span_is_named(span):
    message = error_of(lambda d: d["offers"][0]["working_hours"]["days"].update(tue=span))
    assert "offers.0.working_hours.days" in message and "tue" in message and repr(span) in message


def test_unknown_weekday_is_named():
    message = error_of(lambda d: d["offers"][0]["working_hours"]["days"].update(monday="09:00-21:00"))
    assert "offers.0.working_hours.days" in message and "'monday'" in message


@pytest.mark.parametrize("span", ["09:00-21:00\n", "0٩:00-21:00"])
def test_spans_that_window_cannot_read_are_rejected_at_load(span):
    error_of(lambda d: d["offers"][0]["working_hours"]["days"].update(mon=span))


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "not-a-cidr", "300.1.1.1/32"])
def test_bad_cidr_is_named(cidr):
    message = error_of(lambda d: d["provider"].update(webhook_cidrs=["127.0.0.0/8", cidr]))
    assert "provider.webhook_cidrs" in message and cidr in message


def test_invalid_yaml_is_reported_as_such():
    with pytest.raises(config.ConfigError) as info:
        config.parse("offers: [1, 2\nbudget: {", "broken.yaml")
    assert str(info.value).startswith("broken.yaml: not valid YAML")


@pytest.mark.parametrize("text", ["", "null", "- 1\n- 2", "just a sentence", "42"])
def test_a_document_that_is_not_a_mapping_is_rejected(text):
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "odd.yaml")
    assert str(info.value) == "odd.yaml: the document must be a mapping"


def test_config_error_is_a_value_error():
    assert issubclass(config.ConfigError, ValueError)


# --- CALLBACK_DELAY_SECONDS --------------------------------------------------------------------------


@pytest.fixture
def offer():
    return config.parse((ROOT / "config" / "local.yaml").read_text(encoding="utf-8")).offer(101)


def test_callback_delay_is_the_offers_without_override(offer, monkeypatch):
    monkeypatch.delenv("CALLBACK_DELAY_SECONDS", raising=False)
    assert config.callback_delay(offer) == 300


def test_empty_override_means_no_override(offer, monkeypatch):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", "")
    assert config.callback_delay(offer) == 300


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("1200", 1200), ("7", 7)])
def test_callback_delay_override(offer, monkeypatch, value, expected):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", value)
    assert config.callback_delay(offer) == expected


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_bad_callback_delay_override_raises_naming_the_variable(offer, monkeypatch, value):
    monkeypatch.setenv("CALLBACK_DELAY_SECONDS", value)
    with pytest.raises(config.ConfigError, match="CALLBACK_DELAY_SECONDS"):
        config.callback_delay(offer)


# --- offer_for_form ------------------------------------------------------------------------------------


def test_known_form_selects_its_offer():
    cfg = parse_variant(lambda d: None)
    assert cfg.offer_for_form("form493249737").id == 101
    assert cfg.offer_for_form("form512345679").id == 102


@pytest.mark.parametrize("formid", ["form000", "", None])
def test_unknown_form_goes_to_the_default_offer(formid):
    cfg = parse_variant(lambda d: d.update(default_offer_id=102))
    assert cfg.offer_for_form(formid).id == 102


@pytest.mark.parametrize("formid", ["form000", "", None])
def test_unknown_form_without_default_feeds_nothing(formid):
    cfg = parse_variant(lambda d: d.pop("default_offer_id"))
    assert cfg.offer_for_form(formid) is None
    assert cfg.offer_for_form("form493249737").id == 101


def test_offer_lookup_by_id():
    cfg = parse_variant(lambda d: None)
    assert cfg.offer(102).name == "Smart watch cart"
    assert cfg.offer(7) is None


# --- WorkingHours.window -------------------------------------------------------------------------------


def test_window_of_an_ordinary_day():
    hours = config.WorkingHours(days={"mon": "09:00-21:00", "sat": "10:30-16:45"})
    assert hours.window("mon") == (dt.time(9, 0), dt.time(21, 0))
    assert hours.window("sat") == (dt.time(10, 30), dt.time(16, 45))


def test_window_until_midnight_has_no_end():
    hours = config.WorkingHours(days={"fri": "00:00-24:00", "sun": "18:00-24:00"})
    assert hours.window("fri") == (dt.time(0, 0), None)
    assert hours.window("sun") == (dt.time(18, 0), None)


def test_missing_day_is_closed():
    hours = config.WorkingHours(days={"mon": "09:00-21:00"})
    assert hours.window("tue") is None
    assert hours.window("sun") is None


def test_default_working_hours_are_nine_to_nine_moscow_every_day():
    hours = config.WorkingHours()
    assert hours.timezone == "Europe/Moscow"
    assert all(hours.window(day) == (dt.time(9), dt.time(21)) for day in config.DAYS)
