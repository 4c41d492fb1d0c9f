"""Phone numbers (R-5, R-9): normalised to E.164, masked for logs and answers, redacted in free text."""

from __future__ import annotations

import json
import re

import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from functions.core.phones import InvalidPhone, mask, national_digits, normalise, redact, show

E164 = "+79991112233"
MASKED = "+7 999 ***-**-33"


# --- normalise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "+7 (999) 111-22-33",
        "8 999 111 22 33",
        "9991112233",
        "+79991112233",
        "89991112233",
        "79991112233",
        "  +7 999 111-22-33  ",
        "8-999-111-22-33",
        "+7(999)1112233",
        89991112233,
        9991112233,
    ],
)
def test_r5_spellings_normalise_to_e164(raw):
    assert normalise(raw) == E164


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "abc", "123", "+7 (000) 111-22-33", "8 999 111 22", "+7 999 111 22 33 44 55", "1" * 41,
     None, True, False, 3.5, ["+79991112233"], {"phone": "+79991112233"}],
)
def test_unparseable_or_impossible_phones_raise_invalid_phone(raw):
    with pytest.raises(InvalidPhone):
        normalise(raw)


def test_invalid_phone_is_a_value_error():
    assert issubclass(InvalidPhone, ValueError)


def test_other_regions_are_kept_in_their_own_country_code():
    assert normalise("+44 20 7946 0958") == "+442079460958"


# --- mask, show, national_digits ---------------------------------------------------------------------


def test_mask_shows_operator_code_and_last_two_digits():
    assert mask(E164) == MASKED
    assert mask("+79994445566") == "+7 999 ***-**-66"


@pytest.mark.parametrize(("e164", "masked"), [
    ("+12127365000", "+1 212 ***-**-00"),  # split at the country code, not "+121 273 …"
    ("+442079460958", "+44 207 ***-**-58"),
    ("+4930123456", "+49 3 ***-**-56"),  # a short national number shows fewer digits: five stay hidden
    ("+380441234567", "+380 44 ***-**-67"),
    ("+77001234567", "+7 700 ***-**-67"),
])
def test_mask_of_a_foreign_number_splits_at_its_country_code(e164, masked):
    assert mask(e164) == masked
    assert redact(f"call {e164} now") == f"call {masked} now"


@pytest.mark.parametrize("short", ["", "+7", "12345"])
def test_mask_of_something_too_short_shows_nothing(short):
    assert mask(short) == "***"


def test_national_digits_are_the_ten_digits_beeline_wants():
    assert national_digits(E164) == "9991112233"
    assert len(national_digits("+74951234567")) == 10


@pytest.mark.parametrize("foreign", ["+12127365000", "+4930123456", "+380441234567", "not a phone"])
def test_national_digits_refuse_what_is_not_a_russian_number(foreign):
    # +1 212 736 5000 has ten national digits too: dialled as 212 736 50 00 it rings a Russian stranger.
    with pytest.raises(InvalidPhone):
        national_digits(foreign)


def test_show_full_and_partial():
    assert show(E164, "full") == E164
    assert show(E164, "partial") == MASKED
    # Anything but "full" is partial: never show more than asked.
    assert show(E164, "unexpected") == MASKED


# --- redact --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+79991112233", MASKED),
        ("call +79991112233 now", f"call {MASKED} now"),
        ("Телефон: 8 (999) 111-22-33.", f"Телефон: {MASKED}."),
        ("Phone=%2B79991112233&Name=Anna", f"Phone={MASKED}&Name=Anna"),
        ('{"phone": "+79991112233", "name": "Анна"}', f'{{"phone": "{MASKED}", "name": "Анна"}}'),
        ("tel 9991112233", f"tel {MASKED}"),
        ("+7 999 111 22 33, +7 999 444-55-66", f"{MASKED}, +7 999 ***-**-66"),
        ("(+7 (999) 111-22-33)", f"({MASKED})"),
    ],
)
def test_redact_masks_phones_in_free_text(text, expected):
    assert redact(text) == expected


