"""CHT's phone-number normalisation (`@medic/phone-number.normalize`), which numbers may be handed
to RapidPro, and log masking."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
    return _normalize(region_for(settings.get("default_country_code")), _mode(settings), phone)


def _mode(settings: Mapping[str, Any]) -> str:
    """`phone_validation` as CHT reads it: lower-cased; anything but partial/none is full."""
    validation = settings.get("phone_validation")
    mode = validation.lower() if isinstance(validation, str) else ""
    return mode if mode in ("partial", "none") else "full"


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


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a message must not be handed to RapidPro; `reason` names no number (it is stored in
    the task's `state_details` and logged)."""

    reason: str


def rapidpro_urn(settings: Mapping[str, Any], phone: Any) -> str | Refused:
    """The `tel:` URN to send `phone` to through RapidPro, or why it must not be sent at all.

    CHT posts `normalize(settings, to) || to`: a number its own rules reject goes out as written.
    RapidPro does not refuse a `+` number that is not a possible number: it drops the `+` and
    takes the digits as a local number of the workspace's country (`URN.normalize_number`), so
    `+2547123` reaches whoever owns 2547123 there. For health messages a wrong recipient is worse
    than a failure, so only a number RapidPro keeps exactly as sent goes out:

    1. CHT's normalisation accepts it (`default_country_code`, `phone_validation`): the rules
       CHT already applies to contacts' numbers;
    2. the result is E.164 and exactly a possible number (`IS_POSSIBLE`, RapidPro's own test in
       `parse_number`), so RapidPro stores and sends it unchanged.

    Step 2 matters where CHT is lenient. `phone_validation: none` accepts anything parseable
    (`12` → `+25412`), `partial` accepts lengths that are possible only locally (`+15551212`),
    and valid short numbers come back in national format (`112`): RapidPro would reinterpret or
    refuse each of them, so they are refused here. Validity (`is_valid_number`) is not required
    beyond what the operator's `phone_validation` asks: a possible number in a range
    libphonenumber does not know yet is still the number CHT meant, and RapidPro keeps it.
    """
    normalized = normalize(settings, phone)
    if normalized is None:
        return Refused(f"Invalid phone number under CHT's rules ({_rules(settings)}): not sent")
    if not _kept_by_rapidpro(normalized):
        return Refused(
            "Invalid phone number: not a possible international number (phone_validation "
            f"{_mode(settings)} lets it pass, but RapidPro would send it to a different number "
            "or refuse it): not sent"
        )
    return f"tel:{normalized}"


def _rules(settings: Mapping[str, Any]) -> str:
    code: Any = settings.get("default_country_code")
    if region_for(code) == "ZZ":
        country = "no usable default_country_code"
    else:
        country = f"default_country_code {int(code)}"
    return f"{country}, phone_validation {_mode(settings)}"


@functools.lru_cache(maxsize=8192)
def _kept_by_rapidpro(number: str) -> bool:
    """Whether RapidPro stores `number` as it is: E.164 and exactly IS_POSSIBLE (not local-only),
    and formatted back to the same string (`+25400000000` would be stored as `+2540000000`)."""
    if not number.startswith("+"):
        return False  # a short number in national format: RapidPro would read it as local
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return False
    return (
        phonenumbers.is_possible_number_with_reason(parsed)
        == phonenumbers.ValidationResult.IS_POSSIBLE
        and phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == number
    )


#: A phone URN in a sentence (RapidPro: "Invalid URN: tel:+2547. Ensure ..."): its whole path,
#: up to the end of the sentence or of one `; `-separated part of a summary.
_URN_IN_TEXT = re.compile(r"(?<![A-Za-z])(tel|whatsapp):(.*?)(?=\.\s|\.?$|;)")
#: Any other run of digits (spaces allowed inside), with its `+` if it has one.
_DIGIT_RUN = re.compile(r"\+?\d(?:[\d ]*\d)?")
_ANY_DIGIT = re.compile(r"\d")


def mask_numbers(text: str) -> str:
    """Text from elsewhere (a RapidPro error) fit for logs and `state_details`: every phone number
    in it masked as `mask` does (`tel:+254712345678` → `tel:***678`).

    A URN's path with a digit in it is masked whole. Elsewhere a run of digits is masked when
    it has a `+` or at least 5 digits; shorter runs (limits, counts, seconds in RapidPro's
    messages) stay.
    """
    text = _URN_IN_TEXT.sub(
        lambda m: f"{m.group(1)}:{mask(m.group(2))}" if _ANY_DIGIT.search(m.group(2)) else m[0],
        text,
    )

    def number(match: re.Match[str]) -> str:
        found = match.group(0)
        digits = sum(c.isdigit() for c in found)
        return mask(found) if found.startswith("+") or digits >= 5 else found

    return _DIGIT_RUN.sub(number, text)


def mask(phone: object) -> str:
    """A phone number safe for logs: the last 3 digits only (`***636`).

    Health data: logs never carry a full phone number.
    """
    if not isinstance(phone, str):
        return "***"
    digits = re.sub(r"[^0-9]", "", phone)
    return "***" + digits[-3:] if len(digits) > 3 else "***"
