"""JS date parsing as CHT does it: V8's `new Date(string)` and moment 2.30's `moment(value)`.

CHT stores dates as epoch milliseconds produced by these two parsers, including their lenient
corners (`"Apr 11, 2021 18:00 +0800"`, `"2012/3/2"`, a bare `"3"` meaning 2001-03-01). We port
them rather than approximate them, so that reports carry the numbers CHT would have stored.

"Local time" is UTC throughout: the daemon's documents match CHT running with `TZ=UTC`, which
is how the conformance corpus records its expected values (smsparser spec §6.3).

Every parser returns a float: epoch milliseconds, or NaN for an invalid date (JS `NaN`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .jsvalues import UNDEFINED, WHITESPACE, WS, string_to_number

MS_PER_DAY = 86_400_000
MAX_TIME_MS = 8.64e15  # ECMAScript TimeClip bound
_MAX_LOCAL_MS = MAX_TIME_MS + 864_000_000  # V8 kMaxTimeBeforeUTCInMs


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year; month 1..12)."""
    year -= 1 if month <= 2 else 0  # count years from March
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """Inverse of `days_from_civil`: (year, month 1..12, day)."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def is_leap(year: int) -> bool:
    """Gregorian leap year."""
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in_month(year: int, month: int) -> int:
    """Length of `month` (1..12) in `year`."""
    if month == 2:
        return 29 if is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def make_time_ms(
    year: float,
    month0: float,
    day: float,
    hour: float = 0,
    minute: float = 0,
    second: float = 0,
    ms: float = 0,
) -> float:
    """ECMAScript MakeDate(MakeDay(y, m, d), MakeTime(h, m, s, ms)); `month0` is 0-based."""
    parts = (year, month0, day, hour, minute, second, ms)
    if not all(math.isfinite(p) for p in parts):
        return math.nan
    y, m, d, h, mi, s, milli = (math.trunc(p) for p in parts)
    ym = y + m // 12
    days = days_from_civil(ym, m % 12 + 1, 1) + d - 1
    return float(days * MS_PER_DAY + h * 3_600_000 + mi * 60_000 + s * 1000 + milli)


def time_clip(ms: float) -> float:
    """ECMAScript TimeClip: NaN outside ±8.64e15, else truncated to an integer."""
    if not math.isfinite(ms) or abs(ms) > MAX_TIME_MS:
        return math.nan
    return float(math.trunc(ms)) + 0.0


# --------------------------------------------------------------------------------------------
# V8's date parser (src/date/dateparser*.{h,cc}): the ES5 ISO subset, then the legacy fallback.
# --------------------------------------------------------------------------------------------


class _Kind(IntEnum):
    INVALID = 0
    END = 1
    NUMBER = 2
    SYMBOL = 3
    WHITESPACE = 4
    UNKNOWN = 5
    KEYWORD = 6


class _Keyword(IntEnum):
    INVALID = 0
    MONTH_NAME = 1
    TIME_ZONE_NAME = 2
    TIME_SEPARATOR = 3
    AM_PM = 4


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
#: V8's KeywordTable: a 3-character prefix, its type and value. Only month names may be longer.
_KEYWORDS: tuple[tuple[str, _Keyword, int], ...] = (
    *((name, _Keyword.MONTH_NAME, i + 1) for i, name in enumerate(_MONTHS)),
    ("am", _Keyword.AM_PM, 0),
    ("pm", _Keyword.AM_PM, 12),
    ("ut", _Keyword.TIME_ZONE_NAME, 0),
    ("utc", _Keyword.TIME_ZONE_NAME, 0),
    ("z", _Keyword.TIME_ZONE_NAME, 0),
    ("gmt", _Keyword.TIME_ZONE_NAME, 0),
    ("cdt", _Keyword.TIME_ZONE_NAME, -5),
    ("cst", _Keyword.TIME_ZONE_NAME, -6),
    ("edt", _Keyword.TIME_ZONE_NAME, -4),
    ("est", _Keyword.TIME_ZONE_NAME, -5),
    ("mdt", _Keyword.TIME_ZONE_NAME, -6),
    ("mst", _Keyword.TIME_ZONE_NAME, -7),
    ("pdt", _Keyword.TIME_ZONE_NAME, -7),
    ("pst", _Keyword.TIME_ZONE_NAME, -8),
    ("t", _Keyword.TIME_SEPARATOR, 0),
)
_V8_WHITESPACE = frozenset(WHITESPACE)
#: Words stop at JS WhiteSpace but not at line terminators (U+2028/9 are read as letters).
_V8_WORD_BREAK = _V8_WHITESPACE - frozenset("\n\r\u2028\u2029")
_MAX_SIGNIFICANT_DIGITS = 9
_NONE = -(2**31)  # V8's kNone


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    value: int = 0  # number value, keyword value or symbol code point
    length: int = 0
    keyword: _Keyword = _Keyword.INVALID

    def is_number(self, length: int | None = None) -> bool:
        return self.kind is _Kind.NUMBER and (length is None or self.length == length)

    def is_symbol(self, char: str) -> bool:
        return self.kind is _Kind.SYMBOL and self.value == ord(char)

    def is_sign(self) -> bool:
        return self.is_symbol("+") or self.is_symbol("-")

    def sign(self) -> int:
        return -1 if self.is_symbol("-") else 1

    def is_keyword(self, keyword: _Keyword | None = None) -> bool:
        return self.kind is _Kind.KEYWORD and (keyword is None or self.keyword is keyword)

    def is_keyword_z(self) -> bool:
        return self.is_keyword(_Keyword.TIME_ZONE_NAME) and self.length == 1 and self.value == 0


def _lookup_keyword(prefix: str, length: int) -> tuple[_Keyword, int]:
    for name, keyword, value in _KEYWORDS:
        if prefix == name and (length <= 3 or keyword is _Keyword.MONTH_NAME):
            return keyword, value
    return _Keyword.INVALID, 0


class _Scanner:
    """V8's DateStringTokenizer: one token of look-ahead."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._next = self._scan()

    def _char(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _scan(self) -> _Token:
        start, char = self._pos, self._char()
        if char == "":
            return _Token(_Kind.END)
        if "0" <= char <= "9":
            return _Token(_Kind.NUMBER, self._read_number(), self._pos - start)
        if char in ":-+.)":
            self._pos += 1
            return _Token(_Kind.SYMBOL, ord(char))
        if char >= "A" and char not in _V8_WORD_BREAK:
            return self._read_word()
        self._pos += 1
        if char in _V8_WHITESPACE:
            return _Token(_Kind.WHITESPACE, length=1)
        if char == "(":
            self._skip_parentheses()
        return _Token(_Kind.UNKNOWN)

    def _read_number(self) -> int:
        while self._char() == "0":
            self._pos += 1
        number = digits = 0
        while "0" <= (char := self._char()) <= "9" and char != "":
            if digits < _MAX_SIGNIFICANT_DIGITS:
                number = number * 10 + ord(char) - 48
            digits += 1
            self._pos += 1
        return number

    def _read_word(self) -> _Token:
        start = self._pos
        while (char := self._char()) >= "A" and char not in _V8_WORD_BREAK:
            self._pos += 1
        word = self._text[start : self._pos]
        prefix = "".join(chr(ord(c) | 0x20) for c in word[:3])  # V8's AsciiAlphaToLower
        keyword, value = _lookup_keyword(prefix, len(word))
        return _Token(_Kind.KEYWORD, value, len(word), keyword)

    def _skip_parentheses(self) -> None:
        balance = 1  # the "(" is already consumed
        while balance > 0 and (char := self._char()) != "":
            if char == ")":
                balance -= 1
            elif char == "(":
                balance += 1
            self._pos += 1

    def next(self) -> _Token:
        token, self._next = self._next, self._scan()
        return token

    def peek(self) -> _Token:
        return self._next

    def skip_symbol(self, char: str) -> bool:
        if self._next.is_symbol(char):
            self.next()
            return True
        return False


def _between(x: int, low: int, high: int) -> bool:
    return low <= x <= high


@dataclass(slots=True)
class _Day:
    comp: list[int] = field(default_factory=list)
    named_month: int = _NONE
    is_iso: bool = False

    def add(self, n: int) -> bool:
        if len(self.comp) < 3:
            self.comp.append(n)
            return True
        return False

    def write(self) -> tuple[int, int, int] | None:
        """(year, month 1..12, day), or None when the components make no date."""
        if not self.comp:
            return None
        comp = self.comp + [1] * (3 - len(self.comp))  # day and month default to 1
        year = 0  # KJS compatibility: a missing year is 0, i.e. 2000 below
        if self.named_month == _NONE:
            if self.is_iso or not _between(comp[0], 1, 31):
                year, month, day = comp
            else:
                month, day, year = comp
        else:
            month = self.named_month
            if not _between(comp[0], 1, 31):
                year, day = comp[0], comp[1]
            else:
                day, year = comp[0], comp[1]
        if not self.is_iso:
            if _between(year, 0, 49):
                year += 2000
            elif _between(year, 50, 99):
                year += 1900
        if not (_between(month, 1, 12) and _between(day, 1, 31)):
            return None
        return year, month, day


@dataclass(slots=True)
class _Time:
    comp: list[int] = field(default_factory=list)
    hour_offset: int = _NONE

    def is_empty(self) -> bool:
        return not self.comp

    def is_expecting(self, n: int) -> bool:
        index = len(self.comp)
        return (
            (index == 1 and _between(n, 0, 59))
            or (index == 2 and _between(n, 0, 59))
            or (index == 3 and _between(n, 0, 999))
        )

    def add(self, n: int) -> bool:
        if len(self.comp) < 4:
            self.comp.append(n)
            return True
        return False

    def add_final(self, n: int) -> bool:
        if not self.add(n):
            return False
        self.comp += [0] * (4 - len(self.comp))
        return True

    def write(self) -> tuple[int, int, int, int] | None:
        hour, minute, second, milli = self.comp + [0] * (4 - len(self.comp))
        if self.hour_offset != _NONE:
            if not _between(hour, 0, 12):
                return None
            hour = hour % 12 + self.hour_offset
        in_range = (
            _between(hour, 0, 23)
            and _between(minute, 0, 59)
            and _between(second, 0, 59)
            and _between(milli, 0, 999)
        )
        if not in_range and (hour != 24 or minute or second or milli):
            return None
        return hour, minute, second, milli


@dataclass(slots=True)
class _Zone:
    sign: int = _NONE
    hour: int = _NONE
    minute: int = _NONE

    def set(self, offset_hours: int) -> None:
        self.sign = -1 if offset_hours < 0 else 1
        self.hour = abs(offset_hours)
        self.minute = 0

    def is_expecting(self, n: int) -> bool:
        return self.hour != _NONE and self.minute == _NONE and _between(n, 0, 59)

    def is_utc(self) -> bool:
        return self.hour == 0 and self.minute == 0

    def is_empty(self) -> bool:
        return self.hour == _NONE

    def offset_seconds(self) -> int | None:
        """The UTC offset in seconds, or None for local time.

        Raises:
            _Invalid: the offset does not fit V8's Smi (computed in unsigned 32-bit, as V8 does).
        """
        if self.sign == _NONE:
            return None
        hour = 0 if self.hour == _NONE else self.hour
        minute = 0 if self.minute == _NONE else self.minute
        total = (hour * 3600 + minute * 60) % 2**32
        if total > 2**31 - 1:
            raise _Invalid
        return self.sign * total


def _read_milliseconds(token: _Token) -> int:
    number, length = token.value, token.length
    if length == 1:
        return number * 100
    if length == 2:
        return number * 10
    length = min(length, _MAX_SIGNIFICANT_DIGITS)
    return number // 10 ** (length - 3) if length > 3 else number


class _Invalid(Exception):
    """The string is not a date (V8's `DateToken::Invalid()` / `return false`)."""


def _parse_es5(scanner: _Scanner, day: _Day, clock: _Time, zone: _Zone) -> _Token:
    """V8 ParseES5DateTime: returns the first token it could not handle (END on success)."""
    if scanner.peek().is_sign():
        sign_token = scanner.next()
        if not scanner.peek().is_number(6):
            return sign_token
        year = scanner.next().value
        if sign_token.sign() < 0 and year == 0:
            return sign_token
        day.add(sign_token.sign() * year)
    elif scanner.peek().is_number(4):
        day.add(scanner.next().value)
    else:
        return scanner.next()
    if scanner.skip_symbol("-"):
        if not scanner.peek().is_number(2) or not _between(scanner.peek().value, 1, 12):
            return scanner.next()
        day.add(scanner.next().value)
        if scanner.skip_symbol("-"):
            if not scanner.peek().is_number(2) or not _between(scanner.peek().value, 1, 31):
                return scanner.next()
            day.add(scanner.next().value)
    if not scanner.peek().is_keyword(_Keyword.TIME_SEPARATOR):
        if scanner.peek().kind is not _Kind.END:
            return scanner.next()
    else:
        scanner.next()
        _parse_es5_time(scanner, clock, zone)
    if zone.is_empty() and clock.is_empty():
        zone.set(0)  # a date-only ISO string is UTC
    day.is_iso = True
    return _Token(_Kind.END)


def _expect_two_digits(scanner: _Scanner, low: int, high: int) -> int:
    token = scanner.peek()
    if not token.is_number(2) or not _between(token.value, low, high):
        raise _Invalid
    return scanner.next().value


def _parse_es5_time(scanner: _Scanner, clock: _Time, zone: _Zone) -> None:
    hour = _expect_two_digits(scanner, 0, 24)
    limit = 0 if hour == 24 else 59  # 24:00[:00[.000]] only
    clock.add(hour)
    if not scanner.skip_symbol(":"):
        raise _Invalid
    clock.add(_expect_two_digits(scanner, 0, limit))
    if scanner.skip_symbol(":"):
        clock.add(_expect_two_digits(scanner, 0, limit))
        if scanner.skip_symbol("."):
            token = scanner.peek()
            if not token.is_number() or (hour == 24 and token.value > 0):
                raise _Invalid
            clock.add(_read_milliseconds(scanner.next()))
    if scanner.peek().is_keyword_z():
        scanner.next()
        zone.set(0)
    elif scanner.peek().is_sign():
        zone.sign = scanner.next().sign()
        if scanner.peek().is_number(4):
            hourmin = scanner.next().value
            if not (_between(hourmin // 100, 0, 23) and _between(hourmin % 100, 0, 59)):
                raise _Invalid
            zone.hour, zone.minute = hourmin // 100, hourmin % 100
        else:
            zone.hour = _expect_two_digits(scanner, 0, 23)
            if not scanner.skip_symbol(":"):
                raise _Invalid
            zone.minute = _expect_two_digits(scanner, 0, 59)
    if scanner.peek().kind is not _Kind.END:
        raise _Invalid


@dataclass(slots=True)
class _Legacy:
    """State of V8's legacy (pre-ES5, Safari-compatible) loop."""

    scanner: _Scanner
    day: _Day
    clock: _Time
    zone: _Zone
    has_read_number: bool

    def number(self, token: _Token) -> None:
        scanner, n = self.scanner, token.value
        self.has_read_number = True
        if scanner.skip_symbol(":"):
            if scanner.skip_symbol(":"):
                if not self.clock.is_empty():
                    raise _Invalid
                self.clock.add(n)
                self.clock.add(0)
            else:
                if not self.clock.add(n):
                    raise _Invalid
                if scanner.peek().is_symbol("."):
                    scanner.next()
        elif scanner.skip_symbol(".") and self.clock.is_expecting(n):
            self.clock.add(n)
            if not scanner.peek().is_number():
                raise _Invalid
            self.clock.add_final(_read_milliseconds(scanner.next()))
        elif self.zone.is_expecting(n):
            self.zone.minute = n
        elif self.clock.is_expecting(n):
            self.clock.add_final(n)
            peek = scanner.peek()
            if peek.kind not in (_Kind.END, _Kind.WHITESPACE) and not (
                peek.is_keyword_z() or peek.is_sign()
            ):
                raise _Invalid
        else:
            if not self.day.add(n):
                raise _Invalid
            scanner.skip_symbol("-")

    def keyword(self, token: _Token) -> None:
        if token.keyword is _Keyword.AM_PM and not self.clock.is_empty():
            self.clock.hour_offset = token.value
        elif token.keyword is _Keyword.MONTH_NAME:
            self.day.named_month = token.value
            self.scanner.skip_symbol("-")
        elif token.keyword is _Keyword.TIME_ZONE_NAME and self.has_read_number:
            self.zone.set(token.value)
        elif self.has_read_number or self.scanner.peek().is_number():
            raise _Invalid  # garbage words are only allowed before the first number

    def sign(self, token: _Token) -> None:
        """A UTC offset; only legal after "UTC" or a time."""
        self.zone.sign = token.sign()
        n = length = 0
        if self.scanner.peek().is_number():
            number = self.scanner.next()
            n, length = number.value, number.length
        self.has_read_number = True
        if self.scanner.peek().is_symbol(":"):
            self.zone.hour, self.zone.minute = n, _NONE
        elif length in (1, 2):
            self.zone.hour, self.zone.minute = n, 0
        elif length in (3, 4):
            self.zone.hour, self.zone.minute = n // 100, n % 100
        else:
            raise _Invalid

    def run(self, token: _Token) -> None:
        while token.kind is not _Kind.END:
            if token.kind is _Kind.INVALID:
                raise _Invalid
            if token.is_number():
                self.number(token)
            elif token.is_keyword():
                self.keyword(token)
            elif token.is_sign() and (self.zone.is_utc() or not self.clock.is_empty()):
                self.sign(token)
            elif (token.is_sign() or token.is_symbol(")")) and self.has_read_number:
                raise _Invalid
            token = self.scanner.next()


def js_date_parse(text: str) -> float:
    """`new Date(text).valueOf()` as V8 (Node 20) computes it, with local time = UTC."""
    scanner = _Scanner(text)
    day, clock, zone = _Day(), _Time(), _Zone()
    try:
        token = _parse_es5(scanner, day, clock, zone)
        _Legacy(scanner, day, clock, zone, has_read_number=bool(day.comp)).run(token)
        ymd, hms, offset = day.write(), clock.write(), zone.offset_seconds()
    except _Invalid:
        return math.nan
    if ymd is None or hms is None:
        return math.nan
    ms = make_time_ms(ymd[0], ymd[1] - 1, ymd[2], *hms)
    if offset is None:
        if abs(ms) > _MAX_LOCAL_MS:
            return math.nan
    else:
        ms -= offset * 1000
    return time_clip(ms)


# --------------------------------------------------------------------------------------------
# moment 2.30 `moment(input)`: ASP.NET JSON date, ISO 8601, RFC 2822, then `new Date(input)`.
# --------------------------------------------------------------------------------------------

_D = "[0-9]"
_ASP_NET = re.compile(r"/?Date\((-?[0-9]+)", re.IGNORECASE)
_EXTENDED_ISO = re.compile(
    rf"[{WS}]*((?:[+-]{_D}{{6}}|{_D}{{4}})-(?:{_D}{_D}-{_D}{_D}|W{_D}{_D}-{_D}|W{_D}{_D}"
    rf"|{_D}{_D}{_D}|{_D}{_D}))(?:(T| )({_D}{_D}(?::{_D}{_D}(?::{_D}{_D}(?:[.,]{_D}+)?)?)?)"
    rf"([+-]{_D}{_D}(?::?{_D}{_D})?|[{WS}]*Z)?)?\Z"
)
_BASIC_ISO = re.compile(
    rf"[{WS}]*((?:[+-]{_D}{{6}}|{_D}{{4}})(?:{_D}{{4}}|W{_D}{{3}}|W{_D}{_D}|{_D}{{3}}|{_D}{_D}|))"
    rf"(?:(T| )({_D}{_D}(?:{_D}{_D}(?:{_D}{_D}(?:[.,]{_D}+)?)?)?)"
    rf"([+-]{_D}{_D}(?::?{_D}{_D})?|[{WS}]*Z)?)?\Z"
)
_TZ = re.compile(rf"Z|[+-]{_D}{_D}(?::?{_D}{_D})?")
#: moment's isoDates: (format, detector, time allowed). Detectors are searched, not anchored.
_ISO_DATES: tuple[tuple[str, re.Pattern[str], bool], ...] = tuple(
    (fmt, re.compile(rx), allow_time)
    for fmt, rx, allow_time in (
        ("YYYYYY-MM-DD", rf"[+-]{_D}{{6}}-{_D}{_D}-{_D}{_D}", True),
        ("YYYY-MM-DD", rf"{_D}{{4}}-{_D}{_D}-{_D}{_D}", True),
        ("GGGG-[W]WW-E", rf"{_D}{{4}}-W{_D}{_D}-{_D}", True),
        ("GGGG-[W]WW", rf"{_D}{{4}}-W{_D}{_D}", False),
        ("YYYY-DDD", rf"{_D}{{4}}-{_D}{{3}}", True),
        ("YYYY-MM", rf"{_D}{{4}}-{_D}{_D}", False),
        ("YYYYYYMMDD", rf"[+-]{_D}{{10}}", True),
        ("YYYYMMDD", rf"{_D}{{8}}", True),
        ("GGGG[W]WWE", rf"{_D}{{4}}W{_D}{{3}}", True),
        ("GGGG[W]WW", rf"{_D}{{4}}W{_D}{{2}}", False),
        ("YYYYDDD", rf"{_D}{{7}}", True),
        ("YYYYMM", rf"{_D}{{6}}", False),
        ("YYYY", rf"{_D}{{4}}", False),
    )
)
_ISO_TIMES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (fmt, re.compile(rx))
    for fmt, rx in (
        ("HH:mm:ss.SSSS", rf"{_D}{_D}:{_D}{_D}:{_D}{_D}\.{_D}+"),
        ("HH:mm:ss,SSSS", rf"{_D}{_D}:{_D}{_D}:{_D}{_D},{_D}+"),
        ("HH:mm:ss", rf"{_D}{_D}:{_D}{_D}:{_D}{_D}"),
        ("HH:mm", rf"{_D}{_D}:{_D}{_D}"),
        ("HHmmss.SSSS", rf"{_D}{{6}}\.{_D}+"),
        ("HHmmss,SSSS", rf"{_D}{{6}},{_D}+"),
        ("HHmmss", rf"{_D}{{6}}"),
        ("HHmm", rf"{_D}{{4}}"),
        ("HH", rf"{_D}{_D}"),
    )
)
#: moment's non-strict parse regexes for the format units the ISO formats use.
_UNIT_REGEX: dict[str, re.Pattern[str]] = {
    "YYYYYY": re.compile(rf"[+-]?{_D}{{1,6}}"),
    "YYYY": re.compile(rf"{_D}{{1,4}}"),
    "GGGG": re.compile(rf"{_D}{{1,4}}"),
    "MM": re.compile(rf"{_D}{_D}?"),
    "DD": re.compile(rf"{_D}{_D}?"),
    "DDD": re.compile(rf"{_D}{{1,3}}"),
    "WW": re.compile(rf"{_D}{_D}?"),
    "E": re.compile(rf"{_D}{_D}?"),
    "HH": re.compile(rf"{_D}{_D}?"),
    "mm": re.compile(rf"{_D}{_D}?"),
    "ss": re.compile(rf"{_D}{_D}?"),
    "SSSS": re.compile(rf"{_D}+"),
    "Z": re.compile(rf"Z|[+-]{_D}{_D}(?::?{_D}{_D})?", re.IGNORECASE),
}
_FORMAT_UNIT = re.compile(r"\[[^\[]*\]|YYYYYY|YYYY|GGGG|MM|DDD|DD|WW|E|HH|mm|ss|SSSS|Z|.")
_CHUNK_OFFSET = re.compile(r"[+-]|[0-9]{2}")

_RFC2822 = re.compile(
    r"(?:(Mon|Tue|Wed|Thu|Fri|Sat|Sun),?[WS])?([0-9]{1,2})[WS]"
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[WS]([0-9]{2,4})[WS]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2}))?[WS](?:(UT|GMT|[ECMP][SD]T)|([Zz])|([+-][0-9]{4}))\Z".replace("WS", WS)
)
_RFC_COMMENT_OR_FOLD = re.compile(r"\([^()]*\)|[\n\t]")
_RFC_SPACES = re.compile(rf"[{WS}][{WS}]+")
_OBS_OFFSETS = {  # minutes east of UTC
    "UT": 0,
    "GMT": 0,
    "EDT": -240,
    "EST": -300,
    "CDT": -300,
    "CST": -360,
    "MDT": -360,
    "MST": -420,
    "PDT": -420,
    "PST": -480,
}
_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_MONTHS_SHORT = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _to_int(text: str) -> int:
    """moment's `toInt`: `+text` floored towards zero, 0 when not finite."""
    number = string_to_number(text)
    return math.trunc(number) if math.isfinite(number) and number != 0 else 0


