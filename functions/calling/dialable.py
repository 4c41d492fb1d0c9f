"""Which numbers the provider may dial (R-5): checked before anything is taken for a call.

Beeline's click-to-call takes 10 national digits and dials them as a Russian number, so a foreign
number would either ring a stranger (`+1 212 736 5000` as 212 736 50 00) or be refused. Such a lead
still becomes a lead and a CRM order; it is never dialled automatically, and says why.
"""

from __future__ import annotations

from functions.core import phones
from functions.core.config import Config

DIALLED_COUNTRY_CODE = 7  # the only country code Beeline's 10-digit phoneNumber can express


def refusal(phone: object, cfg: Config) -> str | None:
    """Why the provider cannot dial this number (a short sentence for the lead, the API and the call
    log), or None when it can."""
    if not isinstance(phone, str) or phones.country_code(phone) is None:
        return "not a phone number"
    if phones.country_code(phone) != DIALLED_COUNTRY_CODE:
        return "number outside +7"
    region = phones.region(phone)
    if region is None:
        return "not a valid +7 number"
    if region not in cfg.provider.dialable_regions:
        return f"number in {region}, outside provider.dialable_regions"
    try:
        phones.national_digits(phone)
    except phones.InvalidPhone:
        return "not 10 national digits"
    return None
