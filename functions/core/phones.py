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


def _parsed(e164: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(e164, DEFAULT_REGION)
    except phonenumbers.NumberParseException:
        return None


def country_code(e164: str) -> int | None:
    """The country calling code (`+12127365000` -> 1), or None for what is not a phone number."""
    number = _parsed(e164)
    return number.country_code if number else None


def region(e164: str) -> str | None:
    """The region of a valid number (`+77001234567` -> "KZ": +7 is shared by RU and KZ), else None."""
    number = _parsed(e164)
    if number is None or not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.region_code_for_number(number)


def national_digits(e164: str) -> str:
    """The 10 national digits Beeline's click-to-call wants (`+79991112233` -> `9991112233`).
    Raises InvalidPhone for anything else: a foreign number's digits would dial a Russian stranger."""
    number = _parsed(e164)
    digits = phonenumbers.national_significant_number(number) if number else ""
    if number is None or number.country_code != 7 or len(digits) != 10:
        raise InvalidPhone("not a +7 number with 10 national digits")
    return digits


def mask(e164: str) -> str:
    """`+79991112233` -> `+7 999 ***-**-33`: enough to tell leads apart, not enough to call them.
    Foreign numbers split at their own country code (`+1 212 ***-**-00`); a short national number
    shows fewer leading digits, so at least five stay hidden as in the Russian form (`+49 3 ***-**-56`)."""
    digits = re.sub(r"\D", "", e164)
    if len(digits) < 6:
        return "***"
    if e164.startswith("+7") and len(digits) == 11:  # also the impossible +7 shapes a person typed
        return f"+7 {digits[1:4]} ***-**-{digits[-2:]}"
    number = _parsed(e164) if e164.startswith("+") else None
    national = phonenumbers.national_significant_number(number) if number else ""
    if not number or len(national) < 4 or not digits.endswith(national):
        return "***" + digits[-2:]
    head = national[:min(3, max(0, len(national) - 7))]
    return f"+{number.country_code} " + (f"{head} " if head else "") + f"***-**-{national[-2:]}"


def show(e164: str, visibility: str) -> str:
    """A phone as an API answer or report shows it: full, or partial like the logs (R-9)."""
    return e164 if visibility == "full" else mask(e164)


# Runs of digits with the usual phone separators, optionally after + (or %2B in URL-encoded text).
# A neighbouring word character excludes UUIDs and identifiers; an escaped newline in a JSON line
# (`\n` as two characters) still counts as a boundary.
_RUN = re.compile(r"(?:(?<!\w)|(?<=\\[nrt]))(?:\+|%2B)?\d[\d\s\-().]*\d(?!\w)")
_SPACES = re.compile(r"(\s+)")


def _phone_in(text: str, digits: str) -> str | None:
    """The masked form if these whitespace-joined groups spell a phone number, else None."""
    international = text.startswith("+")
    if international and 10 <= len(digits) <= 15:
        try:
            return mask(normalise("+" + digits))
        except InvalidPhone:
            pass
    # Russian shapes, valid or not: a person typed them (8/7 + 10 digits, or 10 digits from 9).
    if (len(digits) == 11 and digits[0] in "78") or (len(digits) == 10 and digits[0] == "9"):
        return mask("+7" + digits[-10:])
    return None


def _mask_run(match: re.Match) -> str:
    # A run may join several numbers ("order 48211 8 999 111 22 33", "18 89991112233"): try every
    # window of consecutive space-separated groups, longest first, and mask the ones that are phones.
    parts = _SPACES.split(match.group(0).replace("%2B", "+", 1))
    groups, gaps = parts[0::2], [*parts[1::2], ""]
    out, i = [], 0
    while i < len(groups):
        masked, end, digits = None, i, ""
        for j in range(i, len(groups)):
            digits += re.sub(r"\D", "", groups[j])
            if len(digits) > 15:
                break
            found = _phone_in(" ".join(groups[i:j + 1]), digits)
            if found:
                masked, end = found, j
        if masked:
            out.append(masked + gaps[end])
            i = end + 1
        else:
            out.append(groups[i] + gaps[i])
            i += 1
    return "".join(out)


def redact(text: str) -> str:
    """Mask every phone number found in free text (the last line of defence for logs)."""
    if not any(ch.isdigit() for ch in text):
        return text
    return _RUN.sub(_mask_run, text)
