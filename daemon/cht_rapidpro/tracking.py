"""What the RapidPro log follower keeps in memory about our messages, in a few bytes each.

`TrackedIndex` holds every message whose RapidPro status may still change, keyed by the
RapidPro identity its task carries in `gateway_ref`: the broadcast id of a message this daemon
sent, or `MIRROR_BASE` + the message id of a message mirrored from RapidPro's log (their
`gateway_ref` is `rapidpro-msg:<host>:<id>`, so the two id sequences never meet). Per message
it keeps four machine numbers in parallel arrays sorted by key (17 bytes; 200,000 messages
take 3.4 MB): when RapidPro created it (or, until a row of RapidPro's log was seen, when it
was sent), when its status was last asked of RapidPro, and the state CHT shows (so that a poll
with no news costs no CouchDB read). The tasks themselves are read from CouchDB when a status
changes, by `gateway_ref` through CHT's `medic-sms/messages_by_gateway_ref` view; without that
view the index also keeps each key's document id (16 more bytes for a uuid, the ids CHT gives
its documents; a dictionary entry for any other id).

Messages that reached a final state stay known as ours for `FINAL_RETENTION_S`, so that a row
of RapidPro's log for a message delivered within seconds is never taken for a foreign one.

`OwnContent` is the other half of "is this row ours?": the numbers and texts of our sends whose
broadcast id CouchDB may not show yet (claimed, posted, not written back; or a task with several
messages, whose task keeps only the last broadcast id). A foreign-looking row that matches one
waits rather than being mirrored.
"""

from __future__ import annotations

import bisect
import re
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .cht.outgoing import MalformedTaskError, find_claim, iter_tasks, sent_at
from .cht.phone import normalize
from .cht.state import IN_FLIGHT_STATES, SENDABLE_STATES, STATUS_MAP, State, js_truthy

#: Keys at and above this are mirrored messages: MIRROR_BASE + RapidPro's message id.
MIRROR_BASE = 1 << 60
#: `gateway_ref` (and `_id`) of a mirrored message: this prefix, RapidPro's host, the message id.
MIRROR_REF_PREFIX = "rapidpro-msg:"
#: How long a message that reached a final state is still known as ours.
FINAL_RETENTION_S = 6 * 3600

# The (state, state_details) pairs a RapidPro status maps to, as one-byte codes.
_PAIRS: list[tuple[str, str]] = sorted({(str(s), d) for s, d in STATUS_MAP.values()})
CODES: dict[tuple[str, str], int] = {pair: code for code, pair in enumerate(_PAIRS)}
#: In flight, with details no RapidPro status gives (e.g. our own write-back's): always read.
UNKNOWN = 100
#: Final (delivered, failed, or no longer a task of ours): kept only to recognise our rows.
FINAL = 101
#: Removed (a tombstone until the arrays are compacted).
DEAD = 102
_EXACT = 1  # flag: `time` is RapidPro's `created_on` of the message (not our send time)


def code_for(state: Any, details: Any) -> int:
    """The one-byte code of a task state as CHT shows it."""
    if isinstance(state, str) and isinstance(details, str):
        return CODES.get((state, details), UNKNOWN)
    return UNKNOWN


def code_of_status(status: str | None) -> int | None:
    """The code a RapidPro status would give a task, or None for an unknown status."""
    mapped = STATUS_MAP.get(status or "")
    return None if mapped is None else CODES[(str(mapped[0]), mapped[1])]


def code_state(code: int) -> str | None:
    return _PAIRS[code][0] if 0 <= code < len(_PAIRS) else None


def index_key(gateway_ref: Any) -> int | None:
    """The index key of a task's `gateway_ref`; None for refs RapidPro's log cannot show."""
    if isinstance(gateway_ref, bool):
        return None
    if isinstance(gateway_ref, int):
        return gateway_ref if 0 < gateway_ref < MIRROR_BASE else None
    if isinstance(gateway_ref, str):
        text = gateway_ref.strip()
        if text.isdigit() and text.isascii():
            number = int(text)
            return number if 0 < number < MIRROR_BASE else None
        if text.startswith(MIRROR_REF_PREFIX):
            rest = text[len(MIRROR_REF_PREFIX) :].rpartition(":")[2]
            if rest.isdigit() and rest.isascii() and 0 < int(rest) < MIRROR_BASE:
                return MIRROR_BASE + int(rest)
    return None


