"""outbound._Backlog: the order documents are taken for sending (oldest due first; another
replica's share only after its turn, newest first)."""

from __future__ import annotations

import time

from cht_rapidpro.outbound import HANDOFF_S, _Backlog, _Entry


def entry(due: float) -> _Entry:
    return _Entry({"_id": f"d{due}"}, [], due=due)


def drain(backlog: _Backlog, *, help_others: bool = True) -> list[str]:
    taken = []
    while isinstance(ready := backlog.next_ready(help_others=help_others), tuple):
        taken.append(ready[0])
    return taken


def test_own_documents_go_oldest_due_first() -> None:
    backlog = _Backlog()
    for due in (30.0, 10.0, 20.0):
        backlog.put(f"d{due}", entry(due), mine=True)
    assert drain(backlog) == ["d10.0", "d20.0", "d30.0"]
    assert backlog.next_ready() is None


def test_another_replicas_documents_wait_their_turn_then_go_newest_first() -> None:
    backlog = _Backlog()
    for due in (1.0, 2.0, 3.0):
        backlog.put(f"theirs{due}", entry(due), mine=False)
    backlog.put("mine", entry(9.0), mine=True)
    assert drain(backlog) == ["mine"]
    wait = backlog.next_ready()
    assert isinstance(wait, float) and 0 < wait <= HANDOFF_S
    for item in backlog.entries.values():
        item.ready_at = time.monotonic() - 1  # their replica's turn has passed
    assert drain(backlog, help_others=False) == []  # not while our own jobs wait
    assert drain(backlog) == ["theirs3.0", "theirs2.0", "theirs1.0"]


def test_a_document_taken_out_or_put_again_is_not_taken_twice() -> None:
    backlog = _Backlog()
    backlog.put("a", entry(1.0), mine=True)
    backlog.put("b", entry(2.0), mine=True)
    assert backlog.pop("a") is not None
    again = entry(0.5)
    backlog.put("b", again, mine=True)  # a newer revision of b, due earlier
    assert drain(backlog) == ["b"]
    assert len(backlog) == 0
