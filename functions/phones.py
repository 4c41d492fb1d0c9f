"""Phone numbers: parsed with libphonenumber (default region RU), masked for logs and answers (R-5, R-9)."""

from __future__ import annotations

import re

import phonenumbers

DEFAULT_REGION = "RU"


class InvalidPhone(ValueError):
    pass


def normalise(raw: object, region: str = DEFAULT_REGION) -> str:
    """Return E.164 (`+79991112233`) or raise InvalidPhone for an unparseable or impossible number."""
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise InvalidPhone("not a phone number")
    text = str(raw).strip()
    if not text or len(text) > 40:
        raise InvalidPhone("not a phone number")
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise InvalidPhone("not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhone("impossible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def national_digits(e164: str) -> str:
    """The 10 national digits Beeline's click-to-call wants (`+79991112233` -> `9991112233`)."""
    number = phonenumbers.parse(e164, DEFAULT_REGION)
    return phonenumbers.national_significant_number(number)


def mask(e164: str) -> str:
    """`+79991112233` -> `+7 999 ***-**-33`: enough to tell leads apart, not enough to call them."""
    digits = re.sub(r"\D", "", e164)
    if len(digits) < 6:
        return "***"
    if e164.startswith("+7") and len(digits) == 11:
        return f"+7 {digits[1:4]} ***-**-{digits[-2:]}"
    return f"+{digits[:-8]} {digits[-8:-5]} ***-**-{digits[-2:]}" if len(digits) > 8 else "***" + digits[-2:]


def show(e164: str, visibility: str) -> str:
    """A phone as an API answer or report shows it: full, or partial like the logs (R-9)."""
    return e164 if visibility == "full" else mask(e164)


# Phone-shaped runs in free text: optional +, 10-15 digits with the usual separators. Neighbouring
# word characters or ':' exclude ids such as Tilda's tranid `1234567:8901234567` and epoch millis.
_CANDIDATE = re.compile(r"(?<![\w:])(?:\+|%2B|\b)\d[\d\s\-().]{8,22}\d(?![\w:])")


def _mask_match(match: re.Match) -> str:
    text = match.group(0).replace("%2B", "+")
    digits = re.sub(r"\D", "", text)
    if not 10 <= len(digits) <= 15:
        return text
    try:
        return mask(normalise(text))
    except InvalidPhone:
        # An impossible number is still something a person typed: mask shapes that look Russian.
        if (len(digits) == 11 and digits[0] in "78") or (len(digits) == 10 and digits[0] == "9"):
            return "***-**-" + digits[-2:]
        return text


def redact(text: str) -> str:
    """Mask every phone number found in free text (the last line of defence for logs)."""
    if not any(ch.isdigit() for ch in text):
        return text
    return _CANDIDATE.sub(_mask_match, text)
