"""Merging conflicting revisions of a CHT document into one that tells the truth.

On a CouchDB cluster two writes from the same parent revision can both be kept, as
conflicting branches (couchdb-real.md §3). CouchDB then shows one branch (the "winner", by
revision order) and hides the others; nothing in it is about meaning. For the task fields the
gateway owns, a blind winner could lose a `gateway_ref`, revive a cleared message or take a
delivered one back to `sent`. This module computes, from every live leaf, the document the
winner should become:

- Each task present in several leaves (the same messages, at the same index) becomes the
  version that is furthest along: the latest send *attempt* first (a resend from the web
  app, an unmuted schedule), then the state's rank (a user's `cleared`/`muted` and CHT's
  `denied`/`duplicate` over RapidPro's final states over in-flight states over a claim over
  `pending`), then the newest history entry. Its `state_history` is the union of every
  version's entries in time order, so no entry that happened is lost (claims included: a
  claimant may have posted); a `gateway_ref` of the same attempt is kept if the chosen
  version lacks one.
- Tasks only some leaves have (e.g. an auto-reply added on the other branch) are kept.
- Other top-level fields come from the base (the winner); fields only another leaf has are
  added.

A losing leaf may be deleted only if everything it says is now in the merged document
(`MergeResult.disposable`); a leaf whose other fields disagree with the winner is a conflict
of CHT's own, merged into the winner as far as tasks go and otherwise left alone.

Pure functions over dicts; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .outgoing import TASK_LISTS
from .state import State, parse_iso

#: How far along a state is, within one attempt. Unknown states sit between a claim and
#: RapidPro's first answer.
_RANK: dict[str, int] = {
    State.SCHEDULED: 0,
    State.PENDING: 0,
    State.FORWARDED_TO_GATEWAY: 1,
    State.RECEIVED_BY_GATEWAY: 2,
    State.UNRECOGNISED: 2,
    State.FORWARDED_BY_GATEWAY: 3,
    State.SENT: 4,
    State.DELIVERED: 5,
    State.FAILED: 5,
    State.CLEARED: 6,
    State.CLEAR: 6,
    State.MUTED: 6,
    State.DENIED: 6,
    State.DUPLICATE: 6,
}
_UNKNOWN_RANK = 2
#: A `pending`/`scheduled` entry that follows one of these starts a new attempt.
_RESTARTS = frozenset({State.PENDING, State.SCHEDULED})
_CONTINUES = frozenset({State.PENDING, State.SCHEDULED, State.FORWARDED_TO_GATEWAY})
#: Fields of a document that are CouchDB's, not content.
_META = frozenset({"_id", "_rev", "_revisions", "_conflicts", "_deleted_conflicts", "_deleted"})
_TASK_STATE_FIELDS = frozenset({"state", "state_details", "state_history", "gateway_ref"})
_EPOCH = datetime.min.replace(tzinfo=UTC)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _history(task: Mapping[str, Any]) -> list[Any]:
    history = task.get("state_history")
    return history if isinstance(history, list) else []


def attempts(task: Mapping[str, Any]) -> int:
    """How many send attempts the task's history shows (1 + restarts)."""
    count = 1
    previous: Any = None
    for entry in _history(task):
        state = entry.get("state") if isinstance(entry, dict) else None
        if previous is not None and state in _RESTARTS and previous not in _CONTINUES:
            count += 1
        if state is not None:
            previous = state
    return count


def _entry_stamp(entry: Any) -> datetime:
    stamp = parse_iso(entry.get("timestamp")) if isinstance(entry, dict) else None
    return stamp or _EPOCH


def _last_stamp(task: Mapping[str, Any]) -> datetime:
    stamps = [
        stamp
        for entry in _history(task)
        if isinstance(entry, dict) and (stamp := parse_iso(entry.get("timestamp"))) is not None
    ]
    return max(stamps, default=_EPOCH)


