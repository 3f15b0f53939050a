"""The sandbox's RapidPro wire format: validation, template rendering, JSON shapes and cursors.

Pure functions (no aiohttp). Faithful to spec rapidpro-api §1.3-§2.4 and §4.3 where it matters to
a client: DRF-shaped error bodies with RapidPro's exact messages; broadcast text trimmed of
leading and trailing whitespace before it is checked and stored, NUL and lone surrogate
characters refused (DRF `CharField`); `tel` URN normalisation including RapidPro's
reinterpretation of `+` numbers that are not possible numbers (`normalize_urn`); field order of
each dialect; timestamps that drop zero microseconds.

Simplified, on purpose: attachments, groups and quick replies are accepted only when empty (the
sandbox has no media and no groups); templates only know the contact and its URNs (see
`render_template`); URNs of schemes other than `tel` are not validated per scheme, and a `?` or
`#` in a URN path is not split off as RapidPro's URN parser would; translation keys are not
checked against ISO 639-3.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlencode

import phonenumbers

Dialect = Literal["current", "v9"]
DIALECTS: tuple[Dialect, ...] = ("current", "v9")
#: The org's first flow language: a plain-string `text` is stored under it.
DEFAULT_LANGUAGE = "eng"
#: Longest translation of a broadcast (spec §2.1: `MSG_FIELD_SIZE` in v9, 4096 since v10.1.45).
TEXT_LIMITS: Mapping[Dialect, int] = {"v9": 640, "current": 4096}
MAX_ITEMS = 100
MAX_URN_LENGTH = 255
# fmt: off
URN_SCHEMES = frozenset({
    "tel", "whatsapp", "facebook", "telegram", "mailto", "ext", "twitter", "twitterid", "viber",
    "line", "discord", "instagram", "slack", "webchat", "rocketchat", "jiochat", "wechat", "fcm",
    "freshchat", "vk", "external",
})
# fmt: on
#: Top-level names of the broadcast template context (spec §2.4); other `@word`s stay literal.
CONTEXT_NAMES = frozenset({"contact", "fields", "globals", "urns"})


class ValidationError(Exception):
    """A 400 with a DRF field dict, e.g. `{"urns": {"0": ["Invalid URN: ..."]}}`."""

    def __init__(self, errors: dict[str, Any]) -> None:
        super().__init__(errors)
        self.errors = errors


class QueryError(Exception):
    """A 400 for a bad query parameter: `{"detail": message}`."""


class CursorError(Exception):
    """An unreadable `cursor`: DRF answers 404 `{"detail": "Invalid cursor"}`."""


def iso(moment: datetime) -> str:
    """DRF's rendering: UTC, `Z`, microseconds only when non-zero (`isoformat()`)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_query_datetime(value: str) -> datetime | None:
    """`before`/`after` as `iso8601.parse_date` reads them; None when unparseable (no 400)."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# --- URNs ----------------------------------------------------------------------------------------


def normalize_urn(value: object, country: str | None) -> str | None:
    """`URN.normalize` + `URN.validate` (spec §2.3); None when RapidPro would reject the URN.

    As RapidPro does it (temba `contacts/models.py` `URN.normalize_number`, `utils/urns`
    `parse_number`), including what a client least expects: a `tel` number that is not a possible
    number as written is not refused but kept as its bare digits, `+` dropped, and accepted if
    those digits are a possible *local* number of the workspace's country: `tel:+2547123` in a
    Kenyan workspace is stored as `tel:2547123` and the SMS goes to whoever has that local number.
    """
    if not isinstance(value, str) or len(value) > MAX_URN_LENGTH or ":" not in value:
        return None
    scheme, _, path = value.partition(":")
    path = path.strip()
    # The scheme is matched as written (`TEL:` is not a scheme RapidPro knows).
    if scheme not in URN_SCHEMES or not path:
        return None
    if scheme != "tel":
        return f"{scheme}:{path}"
    number = _normalize_number(path, country)
    # `URN.validate`: the stored path must itself parse as a possible number.
    if not number or _possible_e164(number, country) is None:
        return None
    return f"tel:{number}"


def _normalize_number(path: str, country: str | None) -> str:
    """`URN.normalize_number`: E.164 when possible as written, else the bare digits."""
    number = path.strip()
    normalized = number.lower()
    if normalized.endswith(("e+11", "e+12")):  # a number Excel turned into 2.54712E+11
        normalized = normalized[:-4].replace(".", "")
    normalized = re.sub(r"[^0-9a-z]", "", normalized)
    parse_as = normalized
    # A `+` is implied for long numbers not in a national format.
    if number.startswith("+") or (len(normalized) >= 11 and not normalized.startswith("0")):
        parse_as = "+" + normalized
    # "if it's not a possible number, just return what we have minus the +"
    return _possible_e164(parse_as, country) or normalized


def _possible_e164(number: str, country: str | None) -> str | None:
    """`parse_number`: E.164 if `number` parses and is exactly IS_POSSIBLE, else None."""
    try:
        parsed = phonenumbers.parse(number, country.upper() if country else None)
    except phonenumbers.NumberParseException:
        return None
    # Only length-possibility, not `is_valid_number`; local-only lengths do not count.
    if (
        phonenumbers.is_possible_number_with_reason(parsed)
        != phonenumbers.ValidationResult.IS_POSSIBLE
    ):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# --- POST /broadcasts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BroadcastRequest:
    """A validated broadcast POST: normalised URNs, resolved contact UUIDs, translations."""

    urns: tuple[str, ...]
    contacts: tuple[str, ...]
    text: dict[str, str]
    base_language: str


def validate_broadcast(
    body: Any,
    *,
    dialect: Dialect,
    country: str | None,
    find_contact: Callable[[str], str | None],
) -> BroadcastRequest:
    """Validate a broadcast POST like `BroadcastWriteSerializer` (spec §1.3, §2.1-§2.3).

    Field errors are collected over all fields first, then the whole-request rules run.

    Raises:
        ValidationError: with the DRF body RapidPro would answer.
    """
    if not isinstance(body, dict):
        raise ValidationError({"non_field_errors": ["Request body should be a single JSON object"]})
    errors: dict[str, Any] = {}
    urns = _field(errors, "urns", body.get("urns"), lambda v: _urns(v, country))
    contacts = _field(
        errors, "contacts", body.get("contacts"), lambda v: _contacts(v, find_contact)
    )
    _field(errors, "groups", body.get("groups"), _no_objects)
    _field(errors, "attachments", body.get("attachments"), _no_attachments)
    text = _field(
        errors, "text", body.get("text"), lambda v: _translations(v, TEXT_LIMITS[dialect])
    )
    if errors:
        raise ValidationError(errors)
    if not text:
        raise ValidationError({"non_field_errors": ["Must provide either text or attachments."]})
    if not urns and not contacts and not body.get("groups"):
        raise ValidationError(
            {"non_field_errors": ["Must provide either urns, contacts or groups."]}
        )
    base_language = body.get("base_language") or next(iter(text))
    if base_language not in text:
        raise ValidationError(
            {"non_field_errors": ["No text translation provided in base language."]}
        )
    return BroadcastRequest(tuple(urns or ()), tuple(contacts or ()), text, str(base_language))


T = TypeVar("T")


def _field(errors: dict[str, Any], name: str, value: Any, parse: Callable[[Any], T]) -> T | None:
    if value is None:
        return None
    try:
        return parse(value)
    except ValidationError as exc:
        errors[name] = exc.errors["_"]
        return None


def _fail(detail: Any) -> ValidationError:
    return ValidationError({"_": detail})


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _fail([f'Expected a list of items but got type "{type(value).__name__}".'])
    if len(value) > MAX_ITEMS:
        raise _fail([f"Ensure this field has no more than {MAX_ITEMS} elements."])
    return value


def _urns(value: Any, country: str | None) -> list[str]:
    normalized: list[str] = []
    item_errors: dict[str, list[str]] = {}
    for index, item in enumerate(_list(value)):
        urn = normalize_urn(item, country)
        if urn is None:
            message = f"Invalid URN: {item}. Ensure phone numbers contain country codes."
            item_errors[str(index)] = [message]  # ListField errors are keyed by string index
        else:
            normalized.append(urn)
    if item_errors:
        raise _fail(item_errors)
    return list(dict.fromkeys(normalized))  # one message per contact, as mailroom does


def _contacts(value: Any, find_contact: Callable[[str], str | None]) -> list[str]:
    found: list[str] = []
    for item in _list(value):
        contact = find_contact(item) if isinstance(item, str) else None
        if contact is None:
            raise _fail([f"No such object: {item}"])
        found.append(contact)
    return found


def _no_objects(value: Any) -> list[str]:
    """Groups: the sandbox has none, so any reference is unknown."""
    items = _list(value)
    if items:
        raise _fail([f"No such object: {items[0]}"])
    return []


def _no_attachments(value: Any) -> None:
    """Attachments must reference uploaded media, and the sandbox has none."""
    items = [x for v in value.values() for x in v] if isinstance(value, dict) else _list(value)
    if items:
        raise _fail([f"No such object: {items[0]}"])


def _translations(value: Any, limit: int) -> dict[str, str]:
    """`TranslatedTextField`: each text through DRF's `CharField(max_length=limit)`.

    DRF trims leading and trailing whitespace first (`trim_whitespace=True`, `str.strip()`), so
    RapidPro stores and lists the trimmed text and checks the limit on it; then
    `ProhibitNullCharactersValidator` and `ProhibitSurrogateCharactersValidator` run, every
    failing validator adding its message.
    """
    if isinstance(value, str):
        value = {DEFAULT_LANGUAGE: value}
    if not isinstance(value, dict):
        raise _fail(["Not a valid string."])
    if not value:
        raise _fail(["This field may not be empty."])
    errors: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for language, text in value.items():
        if isinstance(text, int | float) and not isinstance(text, bool):
            text = str(text)  # DRF coerces numbers
        if not isinstance(text, str):
            errors[language] = ["Not a valid string."]
            continue
        text = text.strip()
        if not text:
            errors[language] = ["This field may not be blank."]
            continue
        problems = []
        if len(text) > limit:
            problems.append(f"Ensure this field has no more than {limit} characters.")
        if "\x00" in text:
            problems.append("Null characters are not allowed.")
        surrogate = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
        if surrogate is not None:
            problems.append(f"Surrogate characters are not allowed: U+{ord(surrogate):X}.")
        if problems:
            errors[language] = problems
        texts[language] = text
    if errors:
        raise _fail(errors)
    return texts


# --- templates -----------------------------------------------------------------------------------

_TEMPLATE = re.compile(r"@@|@\((?:[^()]|\([^()]*\))*\)|@([A-Za-z_]\w*(?:\.\w+)*)")


def render_template(text: str, context: Mapping[str, Any]) -> str:
    """Evaluate a broadcast text per contact, the parts of goflow's templates a client meets.

    `@@` gives `@`; `@contact.name` and other paths under `contact`, `fields`, `globals` and `urns`
    are looked up in `context` (a missing or null value renders empty, as an erroring expression
    does); `@word` for any other word stays literal (`a@gmail.com`). Simplified: `@(...)`
    expressions are not evaluated and render empty.
    """

    def replace(match: re.Match[str]) -> str:
        found, path = match.group(0), match.group(1)
        if found == "@@":
            return "@"
        if path is None:
            return ""
        parts = path.split(".")
        if parts[0].lower() not in CONTEXT_NAMES:
            return found
        value: Any = context
        for part in parts:
            value = value.get(part.lower()) if isinstance(value, Mapping) else None
        if isinstance(value, Mapping):
            value = value.get("__default__")
        return "" if value is None else str(value)

    return _TEMPLATE.sub(replace, text)


# --- JSON shapes ---------------------------------------------------------------------------------


#: Field order of each read serializer (`Meta.fields`, spec §2.2 and §4.3).
# fmt: off
BROADCAST_FIELDS: Mapping[Dialect, tuple[str, ...]] = {
    "v9": ("id", "urns", "contacts", "groups", "text", "attachments", "base_language", "status",
           "created_on"),
    "current": ("uuid", "status", "progress", "urns", "contacts", "groups", "text", "attachments",
                "quick_replies", "base_language", "created_on", "id"),
}
MESSAGE_FIELDS: Mapping[Dialect, tuple[str, ...]] = {
    "v9": ("id", "broadcast", "contact", "urn", "channel", "direction", "type", "status",
           "archived", "visibility", "text", "labels", "flow", "attachments", "created_on",
           "sent_on", "modified_on", "media"),
    "current": ("uuid", "contact", "urn", "channel", "direction", "type", "status", "archived",
                "visibility", "text", "labels", "flow", "attachments", "quick_replies",
                "created_on", "sent_on", "modified_on", "media", "id", "broadcast"),
}
# fmt: on


def shape(fields: Sequence[str], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` reduced to `fields`, in that order (compact JSON keeps it)."""
    return {name: values[name] for name in fields}