@dataclass(slots=True)
class _Parsed:
    """moment's config._a / _w / _dayOfYear / _tzm after token parsing."""

    year: int | None = None
    month0: int | None = None
    day: int | None = None
    hour: int = 0
    minute: int = 0
    second: int = 0
    ms: int = 0
    week_year: int | None = None
    week: int | None = None
    weekday: int | None = None
    day_of_year: int | None = None
    tz_minutes: int | None = None


def _offset_from_string(text: str) -> int:
    """moment's `offsetFromString`: minutes east of UTC from `Z`, `+08`, `+0800`, `+08:00`."""
    parts = _CHUNK_OFFSET.findall(text) or ["-", "0", "0"]
    minutes = int(parts[1]) * 60 + (_to_int(parts[2]) if len(parts) > 2 else 0)
    return 0 if minutes == 0 else (minutes if parts[0] == "+" else -minutes)


#: Format units that set one integer attribute of `_Parsed` with moment's `toInt`.
_INT_UNITS = {
    "YYYYYY": "year",
    "DD": "day",
    "DDD": "day_of_year",
    "GGGG": "week_year",
    "WW": "week",
    "E": "weekday",
    "HH": "hour",
    "mm": "minute",
    "ss": "second",
}


def _apply_unit(unit: str, text: str, parsed: _Parsed) -> None:
    """moment's parse callback for one format unit (`addParseToken`)."""
    if unit in _INT_UNITS:
        setattr(parsed, _INT_UNITS[unit], _to_int(text))
    elif unit == "YYYY":
        year = _to_int(text)
        parsed.year = year + (1900 if year > 68 else 2000) if len(text) == 2 else year
    elif unit == "MM":
        parsed.month0 = _to_int(text) - 1
    elif unit == "SSSS":
        parsed.ms = math.trunc(string_to_number("0." + text) * 1000)
    elif unit == "Z":
        parsed.tz_minutes = _offset_from_string(text)


