"""Bikram Sambat (Nepali calendar) to Gregorian, as medic's `bikram-sambat` 1.8.1 converts it.

The month-length table is the one in smsparser spec §12.1 (BS 1970-2090, two bits per month).
Published BS tables disagree, especially for future years, so we use CHT's table and no
third-party calendar library. Arguments are coerced the way the JS code coerces them: CHT
passes strings cut out of the SMS, and `"08"`, `"8"` and `"8.0"` all mean August.
"""

from __future__ import annotations

import math
from typing import Any, Final

from .jsdate import MS_PER_DAY, civil_from_days, days_from_civil, time_clip
from .jsvalues import to_number

FIRST_YEAR: Final = 1970
#: BS 1970-01-01 is AD 1913-04-13; the JS epoch constant is local midnight in India (18:30Z the
#: day before), which only matters for fractional days.
_EPOCH_MS: Final = days_from_civil(1913, 4, 12) * MS_PER_DAY + 66_600_000

# fmt: off
#: Month lengths of BS years 1970..2090: month m has 29 + ((T >> 2*(m-1)) & 3) days.
ENCODED_MONTH_LENGTHS: Final = (
    5315258, 5314490, 9459438, 8673005, 5315258, 5315066, 9459438, 8673005, 5315258, 5314298,
    9459438, 5327594, 5315258, 5314298, 9459438, 5327594, 5315258, 5314286, 9459438, 5315306,
    5315258, 5314286, 8673006, 5315306, 5315258, 5265134, 8673006, 5315258, 5315258, 9459438,
    8673005, 5315258, 5314298, 9459438, 8673005, 5315258, 5314298, 9459438, 8473322, 5315258,
    5314298, 9459438, 5327594, 5315258, 5314298, 9459438, 5327594, 5315258, 5314286, 8673006,
    5315306, 5315258, 5265134, 8673006, 5315306, 5315258, 9459438, 8673005, 5315258, 5314490,
    9459438, 8673005, 5315258, 5314298, 9459438, 8473325, 5315258, 5314298, 9459438, 5327594,
    5315258, 5314298, 9459438, 5327594, 5315258, 5314286, 9459438, 5315306, 5315258, 5265134,
    8673006, 5315306, 5315258, 5265134, 8673006, 5315258, 5314490, 9459438, 8673005, 5315258,
    5314298, 9459438, 8669933, 5315258, 5314298, 9459438, 8473322, 5315258, 5314298, 9459438,
    5327594, 5315258, 5314286, 9459438, 5315306, 5315258, 5265134, 8673006, 5315306, 5315258,
    5265134, 8673006, 5315258, 5315258, 5527226, 5528046, 5527277, 5528250, 5528057, 5527277,
    5527277,
)
# fmt: on


class BikramSambatError(ValueError):
    """The BS date does not exist or is outside the table (the JS library throws)."""


def _to_int32(number: float) -> int:
    """JS ToInt32 (what `<<` does to its operand)."""
    if not math.isfinite(number):
        return 0
    value = math.trunc(number) % 2**32
    return value - 2**32 if value >= 2**31 else value


def days_in_month(year: float, month: float) -> int:
    """Length of BS `month` in `year`, with the JS library's checks and coercions.

    Raises:
        BikramSambatError: the month is outside 1..12 or the year is not in the table.
    """
    if month < 1 or month > 12:
        raise BikramSambatError(f"Invalid month value {month}")
    index = year - FIRST_YEAR
    if not (
        math.isfinite(index) and index.is_integer() and 0 <= index < len(ENCODED_MONTH_LENGTHS)
    ):
        raise BikramSambatError(f"No data for year: {year} BS")
    shift = (_to_int32(month - 1) << 1) & 31
    return 29 + ((ENCODED_MONTH_LENGTHS[int(index)] >> shift) & 3)


def to_greg(year: Any, month: Any, day: Any) -> tuple[int, int, int] | None:
    """`toGreg(year, month, day)`: the Gregorian (year, month, day), or None for JS's NaN date.

    A missing (undefined) or non-numeric day gives the NaN date; a non-numeric month acts as
    month 1. Both quirks are CHT's, and callers turn the NaN date into NaN milliseconds.

    Raises:
        BikramSambatError: the date is invalid (month < 1, year < 1970, day out of range, ...).
    """
    y, m, d = to_number(year), to_number(month), to_number(day)
    if m < 1:
        raise BikramSambatError(f"Invalid month value {m}")
    if y < FIRST_YEAR:
        raise BikramSambatError(f"Invalid year value {y}")
    if d < 1 or d > days_in_month(y, m):  # NaN passes both comparisons, as in JS
        raise BikramSambatError(f"Invalid day value {d}")
    timestamp = _EPOCH_MS + MS_PER_DAY * d
    m -= 1
    while y >= FIRST_YEAR:
        while m > 0:
            timestamp += MS_PER_DAY * days_in_month(y, m)
            m -= 1
        m, y = 12.0, y - 1
    clipped = time_clip(timestamp)
    if math.isnan(clipped):
        return None
    return civil_from_days(math.floor(clipped / MS_PER_DAY))
