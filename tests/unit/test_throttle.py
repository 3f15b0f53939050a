"""rapidpro.throttle: client-side sliding-window budgets per scope (rapidpro-api §1.6).

`Budget` takes an injectable clock, so every test here runs on a fake one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cht_rapidpro.rapidpro import throttle
from cht_rapidpro.rapidpro.throttle import BROADCASTS, MESSAGES, Budget

WINDOW = 10.0


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(limit: int | None = 3, **others: int | None) -> tuple[Budget, FakeClock]:
    """A budget whose entries age out exactly at the window, as on RapidPro (the margin for
    arrival delay is tested on its own below)."""
    clock = FakeClock()
    return Budget({BROADCASTS: limit, **others}, window_s=WINDOW, margin_s=0.0, clock=clock), clock


def test_allows_up_to_the_limit_then_refuses() -> None:
    b, _ = budget(3)
    assert b.remaining(BROADCASTS) == 3
    assert [b.try_acquire(BROADCASTS) for _ in range(4)] == [True, True, True, False]
    assert b.remaining(BROADCASTS) == 0


def test_remaining_counts_down() -> None:
    b, clock = budget(3)
    seen = []
    for _ in range(3):
        b.try_acquire(BROADCASTS)
        clock.now += 1
        seen.append(b.remaining(BROADCASTS))
    assert seen == [2, 1, 0]


# Requests at t=100, 101, 102 with limit 3 and a 10 s window.
@pytest.mark.parametrize(
    ("now", "wait", "remaining"),
    [
        (102.0, 8.0, 0),
        (105.0, 5.0, 0),
        (109.5, 0.5, 0),
        (110.0, 0.0, 1),  # the oldest ages out exactly at t0 + window, as in DRF
        (111.0, 0.0, 2),
        (112.0, 0.0, 3),
        (500.0, 0.0, 3),
    ],
    ids=["just-full", "mid-window", "almost", "oldest-ages-out", "two-aged", "all-aged", "later"],
)
def test_sliding_window(now: float, wait: float, remaining: int) -> None:
    b, clock = budget(3)
    for _ in range(3):
        assert b.try_acquire(BROADCASTS)
        clock.now += 1
    clock.now = now
    assert b.wait_time(BROADCASTS) == pytest.approx(wait)
    assert b.remaining(BROADCASTS) == remaining
    assert b.try_acquire(BROADCASTS) is (remaining > 0)


def test_window_slides_rather_than_resetting() -> None:
    """A sliding log, not a fixed bucket: a freed slot is refilled one request at a time."""
    b, clock = budget(2)
    assert b.try_acquire(BROADCASTS)  # t=100
    clock.now = 105
    assert b.try_acquire(BROADCASTS)  # t=105
    clock.now = 110
    assert b.try_acquire(BROADCASTS)  # t=100 aged out
    assert not b.try_acquire(BROADCASTS)
    assert b.wait_time(BROADCASTS) == pytest.approx(5.0)  # until t=105 ages out


def test_refused_requests_do_not_extend_the_wait() -> None:
    """rapidpro-api §1.6: only allowed requests are logged."""
    b, clock = budget(1)
    assert b.try_acquire(BROADCASTS)
    for _ in range(5):
        clock.now += 1
        assert not b.try_acquire(BROADCASTS)
    assert b.wait_time(BROADCASTS) == pytest.approx(5.0)
    clock.now = 110
    assert b.try_acquire(BROADCASTS)


def test_scopes_are_independent() -> None:
    """rapidpro-api §1.6: polling /messages does not eat into the /broadcasts budget."""
    b, _ = budget(2, **{MESSAGES: 1})
    assert b.try_acquire(MESSAGES)
    assert not b.try_acquire(MESSAGES)
    assert b.remaining(BROADCASTS) == 2
    assert b.try_acquire(BROADCASTS)
    assert b.try_acquire(BROADCASTS)
    assert not b.try_acquire(BROADCASTS)
    assert b.wait_time(MESSAGES) == pytest.approx(WINDOW)


@pytest.mark.parametrize("limit", [0, None], ids=["zero", "none"])
def test_zero_or_none_means_unlimited(limit: int | None) -> None:
    b, _ = budget(limit)
    assert all(b.try_acquire(BROADCASTS) for _ in range(1000))
    assert b.remaining(BROADCASTS) is None
    assert b.wait_time(BROADCASTS) == 0


def test_unknown_scope_is_unlimited() -> None:
    b, _ = budget(1)
    assert all(b.try_acquire("v2.contacts") for _ in range(50))
    assert b.remaining("v2.contacts") is None


@pytest.mark.parametrize("limit", [3, None], ids=["limited", "unlimited"])
def test_block_after_429(limit: int | None) -> None:
    """A 429 stops the scope for Retry-After seconds, even with budget left or no limit."""
    b, clock = budget(limit)
    b.block(BROADCASTS, 36)
    assert b.throttled[BROADCASTS] == 1
    assert b.wait_time(BROADCASTS) == pytest.approx(36)
    assert not b.try_acquire(BROADCASTS)
    clock.now += 35.5
    assert b.wait_time(BROADCASTS) == pytest.approx(0.5)
    clock.now += 0.5
    assert b.wait_time(BROADCASTS) == 0
    assert b.try_acquire(BROADCASTS)


def test_block_only_affects_its_scope() -> None:
    b, _ = budget(3, **{MESSAGES: 3})
    b.block(MESSAGES, 60)
    assert b.try_acquire(BROADCASTS)
    assert not b.try_acquire(MESSAGES)
    assert b.throttled == {BROADCASTS: 0, MESSAGES: 1}


def test_shorter_block_does_not_shorten_a_longer_one() -> None:
    b, _ = budget(3)
    b.block(BROADCASTS, 60)
    b.block(BROADCASTS, 5)
    assert b.wait_time(BROADCASTS) == pytest.approx(60)
    assert b.throttled[BROADCASTS] == 2


def test_negative_block_is_ignored_but_counted() -> None:
    b, _ = budget(3)
    b.block(BROADCASTS, -5)
    assert b.wait_time(BROADCASTS) == 0
    assert b.throttled[BROADCASTS] == 1


def test_wait_time_is_the_longer_of_block_and_window() -> None:
    b, clock = budget(1)
    assert b.try_acquire(BROADCASTS)  # window full until t=110
    b.block(BROADCASTS, 3)  # blocked until t=103
    assert b.wait_time(BROADCASTS) == pytest.approx(10)
    b.block(BROADCASTS, 20)  # blocked until t=120
    assert b.wait_time(BROADCASTS) == pytest.approx(20)
    clock.now = 115
    assert b.remaining(BROADCASTS) == 1
    assert not b.try_acquire(BROADCASTS)


async def test_acquire_returns_at_once_when_budget_is_left() -> None:
    b, _ = budget(2)
    await b.acquire(BROADCASTS)
    assert b.remaining(BROADCASTS) == 1


async def test_acquire_waits_for_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """acquire() sleeps for wait_time, then takes the slot (sleep advances the fake clock)."""
    b, clock = budget(1)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(throttle, "asyncio", SimpleNamespace(sleep=fake_sleep))
    assert b.try_acquire(BROADCASTS)
    clock.now += 4
    await b.acquire(BROADCASTS)
    assert slept == [pytest.approx(6.0)]
    assert clock.now == pytest.approx(110.0)
    assert b.remaining(BROADCASTS) == 0


def test_outage_is_one_pause_for_all_who_hit_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cht_rapidpro.retry import Backoff, Outage

    clock = [100.0]
    monkeypatch.setattr("cht_rapidpro.retry.time.monotonic", lambda: clock[0])
    outage = Outage(Backoff(initial=1.0, maximum=300.0, jitter=0.0))
    # Sixteen jobs fail at once: they all wait for the same second, not 1, 2, 4, ... 300 s.
    assert [outage.failed() for _ in range(16)] == [1.0] * 16
    clock[0] += 1.0
    assert outage.failed() == 2.0  # still failing after the pause: the next one is longer
    outage.recovered()
    clock[0] += 5.0
    assert outage.failed() == 1.0


def test_entries_are_kept_a_margin_longer_than_the_window() -> None:
    """RapidPro logs a request when it arrives, after we logged it: ours age out later."""
    clock = FakeClock()
    b = Budget({BROADCASTS: 1}, window_s=3600.0, clock=clock)
    assert b.margin_s == pytest.approx(3.6)
    assert b.try_acquire(BROADCASTS)
    clock.now += 3600.0
    assert not b.try_acquire(BROADCASTS)  # RapidPro may not have let it go yet
    assert b.wait_time(BROADCASTS) == pytest.approx(3.6)
    clock.now += 3.6
    assert b.try_acquire(BROADCASTS)


class FakeShare:
    def __init__(self, live: int = 0, departed: int = 0, live_count: int = 0) -> None:
        self.value = throttle.Others(live, departed, live_count)

    def others(self, scope: str, now: float) -> throttle.Others:
        return self.value


@pytest.mark.parametrize(
    ("others", "allowed", "remaining_before"),
    [
        ((0, 0, 0), 12, 12),  # alone: the whole budget
        ((0, 0, 2), 4, 4),  # three replicas: a third each
        ((0, 3, 2), 3, 3),  # a departed run used 3: the rest in thirds
        ((0, 12, 0), 0, 0),  # an earlier run of ours used it all
        ((10, 0, 1), 2, 2),  # the other replica overdrew (it joined late): only what is left
    ],
    ids=["alone", "three-replicas", "departed-usage", "earlier-run-used-all", "overdrawn"],
)
def test_the_workspace_budget_is_shared(
    others: tuple[int, int, int], allowed: int, remaining_before: int
) -> None:
    b, _ = budget(12)
    b.share = FakeShare(*others)
    assert b.remaining(BROADCASTS) == remaining_before
    granted = sum(b.try_acquire(BROADCASTS) for _ in range(20))
    assert granted == allowed
    assert b.remaining(BROADCASTS) == 0
    assert b.wait_time(BROADCASTS) > 0


def test_restored_entries_count_until_they_age_out() -> None:
    b, clock = budget(3)
    b.restore(BROADCASTS, [clock.now - 9.0, clock.now - 5.0])
    assert b.remaining(BROADCASTS) == 1
    assert b.entries(BROADCASTS) == [clock.now - 9.0, clock.now - 5.0]
    clock.now += 1.0
    assert b.remaining(BROADCASTS) == 2
