"""cht.phone: CHT's phone normalisation (cht-messaging §3.7, vectors §6.8), which numbers go to
RapidPro, and log masking."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cht_rapidpro.cht.phone import (
    Refused,
    mask,
    mask_numbers,
    normalize,
    rapidpro_urn,
    region_for,
)
from cht_rapidpro.sandbox.wire import normalize_urn

NZ = {"default_country_code": 64}
KE = {"default_country_code": 254}
KE_STR = {"default_country_code": "254"}

# (id, settings, input, expected); None stands for CHT's `false`.
VECTORS: list[tuple[str, dict[str, Any], str, str | None]] = [
    # §6.8 item 72
    ("72-nz-e164-unchanged", NZ, "+64275552636", "+64275552636"),
    ("72-nz-conflicting-country-unchanged", NZ, "+15155556442", "+15155556442"),
    ("72-no-settings-e164-unchanged", {}, "+64275552636", "+64275552636"),
    ("72-nz-national", NZ, "0275552636", "+64275552636"),
    ("72-nz-punctuation", NZ, "+ 6 4 - 02 7.-.5.(55((2636.", "+64275552636"),
    ("72-nz-trunk-zero-after-cc", NZ, "+640275552636", "+64275552636"),
    # §6.8 item 73
    ("73-short-number-none", {**NZ, "phone_validation": "none"}, "4234", "4234"),
    # §6.8 item 74
    ("74-national-without-country", {}, "0275552636", None),
    ("74-empty", NZ, "", None),
    ("74-too-long", NZ, "5155556442123", None),
    ("74-letter-inside", NZ, "02755K2636", None),
    ("74-letters-inside", NZ, "0275HHH636", None),
    ("74-letters-trailing", NZ, "0275552636ff", None),
    ("74-angle-brackets", NZ, "0275552<636>", None),
    # §6.8 item 75
    ("75-ke-national", KE, "0712345678", "+254712345678"),
    ("75-ke-no-trunk", KE, "712345678", "+254712345678"),
    ("75-ke-cc-without-plus", KE, "254712345678", "+254712345678"),
    ("75-ke-e164", KE, "+254712345678", "+254712345678"),
    ("75-ke-str-national", KE_STR, "0712345678", "+254712345678"),
    ("75-ke-str-no-trunk", KE_STR, "712345678", "+254712345678"),
    ("75-ke-str-cc-without-plus", KE_STR, "254712345678", "+254712345678"),
    ("75-ke-str-e164", KE_STR, "+254712345678", "+254712345678"),
    ("75-ke-short-100", KE, "100", None),
    ("75-ke-emergency-112", KE, "112", None),
    ("75-ke-alpha-sender", KE, "SAFARICOM", None),
    ("75-ke-alnum", KE, "phone1", None),
    ("75-us-911", {"default_country_code": 1}, "911", None),
    ("75-ke-partial", {**KE, "phone_validation": "partial"}, "0712345", "+2540712345"),
    ("75-ke-none", {**KE, "phone_validation": "none"}, "12", "+25412"),
    ("75-cr-e164", {"default_country_code": 506}, "+50689999999", "+50689999999"),
    ("75-np-national", {"default_country_code": 977}, "9841202020", "+9779841202020"),
    # §6.8 item 76
    ("76-cc-plus-national", {"default_country_code": "+254"}, "0712345678", None),
    ("76-cc-leading-zero-national", {"default_country_code": "0254"}, "0712345678", None),
    ("76-cc-empty-national", {"default_country_code": ""}, "0712345678", None),
    ("76-cc-null-national", {"default_country_code": None}, "0712345678", None),
    ("76-cc-plus-e164", {"default_country_code": "+254"}, "+254712345678", "+254712345678"),
    ("76-cc-leading-zero-e164", {"default_country_code": "0254"}, "+254712345678", "+254712345678"),
    ("76-cc-empty-e164", {"default_country_code": ""}, "+254712345678", "+254712345678"),
    ("76-cc-null-e164", {"default_country_code": None}, "+254712345678", "+254712345678"),
    # §3.7 step 3: phone_validation is lower-cased
    ("3.7-validation-lower-cased", {**KE, "phone_validation": "PARTIAL"}, "0712345", "+2540712345"),
    ("3.7-unknown-validation-is-full", {**KE, "phone_validation": "strict"}, "0712345", None),
]


@pytest.mark.parametrize(
    ("settings", "phone", "expected"),
    [vector[1:] for vector in VECTORS],
    ids=[vector[0] for vector in VECTORS],
)
def test_normalize(settings: dict[str, Any], phone: str, expected: str | None) -> None:
    assert normalize(settings, phone) == expected


FULL = {"default_country_code": 254, "phone_validation": "full"}
PARTIAL = {"default_country_code": 254, "phone_validation": "partial"}
NONE = {"default_country_code": 254, "phone_validation": "none"}
RULES = "Invalid phone number under CHT's rules"
IMPOSSIBLE = "Invalid phone number: not a possible international number"

# (id, settings, `to`, the URN sent, or the start of the reason it is refused with)
RECIPIENTS: list[tuple[str, dict[str, Any], str, str]] = [
    # CHT normalises these: sent in E.164, which RapidPro keeps as it is.
    ("ke-national", FULL, "0712345678", "tel:+254712345678"),
    ("ke-national-punctuated", FULL, "0712 345-678", "tel:+254712345678"),
    ("ke-no-trunk", FULL, "712345678", "tel:+254712345678"),
    ("ke-cc-without-plus", FULL, "254712345678", "tel:+254712345678"),
    ("ke-e164", FULL, "+254712345678", "tel:+254712345678"),
    ("foreign-e164", FULL, "+50689999999", "tel:+50689999999"),
    ("default-validation-is-full", KE, "0712345678", "tel:+254712345678"),
    ("none-possible", NONE, "+254700000001", "tel:+254700000001"),
    ("partial-possible-but-invalid", PARTIAL, "0712345", "tel:+2540712345"),
    # Issue 11: RapidPro would store these as local numbers of the workspace (tel:2547123...).
    ("plus-too-short", FULL, "+2547123", RULES),
    ("plus-unknown-country-code", FULL, "+999123456", RULES),
    ("plus-zero", FULL, "+0712345678", RULES),
    ("plus-unknown-country-code-none", NONE, "+999123456", RULES),
    ("plus-zero-none", NONE, "+0712345678", RULES),
    # CHT's rules reject them; CHT itself would post them as written.
    ("short-code", FULL, "12", RULES),
    ("alpha-sender", FULL, "SAFARICOM", RULES),
    ("no-digits", FULL, "++--", RULES),
    ("empty", FULL, "", RULES),
    ("national-without-country", {"phone_validation": "none"}, "0712345678", RULES),
    ("national-unusable-country", {"default_country_code": "+254"}, "0712345678", RULES),
    # CHT lets these through; RapidPro would not keep them as they are.
    ("none-too-short", NONE, "12", IMPOSSIBLE),
    ("none-plus-too-short", NONE, "+2547123", IMPOSSIBLE),
    ("none-too-long", NONE, "+2547123456789012", IMPOSSIBLE),
    ("none-valid-short-number", NONE, "112", IMPOSSIBLE),
    ("partial-local-only-length", {"default_country_code": 1, "phone_validation": "partial"},
     "5551212", IMPOSSIBLE),
    ("partial-plus-local-only-length", PARTIAL, "+15551212", IMPOSSIBLE),
    # Found by the property test below: RapidPro would store +2540000000 (one zero less).
    ("partial-not-formatted-back-the-same", PARTIAL, "00000000", IMPOSSIBLE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "phone", "expected"),
    [vector[1:] for vector in RECIPIENTS],
    ids=[vector[0] for vector in RECIPIENTS],
)
def test_rapidpro_urn(settings: dict[str, Any], phone: str, expected: str) -> None:
    result = rapidpro_urn(settings, phone)
    if expected.startswith("tel:"):
        assert result == expected
    else:
        assert isinstance(result, Refused)
        assert result.reason.startswith(expected), result.reason
        assert result.reason.endswith(": not sent")
        assert not re.search(r"\d{4}", result.reason), "the reason names no number"


def test_refusal_names_the_rules_that_refused() -> None:
    refused = rapidpro_urn(FULL, "+2547123")
    assert isinstance(refused, Refused)
    assert "(default_country_code 254, phone_validation full)" in refused.reason
    refused = rapidpro_urn({"default_country_code": "0254", "phone_validation": "NONE"}, "07")
    assert isinstance(refused, Refused)
    assert "(no usable default_country_code, phone_validation none)" in refused.reason


@given(
    st.one_of(
        st.from_regex(r"\+?0?(254|250|1|64|977)?[0-9]{0,12}", fullmatch=True),
        st.text(alphabet="0123456789+-() ", max_size=18),
    ),
    st.sampled_from([FULL, PARTIAL, NONE, {"default_country_code": 1}, {}]),
    st.sampled_from(["KE", "RW", "US", None]),
)
def test_rapidpro_keeps_every_number_handed_to_it(
    phone: str, settings: dict[str, Any], workspace: str | None
) -> None:
    """Whatever the workspace's country, RapidPro stores the URN exactly as sent (the sandbox
    reproduces RapidPro's normalisation independently of `cht.phone`)."""
    urn = rapidpro_urn(settings, phone)
    if isinstance(urn, str):
        assert normalize_urn(urn, workspace) == urn


