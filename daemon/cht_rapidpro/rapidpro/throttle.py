"""Client-side request budget per RapidPro throttle scope, mirroring RapidPro's own rule.

RapidPro throttles each workspace per scope with a sliding one-hour log of requests (DRF's
`SimpleRateThrottle`: a request is allowed while fewer than the limit were allowed in the
last hour). We keep the same log for our own requests and stay under a configured share of
the server's rate, so 429s do not happen in normal operation. Our entries are kept a little
longer than the window (`margin_s`): RapidPro logs a request when it arrives, a moment after
we log it.

The bucket is the workspace's, not the process's: replicas of the daemon and earlier runs of
this one spend it too. A `Share` (see `ledger.py`, which keeps every replica's log in CouchDB)
says what the others used; each live replica then keeps to an equal part of what the
departed ones left, and all of them together to the limit. Other integrations on the same
workspace can still push us over: 429s are honoured too (`block`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

BROADCASTS = "broadcasts"
MESSAGES = "messages"


@dataclass(frozen=True, slots=True)
class Others:
    """Requests of other daemon processes in the current window of one scope."""

    live: int  # by replicas running now
    departed: int  # by processes gone (an earlier run, a replica that left): still counted
    live_count: int  # how many other replicas run now


class Share(Protocol):
    def others(self, scope: str, now: float) -> Others: ...


class Budget:
    """Sliding-window request budgets keyed by scope; a limit of 0 or None means unlimited."""

    def __init__(
        self,
        per_window: Mapping[str, int | None],
        *,
        window_s: float = 3600.0,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limits = {scope: limit or None for scope, limit in per_window.items()}
        self.window_s = window_s
        # RapidPro logs a request on arrival, after we did: keep ours a little longer.
        self.margin_s = max(1.0, window_s / 1000) if margin_s is None else margin_s
        self._clock = clock
        self._log: dict[str, deque[float]] = {scope: deque() for scope in self._limits}
        self._blocked_until: dict[str, float] = {}
        self.throttled: dict[str, int] = {scope: 0 for scope in self._limits}  # 429s seen
        self.share: Share | None = None
        self.changed = asyncio.Event()  # set when our log gets an entry (for publishing)

    @property
    def scopes(self) -> list[str]:
        return list(self._limits)

    def limit(self, scope: str) -> int | None:
        return self._limits.get(scope)

    def now(self) -> float:
        return self._clock()

    def _prune(self, scope: str, now: float) -> deque[float]:
        log = self._log.setdefault(scope, deque())
        while log and log[0] <= now - self.window_s - self.margin_s:
            log.popleft()
        return log

    def entries(self, scope: str) -> list[float]:
        """Our own requests in the current window (wall-clock times)."""
        return list(self._prune(scope, self._clock()))

    def restore(self, scope: str, times: list[float]) -> None:
        """Requests an earlier run of this process made (they still count on RapidPro)."""
        log = self._log.setdefault(scope, deque())
        merged = sorted([*log, *times])
        log.clear()
        log.extend(merged)
        self._prune(scope, self._clock())

    def _allowance(self, scope: str, now: float) -> tuple[int, int] | None:
        """(our cap, everyone's use but ours) for a limited scope, None if unlimited."""
        limit = self._limits.get(scope)
        if limit is None:
            return None
        if self.share is None:
            return limit, 0
        others = self.share.others(scope, now)
        # What departed processes used is gone for this window; the rest is shared equally
        # by the replicas running now, so that no two of them can together exceed it.
        cap = math.floor((limit - others.departed) / (1 + others.live_count))
        return max(0, cap), others.live + others.departed

    def wait_time(self, scope: str) -> float:
        """Seconds until one more request in `scope` is allowed (0 if it is now)."""
        now = self._clock()
        wait = max(0.0, self._blocked_until.get(scope, 0.0) - now)
        allowance = self._allowance(scope, now)
        if allowance is not None:
            cap, elsewhere = allowance
            limit = self._limits[scope] or 0
            log = self._prune(scope, now)
            lifetime = self.window_s + self.margin_s
            if len(log) >= cap:
                if cap <= 0:
                    wait = max(wait, min(lifetime, 1.0 + self.window_s / 360))
                else:
                    wait = max(wait, log[len(log) - cap] + lifetime - now)
            elif len(log) + elsewhere >= limit:
                # The others' requests age out on their own clocks: look again soon.
                wait = max(wait, min(lifetime, 1.0 + self.window_s / 360))
        return wait

    def try_acquire(self, scope: str) -> bool:
        """Take one request from the budget if one is available now."""
        if self.wait_time(scope) > 0:
            return False
        self._log.setdefault(scope, deque()).append(self._clock())
        self.changed.set()
        return True

    async def acquire(self, scope: str) -> None:
        """Wait until one more request is allowed, then take it."""
        while not self.try_acquire(scope):  # noqa: ASYNC110
            # The budget frees up as time passes, not on an event.
            await asyncio.sleep(max(0.01, self.wait_time(scope)))

    def block(self, scope: str, seconds: float) -> None:
        """RapidPro answered 429: send nothing more in `scope` for `seconds`."""
        self.throttled[scope] = self.throttled.get(scope, 0) + 1
        until = self._clock() + max(0.0, seconds)
        self._blocked_until[scope] = max(self._blocked_until.get(scope, 0.0), until)

    def remaining(self, scope: str) -> int | None:
        """Requests left to us in the current window (None: unlimited)."""
        now = self._clock()
        allowance = self._allowance(scope, now)
        if allowance is None:
            return None
        cap, elsewhere = allowance
        used = len(self._prune(scope, now))
        limit = self._limits[scope] or 0
        return max(0, min(cap - used, limit - elsewhere - used))
