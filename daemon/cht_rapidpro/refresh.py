"""When to ask RapidPro for the status of each tracked message, and how: a pure planner.

RapidPro has no "changed since" feed for outgoing messages (rapidpro-api §5.2), so a status
change is only seen by reading the message again. Two ways, with different costs:

- a **window scan** (`GET messages.json?after=&before=`, 250 rows a request) reads every
  message the workspace created in a time window, ours or not: ⌈rows in the window / 250⌉
  requests for all the tracked messages in it;
- a **look-up** (`?broadcast=<id>`, or `?id=<id>` for a mirrored message) reads one message:
  one request per message.

Where our messages are dense among the workspace's (CHT is the only traffic), scans win by far
(4 requests for 1,000 messages); where they are sparse (busy flows beside CHT), look-ups do
(100 messages spread over days of foreign traffic cost 100 requests, not the days' pages).

**Schedule.** A message is due again `refresh_interval(age)` after its last refresh: every
round while it is a few minutes old, then a quarter of its age, and every 48 minutes at most
(statuses change most soon after sending). The promise is hourly (`CEILING_S`, which the
`overdue` figures check): the 12 minutes between leave room for a round cut short by the budget
and for the burst of a restart, when everything tracked is due at once. Everything due is
covered in a round when the budget allows; when it does not, the most overdue go first, so
the oldest are never starved: waiting makes them more overdue than any newcomer.

**Cost model.** Due messages are grouped by 10-minute buckets of their creation time. For each
bucket the scan cost is ⌈estimated rows / 250⌉ (the workspace's density, learned from every scan
and kept per bucket, `Density`) against one look-up per message; the cheaper wins. Adjacent scan
buckets merge when one scan costs no more than two. A bucket of unknown density is scanned when
it has more than `UNKNOWN_SCAN_MIN` messages (the scan then learns the density and gives up for
look-ups as soon as it proves dearer, see `ScanProgress`), else looked up.
"""

from __future__ import annotations

import bisect
import heapq
import math
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tracking import DueSet

PAGE = 250
BUCKET_S = 600
#: Every tracked message is refreshed at least this often, however old it is...
CEILING_S = 3600.0
#: ...by planning its refresh this often at most (the slack absorbs budget cuts).
REFRESH_EVERY_S = 0.8 * CEILING_S
#: A bucket of unknown density is scanned only with more due messages than this.
UNKNOWN_SCAN_MIN = 3


def refresh_interval(age_s: float, *, poll_s: float, ceiling_s: float = REFRESH_EVERY_S) -> float:
    """Seconds between two status refreshes of a message `age_s` old."""
    return min(ceiling_s, max(poll_s, age_s / 4))


class Density:
    """Rows the workspace created per second, per 10-minute bucket of `created_on`.

    Each scan reports the rows it read per bucket and the span it covered; the bucket keeps the
    observation covering most of it (a later equal one wins).
    """

    def __init__(self, bucket_s: int = BUCKET_S) -> None:
        self.bucket_s = bucket_s
        self._seen: dict[int, tuple[int, float]] = {}  # bucket -> (rows, seconds covered)

    def __len__(self) -> int:
        return len(self._seen)

    def bucket(self, moment: float) -> int:
        return math.floor(moment / self.bucket_s)

    def record(self, low: float, high: float, counts: Mapping[int, int]) -> None:
        """A scan read every row created in [low, high]; `counts` per bucket."""
        if high <= low:
            return
        for number in range(self.bucket(low), self.bucket(high) + 1):
            start = number * self.bucket_s
            covered = min(high, start + self.bucket_s) - max(low, start)
            if covered <= 0:
                continue
            rows = counts.get(number, 0)
            old = self._seen.get(number)
            if old is None or covered >= old[1]:
                self._seen[number] = (rows, covered)

    def rate(self, number: int) -> float | None:
        seen = self._seen.get(number)
        return None if seen is None else seen[0] / seen[1]

    def estimate(self, low: float, high: float) -> float | None:
        """Rows created in [low, high], or None if part of it was never observed."""
        if high < low:
            return 0.0
        total = 0.0
        for number in range(self.bucket(low), self.bucket(high) + 1):
            rate = self.rate(number)
            if rate is None:
                return None
            start = number * self.bucket_s
            total += rate * max(0.0, min(high, start + self.bucket_s) - max(low, start))
        return total

    def prune(self, before: float) -> None:
        oldest = self.bucket(before)
        for number in [n for n in self._seen if n < oldest]:
            del self._seen[number]

    def to_json(self) -> dict[str, list[float]]:
        return {str(n): [rows, round(secs, 1)] for n, (rows, secs) in sorted(self._seen.items())}

    @classmethod
    def from_json(cls, data: Any, bucket_s: int = BUCKET_S) -> Density:
        density = cls(bucket_s)
        if isinstance(data, dict):
            for name, value in data.items():
                try:
                    rows, secs = int(value[0]), float(value[1])
                    number = int(name)
                except (TypeError, ValueError, IndexError):
                    continue
                if rows >= 0 and secs > 0:
                    density._seen[number] = (rows, secs)
        return density


