"""The workspace's RapidPro budget is shared by replicas and survives restarts (ledger.py).

The sandbox throttles like RapidPro (a sliding log per scope) but over a short window, and the
daemons are told the same window (`CHT_RAPIDPRO_THROTTLE_WINDOW`), so that an hour's budget
plays out in seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from support import CouchAdmin, all_tasks, eventually, message_doc, task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WINDOW = 12.0
LIMIT = 30


def throttle(rapidpro: Any) -> None:
    # Current TextIt: broadcasts fall into the catch-all `v2` scope.
    rapidpro.sandbox.configure(rates={"v2": LIMIT}, throttle_window=WINDOW)


def env(instance: str) -> dict[str, str]:
    return {
        "CHT_RAPIDPRO_INSTANCE": instance,
        "CHT_RAPIDPRO_BROADCASTS_PER_HOUR": str(LIMIT),
        "CHT_RAPIDPRO_THROTTLE_WINDOW": str(WINDOW),
        "CHT_RAPIDPRO_POLL_INTERVAL": "60",  # no status polling in the way
    }


def posts(rapidpro: Any) -> list[Any]:
    return [r for r in rapidpro.sandbox.requests if r.method == "POST" and "broadcasts" in r.path]


def worst_window(times: list[float]) -> int:
    """The most POSTs any window of WINDOW seconds held."""
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + WINDOW) for t in times), default=0)


async def sent(couch: CouchAdmin) -> int:
    return sum(
        1
        for doc in await couch.all_docs()
        for item in all_tasks(doc)
        if item["state"] not in ("pending", "forwarded-to-gateway")
    )


async def test_three_replicas_stay_inside_one_budget(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    throttle(rapidpro)
    daemons = [await daemon_factory(**env(name)) for name in ("a", "b", "c")]
    # Replicas running side by side before the work comes (one joining in the middle of a
    # burst may overdraw for the moment it takes the others to hear of it).
    await eventually(
        lambda: asyncio.sleep(0, [len(d.gateway.presence.peers()) for d in daemons]),
        lambda peers: peers == [2, 2, 2],
        what="the replicas knowing each other",
    )
    total = 2 * LIMIT
    await cht.bulk([message_doc([task(f"+2547110{n:05d}", f"budget {n}")]) for n in range(total)])
    try:
        await eventually(lambda: sent(cht), lambda n: n == total, within=120, every=0.5,
                         what="every message sent")  # fmt: skip
    except AssertionError as exc:
        budgets = [
            (d.settings.instance, d.gateway.rapidpro.budget.remaining("broadcasts"),
             d.gateway.rapidpro.budget.wait_time("broadcasts"), d.gateway.sender.queued,
             d.gateway.sender.active)
            for d in daemons
        ]  # fmt: skip
        stuck = [
            (doc["_id"], item["state"])
            for doc in await cht.all_docs()
            for item in all_tasks(doc)
            if item["state"] in ("pending", "forwarded-to-gateway")
        ]
        raise AssertionError(f"{exc}; budgets {budgets}; stuck {stuck}") from None
    refused = [r for r in rapidpro.sandbox.requests if r.status == 429]
    assert refused == []
    accepted = [r.at.timestamp() for r in posts(rapidpro) if r.status == 201]
    assert len(accepted) == total
    assert worst_window(accepted) <= LIMIT
    senders = {
        item["state_history"][1]["state_details"]["instance"]
        for doc in await cht.all_docs()
        for item in all_tasks(doc)
    }
    assert senders == {"a", "b", "c"}  # all three sent, none alone spent the budget


async def test_a_restart_keeps_counting_what_the_earlier_run_spent(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    throttle(rapidpro)
    first = await daemon_factory(**env("solo"))
    spent = LIMIT - 5
    await cht.bulk([message_doc([task(f"+2547120{n:05d}", f"first {n}")]) for n in range(spent)])
    await eventually(lambda: sent(cht), lambda n: n == spent, within=60, every=0.2,
                     what="the first run's messages sent")  # fmt: skip
    await first.stop()  # publishes what it spent
    second = await daemon_factory(**env("solo"))
    await eventually(
        lambda: asyncio.sleep(0, second.gateway.started.is_set()), what="the second run started"
    )
    remaining = second.gateway.rapidpro.budget.remaining("broadcasts")
    assert remaining is not None and remaining <= 5
    await cht.bulk([message_doc([task(f"+2547130{n:05d}", f"second {n}")]) for n in range(10)])
    await eventually(lambda: sent(cht), lambda n: n == spent + 10, within=90, every=0.5,
                     what="the second run's messages sent")  # fmt: skip
    assert [r for r in rapidpro.sandbox.requests if r.status == 429] == []
    assert worst_window([r.at.timestamp() for r in posts(rapidpro) if r.status == 201]) <= LIMIT
