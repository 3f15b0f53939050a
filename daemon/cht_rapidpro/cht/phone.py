"""CHT's phone-number normalisation (`@medic/phone-number.normalize`) and log masking."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import phonenumbers
from phonenumbers import shortnumberinfo

_LETTER = re.compile(r"[a-z]", re.IGNORECASE)
_CANONICAL_CC = re.compile(r"[1-9][0-9]*")


def region_for(default_country_code: Any) -> str:
    """Region for CHT's `default_country_code`, looked up the way the JS library does.

    google-libphonenumber does an exact lookup of `String(cc)`: `254` and `"254"` find KE, while
    `"+254"`, `"0254"`, `""` and a missing value find nothing ("ZZ").
    """
    cc = default_country_code
    if isinstance(cc, bool):
        return "ZZ"
    if isinstance(cc, float) and cc.is_integer():
        cc = int(cc)  # JS String(254.0) is "254"
    if isinstance(cc, int):
        text = str(cc)
    elif isinstance(cc, str):
        text = cc
    else:
        return "ZZ"
    if not _CANONICAL_CC.fullmatch(text):
        return "ZZ"
    return phonenumbers.region_code_for_country_code(int(text))


def normalize(settings: Mapping[str, Any], phone: Any) -> str | None:
    """Normalise `phone` as CHT does; None where CHT returns false.

    Args:
        settings: the whole app_settings object (top-level `default_country_code` and
            `phone_validation` are used).
        phone: the number as stored.

    Returns:
        E.164, or NATIONAL format for valid short numbers; None if the number does not
        validate. Callers use `normalize(settings, phone) or phone`, as CHT does.
    """
    if not isinstance(phone, str) or not phone:
        return None
    validation = settings.get("phone_validation")
    mode = validation.lower() if isinstance(validation, str) else ""
    return _normalize(region_for(settings.get("default_country_code")), mode, phone)


@functools.lru_cache(maxsize=8192)
def _normalize(region: str, mode: str, phone: str) -> str | None:
    """`normalize` for one region and validation mode (libphonenumber is costly: cached)."""
    try:
        parsed = phonenumbers.parse(phone, region, keep_raw_input=True)
    except phonenumbers.NumberParseException:
        return None
    if mode == "partial":
        valid = phonenumbers.is_possible_number(parsed)
    elif mode == "none":
        valid = True
    else:
        valid = phonenumbers.is_valid_number(parsed)
    if not valid or _LETTER.search(phone):
        return None
    if shortnumberinfo.is_valid_short_number(parsed):
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def mask(phone: object) -> str:
    """A phone number safe for logs: the last 3 digits only (`***636`).

    Health data: logs never carry a full phone number.
    """
    if not isinstance(phone, str):
        return "***"
    digits = re.sub(r"[^0-9]", "", phone)
    return "***" + digits[-3:] if len(digits) > 3 else "***"
