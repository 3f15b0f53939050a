"""A proxy that makes the single-writer test server answer as a CouchDB 3 cluster can.

pouchdb-server has one copy of each document, so it can never answer a write `accepted`, keep
two branches from one parent, or serve a read from a copy that has not caught up. A real
3-node cluster does all three (../shared/spec/couchdb-real.md §3). This proxy sits between the
daemon and the test server and, for the writes and reads a test chooses, answers the way the
cluster would, storing on the server exactly what the cluster's copies would end up holding:

- `ACCEPTED`: the write is stored normally, but answered `{"ok": true, "accepted": true}`
  (HTTP 202): it reached too few copies in time (a slow copy; or the others were down).
- `MINORITY`: the write landed only on a copy that had not seen the competing write yet. It
  is stored as a branch beside what is there (`_bulk_docs` with `new_edits: false`, which is
  how CouchDB's internal replication copies it) and answered `accepted`: once the copies
  sync, the document holds both branches.
- `LOST`: the write landed only on a copy whose node then died. It is answered `accepted`,
  invisible to every read, and stored as a branch only when `release_lost()` says the node
  is back.
- `CONFLICT`: the write is refused as a conflict though its parent is a leaf (a read through a
  node that had not caught up made the client's view stale, or a competing write from
  another node won the race on two copies).

Reads: `stale_reads[doc_id] = rev` serves that older revision for the next plain `GET` of
the document (a copy that had not caught up yet). Everything else is passed through. The database
info gains `cluster: {n: 3, …}`, as CouchDB 3 reports it, so the daemon knows it talks to a
cluster.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pouchdb import HEADERS


class Write(enum.Enum):
    PASS = "pass"
    ACCEPTED = "accepted"
    MINORITY = "minority"
    LOST = "lost"
    CONFLICT = "conflict"


#: Decides the fate of one `_bulk_docs` row: (db, document as sent) -> what the cluster does.
WritePolicy = Callable[[str, dict[str, Any]], Write]


@dataclass
class Stats:
    writes: dict[Write, int] = field(default_factory=lambda: dict.fromkeys(Write, 0))
    stale_reads: int = 0


def new_rev(parent: str | None) -> tuple[str, dict[str, Any]]:
    """A revision id for a branch written as a child of `parent`, with its `_revisions`."""
    generation = int(parent.split("-", 1)[0]) + 1 if parent else 1
    digest = uuid.uuid4().hex
    ids = [digest] + ([parent.split("-", 1)[1]] if parent else [])
    return f"{generation}-{digest}", {"start": generation, "ids": ids}


class QuorumProxy:
    """An aiohttp server in front of the test server (one per test; start/stop it)."""

    def __init__(self, upstream: str, auth: tuple[str, str]) -> None:
        self.upstream = upstream.rstrip("/")
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        self._auth = {"Authorization": f"Basic {token}"}
        self.policy: WritePolicy = lambda db, doc: Write.PASS
        self.stale_reads: dict[str, str] = {}
        self.lost: list[tuple[str, dict[str, Any]]] = []  # (db, doc with its new rev)
        self.lost_written = asyncio.Event()  # set when a write is lost
        # Runs after a MINORITY branch is stored, before the write is answered (e.g. another
        # process resolving the conflict in between).
        self.after_branch: Callable[[str, str], Awaitable[None]] | None = None
        self.stats = Stats()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""
        self.port = 0

    async def start(self, port: int = 0) -> None:
        """Serve (on `port`, e.g. to come back where clients expect this node)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={**HEADERS, **self._auth})
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def down(self) -> None:
        """The node stops answering (its clients see connection errors)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def stop(self) -> None:
        await self.down()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def db_url(self, db: str, user: str, password: str) -> str:
        host = self.url.removeprefix("http://")
        return f"http://{user}:{password}@{host}/{db}"

    async def release_lost(self) -> int:
        """The node that held the `LOST` writes is back: its branches reach every copy."""
        released, self.lost = self.lost, []
        for db, doc in released:
            await self._store_branches(db, [doc])
        return len(released)

    # -- the proxy ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        body = await request.read()
        if request.method == "POST" and len(parts) == 2 and parts[1] == "_bulk_docs":
            return await self._bulk_docs(parts[0], request, body)
        if (
            request.method == "GET"
            and len(parts) == 2
            and not parts[1].startswith("_")
            and "open_revs" not in request.query
            and "rev" not in request.query
            and parts[1] in self.stale_reads
        ):
            self.stats.stale_reads += 1
            query = dict(request.query) | {"rev": self.stale_reads.pop(parts[1])}
            return await self._forward(request, body, query=query)
        if request.method == "GET" and len(parts) == 1 and not parts[0].startswith("_"):
            return await self._db_info(request, body)
        return await self._forward(request, body)

    async def _forward(
        self, request: web.Request, body: bytes, *, query: dict[str, str] | None = None
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "authorization")
        }
        async with self._session.request(
            request.method,
            self.upstream + request.path,
            params=query if query is not None else request.query,
            data=body or None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            content_type = upstream.headers.get("Content-Type")
            if content_type:
                response.headers["Content-Type"] = content_type
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # streamed: the feed's heartbeats pass through
            await response.write_eof()
            return response

    async def _db_info(self, request: web.Request, body: bytes) -> web.Response:
        status, info = await self._call(request.method, request.path, None)
        if status == 200 and isinstance(info, dict):
            info["cluster"] = {"q": 2, "n": 3, "w": 2, "r": 2}
        return web.json_response(info, status=status)

    async def _call(self, method: str, path: str, payload: Any) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.request(
            method,
            self.upstream + path,
            data=None if payload is None else json.dumps(payload),
            headers={"Content-Type": "application/json"} if payload is not None else None,
        ) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def _store_branches(self, db: str, docs: list[dict[str, Any]]) -> None:
        status, rows = await self._call(
            "POST", f"/{db}/_bulk_docs", {"docs": docs, "new_edits": False}
        )
        assert status in (201, 202), (status, rows)

    async def _bulk_docs(self, db: str, request: web.Request, body: bytes) -> web.Response:
        payload = json.loads(body)
        docs: list[dict[str, Any]] = payload.get("docs", [])
        if payload.get("new_edits") is False:
            return await self._forward(request, body)
        fates = [self.policy(db, doc) for doc in docs]
        for fate in fates:
            self.stats.writes[fate] += 1
        passed = [doc for doc, fate in zip(docs, fates, strict=True) if fate in _STORED]
        rows_by_index: dict[int, dict[str, Any]] = {}
        if passed:
            status, rows = await self._call("POST", f"/{db}/_bulk_docs", {"docs": passed})
            if status >= 400:
                return web.json_response(rows, status=status)
            passed_indexes = [i for i, fate in enumerate(fates) if fate in _STORED]
            rows_by_index = dict(zip(passed_indexes, rows, strict=True))
        branches: list[dict[str, Any]] = []
        answer: list[dict[str, Any]] = []
        any_accepted = False
        for index, (doc, fate) in enumerate(zip(docs, fates, strict=True)):
            if fate in _STORED:
                row = dict(rows_by_index[index])
                if fate is Write.ACCEPTED and row.get("ok"):
                    row["accepted"] = True
                    any_accepted = True
                answer.append(row)
                continue
            doc_id = doc.get("_id") or uuid.uuid4().hex
            if fate is Write.CONFLICT:
                answer.append(
                    {"id": doc_id, "error": "conflict", "reason": "Document update conflict."}
                )
                continue
            rev, revisions = new_rev(doc.get("_rev"))
            branch = {k: v for k, v in doc.items() if k != "_revisions"} | {
                "_id": doc_id,
                "_rev": rev,
                "_revisions": revisions,
            }
            if fate is Write.MINORITY:
                branches.append(branch)
            else:
                self.lost.append((db, branch))
                self.lost_written.set()
            answer.append({"ok": True, "id": doc_id, "rev": rev, "accepted": True})
            any_accepted = True
        if branches:
            await self._store_branches(db, branches)
            if self.after_branch is not None:
                for branch in branches:
                    await self.after_branch(db, branch["_id"])
        return web.json_response(answer, status=202 if any_accepted else 201)


_STORED = frozenset({Write.PASS, Write.ACCEPTED})
