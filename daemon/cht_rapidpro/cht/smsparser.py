"""CHT's SMS parser: form codes, muvuku, javarosa, textforms and compact textforms, field types.

A port of `api/src/services/report/smsparser.js` and its sub-parsers (CHT 5.2), following
`spec/smsparser.md`. The output must match what CHT stores, quirks included, because other CHT
components read these reports; where the JS behaviour looks like a bug (textforms numbers,
labels used as regular expressions) it is kept, and the spec section is cited.

Representation of JS values:
- `undefined` is a missing key in dicts (JSON drops it too). `parse_field` can return the
  `UNDEFINED` sentinel; `parse` never stores it.
- `null` is None; NaN is `math.nan` (an impossible date); JSON writers must turn NaN into null.
- Numbers are `int` when integral, else `float` (JS has one number type).

Where CHT's JavaScript throws, `JsError` is raised.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import phone
from .bikram_sambat import BikramSambatError, to_greg
from .jsdate import MS_PER_DAY, days_from_civil, js_date_parse, moment_value_of
from .jsvalues import (
    DOT,
    UNDEFINED,
    WS,
    JsError,
    get_property,
    js_number,
    js_string,
    js_trim,
    js_truthy,
    strict_equal,
    to_number,
)
from .translations import DEFAULT_TRANSLATIONS, Translate, Translator

__all__ = [
    "UNDEFINED",
    "JsError",
    "ParseContext",
    "bs_to_epoch",
    "form_fields",
    "get_form_code",
    "is_compact",
    "is_muvuku_format",
    "parse",
    "parse_array",
    "parse_field",
    "parse_num",
    "standardise_digits",
    "strip_invisible",
]

_ZERO_WIDTH = re.compile("[\u200b-\u200d\ufeff]")
_DEVANAGARI_DIGITS = str.maketrans("०१२३४५६७८९", "0123456789")
_MUVUKU = re.compile(rf"[{WS}]*([A-Za-z]?[0-9])!{DOT}+!{DOT}+")
_FORM_CODE = re.compile(rf"[{WS}]*([^{WS}!\-,:#]+)")
_BOUNDARY = re.compile(rf"[{WS}]*#[{WS}]*")
#: The textforms key/value regex (spec §8.1), with JS `\s`, `.`, `\d` and `$` spelled out.
_TEXTFORMS_FIELD = re.compile(
    rf"[{WS}]*([A-Za-z_.*]+)[{WS}!-]*([0-9]{{4}}[-/][0-9]{{1,2}}[-/][0-9]{{1,2}})?"
    rf"[{WS}!-]*([1-9][0-9]*(?:\.(?:[0-9]+)?)?)?[{WS}!-]*({DOT}+?)?[{WS}]*\Z"
)
_COMPACT_TOKEN = re.compile(rf'"[^"]+"|[^"{WS}]+')
_COMPACT_TOKEN_GREEDY = re.compile(rf'"{DOT}+"|[^"{WS}]+')
_JAVAROSA_SEPARATOR = re.compile(r"([^\\])#")  # a `#` not escaped with `\`
_NON_DIGIT = re.compile(r"[^0-9]")
_PATIENT_ID_KEYS = frozenset({"patient_id", "place_id"})


@dataclass(frozen=True, slots=True)
class ParseContext:
    """What CHT's parser reads from `config`: app settings and `translate`.

    Attributes:
        settings: the app settings (`locale`, `default_country_code`, `phone_validation`).
        translate: CHT's `config.translate`; labels and list values go through it.
    """

    settings: Mapping[str, Any]
    translate: Translate = field(repr=False)

    @classmethod
    def for_settings(
        cls,
        settings: Mapping[str, Any],
        translations: Mapping[str, Mapping[str, str]] = DEFAULT_TRANSLATIONS,
    ) -> ParseContext:
        """A context that translates with the given cache (`{locale: {key: text}}`)."""
        return cls(settings, Translator(settings, translations))


class _Parser(Enum):
    MUVUKU = "muvuku"
    JAVAROSA = "javarosa"
    COMPACT = "compact"
    TEXTFORMS = "textforms"


# ----------------------------------------------------------------------------- text helpers


def strip_invisible(value: Any) -> Any:
    """Remove zero-width characters (U+200B-U+200D, U+FEFF) from a string (spec §2.2)."""
    return _ZERO_WIDTH.sub("", value) if isinstance(value, str) else value


def standardise_digits(value: Any) -> Any:
    """Devanagari digits to ASCII, invisible characters removed; falsy values unchanged (§2.1)."""
    if not js_truthy(value):
        return value
    return strip_invisible(js_string(value).translate(_DEVANAGARI_DIGITS))


def parse_num(raw: Any) -> Any:
    """CHT's `parseNum`: a JS number, None when not a finite number, UNDEFINED for undefined."""
    if raw is UNDEFINED:
        return UNDEFINED
    std = standardise_digits(raw)
    number = to_number(std)
    if std == "" or not math.isfinite(number):
        return None
    return js_number(number)


