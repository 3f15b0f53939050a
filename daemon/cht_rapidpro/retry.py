"""Backoff arithmetic and the interruptible wait every loop uses."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

#: One generator for all jitter (seeding a new one per Backoff costs an os.urandom read).
_JITTER = random.Random()  # noqa: S311 (jitter, not cryptography)


@dataclass(slots=True)
class Backoff:
    """Capped, jittered exponential backoff (1, 2, 4, ... up to `maximum` seconds).

    `next_delay()` returns the delay for the current attempt and moves to the next one;
    `reset()` after a success. Jitter spreads reconnecting replicas apart.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.1
    attempt: int = 0
    _rng: random.Random = field(default=_JITTER, repr=False)

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        if base <= 0:
            return 0.0
        spread = base * self.jitter
        return max(0.0, min(self.maximum, base + self._rng.uniform(-spread, spread)))

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_wake(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if the event was set."""
    if event.is_set():
        return True
    if seconds <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


@dataclass(slots=True)
class Outage:
    """One shared pause for everyone who hits the same failing dependency.

    The first failure after a pause has ended starts the next, longer pause; failures of
    other jobs during a pause wait for the same end instead of lengthening it (sixteen
    concurrent 503s are one outage, not sixteen steps of backoff).
    """

    backoff: Backoff
    until: float = 0.0

    def failed(self) -> float:
        """Record a failure; seconds to wait before trying again."""
        now = time.monotonic()
        if self.until <= now:
            self.until = now + self.backoff.next_delay()
        return self.until - now

    def recovered(self) -> None:
        self.backoff.reset()
        self.until = 0.0