def _parse_with_format(text: str, fmt: str) -> _Parsed:
    """moment's non-strict `configFromStringAndFormat`: each unit is searched for in the rest."""
    parsed, rest = _Parsed(), text
    for unit in _FORMAT_UNIT.findall(fmt):
        pattern = _UNIT_REGEX.get(unit) or re.compile(re.escape(unit.strip("[]")))
        found = pattern.search(rest)
        if found is None or found.group() == "":
            continue
        rest = rest[rest.index(found.group()) + len(found.group()) :]
        _apply_unit(unit, found.group(), parsed)
    return parsed


def _days_in_year(year: int) -> int:
    """365 or 366."""
    return 366 if is_leap(year) else 365


def _first_week_offset(year: int) -> int:
    """moment's firstWeekOffset for ISO weeks (dow 1, doy 4)."""
    weekday_of_jan4 = (days_from_civil(year, 1, 4) + 4) % 7  # 1970-01-01 was a Thursday
    return -((7 + weekday_of_jan4 - 1) % 7) + 4 - 1


def _resolve_iso_week(parsed: _Parsed) -> bool:
    """Turn GGGG/WW/E into year + day_of_year; False on overflow (an invalid moment)."""
    week_year = parsed.week_year if parsed.week_year is not None else parsed.year
    if week_year is None:
        week_year = _current_year()
    week = 1 if parsed.week is None else parsed.week
    weekday = 1 if parsed.weekday is None else parsed.weekday
    offset, next_offset = _first_week_offset(week_year), _first_week_offset(week_year + 1)
    weeks = (_days_in_year(week_year) - offset + next_offset) // 7
    if week < 1 or week > weeks or weekday < 1 or weekday > 7:
        return False
    day_of_year = 1 + 7 * (week - 1) + (6 + weekday) % 7 + offset
    if day_of_year <= 0:
        week_year -= 1
        day_of_year += _days_in_year(week_year)
    elif day_of_year > _days_in_year(week_year):
        day_of_year -= _days_in_year(week_year)
        week_year += 1
    parsed.year, parsed.day_of_year = week_year, day_of_year
    return True