def bs_to_epoch(year: Any, month: Any, day: Any) -> Any:
    """Bikram Sambat date to local-midnight ms (§12.1): None if it does not exist, NaN for
    the NaN date the JS library returns when the day is missing."""
    try:
        greg = to_greg(year, month, day)
    except BikramSambatError:
        return None
    if greg is None:
        return math.nan
    return days_from_civil(*greg) * MS_PER_DAY


# --------------------------------------------------------------------- form-definition access


def _prop(obj: Any, key: str) -> Any:
    """`obj[key]`; JsError where JS throws (obj is null/undefined)."""
    return get_property(obj, key)


def form_fields(form_def: Any) -> list[tuple[str, Any]]:
    """`def.fields` as (key, definition) pairs, in definition order (`Object.keys`).

    Raises:
        JsError: `form_def` is null or undefined.
    """
    fields = _prop(form_def, "fields")
    if isinstance(fields, dict):
        return list(fields.items())
    if isinstance(fields, list | str):
        return [(str(i), v) for i, v in enumerate(fields)]
    return []


def _field_type(field_def: Any) -> Any:
    return _prop(field_def, "type")


def _labels_part(field_def: Any, part: str) -> Any:
    """`field.labels && field.labels[part]` (the isCompact/javarosa form: no throw on labels)."""
    labels = _prop(field_def, "labels")
    return _prop(labels, part) if js_truthy(labels) else labels


def _meta_code(form_def: Any) -> Any:
    """`def && def.meta && def.meta.code`."""
    if not js_truthy(form_def):
        return form_def
    meta = _prop(form_def, "meta")
    return _prop(meta, "code") if js_truthy(meta) else meta


@functools.lru_cache(maxsize=512)
def _compile_label(source: str) -> re.Pattern[str]:
    """A label pasted into a regex, as CHT does (labels are not escaped, spec §5, §6.2).

    Python's `re` stands in for JS regexes here; labels are plain words in practice.
    """
    try:
        return re.compile(source, re.IGNORECASE)
    except re.error as err:
        raise JsError(f"Invalid regular expression: /{source}/: {err}") from err


# -------------------------------------------------------------------------- format detection


def is_muvuku_format(msg: Any) -> bool:
    """`1!CODE!...`-style messages (spec §3.2); `J1!...` (javarosa) counts too."""
    return isinstance(msg, str) and _MUVUKU.match(msg) is not None


def get_form_code(msg: Any) -> str | None:
    """The upper-cased form code of a message, or None (spec §3.1)."""
    if not isinstance(msg, str):
        return None
    pieces = msg.split("!")
    if len(pieces) >= 3:
        return pieces[1].upper()
    match = _FORM_CODE.match(msg)
    return match.group(1).upper() if match else None


def _strip_form_code(code: Any, msg: str) -> str:
    """Remove `code` and the separators after it from the start of `msg` (spec §6.1)."""
    if not isinstance(code, str):
        return msg
    pattern = rf"^[{WS}]*{re.escape(code)}[{WS}!\-,:#]*"
    return re.sub(pattern, "", msg, count=1, flags=re.IGNORECASE)


