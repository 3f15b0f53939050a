"""Finding broadcasts an earlier, uncertain attempt may have created (RapidPro has no
idempotency key: this lookup is ours).

A message must be looked up before it is posted again whenever an earlier POST may have
reached RapidPro: a takeover of another claimant's claim, a POST that timed out or got a 5xx
(see `claims.py`, H4). The lookup scans `GET /broadcasts.json?after=...` newest first and
matches on what RapidPro stores: the URN as RapidPro normalised it and the text trimmed.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from .errors import GatewayError
from .rapidpro.client import RapidProClient
from .rapidpro.models import Broadcast, Target, stored_text


class Lookup(Protocol):
    """What a message to look up must say: its URN and its text, exactly as posted."""

    urn: str
    text: str


class Reconciler:
    """Finds broadcasts an earlier, uncertain attempt may have created.

    Concurrent lookups share one scan of `GET /broadcasts.json?after=...` (newest first), and
    each broadcast is handed to at most one message, so two identical messages never adopt
    the same broadcast.
    """

    def __init__(
        self,
        rapidpro: RapidProClient,
        *,
        skew: timedelta,
        is_taken: Callable[[Any], bool],
    ) -> None:
        self._rapidpro = rapidpro
        self._skew = skew
        self._is_taken = is_taken
        self._pending: list[tuple[Lookup, datetime, asyncio.Future[Broadcast | None]]] = []
        self._lock = asyncio.Lock()
        # Broadcasts handed out recently; once written back, `is_taken` knows them too.
        self._adopted: OrderedDict[str, None] = OrderedDict()
        self.scans = 0

    async def find(self, target: Target, job: Lookup, since: datetime) -> Broadcast | None:
        future: asyncio.Future[Broadcast | None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, since, future))
        async with self._lock:
            if not future.done():
                await self._scan(target)
        return await future

    async def _scan(self, target: Target) -> None:
        """One scan for every lookup queued so far; results and errors go to the futures."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.scans += 1
        after = min(since for _, since, _ in batch) - self._skew
        open_items = list(batch)
        try:
            async for page in self._rapidpro.broadcasts(target, after=after):
                for broadcast in page:
                    key = str(broadcast.id)
                    if broadcast.id is None or key in self._adopted or self._is_taken(broadcast.id):
                        continue
                    for item in open_items:
                        job, since, future = item
                        if _matches(broadcast, job, since - self._skew):
                            self._adopted[key] = None
                            if len(self._adopted) > 10_000:
                                self._adopted.popitem(last=False)
                            future.set_result(broadcast)
                            open_items.remove(item)
                            break
                if not open_items:
                    break
        except (GatewayError, asyncio.CancelledError) as exc:
            for _, _, future in open_items:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for _, _, future in open_items:
            if not future.done():
                future.set_result(None)


def _digits(urn: str) -> str:
    return re.sub(r"[^0-9]", "", urn)


def _matches(broadcast: Broadcast, job: Lookup, not_before: datetime) -> bool:
    if broadcast.created_on is not None and broadcast.created_on < not_before:
        return False
    # RapidPro stores the text trimmed (`stored_text`): compare it as stored, or a text
    # ending in a newline is never found and is sent a second time.
    wanted = stored_text(job.text)
    if all(stored_text(text) != wanted for text in broadcast.texts):
        return False
    if job.urn in broadcast.urns:
        return True
    # RapidPro normalises URNs with the workspace's country (tel:0712... -> tel:+254712...).
    wanted = _digits(job.urn)
    return len(wanted) >= 8 and any(_digits(u).endswith(wanted[-8:]) for u in broadcast.urns)
