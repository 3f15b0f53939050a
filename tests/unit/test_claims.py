"""claims: the H2 verdict over a document's leaves, and the takeover plan (H4), as tables."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from cht_rapidpro.cht.outgoing import (
    ClaimEntry,
    OutgoingMessage,
    TaskRef,
    claim_details,
    claim_entries,
)
from cht_rapidpro.claims import ClaimedTask, Claims, Identity, Verdict, confirm_verdicts
from cht_rapidpro.config import Settings
from cht_rapidpro.couch.client import Leaf

ME = Identity("a", "boot-a")
NOW = datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC)
MSG = {"uuid": "m-1", "to": "+254700000001", "message": "hello"}
REF = TaskRef("d", "tasks", 0)
MESSAGES = (OutgoingMessage("m-1", "+254700000001", "hello"),)


def iso(seconds: float) -> str:
    moment = NOW + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def claim(instance: str, boot: str, at: float) -> dict[str, Any]:
    return {
        "state": "forwarded-to-gateway",
        "state_details": claim_details(instance, boot),
        "timestamp": iso(at),
    }


PENDING = {"state": "pending", "timestamp": iso(-60)}
MINE = claim("a", "boot-a", 0)
PEER = claim("b", "boot-b", -1)
PEER_LATER = claim("b", "boot-b", 1)


def version(*history: dict[str, Any], gateway_ref: Any = None) -> dict[str, Any]:
    last = history[-1]
    task: dict[str, Any] = {"messages": [dict(MSG)], "state": last["state"]}
    if "state_details" in last:
        task["state_details"] = last["state_details"]
    if gateway_ref is not None:
        task["gateway_ref"] = gateway_ref
    task["state_history"] = list(history)
    return task


def leaf(rev: str, ancestry: str, task: dict[str, Any] | None, deleted: bool = False) -> Leaf:
    doc: dict[str, Any] = {"_id": "d", "_rev": rev, "tasks": [] if task is None else [task]}
    return Leaf(rev=rev, ancestry=(rev, *ancestry.split()), deleted=deleted, doc=doc)


OURS = leaf("2-w", "1-p", version(PENDING, MINE))
OURS_ON_Q = leaf("3-w", "2-q 1-p", version(PENDING, MINE))  # our claim written on 2-q
PEER_KNOWN = claim_entries(version(PENDING, PEER))
NONE: frozenset[ClaimEntry] = frozenset()

# (id, leaves, our claim revision, its parent, entries planned with, verdict)
CASES: list[tuple[str, list[Leaf], str, str, frozenset[ClaimEntry], Verdict]] = [
    ("only-our-claim", [OURS], "2-w", "1-p", NONE, Verdict.HELD),
    (
        "sibling-claim-forking-at-our-parent-is-ignored",
        [OURS, leaf("2-y", "1-p", version(PENDING, PEER_LATER))],
        "2-w", "1-p", NONE, Verdict.HELD,
    ),
    (
        "claim-on-a-branch-forking-above-our-parent",
        [OURS_ON_Q, leaf("2-y", "1-p", version(PENDING, PEER))],
        "3-w", "2-q", NONE, Verdict.CONTESTED,
    ),
    (
        "that-claim-was-known-when-planned-a-takeover",
        [leaf("3-w", "2-q 1-p", version(PENDING, PEER, MINE)),
         leaf("2-y", "1-p", version(PENDING, PEER))],
        "3-w", "2-q", PEER_KNOWN, Verdict.HELD,
    ),
    (
        "progress-on-another-branch",
        [OURS_ON_Q, leaf("3-y", "2-r 1-p", version(
            PENDING, {"state": "received-by-gateway", "timestamp": iso(2)}, gateway_ref=9))],
        "3-w", "2-q", NONE, Verdict.CONTESTED,
    ),
    (
        "a-branch-still-pending-is-harmless",
        [OURS_ON_Q, leaf("2-y", "1-p", version(PENDING))],
        "3-w", "2-q", NONE, Verdict.HELD,
    ),
    (
        "our-line-replaced-by-another-claim",
        [leaf("3-x", "2-w 1-p", version(PENDING, MINE, PEER_LATER))],
        "2-w", "1-p", NONE, Verdict.LOST,
    ),
    (
        "our-line-merged-with-news",
        [leaf("3-m", "2-w 1-p", version(PENDING, PEER, MINE))],
        "2-w", "1-p", NONE, Verdict.CONTESTED,
    ),
    (
        "our-branch-deleted-by-a-resolver",
        [leaf("3-del", "2-w 1-p", None, deleted=True),
         leaf("3-m", "2-y 1-p", version(PENDING, MINE, PEER))],
        "2-w", "1-p", NONE, Verdict.LOST,
    ),
    (
        "our-write-not-seen-at-all",
        [leaf("2-y", "1-p", version(PENDING, PEER))],
        "2-w", "1-p", NONE, Verdict.LOST,
    ),
    (
        "an-older-version-without-the-task",
        [OURS, leaf("3-z", "2-z 1-o", None)],
        "2-w", "1-p", NONE, Verdict.HELD,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("leaves", "written", "parent", "known", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_confirm_verdicts(
    leaves: list[Leaf], written: str, parent: str, known: frozenset[ClaimEntry], expected: Verdict
) -> None:
    claimed = {REF: ClaimedTask(REF, MESSAGES, bool(known), NOW, known=known)}
    verdicts = confirm_verdicts(
        leaves, written=written, parent=parent, claimed=claimed, identity=ME
    )
    assert verdicts == {REF: expected}


# -- planning (H4) ------------------------------------------------------------------------


def claims(started: float | None = None, **env: str) -> Claims:
    settings = Settings.from_env(
        {
            "COUCH_URL": "http://admin:pass@127.0.0.1:5984/medic",
            "CHT_RAPIDPRO_CLAIM_TTL": "120",
            "CHT_RAPIDPRO_SEND_TIMEOUT": "20",
            **env,
        }
    )
    none = cast(Any, None)
    return Claims(
        couch=none, writer=none, resolver=none, identity=ME, settings=settings,
        metrics=none, pause=none, couch_outage=none, on_written=lambda d, r: None,
        started=started,
    )  # fmt: skip


def doc_with(*history: dict[str, Any]) -> dict[str, Any]:
    return {"_id": "d", "_rev": "3-x", "tasks": [version(*history)]}


def seconds_ago(entry: dict[str, Any], seconds: float) -> dict[str, Any]:
    moment = datetime.now(UTC) - timedelta(seconds=seconds)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return entry | {"timestamp": stamp}


# A claim entry `age` seconds before the test runs (tables are built at import time).
AGED = tuple[dict[str, Any], float]


@pytest.mark.parametrize(
    ("aged", "take", "takeover", "recheck"),
    [
        (None, True, False, False),
        ((PEER, 10), False, None, True),
        ((PEER, 200), True, True, False),
        ((claim("a", "dead-boot", 5), 5), False, None, True),
        ((MINE, 1), False, None, True),
    ],
    ids=[
        "fresh",
        "a-peer-claim-is-left-until-its-lease-ends",
        "an-expired-peer-claim-is-taken-over",
        "an-earlier-boot-of-ours-waits-until-its-posts-landed",
        "our-own-claim-with-a-post-of-unknown-outcome-waits-settle",
    ],
)
def test_plan(aged: AGED | None, take: bool, takeover: bool | None, recheck: bool) -> None:
    history = (PENDING,) if aged is None else (PENDING, seconds_ago(*aged))
    plan = claims().plan(doc_with(*history), datetime.now(UTC))
    assert bool(plan.take) == take
    if take:
        assert plan.take[0].takeover is takeover
    assert (plan.recheck is not None) == recheck


def test_our_own_unposted_claim_is_retaken_without_a_lookup() -> None:
    mine = claims()
    mine._claimed_unposted(list(MESSAGES))
    plan = mine.plan(doc_with(PENDING, seconds_ago(MINE, 1)), datetime.now(UTC))
    assert [t.takeover for t in plan.take] == [False]


def test_an_earlier_boot_is_taken_over_send_timeout_after_our_start() -> None:
    mine = claims(started=time.monotonic() - 25.0)  # 25 s ago: past SEND_TIMEOUT (20 s)
    dead = claim("a", "dead", 5)
    plan = mine.plan(doc_with(PENDING, seconds_ago(dead, 5)), datetime.now(UTC))
    assert [t.takeover for t in plan.take] == [True]
    assert {(e.instance, e.boot) for e in plan.take[0].known} == {("a", "dead")}
