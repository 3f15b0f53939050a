"""Client-side request budget per RapidPro throttle scope, mirroring RapidPro's own rule.

RapidPro throttles each workspace per scope with a sliding one-hour log of requests. We keep
the same log for our own requests and stay under a configured share of the server's rate, so
429s are rare in normal operation. The bucket is per workspace on RapidPro's side, so other
integrations on the same workspace can still push us over: 429s are honoured too (`block`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping

BROADCASTS = "broadcasts"
MESSAGES = "messages"


class Budget:
    """Sliding-window request budgets keyed by scope; a limit of 0 or None means unlimited."""

    def __init__(
        self,
        per_window: Mapping[str, int | None],
        *,
        window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {scope: limit or None for scope, limit in per_window.items()}
        self._window = window_s
        self._clock = clock
        self._log: dict[str, deque[float]] = {scope: deque() for scope in self._limits}
        self._blocked_until: dict[str, float] = {}
        self.throttled: dict[str, int] = {scope: 0 for scope in self._limits}  # 429s seen

    def _prune(self, scope: str, now: float) -> deque[float]:
        log = self._log.setdefault(scope, deque())
        while log and log[0] <= now - self._window:
            log.popleft()
        return log

    def wait_time(self, scope: str) -> float:
        """Seconds until one more request in `scope` is allowed (0 if it is now)."""
        now = self._clock()
        wait = max(0.0, self._blocked_until.get(scope, 0.0) - now)
        limit = self._limits.get(scope)
        if limit is not None:
            log = self._prune(scope, now)
            if len(log) >= limit:
                wait = max(wait, log[len(log) - limit] + self._window - now)
        return wait

    def try_acquire(self, scope: str) -> bool:
        """Take one request from the budget if one is available now."""
        if self.wait_time(scope) > 0:
            return False
        self._log.setdefault(scope, deque()).append(self._clock())
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
        """Requests left in the current window (None: unlimited)."""
        limit = self._limits.get(scope)
        if limit is None:
            return None
        return max(0, limit - len(self._prune(scope, self._clock())))