@pytest.mark.parametrize(
    ("country_code", "region"),
    [
        (254, "KE"),
        ("254", "KE"),
        (254.0, "KE"),
        (64, "NZ"),
        (1, "US"),
        ("+254", "ZZ"),
        ("0254", "ZZ"),
        ("254.0", "ZZ"),
        ("", "ZZ"),
        (None, "ZZ"),
        (True, "ZZ"),
        ([254], "ZZ"),
    ],
    ids=[
        "int",
        "digits",
        "js-number-254.0",
        "nz",
        "us",
        "plus",
        "leading-zero",
        "string-254.0",
        "empty",
        "undefined",
        "boolean",
        "array",
    ],
)
def test_region_lookup_mimics_js(country_code: Any, region: str) -> None:
    """§3.7 step 1: exact lookup of `String(cc)`; anything non-canonical finds no region."""
    assert region_for(country_code) == region


@pytest.mark.parametrize(
    "phone",
    [None, 254712345678, ["+254712345678"]],
    ids=["undefined", "number", "array"],
)
def test_normalize_non_string_is_false(phone: Any) -> None:
    assert normalize(KE, phone) is None


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+254712345678", "***678"),
        ("0275552636", "***636"),
        ("+ 6 4 - 02 7.-.5.(55((2636.", "***636"),
        ("4234", "***234"),
        ("112", "***"),
        ("12", "***"),
        ("", "***"),
        ("SAFARICOM", "***"),
        (None, "***"),
        (254712345678, "***"),
    ],
    ids=[
        "e164",
        "national",
        "punctuated",
        "four-digits",
        "three-digits-hidden",
        "two-digits-hidden",
        "empty",
        "alpha-sender",
        "none",
        "not-a-string",
    ],
)
def test_mask(phone: Any, expected: str) -> None:
    assert mask(phone) == expected