def _current_year() -> int:
    """moment's default for a missing year (unreachable from the ISO formats in practice)."""
    return time.gmtime().tm_year


def _moment_from_parsed(parsed: _Parsed) -> float:
    """moment's configFromArray + checkOverflow; NaN for an invalid moment."""
    has_week = not (parsed.week_year is None and parsed.week is None and parsed.weekday is None)
    from_week = has_week and parsed.day is None and parsed.month0 is None
    if from_week and not _resolve_iso_week(parsed):
        return math.nan
    year = parsed.year if parsed.year is not None else _current_year()
    if parsed.day_of_year is not None:
        if parsed.day_of_year > _days_in_year(year) or parsed.day_of_year == 0:
            return math.nan
        _, month, day = civil_from_days(days_from_civil(year, 1, 1) + parsed.day_of_year - 1)
        parsed.month0, parsed.day = month - 1, day
    month0 = 0 if parsed.month0 is None else parsed.month0
    day = 1 if parsed.day is None else parsed.day
    hour, minute, second, ms = parsed.hour, parsed.minute, parsed.second, parsed.ms
    if (
        not 0 <= month0 <= 11
        or not 1 <= day <= days_in_month(year, month0 + 1)
        or not 0 <= hour <= 24
        or (hour == 24 and (minute or second or ms))
        or not 0 <= minute <= 59
        or not 0 <= second <= 59
        or not 0 <= ms <= 999
    ):
        return math.nan
    value = make_time_ms(year, month0, day, hour, minute, second, ms)
    if parsed.tz_minutes is not None:
        value -= parsed.tz_minutes * 60_000
    return time_clip(value)


