"""cht.records.create_by_form: the data_record an incoming SMS becomes (smsparser spec §11,
cht-messaging §4.2 and §6.9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cht_rapidpro.cht.records import JsError, RecordError, create_by_form
from cht_rapidpro.cht.translations import Translator

NOW_MS = 1_767_225_600_000
KE = {"default_country_code": 254, "phone_validation": "full"}


def _test_forms() -> dict[str, Any]:
    """`api/tests/form-definitions.js`, as the conformance corpus carries it."""
    cases = json.loads((Path(__file__).parent.parent / "data" / "smsparser-cases.json").read_text())
    return next(
        c["forms"] for c in cases if c["function"] == "createByForm" and "YYYY" in c["forms"]
    )


TEST_FORMS = _test_forms()
#: cht-messaging §6.4 case 43: one required string field.
FORM = {
    "FORM": {
        "meta": {"code": "FORM"},
        "fields": {"some_data": {"type": "string", "required": True}},
    }
}


def test_free_text_from_rapidpro_is_an_unstructured_message() -> None:
    body = {"from": "+50689999999", "message": "the sms message content", "gateway_ref": "ref-1"}

    doc = create_by_form(body, settings={}, now_ms=NOW_MS)

    assert doc == {
        "type": "data_record",
        "from": "+50689999999",
        "errors": [],
        "tasks": [],
        "fields": {},
        "reported_date": NOW_MS,
        "sms_message": {
            "type": "sms_message",
            "message": "the sms message content",
            "form": "THE",
            "from": "+50689999999",
            "gateway_ref": "ref-1",
        },
    }
    assert list(doc) == [
        "type",
        "from",
        "errors",
        "tasks",
        "fields",
        "reported_date",
        "sms_message",
    ]


def test_known_form_fills_fields() -> None:
    doc = create_by_form(
        {"from": "+50689999999", "message": "FORM the data", "gateway_ref": "ref-2"},
        settings={"forms": FORM},
        now_ms=NOW_MS,
    )

    assert doc["form"] == "FORM"
    assert doc["fields"] == {"some_data": "the data"}
    assert doc["errors"] == []
    assert "content_type" not in doc and "_id" not in doc


def test_worked_example_of_the_spec() -> None:
    body = {
        "from": "0712345678",
        "message": "1!YYYY!facility#2011#11#0#1#2#3#4#5#6#9#8#7#6#5#4#99",
        "sent_timestamp": "1352399720000",
        "gateway_ref": "abc",
    }

    doc = create_by_form(body, settings={**KE, "forms": TEST_FORMS}, now_ms=NOW_MS)

    counts = {"la_6x1": 1, "la_6x2": 2, "cotrimoxazole": 3, "zinc": 4, "ors": 5, "eye_ointment": 6}
    stock = {"la_6x1": 9, "la_6x2": 8, "cotrimoxazole": 7, "zinc": 6, "ors": 5, "eye_ointment": 4}
    assert doc == {
        "type": "data_record",
        "from": "+254712345678",
        "form": "YYYY",
        "errors": [{"code": "extra_fields", "message": "Extra fields."}],
        "tasks": [],
        "fields": {
            "facility_id": "facility",
            "year": 2011,
            "month": "November",
            "misoprostol_administered": False,
            "quantity_dispensed": counts,
            "days_stocked_out": stock,
        },
        "reported_date": 1352399720000,
        "sms_message": {
            "type": "sms_message",
            "message": body["message"],
            "form": "YYYY",
            "reported_date": "1352399720000",
            "from": "0712345678",
            "gateway_ref": "abc",
        },
        "refid": "FACILITY",
    }


def test_type_and_missing_field_errors_are_translated() -> None:
    doc = create_by_form(
        {"from": "+888", "message": "YYYY HFI foo#RPY 2012.5"},
        settings={"forms": TEST_FORMS},
        now_ms=NOW_MS,
    )

    assert doc["fields"] == {"facility_id": "foo", "year": 2012.5}
    assert doc["errors"] == [
        {
            "code": "sys.incorrect_type",
            "message": "Incorrect type of field year, expected integer.",
        },
        {"code": "sys.missing_fields", "message": "Missing or invalid fields: month."},
    ]


def test_missing_required_fields_are_listed() -> None:
    doc = create_by_form(
        {"from": "+888", "message": "1!YYYY!foo"}, settings={"forms": TEST_FORMS}, now_ms=NOW_MS
    )

    assert doc["errors"] == [
        {"code": "sys.missing_fields", "message": "Missing or invalid fields: year,month."}
    ]


@pytest.mark.parametrize(
    ("settings", "errors", "form"),
    [
        pytest.param({}, [], None, id="free-text-by-default"),
        pytest.param(
            {"forms_only_mode": True},
            [{"code": "sys.form_not_found", "message": "Form 'FOO' not found."}],
            "FOO",
            id="forms-only-mode",
        ),
    ],
)
def test_unknown_form(settings: dict[str, Any], errors: list[Any], form: str | None) -> None:
    doc = create_by_form(
        {"from": "+888", "message": "foo bar baz"},
        settings={**settings, "forms": TEST_FORMS},
        now_ms=NOW_MS,
    )

    assert doc["errors"] == errors
    assert doc.get("form") == form
    assert doc["sms_message"]["form"] == "FOO"


def test_error_messages_follow_the_locale_chain() -> None:
    translations = {"fr": {"sys.empty": "Message vide."}, "en": {"sys.empty": "Empty."}}
    settings = {"locale": "fr"}
    doc = create_by_form(
        {"from": "+888", "message": " "},
        settings=settings,
        now_ms=NOW_MS,
        translate=Translator(settings, translations),
    )
    english = create_by_form(
        {"from": "+888", "message": " ", "locale": "en"},
        settings=settings,
        now_ms=NOW_MS,
        translate=Translator(settings, translations),
    )

    assert doc["errors"] == [{"code": "sys.empty", "message": "Message vide."}]
    assert english["errors"] == [{"code": "sys.empty", "message": "Empty."}]
    assert english["sms_message"]["locale"] == "en"


@pytest.mark.parametrize(
    ("settings", "sender", "expected"),
    [
        pytest.param(KE, "0712345678", "+254712345678", id="national-to-e164"),
        pytest.param(KE, "+254712345678", "+254712345678", id="e164-kept"),
        pytest.param(KE, "+123", "+123", id="invalid-kept-as-given"),
        pytest.param({}, "0712345678", "0712345678", id="no-country-kept-as-given"),
        pytest.param(KE, "", "", id="empty-sender-allowed"),
    ],
)
def test_sender_is_normalised(settings: dict[str, Any], sender: str, expected: str) -> None:
    doc = create_by_form({"from": sender, "message": "hi"}, settings=settings, now_ms=NOW_MS)

    assert doc["from"] == expected
    assert doc["sms_message"]["from"] == sender  # the raw value stays on sms_message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"message": "test"}, "Missing required value: from", id="no-from"),
        pytest.param({"from": "+888"}, "Missing required field: message", id="no-message"),
    ],
)
def test_missing_required_values_raise(body: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError) as raised:
        create_by_form(body, settings={}, now_ms=NOW_MS)

    assert raised.value.public_message == message


@pytest.mark.parametrize(
    ("sent_timestamp", "reported_date"),
    [
        pytest.param(1352659197736, 1352659197736, id="number"),
        pytest.param("1352659197736", 1352659197736, id="13-digit-string"),
        pytest.param("Apr 11, 2021 18:00 +0800", 1618135200000, id="moment-js-date-fallback"),
        pytest.param("2012-03-12", 1331510400000, id="iso-date-is-utc-midnight"),
        pytest.param("x1352659197736", NOW_MS, id="digits-with-junk-is-now"),
        pytest.param("not a date", NOW_MS, id="garbage-is-now"),
        pytest.param(0, NOW_MS, id="zero-is-now"),
    ],
)
def test_reported_date_from_sent_timestamp(sent_timestamp: Any, reported_date: int) -> None:
    body = {"from": "+888", "message": "hi", "sent_timestamp": sent_timestamp}

    assert create_by_form(body, settings={}, now_ms=NOW_MS)["reported_date"] == reported_date


def test_zero_width_form_code_is_found_and_input_untouched() -> None:
    forms = {
        "ZW": {
            "meta": {"code": "ZW"},
            "fields": {
                "patient_id": {"type": "string"},
                "count": {"type": "integer"},
                "note": {"type": "string"},
            },
        }
    }
    message = "Z\u200bW 01\u200b2 1\u200c2 a\u200db"
    body = {"from": "+888", "message": message}

    doc = create_by_form(body, settings={"forms": forms}, now_ms=NOW_MS)

    assert doc["form"] == "ZW"
    assert doc["fields"] == {"patient_id": "012", "count": 12, "note": "a\u200db"}
    assert doc["sms_message"]["message"] == message
    assert body == {"from": "+888", "message": message}


def test_document_is_json_ready() -> None:
    # bsYear without its month/day gives JS NaN for lmp_date: CouchDB stores null.
    doc = create_by_form(
        {"from": "+888", "message": "YYYS 12345 2068"},
        settings={"forms": TEST_FORMS},
        now_ms=NOW_MS,
    )

    assert doc["fields"] == {"patient_id": "12345", "lmp_year": "2068", "lmp_date": None}
    # NaN is not null for validation: only month and day are reported missing, as in CHT.
    assert doc["errors"][0]["message"] == "Missing or invalid fields: lmp_month,lmp_day."
    json.dumps(doc, allow_nan=False)


def test_message_that_makes_cht_throw_raises_js_error() -> None:
    forms = {"A": {"meta": {"code": "A"}, "fields": {"a": {"type": "string"}}}}

    with pytest.raises(JsError):
        create_by_form({"from": "+888", "message": 'A "'}, settings={"forms": forms})
