"""Replicas learn of each other through CouchDB, so that they can share the work.

Each daemon writes a small presence document (`cht-rapidpro-replica:<instance>`, type
`cht-rapidpro-replica`) into the medic db when it starts, every few minutes while it runs, and
marked `stopped` when it stops. The others see it on their changes feed. No coordinator: the
presence only tunes who claims a document first (see `OutgoingSender._preferred`); claims in
the documents themselves still decide who sends. CHT ignores documents of unknown types.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from .cht.state import iso_now, parse_iso
from .couch.client import CouchClient, JsonDict
from .errors import GatewayError
from .logs import get_logger
from .retry import sleep_or_wake

PREFIX = "cht-rapidpro-replica:"
DOC_TYPE = "cht-rapidpro-replica"
#: A replica not heard of for this long is gone (it re-announces every third of it); until
#: then its share of new documents waits HANDOFF_S on the others.
PEER_TTL_S = 120.0


class Presence:
    """This replica's presence document, and the live peers seen through the feed."""

    def __init__(self, couch: CouchClient, instance: str) -> None:
        self._couch = couch
        self.instance = instance
        self._peers: dict[str, datetime] = {}  # instance -> last announcement
        self._log = get_logger(component="replicas")

    def peers(self) -> list[str]:
        """Other replicas heard of within PEER_TTL_S."""
        now = datetime.now(UTC)
        return [
            name for name, seen in self._peers.items() if (now - seen).total_seconds() < PEER_TTL_S
        ]

    def note(self, instance: str, seen: datetime | None = None) -> None:
        """A peer showed itself (by its presence document or by a claim)."""
        if instance != self.instance:
            if instance not in self._peers:
                self._log.info("replica_seen", peer=instance)
            self._peers[instance] = seen or datetime.now(UTC)

    def handle_doc(self, doc: JsonDict) -> None:
        instance, seen = doc.get("instance"), parse_iso(doc.get("seen_at"))
        if not isinstance(instance, str) or instance == self.instance:
            return
        if doc.get("stopped") or doc.get("_deleted"):
            if self._peers.pop(instance, None) is not None:
                self._log.info("replica_left", peer=instance)
            return
        if seen is not None:
            self.note(instance, seen)

    async def announce(self, *, stopped: bool = False) -> None:
        body: dict[str, Any] = {
            "_id": PREFIX + self.instance,
            "type": DOC_TYPE,
            "instance": self.instance,
            "seen_at": iso_now(),
        }
        if stopped:
            body["stopped"] = True
        await self._couch.put(body)

    async def load(self) -> None:
        """Peers already announced before we started (the feed may not show them again)."""
        for doc in await self._couch.docs_with_prefix(PREFIX):
            self.handle_doc(doc)

    async def run(self, stop: asyncio.Event) -> None:
        while not await sleep_or_wake(stop, PEER_TTL_S / 3):
            try:
                await self.announce()
            except GatewayError as exc:
                self._log.warning("replica_announce_retrying", error=str(exc))