def mirror_key(message_id: Any) -> int | None:
    """The key of the mirror of RapidPro message `message_id`."""
    if isinstance(message_id, int) and not isinstance(message_id, bool):
        return MIRROR_BASE + message_id if 0 < message_id < MIRROR_BASE else None
    return None


def broadcast_key(broadcast: Any) -> int | None:
    """The key of our message sent as broadcast `broadcast` (None for none)."""
    return None if broadcast is None else index_key(broadcast)


@dataclass(frozen=True, slots=True)
class Due:
    """A tracked message whose status is due to be asked of RapidPro."""

    key: int
    time: float  # epoch seconds: RapidPro's created_on if `exact`, else when it was sent
    exact: bool
    overdue: float  # seconds past its refresh interval (priority)


class DueSet:
    """Due messages as parallel arrays: a round may find hundreds of thousands due at once
    (a restart), and a Python object each would cost tens of megabytes for a moment."""

    __slots__ = ("exact", "keys", "overdue", "times")

    def __init__(self) -> None:
        self.keys = array("q")
        self.times = array("d")
        self.exact = bytearray()
        self.overdue = array("d")

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: int, time: float, exact: bool, overdue: float) -> None:
        self.keys.append(key)
        self.times.append(time)
        self.exact.append(1 if exact else 0)
        self.overdue.append(overdue)

    @classmethod
    def of(cls, items: Iterable[Due]) -> DueSet:
        found = cls()
        for item in items:
            found.add(item.key, item.time, item.exact, item.overdue)
        return found

    def items(self) -> Iterator[Due]:
        for i, key in enumerate(self.keys):
            yield Due(key, self.times[i], bool(self.exact[i]), self.overdue[i])


_NO_ID = bytes(16)


def _uuid_bytes(doc_id: str) -> bytes | None:
    """The 16 bytes of a document id written as a canonical uuid, else None."""
    try:
        value = uuid.UUID(doc_id)
    except ValueError:
        return None
    return value.bytes if value.int and str(value) == doc_id else None


