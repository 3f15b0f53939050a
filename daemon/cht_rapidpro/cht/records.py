"""CHT's `records.createByForm`: the `data_record` document an incoming SMS becomes.

A port of `api/src/services/records.js` and `report/validate.js` (CHT 5.2; spec
`smsparser.md` §11, `cht-messaging.md` §4.2). The result is the JSON document CHT saves, before
CHT's transitions (contact lookup, registrations, auto-replies) run on it: no `_id`, no
`contact`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import phone, smsparser
from .jsdate import moment_parse_string, moment_value_of
from .jsvalues import UNDEFINED, JsError, get_property, js_number, js_trim, js_truthy, to_number
from .smsparser import ParseContext, form_fields, get_form_code, strip_invisible
from .translations import DEFAULT_TRANSLATIONS, Translate, Translator

__all__ = [
    "JsError",
    "RecordError",
    "create_by_form",
    "create_record_by_json",
    "parse_sent_timestamp",
    "to_json",
    "validate",
]

_DATE_NUMBER_STRING = re.compile(r"[0-9]{13,}")


class RecordError(ValueError):
    """CHT's `PublicError`: the request is unusable; `public_message` is CHT's answer."""

    def __init__(self, public_message: str) -> None:
        super().__init__(public_message)
        self.public_message = public_message


def _missing(value: Any) -> bool:
    return value is UNDEFINED


def to_json(value: Any) -> Any:
    """What `JSON.stringify` keeps: UNDEFINED members dropped (null in arrays), NaN and
    infinities as null. Returns a deep copy."""
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items() if v is not UNDEFINED}
    if isinstance(value, list):
        return [None if v is UNDEFINED else to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_sent_timestamp(value: Any) -> Any:
    """CHT's `parseSentTimestamp`: epoch ms from a gateway's `sent_timestamp` (§11.2).

    Numbers pass through; a string holding 13+ digits is `Number(string)` (NaN if anything
    else is in it); other strings go through moment. Anything else is UNDEFINED.
    """
    if isinstance(value, bool):
        return UNDEFINED
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        if _DATE_NUMBER_STRING.search(value):
            return js_number(to_number(value))
        return js_number(moment_parse_string(value))
    return UNDEFINED


def _is_integer(value: Any) -> bool:
    """JS `Number.isInteger`."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value).is_integer()
    )


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _is_boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _is_object(value: Any) -> bool:
    """JS `typeof value === 'object'` for a non-null JSON value (arrays too)."""
    return isinstance(value, dict | list)


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "integer": _is_integer,
    "string": _is_string,
    "boolean": _is_boolean,
    "complex": _is_object,
}