def _moment_iso(text: str) -> float | None:
    """moment's configFromISO; None when the string is not ISO (moment tries RFC 2822 next)."""
    match = _EXTENDED_ISO.match(text) or _BASIC_ISO.match(text)
    if match is None:
        return None
    date_part, separator, time_part, zone_part = match.groups()
    found = next(((f, t) for f, rx, t in _ISO_DATES if rx.search(date_part)), None)
    if found is None:
        return None
    date_format, allow_time = found
    time_format = ""
    if time_part:
        time_format = next((f for f, rx in _ISO_TIMES if rx.search(time_part)), "")
        if not time_format or not allow_time:
            return None
        time_format = (separator or " ") + time_format
    zone_format = ""
    if zone_part:
        if not _TZ.search(zone_part):
            return None
        zone_format = "Z"
    parsed = _parse_with_format(text, date_format + time_format + zone_format)
    return _moment_from_parsed(parsed)


def _moment_rfc2822(text: str) -> float | None:
    """moment's configFromRFC2822; None when the string is not RFC 2822."""
    cleaned = _RFC_SPACES.sub(" ", _RFC_COMMENT_OR_FOLD.sub(" ", text)).strip(WHITESPACE)
    match = _RFC2822.match(cleaned)
    if match is None:
        return None
    weekday, day, month, year_text, hour, minute, second, obs, military, numeric = match.groups()
    year = int(year_text)
    year += 2000 if year <= 49 else 1900 if year <= 999 else 0
    month0 = _MONTHS_SHORT.index(month)
    if weekday and _WEEKDAYS.index(weekday) != _weekday(make_time_ms(year, month0, int(day))):
        return math.nan  # flagged `weekdayMismatch`: invalid whatever the fallback finds
    if (
        not 1 <= int(day) <= days_in_month(year, month0 + 1)
        or not 0 <= int(hour) <= 23  # 24:00 overflows: moment's _a has no 0 ms to allow it
        or not 0 <= int(minute) <= 59
        or not 0 <= int(second or 0) <= 59
    ):
        return math.nan  # moment's checkOverflow
    if obs:
        offset = _OBS_OFFSETS[obs]
    elif military:
        offset = 0
    else:
        hm = int(numeric)
        minutes = int(math.fmod(hm, 100))
        offset = (hm - minutes) // 100 * 60 + minutes
    value = make_time_ms(year, month0, int(day), int(hour), int(minute), int(second or 0))
    return time_clip(value - offset * 60_000)


def _weekday(ms: float) -> int:
    """Day of the week (0 = Sunday) of an epoch-ms value."""
    return (math.floor(ms / MS_PER_DAY) + 4) % 7  # 1970-01-01 was a Thursday


def moment_parse_string(text: str) -> float:
    """`moment(text).valueOf()` for a string."""
    if text == "":
        return math.nan
    asp = _ASP_NET.match(text)
    if asp:
        return time_clip(float(int(asp.group(1))))
    for parser in (_moment_iso, _moment_rfc2822):
        value = parser(text)
        if value is not None:
            return value
    return js_date_parse(text)


def moment_value_of(value: Any, *, now_ms: float | None = None) -> float:
    """`moment(value).valueOf()` for a JSON value (strings, numbers; `undefined` is now).

    Arrays and objects (moment's component forms) are not supported and give NaN.
    """
    if value is UNDEFINED:
        return float(now_ms if now_ms is not None else math.floor(time.time() * 1000))
    if isinstance(value, str):
        return moment_parse_string(value)
    if isinstance(value, bool):
        return float(value)  # moment falls back to new Date(true) = 1
    if isinstance(value, int | float):
        return time_clip(float(value))
    return math.nan