def _message_of(msg: Any) -> Any:
    """`msg.message || msg`: the sub-parsers take a doc or a string."""
    if isinstance(msg, dict):
        inner = msg.get("message", UNDEFINED)
        return inner if js_truthy(inner) else msg
    return msg


def _starts_with_label(text: str, label: Any) -> bool:
    """textforms-parser `startsWith`: the whole text is the label, or the label is followed by
    whitespace or a digit."""
    if not text or not js_truthy(label):
        return False
    if isinstance(label, str) and text.lower() == label.lower():
        return True
    return _compile_label(f"^{js_string(label)}[{WS}0-9]").search(text) is not None


def is_compact(form_def: Any, msg: Any, locale: Any, *, context: ParseContext) -> bool:
    """Whether a message (form code already stripped) is compact textforms (spec §6.2).

    Args:
        form_def: the form definition.
        msg: the message text, or a doc whose `message` is used.
        locale: the doc's locale; labels are translated into it.
        context: settings and `translate`.
    """
    if not js_truthy(msg) or not js_truthy(form_def) or not js_truthy(_prop(form_def, "fields")):
        return False
    text = _message_of(msg)
    if not isinstance(text, str):
        raise JsError("msg.split is not a function")
    pieces = _BOUNDARY.split(text)
    if len(pieces) != 1:
        return False
    labels = [
        context.translate(_labels_part(field_def, part), locale)
        for _, field_def in form_fields(form_def)
        for part in ("tiny", "short")
    ]
    return not any(_starts_with_label(pieces[0], label) for label in labels)


def _select_parser(form_def: Any, doc: Mapping[str, Any], context: ParseContext) -> _Parser | None:
    """CHT's `getParser` (spec §3.3); None means there is no parser for this message."""
    message = doc.get("message")
    if not isinstance(message, str):
        return None
    muvuku = _MUVUKU.match(message)
    if muvuku:
        return {"1": _Parser.MUVUKU, "J1": _Parser.JAVAROSA}.get(muvuku.group(1).upper())
    stripped = _strip_form_code(_meta_code(form_def), message)
    if is_compact(form_def, stripped, doc.get("locale", UNDEFINED), context=context):
        return _Parser.COMPACT
    return _Parser.TEXTFORMS


# ------------------------------------------------------------------------------- sub-parsers


def _parse_muvuku(form_def: Any, message: str) -> dict[str, Any]:
    """`1!CODE!v1#v2#...`: values in field order, trimmed; surplus sets `_extra_fields` (§4)."""
    parts = message.split("#")
    header = parts[0].split("!")
    first: Any = "!".join(header[2:]) if len(header) > 2 else UNDEFINED
    values = [first, *parts[1:]]
    keys = [key for key, _ in form_fields(form_def)]
    result: dict[str, Any] = {}
    for i in range(max(len(keys), len(values))):
        if i >= len(keys):
            result["_extra_fields"] = True
            continue
        value = values[i] if i < len(values) else UNDEFINED
        if value is not UNDEFINED:
            result[keys[i]] = js_trim(value) if isinstance(value, str) else value
    return result


def _parse_javarosa(form_def: Any, message: str, context: ParseContext) -> dict[str, Any]:
    """`J1!CODE!label#value#...`: values found by their translated tiny label (§5)."""
    data = "!".join(message.split("!")[2:])
    parts = _JAVAROSA_SEPARATOR.sub("\\1\x0b", data).split("\x0b")
    labels = [js_trim(part) for part in parts[0::2]]
    values = parts[1::2]
    result: dict[str, Any] = {}
    for key, field_def in form_fields(form_def):
        tiny = _labels_part(field_def, "tiny")
        if not js_truthy(tiny):
            continue
        # The label is a regex and `$` is the end of input (Python's `$` also matches before
        # a final newline, hence `\Z`).
        pattern = _compile_label(f"^{js_string(context.translate(tiny))}\\Z")
        for label, value in zip(labels, values, strict=False):
            if pattern.search(label):
                result[key] = value.replace("\\#", "#")
    return result


