"""The unsent backlog the daemon knows of: how many messages wait to be sent, and since when.

It is fed every document the dispatcher sees (the changes feed, start-up sweeps), whoever
sends and whether or not sending is enabled, and read by the `/metrics` gauges behind the
"messages pending too long" alert. A message leaves it when a revision of its document shows
it sent, failed, cleared or gone. Documents the daemon has not seen are not in it: pending
messages from before a restart are found by the sweep that runs when sending is enabled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .cht.outgoing import MalformedTaskError, current_attempt, iter_tasks, sendable_tasks
from .cht.state import SENDABLE_STATES, js_truthy, parse_iso


def waiting_since(task: Mapping[str, Any], doc: Mapping[str, Any]) -> datetime | None:
    """Since when a sendable task has waited to be sent.

    That is the first `pending` or `forwarded-to-gateway` entry of its current attempt (a
    scheduled task becomes pending when it is due; a resend starts a new attempt), else when
    CHT's `messages_by_state` view says it was due (`due || timestamp || reported_date`).
    None if the task says neither.
    """
    try:
        attempt = current_attempt(task)
    except MalformedTaskError:
        attempt = []
    for entry in attempt:
        if isinstance(entry, dict) and entry.get("state") in SENDABLE_STATES:
            stamp = parse_iso(entry.get("timestamp"))
            if stamp is not None:
                return stamp
    for due in (task.get("due"), task.get("timestamp"), doc.get("reported_date")):
        if js_truthy(due):
            return _moment(due)
    return None


def _moment(value: Any) -> datetime | None:
    """An ISO string or JS milliseconds, as CHT stores dates."""
    if isinstance(value, str):
        return parse_iso(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, ValueError, OSError):
            return None
    return None


class UnsentBacklog:
    """Unsent messages by document: how many, and since when the oldest has waited."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._docs: dict[str, tuple[float, int]] = {}  # doc id: (waiting since, messages)
        self._messages = 0

    def update_doc(self, doc: Mapping[str, Any]) -> None:
        """Take the unsent messages of this revision of `doc` (none: it leaves)."""
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            return
        try:
            tasks = sendable_tasks(doc, on_malformed=lambda ref, problem: None)
        except MalformedTaskError:
            tasks = []  # counted and logged as a bad document by the sender
        if not tasks:
            self.remove_doc(doc_id)
            return
        by_ref = dict(iter_tasks(doc))
        stamps = [
            stamp.timestamp()
            for task in tasks
            if (stamp := waiting_since(by_ref[task.ref], doc)) is not None
        ]
        known = self._docs.get(doc_id)
        # Without a date in the document, it has waited since the daemon first saw it.
        since = min(stamps) if stamps else known[0] if known else self._clock()
        count = sum(len(task.messages) for task in tasks)
        self._messages += count - (known[1] if known else 0)
        self._docs[doc_id] = (since, count)

    def remove_doc(self, doc_id: str) -> None:
        known = self._docs.pop(doc_id, None)
        if known is not None:
            self._messages -= known[1]

    @property
    def messages(self) -> int:
        """Unsent messages in the documents seen."""
        return self._messages

    def oldest_age_s(self) -> float:
        """Seconds the oldest unsent message has waited (0 when there is none)."""
        if not self._docs:
            return 0.0
        oldest = min(since for since, _ in self._docs.values())
        return max(0.0, self._clock() - oldest)
