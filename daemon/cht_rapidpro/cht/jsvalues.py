"""JavaScript value semantics the CHT ports rely on: whitespace, truthiness, `Number()`, `String()`.

CHT's parser is JavaScript, and much of its behaviour at the edges comes from JS coercions
(`"0x1A"` is a number, `[]` is truthy, `String(1e21)` is `"1e+21"`). These helpers reproduce
those coercions on JSON-shaped Python values, so the ports can stay line-by-line readable.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from enum import Enum
from typing import Any, Final


class Undefined(Enum):
    """JS `undefined`, where it must be told apart from `null` (None)."""

    VALUE = "undefined"

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Final = Undefined.VALUE


class JsError(Exception):
    """CHT's JavaScript throws here (a TypeError or SyntaxError), so CHT would answer 500.

    Raised only where the input itself makes the JS code throw, e.g. a form field that is not
    an object, a label that is not a valid regular expression, or `"` as a compact message.
    """


#: JS `\s` (WhiteSpace + LineTerminator). Python's `\s` differs: it adds \x1c-\x1f and \x85 and
#: lacks U+FEFF.
WHITESPACE: Final = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
#: The body of a regex character class matching JS `\s`.
WS: Final = r"\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
#: JS `.` without the `s` flag: anything but a line terminator.
DOT: Final = r"[^\n\r\u2028\u2029]"

_DECIMAL_LITERAL = re.compile(r"[+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_NON_DECIMAL_LITERAL = re.compile(r"0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)")
_RADIX = {"x": 16, "o": 8, "b": 2}


def js_truthy(value: Any) -> bool:
    """JS truthiness: objects and arrays are truthy even when empty; NaN is falsy."""
    if value is None or value is UNDEFINED or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, int | float):
        return value != 0 and not math.isnan(value)
    if isinstance(value, str):
        return value != ""
    return True


def js_trim(text: str) -> str:
    """`String.prototype.trim`: strips the JS whitespace set at both ends."""
    return text.strip(WHITESPACE)


def string_to_number(text: str) -> float:
    """JS `Number(string)`: trims, accepts hex/octal/binary, `Infinity` and exponents."""
    body = js_trim(text)
    if body == "":
        return 0.0
    if _DECIMAL_LITERAL.fullmatch(body):
        return float(body.replace("Infinity", "inf"))
    if _NON_DECIMAL_LITERAL.fullmatch(body):
        return float(int(body[2:], _RADIX[body[1].lower()]))
    return math.nan


def to_number(value: Any) -> float:
    """JS `ToNumber` on a JSON value (what `+x`, `x < 1` and `x - 1` do)."""
    if value is UNDEFINED:
        return math.nan
    if value is None or value is False:
        return 0.0
    if value is True:
        return 1.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return string_to_number(value)
    if isinstance(value, list):  # ToPrimitive of an array is its String()
        return string_to_number(js_string(value))
    return math.nan


def number_to_string(number: float) -> str:
    """JS `Number.prototype.toString()` (shortest round-trip digits, JS exponent thresholds)."""
    if math.isnan(number):
        return "NaN"
    if number == 0:
        return "0"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    sign = "-" if number < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(number))).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = k + exponent  # the value is 0.<digits> * 10**n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{sign}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def js_string(value: Any) -> str:
    """JS `String(value)` on a JSON value."""
    if value is UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return number_to_string(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join("" if v is None or v is UNDEFINED else js_string(v) for v in value)
    return "[object Object]"


def js_number(number: float) -> int | float:
    """A JS number as we hand it out: integral values become `int` (2011, not 2011.0)."""
    if math.isfinite(number) and number.is_integer() and abs(number) < 2**53:
        return int(number)
    return number


def strict_equal(a: Any, b: Any) -> bool:
    """JS `===` on JSON values: objects and arrays compare by identity, NaN never equals."""
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def get_property(obj: Any, key: str) -> Any:
    """`obj[key]` on a JSON value; UNDEFINED where JS gives undefined.

    Raises:
        JsError: `obj` is null or undefined (JS throws a TypeError).
    """
    if obj is None or obj is UNDEFINED:
        raise JsError(f"Cannot read properties of {js_string(obj)} (reading '{key}')")
    if isinstance(obj, dict):
        return obj.get(key, UNDEFINED)
    if isinstance(obj, str | list):
        if key == "length":
            return len(obj)
        if key.isdigit() and key.isascii() and (key == "0" or not key.startswith("0")):
            index = int(key)
            return obj[index] if index < len(obj) else UNDEFINED
    return UNDEFINED