def test_redact_masks_phones_inside_a_json_document():
    document = json.dumps({"lead": {"phone": "+7 (999) 111-22-33", "raw": "Phone=8 999 111 22 33"}},
                          ensure_ascii=False)
    redacted = redact(document)
    assert json.loads(redacted) == {"lead": {"phone": MASKED, "raw": f"Phone={MASKED}"}}


def test_redact_masks_impossible_russian_looking_numbers_too():
    # +7 000 is not a valid range, but a person typed it: still not for the logs.
    assert redact("phone 8 000 111 22 33") == "phone +7 000 ***-**-33"


@pytest.mark.parametrize(
    "text",
    [
        "tranid 1234567:8901234567",
        '{"tranid": "1234567:8901234567"}',
        "at 1779987800120 ms",
        '{"ts": 1779987800120}',
        "lead 123e4567-e89b-12d3-a456-426614174000",
        "lead 00000000-0000-0000-0000-000000000000",
        "order 48211 project 1",
        "no digits at all",
        "",
    ],
)
def test_redact_leaves_ids_and_timestamps_alone(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "Перезвоните после 18 89991112233",
        "2024-05-01 89991112233",
        "89991112233 89994445566",
        "order 48211 8 999 111 22 33",
    ],
)
def test_redact_masks_a_phone_that_follows_another_number(text):
    redacted = redact(text)
    assert "***-**-33" in redacted
    assert "1112233" not in re.sub(r"\D", "", redacted)


def test_redact_masks_a_phone_after_an_escaped_newline_in_json():
    line = json.dumps({"comment": "Перезвоните\n89991112233"}, ensure_ascii=False)
    redacted = redact(line)
    assert "1112233" not in redacted
    assert json.loads(redacted) == {"comment": f"Перезвоните\n{MASKED}"}


# --- properties ----------------------------------------------------------------------------------------


def _valid(e164: str) -> bool:
    return phonenumbers.is_valid_number(phonenumbers.parse(e164))


RU_MOBILES = st.text(alphabet="0123456789", min_size=9, max_size=9).map(lambda rest: "+79" + rest).filter(_valid)


def spellings(e164: str) -> list[str]:
    d = e164[2:]  # 10 national digits
    return [
        e164,
        f"8 {d[:3]} {d[3:6]} {d[6:8]} {d[8:]}",
        f"+7 ({d[:3]}) {d[3:6]}-{d[6:8]}-{d[8:]}",
        f"8 ({d[:3]}) {d[3:6]}-{d[6:8]}-{d[8:]}",
        "8" + d,
        d,
    ]


CONTEXTS = [
    "{}",
    "Позвоните мне {} после обеда",
    "tel: {}.",
    '{{"phone": "{}", "tranid": "1234567:8901234567"}}',
    "Phone={}&formid=form493249737",
    "({})",
    "a, {}; b",
]


@settings(max_examples=150, suppress_health_check=[HealthCheck.filter_too_much])
@given(e164=RU_MOBILES, context=st.sampled_from(CONTEXTS))
def test_every_spelling_of_a_valid_mobile_normalises_and_is_redacted(e164, context):
    last_seven = e164[-7:]
    for spelling in spellings(e164):
        assert normalise(spelling) == e164
        redacted = redact(context.format(spelling))
        assert last_seven not in redacted, (spelling, redacted)
        assert mask(e164) in redacted


@settings(max_examples=300)
@given(st.text())
def test_redact_never_raises_on_arbitrary_text(text):
    assert isinstance(redact(text), str)


@settings(max_examples=200)
@given(st.text(alphabet="0123456789 +-().:%2B\n\tabc", max_size=60))
def test_redact_never_raises_on_phone_shaped_noise(text):
    redacted = redact(text)
    # Masking never adds digits: at most it removes them.
    assert sum(c.isdigit() for c in redacted) <= sum(c.isdigit() for c in text)