def _progress(task: Mapping[str, Any]) -> tuple[int, int, datetime]:
    state = task.get("state")
    rank = _RANK.get(state, _UNKNOWN_RANK) if isinstance(state, str) else -1
    return (attempts(task), rank, _last_stamp(task))


def task_identity(task: Mapping[str, Any]) -> str:
    """What makes two versions of a task the same task: its messages' uuids, or (for a
    scheduled task without messages yet) everything but its state fields."""
    messages = task.get("messages")
    if isinstance(messages, list):
        uuids = [m.get("uuid") for m in messages if isinstance(m, dict) and m.get("uuid")]
        if uuids:
            return _canonical(uuids)
    return _canonical({k: v for k, v in task.items() if k not in _TASK_STATE_FIELDS})


def merge_task(versions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One version of a task from several (the first is the base's, kept on ties)."""
    chosen = versions[0]
    for version in versions[1:]:
        if _progress(version) > _progress(chosen):
            chosen = version
    merged: dict[str, Any] = json.loads(json.dumps(chosen))
    own = {_canonical(entry) for entry in _history(chosen)}
    extra: dict[str, Any] = {}
    for version in versions:
        for entry in _history(version):
            key = _canonical(entry)
            if key not in own:
                extra.setdefault(key, entry)
    if extra:
        combined = [*_history(chosen), *extra.values()]
        combined.sort(key=_entry_stamp)  # stable: same-time entries keep their order
        merged["state_history"] = json.loads(json.dumps(combined))
    if merged.get("gateway_ref") in (None, ""):
        same_attempt = [
            v
            for v in versions
            if v.get("gateway_ref") not in (None, "") and attempts(v) == attempts(chosen)
        ]
        if same_attempt:
            latest = max(same_attempt, key=_progress)
            merged["gateway_ref"] = latest["gateway_ref"]
    return merged


@dataclass(slots=True)
class MergeResult:
    """The merged content, and which of the other leaves it makes redundant."""

    doc: dict[str, Any]
    changed: bool  # the merged content differs from the base's
    disposable: list[str] = field(default_factory=list)  # revs of leaves safe to delete
    kept: list[str] = field(default_factory=list)  # revs of leaves that say something else


def _content(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in _META}


def merge_leaves(base: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> MergeResult:
    """Merge `others` (live leaves of the same document) into `base` (the winner)."""
    merged: dict[str, Any] = json.loads(json.dumps(_content(base)))
    redundant: dict[str, bool] = {}
    for other in others:
        rev = str(other.get("_rev"))
        redundant[rev] = True
        for key, value in _content(other).items():
            if key in TASK_LISTS:
                continue
            if key not in merged:
                merged[key] = json.loads(json.dumps(value))
            elif _canonical(merged[key]) != _canonical(value):
                redundant[rev] = False  # CHT's own disagreement: not ours to settle
        for task_list in TASK_LISTS:
            theirs = other.get(task_list)
            if not isinstance(theirs, list):
                continue
            ours = merged.get(task_list)
            if not isinstance(ours, list):
                merged[task_list] = json.loads(json.dumps(theirs))
                continue
            for index, task in enumerate(theirs):
                if not isinstance(task, dict):
                    redundant[rev] = redundant[rev] and index < len(ours) and ours[index] == task
                    continue
                if index >= len(ours):
                    ours.append(json.loads(json.dumps(task)))
                    continue
                mine = ours[index]
                if isinstance(mine, dict) and task_identity(mine) == task_identity(task):
                    ours[index] = merge_task([mine, task])
                else:
                    redundant[rev] = False  # a different task at this index
    changed = _canonical(merged) != _canonical(_content(base))
    merged["_id"] = base.get("_id")
    if "_rev" in base:
        merged["_rev"] = base["_rev"]
    return MergeResult(
        doc=merged,
        changed=changed,
        disposable=[rev for rev, ok in redundant.items() if ok],
        kept=[rev for rev, ok in redundant.items() if not ok],
    )