def _compact_tokens(text: str, field_count: int) -> list[str]:
    tokens = _COMPACT_TOKEN.findall(text)
    if len(tokens) > field_count:
        tokens = _COMPACT_TOKEN_GREEDY.findall(text)
    if not tokens:  # JS: `null.length`
        raise JsError("Cannot read properties of null (reading 'length')")
    return tokens


def _parse_compact(form_def: Any, text: str) -> dict[str, Any]:
    """`CODE v1 v2 "multi word" ...`: values in field order (§7)."""
    fields = form_fields(form_def)
    tokens = _compact_tokens(text, len(fields))
    result: dict[str, Any] = {}
    for i, (key, field_def) in enumerate(fields):
        if not tokens:
            break
        if i == len(fields) - 1 and _field_type(field_def) == "string":
            value = " ".join(tokens)  # the trailing string field takes the rest
        else:
            value = tokens.pop(0)
        if value[:1] == '"' and value[-1:] == '"':
            value = value[1:-1]
        result[key] = value
    return result


@dataclass(frozen=True, slots=True)
class _Pair:
    """A textforms piece with both a number and text after the key (`CDT 33 foo`)."""

    numeric: str
    other: str


def _set_result(results: dict[str, Any], key: str, value: Any) -> None:
    """Store a textforms value; a repeated key collects its values in a list (§8.1)."""
    key = key.lower()
    current = results.get(key, UNDEFINED)
    if current is UNDEFINED:
        if isinstance(value, _Pair):
            results[key] = value.numeric + value.other
        elif value is not UNDEFINED:
            results[key] = value
    else:
        if isinstance(value, _Pair):  # CHT appends its internal object here
            value = {"type": "pair", "values": [value.numeric, value.other]}
        if isinstance(current, list):
            current.append(value)
        else:
            results[key] = [current, value]


def _parse_textforms(text: str) -> dict[str, Any]:
    """`CODE key value # key value ...` tokenizer (§8.1). Keys come back lower-cased.

    Only "digits starting 1-9, optionally .digits" become numbers: CHT's integer/decimal
    classification never matches (a `${}` inside a regex literal), and we keep that.
    """
    results: dict[str, Any] = {}
    if not text:
        return results
    for piece in _BOUNDARY.split(text):
        match = _TEXTFORMS_FIELD.search(piece)
        if match is None:
            continue
        key, date, numeric, other = match.groups()
        if other is not None and js_trim(other) == "":
            other = None
        value: Any
        if numeric is not None and other is not None:
            value = _Pair(numeric, other)
        elif numeric is not None:
            value = js_number(float(numeric))
        elif date is not None:
            value = js_number(js_date_parse(date))
        else:
            value = UNDEFINED if other is None else other
        _set_result(results, key, value)
    return results


def _map_tiny_labels(
    msg_data: dict[str, Any], form_def: Any, locale: Any, context: ParseContext
) -> None:
    """Rename textforms keys from (translated, lower-cased) tiny labels to field keys (§8.2)."""
    for key, field_def in form_fields(form_def):
        label = context.translate(_prop(_prop(field_def, "labels"), "tiny"), locale)
        if not isinstance(label, str):
            continue
        label = label.lower()
        if key != label and js_truthy(msg_data.get(label, UNDEFINED)):
            msg_data[key] = msg_data.pop(label)


# ---------------------------------------------------------------------------- field parsing


def _list_items(field_def: Mapping[str, Any]) -> list[Any]:
    items = field_def["list"]
    if not isinstance(items, list):
        raise JsError("field.list.find is not a function")
    return items


def _item_part(item: Any, index: int) -> Any:
    return _prop(item, str(index))