@dataclass(frozen=True, slots=True)
class Margins:
    """How far a message's row may lie from the time we know for it.

    RapidPro's `created_on` (exact) is the row's own; our send time is not: the row comes after
    the POST (up to SEND_TIMEOUT) and RapidPro's clock may differ (CLOCK_SKEW).
    """

    exact_s: float = 1.0
    before_s: float = 120.0
    after_s: float = 140.0

    def window(self, time: float, exact: bool) -> tuple[float, float]:
        if exact:
            return time - self.exact_s, time + self.exact_s
        return time - self.before_s, time + self.after_s


#: A scan with more keys than this never gives up for look-ups (they would cost far more).
ABORT_CHECK_MAX = 5000


@dataclass(slots=True)
class Scan:
    """Read every row created in [low, high] (high None: up to now), newest first, for the
    tracked messages `keys` (each with the lowest `lows` its row may have)."""

    low: float
    high: float | None
    keys: array[int] = field(default_factory=lambda: array("q"))
    lows: array[float] = field(default_factory=lambda: array("d"))
    pages: float | None = None  # estimated requests (None: density unknown)
    priority: float = 0.0

    @property
    def kind(self) -> str:
        return "scan"

    def absorb(self, other: Scan) -> None:
        """Read `other`'s keys too (its window lies within or below this one's)."""
        self.low = min(self.low, other.low)
        self.keys.extend(other.keys)
        self.lows.extend(other.lows)
        self.priority = max(self.priority, other.priority)


@dataclass(slots=True)
class Lookup:
    """Ask for one message (`?broadcast=` or `?id=`)."""

    key: int
    priority: float

    @property
    def kind(self) -> str:
        return "lookup"


Action = Scan | Lookup


@dataclass(slots=True)
class _Group:
    number: int
    members: array[int] = field(default_factory=lambda: array("q"))  # indexes into the DueSet
    low: float = math.inf
    high: float = -math.inf
    overdue: float = 0.0
    rows: float | None = None


