"""Resolving the conflicting branches the daemon's own writes can leave on a CouchDB cluster.

Two writes from one parent revision that reach different copies of a shard are both kept
(couchdb-real.md §3): the document then has several leaves, CouchDB shows one of them and
lists the others in `_conflicts`. Hiding them would let the shown branch lie (a lost
`gateway_ref`, a revived `cleared` message). Resolution, for a document the daemon writes:

1. read every leaf (`open_revs=all`, a read quorum of copies merged);
2. take the greatest live leaf in CouchDB's revision order as the base (the one CouchDB
   shows), and merge the others into it (`cht.merge`: task states by progress, histories
   united, `gateway_ref`s kept; presence and incoming-report documents are ours, and their
   newest or first version simply stands);
3. write the merged content on top of the base, and only once that write is committed
   (quorum), delete the leaves it made redundant (a `_deleted` revision on each).

Deleting only leaves smaller than a live leaf the resolver saw (the base) means concurrent
resolvers, each with its own partial view, can never delete every live leaf between them:
the greatest live leaf is never deleted, so the document never disappears. A leaf whose other
fields disagree with the base is CHT's own conflict: its tasks are merged, the rest is left
for CHT (logged `conflict_left`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .cht.merge import merge_leaves
from .couch.client import CouchClient, JsonDict, Leaf, revision_key
from .errors import GatewayError
from .ledger import PREFIX as BUDGET_PREFIX
from .logs import get_logger
from .metrics import Metrics
from .replicas import PREFIX as REPLICA_PREFIX

#: Incoming reports the webhook stores: one SMS, so one version stands (see `incoming.py`).
INCOMING_PREFIX = "sms-rapidpro:"
#: How many times a resolution re-reads after its merged write lost a race.
MAX_ROUNDS = 5


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one resolution did."""

    doc: JsonDict | None  # the document as it now stands (None if it has no live leaf)
    merged: bool  # a merged revision was written
    deleted: int  # leaves deleted
    left: int  # conflicting leaves left alone (not ours to settle, or not yet safe)


def live(leaves: Sequence[Leaf]) -> list[Leaf]:
    """Live (not deleted) leaves, greatest first (the first is the one CouchDB shows)."""
    return sorted(
        (leaf for leaf in leaves if not leaf.deleted),
        key=lambda leaf: revision_key(leaf.rev),
        reverse=True,
    )


def plan_resolution(leaves: Sequence[Leaf]) -> tuple[JsonDict | None, list[str], list[str]]:
    """The merged content to write on the base (None if nothing changes), the revisions to
    delete, and the revisions to leave."""
    alive = live(leaves)
    if len(alive) < 2:
        return None, [], []
    base, others = alive[0], alive[1:]
    doc_id = str(base.doc.get("_id", ""))
    if doc_id.startswith((REPLICA_PREFIX, BUDGET_PREFIX)):
        return None, [leaf.rev for leaf in others], []  # one writer: the newest stands
    if doc_id.startswith(INCOMING_PREFIX):
        # Two stores of one SMS: the first version of each is ours and says the same;
        # a version CHT has since edited is CHT's to settle.
        created = [leaf.rev for leaf in others if len(leaf.ancestry) == 1]
        edited = [leaf.rev for leaf in others if len(leaf.ancestry) > 1]
        return None, created, edited
    result = merge_leaves(base.doc, [leaf.doc for leaf in others])
    return (result.doc if result.changed else None), result.disposable, result.kept


class ConflictResolver:
    """Resolves documents with conflicting branches; concurrent requests for one document
    share one resolution."""

    def __init__(
        self,
        couch: CouchClient,
        metrics: Metrics,
        *,
        on_written: Callable[[str, str | None], None] | None = None,
        on_doc: Callable[[JsonDict], None] | None = None,
    ) -> None:
        self._couch = couch
        self._metrics = metrics
        self._on_written = on_written  # (doc id, rev) of each of our writes
        self._on_doc = on_doc  # each merged document we wrote
        self._running: dict[str, asyncio.Future[Resolution]] = {}
        self._log = get_logger(component="conflicts")

    async def resolve(self, doc_id: str, leaves: Sequence[Leaf] | None = None) -> Resolution:
        """Merge the document's live leaves into one; waits for a resolution in progress."""
        running = self._running.get(doc_id)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._running[doc_id] = future
        try:
            result = await self._resolve(doc_id, leaves)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._running[doc_id]

    async def _resolve(self, doc_id: str, leaves: Sequence[Leaf] | None) -> Resolution:
        for _ in range(MAX_ROUNDS):
            if leaves is None:
                leaves = await self._couch.leaves(doc_id)
            alive = live(leaves)
            if len(alive) < 2:
                self._log.debug("conflict_gone", doc_id=doc_id, leaves=len(leaves))
                return Resolution(alive[0].doc if alive else None, False, 0, 0)
            merged, disposable, kept = plan_resolution(leaves)
            current = alive[0].doc
            if merged is not None:
                [result] = await self._couch.bulk_write([merged])
                if result.conflict:
                    leaves = None  # someone wrote meanwhile: look again
                    continue
                if not result.ok:
                    raise GatewayError(f"resolve {doc_id}: {result.error}")
                self._written(doc_id, result.rev)
                if self._on_doc is not None:
                    self._on_doc(merged)
                current = merged
                if not result.committed:
                    # The merged revision may sit on one copy only: deleting the other
                    # leaves now could lose what they say. The next look finishes it.
                    self._log.info("conflict_merge_unconfirmed", doc_id=doc_id)
                    return Resolution(current, True, 0, len(disposable) + len(kept))
            deleted = await self._delete(doc_id, disposable)
            for rev in kept:
                self._log.warning("conflict_left", doc_id=doc_id, rev=rev)
            self._metrics.conflicts_resolved.inc()
            self._log.info(
                "conflict_resolved",
                doc_id=doc_id,
                leaves=len(alive),
                merged=merged is not None,
                deleted=deleted,
                left=len(kept),
            )
            return Resolution(current, merged is not None, deleted, len(kept))
        self._log.warning("conflict_resolution_gave_up", doc_id=doc_id, rounds=MAX_ROUNDS)
        return Resolution(None, False, 0, 0)

    async def _delete(self, doc_id: str, revs: list[str]) -> int:
        if not revs:
            return 0
        tombstones: list[JsonDict] = [
            {"_id": doc_id, "_rev": rev, "_deleted": True} for rev in revs
        ]
        rows = await self._couch.bulk_write(tombstones)
        deleted = 0
        for row in rows:
            if row.ok:
                deleted += 1
                self._written(doc_id, row.rev)
        return deleted

    def _written(self, doc_id: str, rev: str | None) -> None:
        if self._on_written is not None:
            self._on_written(doc_id, rev)

    @staticmethod
    def conflicted(doc: JsonDict) -> bool:
        """Whether a document read with `conflicts=true` shows conflicting branches."""
        conflicts: Any = doc.get("_conflicts")
        return isinstance(conflicts, list) and bool(conflicts)