def validate(form_def: Any, form_data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CHT's `validate(def, formData)`: untranslated `{code, ctx}` errors (spec §11.3).

    Type errors come in field order, then one `sys.missing_fields` for required fields whose
    value is null or undefined. Values are looked up by the flat key, so dotted fields always
    read as missing and are never type-checked (CHT's behaviour).
    """
    errors: list[dict[str, Any]] = []
    missing: list[str] = []
    for key, field_def in form_fields(form_def):
        value = form_data.get(key, UNDEFINED)
        absent = value is None or value is UNDEFINED
        if js_truthy(get_property(field_def, "required")) and absent:
            missing.append(key)
        elif not absent and not js_truthy(get_property(field_def, "list")):
            expected = get_property(field_def, "type")
            check = _TYPE_CHECKS.get(expected) if isinstance(expected, str) else None
            if check is not None and not check(value):
                errors.append(
                    {"code": "sys.incorrect_type", "ctx": {"expectedType": expected, "key": key}}
                )
    if missing:
        errors.append({"code": "sys.missing_fields", "ctx": {"fields": missing}})
    return errors


def _merge(path: list[str], target: dict[str, Any], source: Any) -> None:
    """`smsparser.merge`: copy `source[path]` into `target`, creating nested objects only when
    the source has a truthy value at the first segment."""
    head, rest = path[0], path[1:]
    if not rest:
        value = get_property(source, head)
        if value is UNDEFINED:
            target.pop(head, None)
        else:
            target[head] = value
        return
    inner = get_property(source, head)
    if not js_truthy(inner):
        return
    if not js_truthy(target.get(head)):
        target[head] = {}
    if isinstance(target[head], dict):
        _merge(rest, target[head], inner)


class _RecordBuilder:
    """`getDataRecord` with its collaborators (settings, translate, clock)."""

    def __init__(self, settings: Mapping[str, Any], translate: Translate, now_ms: int) -> None:
        self._settings = settings
        self._translate = translate
        self._now_ms = now_ms

    def form_def(self, code: Any) -> Any:
        """`app_settings.forms[code]`, or None."""
        forms = self._settings.get("forms")
        if not isinstance(forms, dict) or not isinstance(code, str):
            return None
        found = forms.get(code)
        return found if js_truthy(found) else None

    def _locale(self, record: Mapping[str, Any]) -> Any:
        """CHT's `getLocale(record)`: a form field named `locale` can pick the language."""
        fields = record.get("fields")
        candidates = (
            record.get("locale"),
            fields.get("locale") if isinstance(fields, dict) else None,
            record["sms_message"].get("locale"),
            self._settings.get("locale"),
        )
        return next((c for c in candidates if js_truthy(c)), "en")

    def add_error(self, record: dict[str, Any], error: str | dict[str, Any]) -> None:
        """CHT's `addError`: errors are stored as `{code, message}`, translated."""
        entry: dict[str, Any] = {"code": error} if isinstance(error, str) else error
        if not js_truthy(entry.get("message")):
            entry["message"] = self._translate(
                entry["code"], self._locale(record), entry.get("ctx")
            )
            entry.pop("ctx", None)
        record["errors"].append(entry)

    def build(self, form_data: Any, sms_message: dict[str, Any], code: Any) -> dict[str, Any]:
        """The JSON-ready data_record for parsed `form_data` (`getDataRecord`, spec §11.2)."""
        form_def = self.form_def(code)
        sender = sms_message.get("from", UNDEFINED)
        timestamp = parse_sent_timestamp(sms_message.get("reported_date", UNDEFINED))
        record: dict[str, Any] = {
            "type": "data_record",
            "from": phone.normalize(self._settings, sender) or sender,
            "form": UNDEFINED if code is None else code,
            "errors": [],
            "tasks": [],
            "fields": {},
            "reported_date": timestamp if js_truthy(timestamp) else self._now_ms,
            "sms_message": sms_message,
        }
        data = form_data if isinstance(form_data, dict) else {}
        if form_def is not None:
            self._add_fields(record, form_def, data)
        if js_truthy(data.get("_extra_fields")):
            self.add_error(record, "extra_fields")
        message = sms_message.get("message")
        if isinstance(message, str) and js_trim(message) == "":
            self.add_error(record, "sys.empty")
        if form_def is None:
            if js_truthy(self._settings.get("forms_only_mode")):
                self.add_error(record, {"code": "sys.form_not_found", "ctx": {"form": code}})
            else:
                del record["form"]  # an unstructured message, shown in the Messages tab
        document: dict[str, Any] = to_json(record)
        return document

    def _add_fields(self, record: dict[str, Any], form_def: Any, data: dict[str, Any]) -> None:
        reference = get_property(form_def, "facility_reference")
        if js_truthy(reference):
            refid = data.get(reference, UNDEFINED) if isinstance(reference, str) else UNDEFINED
            record["refid"] = refid.upper() if isinstance(refid, str) else refid
        for key, _ in form_fields(form_def):
            _merge(key.split("."), record["fields"], data)
        for error in validate(form_def, data):
            self.add_error(record, error)


def _default_translate(settings: Mapping[str, Any], translate: Translate | None) -> Translate:
    return translate if translate is not None else Translator(settings, DEFAULT_TRANSLATIONS)


def _now(now_ms: int | None) -> int:
    return now_ms if now_ms is not None else math.floor(time.time() * 1000)


def _find_form(
    builder: _RecordBuilder, message: Any, body: dict[str, Any]
) -> tuple[str | None, Any]:
    """The form code and definition; retries without zero-width characters (spec §11.1)."""
    code = get_form_code(message)
    form_def = builder.form_def(code)
    if code and form_def is None:
        cleaned = strip_invisible(code)
        form_def = builder.form_def(cleaned)
        if form_def is not None:
            # CHT replaces the upper-cased code in the message it parses (so a lower-case
            # message keeps its zero-width character and its code, as in CHT).
            body["message"] = message.replace(code, cleaned, 1)
            code = cleaned
    return code, form_def


def create_by_form(
    data: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
    now_ms: int | None = None,
    locale: str | None = None,
    translate: Translate | None = None,
) -> dict[str, Any]:
    """The `data_record` CHT's `records.createByForm(data, {locale})` builds for an SMS.

    Args:
        data: `{"from", "message", "gateway_ref"}` as the RapidPro webhook passes them, plus
            optionally `sent_timestamp` (ms, a 13-digit string or a date string) and `locale`.
            Other keys are ignored. `data` is not modified.
        settings: the app settings (`forms`, `locale`, `default_country_code`,
            `phone_validation`, `forms_only_mode`).
        now_ms: `reported_date` when there is no usable `sent_timestamp` (default: now).
        locale: CHT's `options.locale` (the `?locale=` of `POST /api/v1/records`).
        translate: CHT's `config.translate`; default: English texts for the error codes.

    Returns:
        The JSON-ready document: `type`, `from` (normalised), `form` (absent for free text),
        `errors` (`{code, message}`), `tasks`, `fields`, `reported_date`, `sms_message`, and
        `refid` when the form has a `facility_reference`.

    Raises:
        RecordError: `from` or `message` is missing (CHT answers with the public message).
        JsError: the message makes CHT's parser throw (CHT answers 500).
    """
    if _missing(data.get("from", UNDEFINED)):
        raise RecordError("Missing required value: from")
    if _missing(data.get("message", UNDEFINED)):
        raise RecordError("Missing required field: message")
    translate = _default_translate(settings, translate)
    builder = _RecordBuilder(settings, translate, _now(now_ms))
    body = dict(data)
    raw_message = body["message"]
    code, form_def = _find_form(builder, raw_message, body)
    sms_message = {
        "type": "sms_message",
        "message": raw_message,
        "form": code if code is not None else UNDEFINED,
        "reported_date": body.get("sent_timestamp", UNDEFINED),
        "locale": body.get("locale") if js_truthy(body.get("locale")) else (locale or UNDEFINED),
        "from": body["from"],
        "gateway_ref": body.get("gateway_ref", UNDEFINED),
    }
    form_data: Any = UNDEFINED
    if code and form_def is not None:
        context = ParseContext(settings, translate)
        form_data = smsparser.parse(form_def, body, context=context)
    return builder.build(form_data, sms_message, code)


def _json_field_value(field_def: Any, value: Any, now_ms: int) -> Any:
    """The two conversions `createRecordByJSON` applies: dates to ms, 1/0 to booleans."""
    field_type = get_property(field_def, "type")
    if field_type == "date":
        return js_number(moment_value_of(value, now_ms=now_ms))
    if field_type == "boolean" and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def create_record_by_json(
    body: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
    now_ms: int | None = None,
    translate: Translate | None = None,
) -> dict[str, Any]:
    """CHT's `records.createRecordByJSON` (the JSON `POST /api/v1/records`; spec §11.5).

    Raises:
        RecordError: no `_meta`, no `_meta.form`, or an unknown form.
        JsError: `_meta.form` is not a string (CHT throws a TypeError).
    """
    meta = body.get("_meta", UNDEFINED)
    if meta in ("", None, UNDEFINED):
        raise RecordError("Missing _meta property.")
    form = get_property(meta, "form")
    if form in ("", None, UNDEFINED):
        raise RecordError("Missing required field: form")
    if not isinstance(form, str) or not isinstance(meta, dict):
        raise JsError("options.form.toUpperCase is not a function")
    sms_message = {**meta, "form": form.upper()}
    now = _now(now_ms)
    builder = _RecordBuilder(settings, _default_translate(settings, translate), now)
    form_def = builder.form_def(sms_message["form"])
    if form_def is None:
        raise RecordError(f"Form not found: {sms_message['form']}")
    fields = get_property(form_def, "fields")
    corrected: dict[str, Any] = {}
    for key, value in body.items():
        if key == "_meta":
            continue
        field_def = fields.get(key) if isinstance(fields, dict) else None
        if js_truthy(field_def):
            value = _json_field_value(field_def, value, now)
        corrected[key.lower()] = value
    return builder.build(corrected, sms_message, sms_message["form"])
