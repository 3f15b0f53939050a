"""cht.merge: conflicting leaves of a CHT document become one revision that tells the truth."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cht_rapidpro.cht.merge import attempts, merge_leaves, merge_task
from cht_rapidpro.cht.outgoing import claim_details

ISO = [f"2026-05-01T08:00:{s:02d}.000Z" for s in range(60)]
MSG = {"uuid": "m-1", "to": "+254700000001", "message": "hello"}


def entry(state: str, second: int, details: Any = None) -> dict[str, Any]:
    result: dict[str, Any] = {"state": state}
    if details is not None:
        result["state_details"] = details
    result["timestamp"] = ISO[second]
    return result


def task(*history: dict[str, Any], gateway_ref: Any = None, **extra: Any) -> dict[str, Any]:
    last = history[-1]
    result: dict[str, Any] = {"messages": [dict(MSG)], "state": last["state"], **extra}
    if "state_details" in last:
        result["state_details"] = last["state_details"]
    if gateway_ref is not None:
        result["gateway_ref"] = gateway_ref
    result["state_history"] = list(history)
    return result


PENDING = entry("pending", 0)
CLAIM_A = entry("forwarded-to-gateway", 1, claim_details("a", "boot-a"))
CLAIM_B = entry("forwarded-to-gateway", 2, claim_details("b", "boot-b"))
QUEUED = entry("received-by-gateway", 3, "Queued")
SENT = entry("sent", 5, "Sent")
DELIVERED = entry("delivered", 6, "Delivered")
CLEARED = entry("cleared", 4)
FAILED = entry("failed", 7, "Failed")
RESEND = entry("pending", 8)


@pytest.mark.parametrize(
    ("versions", "state", "gateway_ref", "history"),
    [
        (
            [task(PENDING, CLAIM_A), task(PENDING, CLAIM_B)],
            "forwarded-to-gateway",
            None,
            [PENDING, CLAIM_A, CLAIM_B],
        ),
        (
            [task(PENDING, CLAIM_B), task(PENDING, CLAIM_A, QUEUED, gateway_ref=11)],
            "received-by-gateway",
            11,
            [PENDING, CLAIM_A, CLAIM_B, QUEUED],
        ),
        (
            [
                task(PENDING, CLAIM_A, QUEUED, SENT, DELIVERED, gateway_ref=11),
                task(PENDING, CLAIM_A, QUEUED, SENT, gateway_ref=11),
            ],
            "delivered",
            11,
            [PENDING, CLAIM_A, QUEUED, SENT, DELIVERED],
        ),
        (
            [
                task(PENDING, CLAIM_A, QUEUED, SENT, gateway_ref=11),
                task(PENDING, CLAIM_A, QUEUED, SENT, DELIVERED, gateway_ref=11),
            ],
            "delivered",
            11,
            [PENDING, CLAIM_A, QUEUED, SENT, DELIVERED],
        ),
        (
            [task(PENDING, CLAIM_A, QUEUED, gateway_ref=11), task(PENDING, CLEARED)],
            "cleared",
            11,
            [PENDING, CLAIM_A, QUEUED, CLEARED],
        ),
        (
            [
                task(PENDING, CLAIM_A, QUEUED, FAILED, RESEND, gateway_ref=None),
                task(PENDING, CLAIM_A, QUEUED, FAILED, gateway_ref=11),
            ],
            "pending",
            None,
            [PENDING, CLAIM_A, QUEUED, FAILED, RESEND],
        ),
        (
            [task(PENDING), task(PENDING, CLAIM_A)],
            "forwarded-to-gateway",
            None,
            [PENDING, CLAIM_A],
        ),
    ],
    ids=[
        "two-claims-keep-both-entries",
        "write-back-beats-a-claim-and-keeps-its-ref",
        "delivered-stays-delivered",
        "delivered-on-the-other-branch-wins",
        "cleared-is-never-revived-but-the-ref-is-kept",
        "a-resend-beats-the-failed-branch",
        "a-claim-beats-pending",
    ],
)
def test_merge_task(
    versions: list[dict[str, Any]], state: str, gateway_ref: Any, history: list[Any]
) -> None:
    before = copy.deepcopy(versions)
    merged = merge_task(versions)
    assert merged["state"] == state
    assert merged.get("gateway_ref") == gateway_ref
    assert merged["state_history"] == history
    assert versions == before  # inputs are not modified


def test_merge_task_of_identical_versions_changes_nothing() -> None:
    version = task(PENDING, CLAIM_A)
    assert merge_task([version, copy.deepcopy(version)]) == version


def test_out_of_order_history_is_only_sorted_when_entries_are_added() -> None:
    skewed = task(PENDING, CLAIM_B, CLAIM_A)  # a claimant whose clock was behind
    assert merge_task([skewed, copy.deepcopy(skewed)])["state_history"] == [
        PENDING,
        CLAIM_B,
        CLAIM_A,
    ]


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([], 1),
        ([PENDING, CLAIM_A, QUEUED], 1),
        ([PENDING, CLAIM_A, CLAIM_B, PENDING], 1),
        ([PENDING, CLAIM_A, QUEUED, FAILED, RESEND], 2),
        ([entry("scheduled", 0), entry("muted", 1), entry("scheduled", 2)], 2),
    ],
    ids=["empty", "one-send", "pending-inside-an-attempt", "resend", "unmuted"],
)
def test_attempts(history: list[Any], expected: int) -> None:
    assert attempts({"state_history": history}) == expected


def doc(rev: str, tasks: list[Any], **fields: Any) -> dict[str, Any]:
    return {"_id": "d", "_rev": rev, "type": "data_record", "tasks": tasks, **fields}


def test_merge_leaves_merges_tasks_and_disposes_of_the_loser() -> None:
    base = doc("2-b", [task(PENDING, CLAIM_B)])
    other = doc("3-a", [task(PENDING, CLAIM_A, QUEUED, gateway_ref=7)])
    result = merge_leaves(base, [other])
    assert result.changed
    assert result.disposable == ["3-a"] and result.kept == []
    assert result.doc["_rev"] == "2-b"
    assert result.doc["tasks"][0]["gateway_ref"] == 7
    assert result.doc["tasks"][0]["state"] == "received-by-gateway"


def test_merge_leaves_keeps_tasks_only_one_branch_has() -> None:
    base = doc("2-b", [task(PENDING, CLAIM_B)])
    other = doc("2-a", [task(PENDING), task(PENDING, messages=[{"uuid": "m-2"}])], transitions={})
    result = merge_leaves(base, [other])
    assert len(result.doc["tasks"]) == 2
    assert result.doc["transitions"] == {}
    assert result.disposable == ["2-a"]


def test_merge_leaves_leaves_chts_own_disagreements_alone() -> None:
    base = doc("2-b", [task(PENDING, CLAIM_B)], fields={"temp": 38})
    other = doc("2-a", [task(PENDING, CLAIM_A)], fields={"temp": 39})
    result = merge_leaves(base, [other])
    assert result.kept == ["2-a"] and result.disposable == []
    assert result.doc["fields"] == {"temp": 38}
    assert {
        e["state_details"]["instance"] for e in result.doc["tasks"][0]["state_history"][1:]
    } == {
        "a",
        "b",
    }


def test_merge_leaves_different_task_at_an_index_is_kept() -> None:
    other_task = task(PENDING)
    other_task["messages"] = [{"uuid": "m-9", "to": "+254700000009", "message": "x"}]
    result = merge_leaves(doc("2-b", [task(PENDING, CLAIM_B)]), [doc("2-a", [other_task])])
    assert result.kept == ["2-a"]
    assert result.doc["tasks"][0]["messages"][0]["uuid"] == "m-1"


def test_merge_leaves_of_equal_content_is_no_change() -> None:
    base = doc("2-b", [task(PENDING, CLAIM_B)])
    other = copy.deepcopy(base) | {"_rev": "2-a"}
    result = merge_leaves(base, [other])
    assert not result.changed
    assert result.disposable == ["2-a"]
