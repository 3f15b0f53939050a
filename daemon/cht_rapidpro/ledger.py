"""The workspace's RapidPro budget, shared by the daemon's replicas and by its successive runs.

RapidPro throttles a workspace, not a process (`rapidpro/throttle.py`). Each daemon process
therefore publishes the requests it made in the current throttle window to a document of its
own, `cht-rapidpro-budget:<instance>` (type `cht-rapidpro-budget`): per scope, counts per
bucket of `window/360` seconds (10 s for RapidPro's hour), written at most every
`PUBLISH_EVERY_S` while it makes requests. Every replica reads the others' documents from the
changes feed and so knows what the workspace spent; a process that starts again reads its own
(its earlier run's requests still count on RapidPro).

Counting a bucket's requests as made at its end keeps them a little longer than RapidPro
does: never less. What a process did in the last moments before a crash (less than
`PUBLISH_EVERY_S`) is not in its document; the 429s RapidPro may then answer are honoured.
CHT ignores documents of unknown types.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .couch.client import CouchClient, JsonDict
from .errors import GatewayError
from .logs import get_logger
from .rapidpro.throttle import Budget, Others
from .replicas import Presence
from .retry import sleep_or_wake

PREFIX = "cht-rapidpro-budget:"
DOC_TYPE = "cht-rapidpro-budget"
#: Shortest time between two writes of our budget document.
PUBLISH_EVERY_S = 2.0

Buckets = dict[float, int]  # bucket start (epoch seconds) -> requests


class Ledger:
    """Every process's requests per throttle scope; the `Share` our `Budget` consults."""

    def __init__(
        self, couch: CouchClient, budget: Budget, presence: Presence, instance: str
    ) -> None:
        self._couch = couch
        self._budget = budget
        self._presence = presence
        self.instance = instance
        self.bucket_s = max(1.0, budget.window_s / 360)
        self._others: dict[str, dict[str, Buckets]] = {}  # instance -> scope -> buckets
        self._published: dict[str, Buckets] = {}
        self._log = get_logger(component="budget")

    @property
    def doc_id(self) -> str:
        return PREFIX + self.instance

    # -- what the others spent ------------------------------------------------------------

    def others(self, scope: str, now: float) -> Others:
        live = set(self._presence.peers())
        expiry = self.bucket_s + self._budget.window_s + self._budget.margin_s
        live_used = departed = 0
        for instance, scopes in self._others.items():
            count = sum(n for start, n in scopes.get(scope, {}).items() if start + expiry > now)
            if instance in live:
                live_used += count
            else:
                departed += count
        return Others(live=live_used, departed=departed, live_count=len(live))

    def handle_doc(self, doc: JsonDict) -> None:
        """A budget document from the feed (or read at start)."""
        instance = doc.get("instance")
        if not isinstance(instance, str) or instance == self.instance:
            return
        if doc.get("_deleted"):
            self._others.pop(instance, None)
            return
        self._others[instance] = _parse(doc.get("scopes"))

    async def load(self) -> None:
        """The others' documents, and our own earlier run's requests (they still count)."""
        for doc in await self._couch.docs_with_prefix(PREFIX):
            if doc.get("instance") == self.instance:
                for scope, buckets in _parse(doc.get("scopes")).items():
                    # As if made at each bucket's end: kept at least as long as RapidPro does.
                    times = [
                        start + self.bucket_s for start, n in buckets.items() for _ in range(n)
                    ]
                    self._budget.restore(scope, times)
                    self._published[scope] = buckets
            else:
                self.handle_doc(doc)

    # -- what we spent ----------------------------------------------------------------------

    def _buckets(self, scope: str) -> Buckets:
        found: Buckets = {}
        for moment in self._budget.entries(scope):
            start = math.floor(moment / self.bucket_s) * self.bucket_s
            found[start] = found.get(start, 0) + 1
        return found

    async def publish(self) -> None:
        """Write our requests of the window, if they changed since the last write."""
        current = {scope: self._buckets(scope) for scope in self._budget.scopes}
        if current == self._published:
            return
        body: dict[str, Any] = {
            "_id": self.doc_id,
            "type": DOC_TYPE,
            "instance": self.instance,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "window_s": self._budget.window_s,
            "scopes": {
                scope: {
                    "bucket_s": self.bucket_s,
                    "buckets": {_key(start): n for start, n in sorted(buckets.items())},
                }
                for scope, buckets in current.items()
                if buckets
            },
        }
        await self._couch.put(body)
        self._published = current

    async def run(self, stop: asyncio.Event) -> None:
        """Publish while requests are made (at most every PUBLISH_EVERY_S)."""
        changed = self._budget.changed
        while not stop.is_set():
            changed.clear()
            try:
                await self.publish()
            except GatewayError as exc:
                self._log.warning("budget_publish_retrying", error=str(exc))
            if await sleep_or_wake(stop, PUBLISH_EVERY_S):
                break
            # Then wait for the next request (or, with old buckets to age out, a while).
            waiter = asyncio.ensure_future(changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {waiter, stopper},
                timeout=self._budget.window_s / 10,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            stopper.cancel()


def _key(start: float) -> str:
    return str(int(start)) if float(start).is_integer() else repr(start)


def _parse(scopes: Any) -> dict[str, Buckets]:
    """`scopes` of a budget document; malformed parts are ignored."""
    found: dict[str, Buckets] = {}
    if not isinstance(scopes, Mapping):
        return found
    for scope, body in scopes.items():
        buckets = body.get("buckets") if isinstance(body, Mapping) else None
        if not isinstance(scope, str) or not isinstance(buckets, Mapping):
            continue
        parsed: Buckets = {}
        for key, count in buckets.items():
            try:
                start = float(key)
            except (TypeError, ValueError):
                continue
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                parsed[start] = count
        found[scope] = parsed
    return found