def plan(
    due: DueSet,
    density: Density,
    *,
    now: float,
    margins: Margins,
    lookups_work: bool = True,
    max_lookups: int | None = None,
    page: int = PAGE,
) -> list[Action]:
    """The cheapest way to refresh `due` (see the module docstring), most overdue first.

    A scan that reaches into the last `margins.after_s` is left open-ended (up to now). At most
    `max_lookups` look-ups are planned (the round could not afford more), the most overdue.
    """
    groups: dict[int, _Group] = {}
    times, exact, overdue = due.times, due.exact, due.overdue
    bucket_s = density.bucket_s
    for i in range(len(due)):
        low, high = margins.window(times[i], bool(exact[i]))
        number = math.floor(times[i] / bucket_s)
        group = groups.get(number)
        if group is None:
            group = groups[number] = _Group(number)
        group.members.append(i)
        group.low = min(group.low, low)
        group.high = max(group.high, high)
        group.overdue = max(group.overdue, overdue[i])
    scans: list[_Group] = []
    looked_up: list[tuple[float, int]] = []
    for number in sorted(groups):
        group = groups[number]
        count = len(group.members)
        group.rows = density.estimate(group.low, min(group.high, now))
        if group.rows is None:
            use_scan = count > UNKNOWN_SCAN_MIN or not lookups_work
        else:
            use_scan = math.ceil(group.rows / page) < count or not lookups_work
        if use_scan:
            scans.append(group)
        else:
            looked_up += [(overdue[i], due.keys[i]) for i in group.members]
    merged: list[_Group] = []
    for group in scans:
        last = merged[-1] if merged else None
        if last is not None and _cheaper_together(last, group, density, page, now):
            gap = density.estimate(last.high, group.low)
            last.members.extend(group.members)
            last.rows = (
                None
                if last.rows is None or group.rows is None or gap is None
                else last.rows + group.rows + max(0.0, gap)
            )
            last.low, last.high = min(last.low, group.low), max(last.high, group.high)
            last.overdue = max(last.overdue, group.overdue)
        else:
            merged.append(group)
    if max_lookups is not None and len(looked_up) > max_lookups:
        looked_up = heapq.nlargest(max_lookups, looked_up)
    actions: list[Action] = [Lookup(key, priority) for priority, key in looked_up]
    for group in merged:
        open_ended = group.high >= now - margins.after_s
        scan = Scan(
            low=group.low,
            high=None if open_ended else group.high,
            pages=None if group.rows is None else max(1.0, math.ceil(group.rows / page)),
            priority=group.overdue,
        )
        for i in group.members:
            scan.keys.append(due.keys[i])
            scan.lows.append(margins.window(times[i], bool(exact[i]))[0])
        actions.append(scan)
    actions.sort(key=lambda action: action.priority, reverse=True)
    return actions


def _cheaper_together(
    older: _Group, newer: _Group, density: Density, page: int, now: float
) -> bool:
    if newer.low <= older.high:
        return True  # overlapping windows: one scan reads them once
    if older.rows is None or newer.rows is None:
        return False
    gap = density.estimate(older.high, newer.low)
    if gap is None:
        return False
    together = math.ceil((older.rows + gap + newer.rows) / page)
    return together <= math.ceil(older.rows / page) + math.ceil(newer.rows / page)


@dataclass(slots=True)
class ScanProgress:
    """A scan under way: what it has covered, and whether going on still pays.

    Rows come newest first. A key is covered once the oldest row read is older than the lowest
    its row may have. Going on is dearer than looking the rest up when the pages still to read
    (at the density seen so far) exceed the messages left plus one.
    """

    scan: Scan
    top: float  # newest moment the scan covers (its `high`, or now)
    oldest: float | None = None  # created_on of the oldest row read so far
    rows: int = 0
    pages: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    _sorted_lows: list[float] | None = None

    def add_page(self, created: Iterable[float], density: Density) -> None:
        self.pages += 1
        for moment in created:
            self.rows += 1
            number = density.bucket(moment)
            self.counts[number] = self.counts.get(number, 0) + 1
            if self.oldest is None or moment < self.oldest:
                self.oldest = moment

    def covered(self) -> list[int]:
        """Keys whose whole window has been read (all of them once the scan ended)."""
        if self.oldest is None:
            return []
        oldest = self.oldest
        return [
            key for key, low in zip(self.scan.keys, self.scan.lows, strict=True) if low > oldest
        ]

    def uncovered(self) -> list[int]:
        oldest = self.oldest if self.oldest is not None else math.inf
        return [k for k, low in zip(self.scan.keys, self.scan.lows, strict=True) if low <= oldest]

    def left(self) -> int | None:
        """How many keys are not covered yet (None: too many to count each page)."""
        if len(self.scan.keys) > ABORT_CHECK_MAX:
            return None
        if self._sorted_lows is None:
            self._sorted_lows = sorted(self.scan.lows)
        if self.oldest is None:
            return len(self._sorted_lows)
        return bisect.bisect_right(self._sorted_lows, self.oldest)

    def worth_going_on(self, page: int = PAGE) -> bool:
        left = self.left()
        if left is None or self.oldest is None or self.pages < 2:
            return True
        span = self.top - self.oldest
        if span <= 0:
            return True
        remaining = (self.rows / span) * max(0.0, self.oldest - self.scan.low) / page
        return remaining <= left + 1