def _convert_integer(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    cleaned = strip_invisible(js_string(raw))
    if js_truthy(field_def.get("list")):
        for item in _list_items(field_def):
            if js_string(_item_part(item, 0)) == cleaned:
                # Translated into the default locale: CHT has no doc locale here.
                return ctx.translate(_item_part(item, 1))
        return None
    return parse_num(cleaned)


def _convert_string(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    if js_truthy(field_def.get("list")):
        cleaned = strip_invisible(raw)
        for item in _list_items(field_def):
            if strict_equal(_item_part(item, 0), cleaned):
                return _item_part(item, 1)  # untranslated, unlike integer lists
        return raw
    if key in _PATIENT_ID_KEYS:
        return strip_invisible(standardise_digits(raw))
    return raw  # plain strings keep their invisible characters


def _convert_boolean(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    number = parse_num(strip_invisible(raw))
    if isinstance(number, int | float) and number in (0, 1):
        return number == 1
    return None


def _convert_month(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    return parse_num(strip_invisible(raw))


def _convert_date(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    return js_number(moment_value_of(strip_invisible(raw)))


def _convert_bs_date(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    cleaned = strip_invisible(standardise_digits(raw))
    if not isinstance(cleaned, str):
        raise JsError("cleaned.search is not a function")
    separator = _NON_DIGIT.search(cleaned)
    # The separator is the first non-digit, whatever it is; without one, the whole text is
    # the year (and the missing month/day make it a NaN date or an error).
    parts: list[Any] = cleaned.split(separator.group()) if separator else [cleaned]
    year, month, day = [*parts, UNDEFINED, UNDEFINED][:3]
    return bs_to_epoch(year, month, day)


def _convert_bs_part(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    return standardise_digits(raw)  # a string: leading zeros are kept


def _convert_phone(raw: Any, field_def: Mapping[str, Any], key: str, ctx: ParseContext) -> Any:
    standard = standardise_digits(raw)
    return phone.normalize(ctx.settings, standard) or standard


_Converter = Callable[[Any, Mapping[str, Any], str, ParseContext], Any]
_CONVERTERS: dict[str, _Converter] = {
    "integer": _convert_integer,
    "string": _convert_string,
    "boolean": _convert_boolean,
    "month": _convert_month,
    "date": _convert_date,
    "bsDate": _convert_bs_date,
    "bsYear": _convert_bs_part,
    "bsMonth": _convert_bs_part,
    "bsDay": _convert_bs_part,
    "phone_number": _convert_phone,
}


def parse_field(field_def: Any, raw: Any, key: str, *, context: ParseContext) -> Any:
    """Convert one raw value by its field type (spec §9).

    Types without a converter (none, `bsAggreDate`, `complex`, typos) return `raw` unchanged;
    otherwise UNDEFINED stays UNDEFINED and `""` becomes None.
    """
    field_type = _field_type(field_def)
    converter = _CONVERTERS.get(field_type) if isinstance(field_type, str) else None
    if converter is None:
        return raw
    if raw is UNDEFINED:
        return UNDEFINED
    if raw == "" and isinstance(raw, str):
        return None
    return converter(raw, field_def, key, context)


# ---------------------------------------------------------------------------------- parsing


def _create_deep_key(target: dict[str, Any], path: list[str], value: Any) -> None:
    """Store `value` at a dotted path, creating objects on the way (`createDeepKey`)."""
    head, rest = path[0], path[1:]
    if not rest:
        if value is UNDEFINED:
            target.pop(head, None)
        else:
            target[head] = value
        return
    current = target.get(head)
    if not js_truthy(current):
        current = target[head] = {}
    if isinstance(current, dict):  # JS would set a property on a primitive: no effect
        _create_deep_key(current, rest, value)


def _raw_values(
    parser: _Parser, form_def: Any, doc: Mapping[str, Any], context: ParseContext
) -> dict[str, Any]:
    """`msgData`: the sub-parser's raw values, keyed by field key (textforms: by label)."""
    message: str = doc["message"]
    if parser is _Parser.MUVUKU:
        return _parse_muvuku(form_def, message)
    if parser is _Parser.JAVAROSA:
        return _parse_javarosa(form_def, message, context)
    stripped = _strip_form_code(_meta_code(form_def), message)
    if parser is _Parser.COMPACT:
        return _parse_compact(form_def, stripped)
    msg_data = _parse_textforms(stripped)
    _map_tiny_labels(msg_data, form_def, doc.get("locale", UNDEFINED), context)
    return msg_data


def _aggregate_bs_date(
    form_data: dict[str, Any], msg_data: Mapping[str, Any], form_def: Any
) -> None:
    """Combine bsYear/bsMonth/bsDay fields into the first bsAggreDate field (spec §12.2)."""
    fields = form_fields(form_def)
    target = next((k for k, f in fields if js_truthy(f) and _field_type(f) == "bsAggreDate"), None)
    if target is None:
        return
    parts: dict[str, Any] = {"bsYear": UNDEFINED, "bsMonth": 1, "bsDay": 1}
    for key, field_def in fields:
        field_type = _field_type(field_def)
        if isinstance(field_type, str) and field_type in parts:
            parts[field_type] = standardise_digits(msg_data.get(key, UNDEFINED))
    if js_truthy(parts["bsYear"]):
        form_data[target] = bs_to_epoch(parts["bsYear"], parts["bsMonth"], parts["bsDay"])


def parse(form_def: Any, doc: Mapping[str, Any], *, context: ParseContext) -> dict[str, Any]:
    """Parse an SMS doc against a form definition: CHT's `smsparser.parse` (spec §9.1).

    Args:
        form_def: the form definition (`app_settings.forms[CODE]`), or None.
        doc: the sms doc: `message`, and `locale` (labels are translated into it).
        context: settings and `translate`.

    Returns:
        The form data: field values by field key, dotted keys nested, plus `_extra_fields`
        when a muvuku message had more values than the form has fields. `{}` when there is
        no form, no message or no parser for it. The doc is not modified.

    Raises:
        JsError: where CHT's JavaScript throws (e.g. a textforms message on a form whose
            fields lack `labels`).
    """
    if not (
        js_truthy(form_def)
        and js_truthy(doc)
        and js_truthy(doc.get("message", UNDEFINED))
        and js_truthy(_prop(form_def, "fields"))
    ):
        return {}
    parser = _select_parser(form_def, doc, context)
    if parser is None:
        return {}
    msg_data = _raw_values(parser, form_def, doc, context)
    add_omitted = parser in (_Parser.MUVUKU, _Parser.JAVAROSA)
    form_data: dict[str, Any] = {}
    for key, field_def in form_fields(form_def):
        raw = msg_data.get(key, UNDEFINED)
        if add_omitted or js_truthy(raw):
            value = parse_field(field_def, raw, key, context=context)
            _create_deep_key(form_data, key.split("."), value)
    _aggregate_bs_date(form_data, msg_data, form_def)
    if msg_data.get("_extra_fields") is True:
        form_data["_extra_fields"] = True
    return form_data


def _array_source(
    parser: _Parser | None, form_def: Any, doc: Mapping[str, Any], context: ParseContext
) -> dict[str, Any]:
    """What `parser(def, doc)` returns inside CHT's `parseArray`, throws included (§14)."""
    if parser is None:
        raise JsError("parser is not a function")
    if parser is _Parser.TEXTFORMS:  # CHT passes the definition where a message belongs
        if js_truthy(form_def):
            raise JsError("msg.split is not a function")
        return {}
    if not (js_truthy(form_def) and js_truthy(_prop(form_def, "fields"))):
        return {}
    message: str = doc["message"]
    if parser is _Parser.MUVUKU:
        return _parse_muvuku(form_def, message)
    if parser is _Parser.JAVAROSA:
        return _parse_javarosa(form_def, message, context)
    return _parse_compact(form_def, message)  # the form code is not stripped here


def parse_array(form_def: Any, doc: Mapping[str, Any], *, context: ParseContext) -> list[Any]:
    """CHT's `smsparser.parseArray`: `[sent_timestamp, from, raw value per field...]` (§14).

    Missing values are None (JS undefined, null once serialised).

    Raises:
        JsError: for key/value textforms and unknown muvuku codes, as in CHT.
    """
    values = _array_source(_select_parser(form_def, doc, context), form_def, doc, context)
    if not (js_truthy(form_def) and js_truthy(_prop(form_def, "fields"))):
        return []
    raw = [values.get(key) for key, _ in form_fields(form_def)]
    return [doc.get("sent_timestamp"), doc.get("from"), *raw]