class _DocIds:
    """A document id per slot: 16 bytes for a uuid id (the slot's part of `raw`), or an entry
    of `other` (by key) for any other id."""

    def __init__(self, slots: int) -> None:
        self.raw = bytearray(16 * slots)
        self.other: dict[int, str] = {}

    def insert(self, slot: int) -> None:
        self.raw[slot * 16 : slot * 16] = _NO_ID

    def set(self, slot: int, key: int, doc_id: str) -> None:
        packed = _uuid_bytes(doc_id)
        self.raw[slot * 16 : slot * 16 + 16] = packed or _NO_ID
        if packed is None:
            self.other[key] = doc_id
        else:
            self.other.pop(key, None)

    def clear(self, slot: int, key: int) -> None:
        self.raw[slot * 16 : slot * 16 + 16] = _NO_ID
        self.other.pop(key, None)

    def get(self, slot: int, key: int) -> str | None:
        packed = bytes(self.raw[slot * 16 : slot * 16 + 16])
        return str(uuid.UUID(bytes=packed)) if packed != _NO_ID else self.other.get(key)

    def slots_of(self, doc_id: str, keys: array[int]) -> list[int]:
        packed = _uuid_bytes(doc_id)
        if packed is None:
            wanted = {k for k, d in self.other.items() if d == doc_id}
            return [slot for slot, key in enumerate(keys) if key in wanted]
        found, start = [], 0
        while (at := self.raw.find(packed, start)) >= 0:
            if at % 16 == 0:
                found.append(at // 16)
            start = at + 1
        return found

    def compact(self, keep: list[int]) -> None:
        self.raw = bytearray(b"".join(self.raw[i * 16 : i * 16 + 16] for i in keep))


class TrackedIndex:
    """Messages whose RapidPro status may still change (see the module docstring)."""

    def __init__(self, *, keep_doc_ids: bool = True) -> None:
        self._keys = array("q")
        self._time = array("i")
        self._last = array("i")
        self._code = array("B")
        self._flags = array("B")
        self._dead = 0
        self._live = 0
        self._ids: _DocIds | None = _DocIds(0) if keep_doc_ids else None

    # -- sizes ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages in flight (final ones kept for recognition are not counted)."""
        return self._live

    @property
    def slots(self) -> int:
        return len(self._keys)

    @property
    def keeps_doc_ids(self) -> bool:
        return self._ids is not None

    def keep_doc_ids(self, keep: bool) -> None:
        """Keep document ids (no CHT view to find tasks by `gateway_ref`) or drop them."""
        if keep and self._ids is None:
            self._ids = _DocIds(len(self._keys))
        elif not keep:
            self._ids = None

    # -- lookups ----------------------------------------------------------------------------

    def _find(self, key: int) -> int:
        """The slot of `key` (dead or alive), or -1."""
        keys = self._keys
        slot = bisect.bisect_left(keys, key)
        return slot if slot < len(keys) and keys[slot] == key else -1

    def code(self, key: int) -> int | None:
        """The key's code (a `CODES` value, UNKNOWN or FINAL), None if not known."""
        slot = self._find(key)
        if slot < 0 or self._code[slot] == DEAD:
            return None
        return self._code[slot]

    def tracked(self, key: int) -> bool:
        code = self.code(key)
        return code is not None and code != FINAL

    def is_ours(self, key: int) -> bool:
        """In flight, or final not long ago."""
        return self.code(key) is not None

    def has_ref(self, gateway_ref: Any) -> bool:
        """Whether a `gateway_ref` is one of ours (for the sender's reconciliation)."""
        key = index_key(gateway_ref)
        return key is not None and self.is_ours(key)

    def time_of(self, key: int) -> tuple[float, bool] | None:
        slot = self._find(key)
        if slot < 0 or self._code[slot] in (DEAD, FINAL):
            return None
        return float(self._time[slot]), bool(self._flags[slot] & _EXACT)

    def doc_id(self, key: int) -> str | None:
        slot = self._find(key)
        if self._ids is None or slot < 0 or self._code[slot] in (DEAD, FINAL):
            return None
        return self._ids.get(slot, key)

    def keys(self) -> Iterator[int]:
        """Keys in flight, in key order."""
        for key, code in zip(self._keys, self._code, strict=True):
            if code not in (DEAD, FINAL):
                yield key

    # -- changes ----------------------------------------------------------------------------

    def upsert(
        self,
        key: int,
        *,
        time: float,
        code: int,
        exact: bool = False,
        last: float | None = None,
        doc_id: str | None = None,
    ) -> None:
        """Track `key` (or update it): in flight with `code`.

        An exact time (RapidPro's) is never replaced by an approximate one.
        """
        slot = self._find(key)
        if slot < 0:
            slot = bisect.bisect_left(self._keys, key)
            self._insert(slot, key, time, last if last is not None else time, code)
            self._flags[slot] = _EXACT if exact else 0
            self._live += 1
        else:
            previous = self._code[slot]
            if previous in (DEAD, FINAL):
                if previous == DEAD:
                    self._dead -= 1
                self._live += 1
                self._last[slot] = int(last if last is not None else time)
                self._flags[slot] = 0
            if exact or not self._flags[slot] & _EXACT:
                self._time[slot] = int(time)
                self._flags[slot] = _EXACT if exact else 0
            self._code[slot] = code
            if last is not None:
                self._last[slot] = int(last)
        if doc_id is not None and self._ids is not None:
            self._ids.set(slot, key, doc_id)

    def _insert(self, slot: int, key: int, time: float, last: float, code: int) -> None:
        self._keys.insert(slot, key)
        self._time.insert(slot, int(time))
        self._last.insert(slot, int(last))
        self._code.insert(slot, code)
        self._flags.insert(slot, 0)
        if self._ids is not None:
            self._ids.insert(slot)

    def set_code(self, key: int, code: int) -> None:
        slot = self._find(key)
        if slot >= 0 and self._code[slot] not in (DEAD, FINAL):
            self._code[slot] = code

    def seen(self, key: int, created_on: float, now: float) -> None:
        """RapidPro showed the message: its exact time, and its status is fresh as of now."""
        slot = self._find(key)
        if slot >= 0 and self._code[slot] not in (DEAD, FINAL):
            self._time[slot] = int(created_on)
            self._flags[slot] |= _EXACT
            self._last[slot] = int(now)

    def refreshed(self, key: int, now: float) -> None:
        slot = self._find(key)
        if slot >= 0 and self._code[slot] not in (DEAD, FINAL):
            self._last[slot] = int(now)

    def finish(self, key: int, now: float) -> None:
        """No longer in flight; recognised as ours for FINAL_RETENTION_S."""
        slot = self._find(key)
        if slot < 0:
            self._insert(bisect.bisect_left(self._keys, key), key, now, now, FINAL)
            return
        code = self._code[slot]
        if code == FINAL:
            return
        if code == DEAD:
            self._dead -= 1
        else:
            self._live -= 1
        self._code[slot] = FINAL
        self._last[slot] = int(now)
        if self._ids is not None:
            self._ids.clear(slot, key)

    def remove(self, key: int) -> None:
        slot = self._find(key)
        if slot < 0 or self._code[slot] == DEAD:
            return
        if self._code[slot] != FINAL:
            self._live -= 1
        self._code[slot] = DEAD
        self._dead += 1
        if self._ids is not None:
            self._ids.clear(slot, key)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if self._dead > max(1024, len(self._keys) // 4):
            self.compact()

    def compact(self) -> None:
        """Drop tombstones (the arrays are rebuilt once a quarter of them is dead)."""
        keep = [i for i, code in enumerate(self._code) if code != DEAD]
        self._keys = array("q", (self._keys[i] for i in keep))
        self._time = array("i", (self._time[i] for i in keep))
        self._last = array("i", (self._last[i] for i in keep))
        self._code = array("B", (self._code[i] for i in keep))
        self._flags = array("B", (self._flags[i] for i in keep))
        if self._ids is not None:
            self._ids.compact(keep)
        self._dead = 0

    def expire(self, now: float, *, sent_grace_s: float, max_tracking_s: float) -> int:
        """Stop tracking what RapidPro will not change any more; forget old final entries.

        Returns how many in-flight messages stopped being tracked.
        """
        sent = {code for pair, code in CODES.items() if pair[0] == State.SENT}
        dropped = 0
        for slot, code in enumerate(self._code):
            if code == DEAD:
                continue
            if code == FINAL:
                if now - self._last[slot] > FINAL_RETENTION_S:
                    self._code[slot] = DEAD
                    self._dead += 1
                continue
            age = now - self._time[slot]
            if age > max_tracking_s or (code in sent and age > sent_grace_s):
                self._code[slot] = FINAL
                self._last[slot] = int(now)
                self._live -= 1
                dropped += 1
                if self._ids is not None:
                    self._ids.clear(slot, self._keys[slot])
        self._maybe_compact()
        return dropped

    def due(self, now: float, interval: Callable[[float], float]) -> DueSet:
        """In-flight messages whose last refresh is older than `interval(age)`."""
        found = DueSet()
        keys, times, lasts, flags = self._keys, self._time, self._last, self._flags
        for slot, code in enumerate(self._code):
            if code in (DEAD, FINAL):
                continue
            time = times[slot]
            overdue = now - lasts[slot] - interval(now - time)
            if overdue >= 0:
                found.add(keys[slot], float(time), bool(flags[slot] & _EXACT), overdue)
        return found

    def refreshed_many(self, keys: Iterable[int], now: float) -> int:
        """`refreshed` for many keys; returns how many are in flight."""
        count = 0
        stamp = int(now)
        for key in keys:
            slot = self._find(key)
            if slot >= 0 and self._code[slot] not in (DEAD, FINAL):
                self._last[slot] = stamp
                count += 1
        return count

    def oldest_refresh(self, now: float) -> float:
        """Seconds since the least recently refreshed in-flight message was (0 if none)."""
        ages = [
            now - self._last[slot]
            for slot, code in enumerate(self._code)
            if code not in (DEAD, FINAL)
        ]
        return max(ages, default=0.0)

    def overdue(self, now: float, limit_s: float) -> int:
        """In-flight messages not refreshed for longer than `limit_s`."""
        return sum(
            1
            for slot, code in enumerate(self._code)
            if code not in (DEAD, FINAL) and now - self._last[slot] > limit_s
        )

    # -- documents --------------------------------------------------------------------------

    def update_doc(self, doc: Mapping[str, Any], now: float) -> None:
        """What this revision of a document says about its tasks' keys.

        A key the document no longer carries (a resent task, a deleted document) stays until
        a lookup in CouchDB finds no task for it, or until it expires.
        """
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            return
        try:
            tasks = list(iter_tasks(doc))
        except MalformedTaskError:
            return
        for _, task in tasks:
            # Every broadcast of a message sent in parts (`gateway_refs`, the first of which
            # is `gateway_ref`): their rows are ours too, whatever their status.
            extra = task.get("gateway_refs")
            for ref in extra if isinstance(extra, list) else ():
                part = index_key(ref)
                first = index_key(task.get("gateway_ref"))
                if part is not None and part != first and not self.tracked(part):
                    self.finish(part, now)
            key = index_key(task.get("gateway_ref"))
            if key is None:
                continue
            state = task.get("state")
            if doc.get("_deleted"):
                self.finish(key, now)
            elif state in IN_FLIGHT_STATES and _has_message(task):
                moment = sent_at(task, doc)
                self.upsert(
                    key,
                    time=moment.timestamp() if moment else now,
                    code=code_for(state, task.get("state_details")),
                    doc_id=doc_id,
                )
            elif self.is_ours(key):
                self.finish(key, now)

    def remove_doc(self, doc_id: str, now: float) -> None:
        """A deleted document (only its id is known): forget its keys if we know them."""
        if self._ids is None:
            return  # resolved when a lookup finds no task for the key
        for slot in self._ids.slots_of(doc_id, self._keys):
            if self._code[slot] not in (DEAD, FINAL):
                self.finish(self._keys[slot], now)


def _has_message(task: Mapping[str, Any]) -> bool:
    messages = task.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and js_truthy(m.get("uuid"))
        and js_truthy(m.get("to"))
        and js_truthy(m.get("message"))
        for m in messages
    )


def epoch(moment: datetime) -> float:
    return moment.timestamp()


# -- our own sends, by content ---------------------------------------------------------------

_DIGITS = re.compile(r"\D")
#: Numbers compare by their last digits: national and international forms of one number agree.
_TAIL = 9


def number_tail(phone: Any) -> str:
    """The last digits of a phone number or `tel:` URN (enough to tell numbers apart)."""
    if not isinstance(phone, str):
        return ""
    return _DIGITS.sub("", phone)[-_TAIL:]


def content_key(phone: Any, text: Any) -> tuple[str, str]:
    """A message's number and text as RapidPro lists them (RapidPro trims broadcast text)."""
    return number_tail(phone), text.strip() if isinstance(text, str) else ""


class OwnContent:
    """Our sends whose broadcast CouchDB may not name yet, by number (and text).

    From the changes feed: the numbers of every task we claimed and have not written back
    (`forwarded-to-gateway` with our claim: posted or about to be, possibly in several parts
    whose texts differ from the message's), and the number and text of every message of an
    in-flight task with several messages (its task keeps only the last broadcast id). A row to
    such a number waits rather than being mirrored: small, only sends in progress and the rare
    multi-message tasks.
    """

    def __init__(self) -> None:
        self._by_doc: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
        self._numbers: Counter[str] = Counter()
        self._contents: Counter[tuple[str, str]] = Counter()

    def __len__(self) -> int:
        return sum(self._numbers.values()) + sum(self._contents.values())

    def update_doc(self, doc: Mapping[str, Any], app_settings: Mapping[str, Any]) -> None:
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            return
        self.remove_doc(doc_id)
        if doc.get("_deleted"):
            return
        numbers: list[str] = []
        contents: list[tuple[str, str]] = []
        try:
            for _, task in iter_tasks(doc):
                state = task.get("state")
                messages = task.get("messages")
                if not isinstance(messages, list):
                    continue
                claimed = state in SENDABLE_STATES and find_claim(task) is not None
                several = state in IN_FLIGHT_STATES and len(messages) > 1
                if not (claimed or several):
                    continue
                for message in messages:
                    if isinstance(message, dict) and js_truthy(message.get("to")):
                        to = message.get("to")
                        number = normalize(app_settings, to) or to
                        if claimed:
                            numbers.append(number_tail(number))
                        else:
                            contents.append(content_key(number, message.get("message")))
        except MalformedTaskError:
            return
        if numbers or contents:
            self._by_doc[doc_id] = (numbers, contents)
            self._numbers.update(numbers)
            self._contents.update(contents)

    def remove_doc(self, doc_id: str) -> None:
        old = self._by_doc.pop(doc_id, None)
        if old is None:
            return
        numbers, contents = old
        self._numbers.subtract(numbers)
        self._contents.subtract(contents)
        for number in numbers:
            if self._numbers.get(number, 0) <= 0:
                self._numbers.pop(number, None)
        for content in contents:
            if self._contents.get(content, 0) <= 0:
                self._contents.pop(content, None)

    def matches(self, urn: Any, text: Any) -> bool:
        return number_tail(urn) in self._numbers or content_key(urn, text) in self._contents