@given(st.text(alphabet="0123456789+-() .abcK", max_size=30))
def test_mask_never_reveals_the_whole_number(phone: str) -> None:
    masked = mask(phone)
    digits = re.sub(r"[^0-9]", "", phone)
    shown = re.sub(r"[^0-9]", "", masked)
    assert masked.startswith("***")
    assert len(shown) <= 3
    assert digits.endswith(shown)
    if digits:
        assert len(shown) < len(digits), "the full number must never appear"


ENSURE = "Ensure phone numbers contain country codes."


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"urns.0: Invalid URN: tel:+2547. {ENSURE}", f"urns.0: Invalid URN: tel:***547. {ENSURE}"),
        (f"Invalid URN: tel:+254 712 345 678. {ENSURE}", f"Invalid URN: tel:***678. {ENSURE}"),
        (f"Invalid URN: tel:0712-345-678. {ENSURE}", f"Invalid URN: tel:***678. {ENSURE}"),
        ("a: Invalid URN: tel:12; b: Invalid URN: tel:+2547123", "a: Invalid URN: tel:***; "
         "b: Invalid URN: tel:***123"),
        ("Invalid URN: whatsapp:254712345678.", "Invalid URN: whatsapp:***678."),
        ("Invalid URN: tel:abc.", "Invalid URN: tel:abc."),
        ("call +254712345678 or 0712 345 678", "call ***678 or ***678"),
        ("+2547", "***547"),
        ("text.eng: Ensure this field has no more than 640 characters.",
         "text.eng: Ensure this field has no more than 640 characters."),
        ("Request was throttled. Expected available in 3500 seconds.",
         "Request was throttled. Expected available in 3500 seconds."),
        ("due 2026-12-01 10:30", "due 2026-12-01 10:30"),
        ("No such object: 123456", "No such object: ***456"),
    ],
    ids=[
        "rapidpro-short-plus-number",
        "spaced-number",
        "dashed-number",
        "two-parts",
        "whatsapp",
        "no-digits-kept",
        "bare-numbers",
        "four-digits-with-plus",
        "limit-kept",
        "seconds-kept",
        "date-kept",
        "long-id-masked-too",
    ],
)  # fmt: skip
def test_mask_numbers(text: str, masked: str) -> None:
    assert mask_numbers(text) == masked


@given(
    st.one_of(
        st.tuples(
            st.from_regex(r"\+?[0-9]{4,15}", fullmatch=True),
            st.sampled_from(["Invalid URN: tel:{}. " + ENSURE, "urns.0: Invalid URN: tel:{}"]),
        ),
        st.tuples(
            st.from_regex(r"\+[0-9]{4,15}|[0-9]{5,15}", fullmatch=True),
            st.sampled_from(["No contact {} here", "{}", "({})"]),
        ),
    )
)
def test_mask_numbers_never_reveals_a_whole_number(case: tuple[str, str]) -> None:
    number, template = case
    masked = mask_numbers(template.format(number))
    assert number.lstrip("+") not in masked
    shown = len(re.sub(r"[^0-9]", "", masked)) - len(re.sub(r"[^0-9]", "", template))
    assert shown <= 3
