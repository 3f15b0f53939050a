"""Backoff arithmetic and the interruptible wait every loop uses."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field


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
    _rng: random.Random = field(default_factory=random.Random, repr=False)

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