# --- query parameters and cursors ----------------------------------------------------------------


def int_param(query: Mapping[str, str], name: str) -> int | None:
    """An integer filter; non-integers are a 400 `Value for <name> must be an integer`."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise QueryError(f"Value for {name} must be an integer") from None


def uuid_param(query: Mapping[str, str], name: str) -> str | None:
    """A UUID filter (current only); invalid is a 400 `Value for <name> must be a valid UUID`."""
    value = query.get(name)
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise QueryError(f"Value for {name} must be a valid UUID") from None


SortKey = tuple[datetime, int]


@dataclass(frozen=True, slots=True)
class Cursor:
    """A DRF-style position cursor: rows strictly after `position` (older), or before if reverse."""

    position: SortKey
    reverse: bool = False

    def encode(self) -> str:
        moment, row_id = self.position
        raw = urlencode({"r": int(self.reverse), "p": f"{iso(moment)}|{row_id}"})
        return base64.b64encode(raw.encode()).decode()

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            fields = parse_qs(base64.b64decode(token.encode(), validate=True).decode())
            moment, _, row_id = fields["p"][0].rpartition("|")
            position = (datetime.fromisoformat(moment), int(row_id))
            return cls(position, reverse=fields.get("r", ["0"])[0] == "1")
        except (binascii.Error, UnicodeDecodeError, KeyError, ValueError) as exc:
            raise CursorError("Invalid cursor") from exc


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Any]
    next: Cursor | None
    previous: Cursor | None


def paginate(
    rows: Sequence[T], key: Callable[[T], SortKey], cursor: Cursor | None, size: int
) -> Page:
    """One page of `rows` ordered newest first by `key` (DRF `CursorPagination`, spec §1.5).

    The cursor holds a position, so rows inserted ahead of it do not shift later pages.
    """
    ordered = sorted(rows, key=key, reverse=True)
    if cursor is None:
        page = ordered[:size]
    elif cursor.reverse:
        page = [r for r in ordered if key(r) > cursor.position][-size:]
    else:
        page = [r for r in ordered if key(r) < cursor.position][:size]
    if not page:
        return Page([], None, None)
    first, last = key(page[0]), key(page[-1])
    has_next = any(key(r) < last for r in ordered)
    has_previous = cursor is not None and any(key(r) > first for r in ordered)
    return Page(
        list(page),
        Cursor(last) if has_next else None,
        Cursor(first, reverse=True) if has_previous else None,
    )
