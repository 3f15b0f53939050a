"""Thin, typed CouchDB access for the CHT `medic` db, its vault and the server config.

aiocouch handles documents and bulk writes; the changes feed, views and `_node/.../_config`
use plain aiohttp on aiocouch's own session (one connection pool, one set of credentials).
Every HTTP outcome becomes an `errors` class here; no business rules live in this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import ssl
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiocouch
import aiocouch.exception
import aiohttp
from aiocouch.document import Document

from ..config import CouchTarget
from ..errors import AuthError, ConflictError, GatewayError, RetryableError

JsonDict = dict[str, Any]
T = TypeVar("T")


def clone(doc: JsonDict) -> JsonDict:
    """A deep copy of a JSON document (several times faster than `copy.deepcopy`)."""
    copied: JsonDict = json.loads(json.dumps(doc))
    return copied


_RAW_VIEW_PARAMS = frozenset(
    {"startkey_docid", "endkey_docid", "start_key_doc_id", "end_key_doc_id"}
)


class NotFoundError(GatewayError):
    """The database or document does not exist."""


class AccountLockedError(RetryableError):
    """CouchDB refuses the user for a while after repeated failed logins from this address.

    CouchDB 3.4 (`[chttpd_auth_lockout]`, on by default) answers 403 "Account is temporarily
    locked due to multiple authentication failures" to every request of a user that failed to
    log in 5 times from one address, *whatever the password*, for 5 minutes after the first
    failure. Someone else's wrong password does this to the daemon's own user: the lock ends by
    itself, so it is retryable, not a configuration error (which would stop the daemon).
    """


class LoginFailedError(AuthError):
    """CouchDB did not accept the name or password (401).

    Each one counts towards CouchDB's lockout of that user (see AccountLockedError): after one,
    make no further requests with the same credentials.
    """


#: Part of CouchDB's answer to a locked user (chttpd_auth_lockout).
_LOCKOUT_REASON = "temporarily locked"


def _locked_out(status: int, reason: str) -> bool:
    return status == 403 and _LOCKOUT_REASON in reason.lower()


async def couch_compat(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware every CouchDB request goes through.

    `Accept: application/json` makes pouchdb-server label JSON as JSON, and
    `Accept-Encoding: identity` stops Express from gzip-buffering streamed responses
    (spec couchdb-test-server §5). Both are harmless on Apache CouchDB.
    """
    request.headers["Accept"] = "application/json"
    request.headers["Accept-Encoding"] = "identity"
    return await handler(request)


def basic_auth(user: str, password: str) -> aiohttp.ClientMiddlewareType:
    """A middleware that authenticates every request (CouchDB 3 has no admin party).

    Done here rather than by aiocouch, whose `aiohttp.BasicAuth` is deprecated in aiohttp 3.14.
    """
    value = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    async def middleware(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        request.headers["Authorization"] = value
        return await handler(request)

    return middleware


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Turn aiocouch/aiohttp outcomes into `errors` classes, in one table."""
    try:
        yield
    except aiocouch.ConflictError as exc:
        raise ConflictError(f"{what}: conflict") from exc
    except (aiocouch.UnauthorizedError, aiocouch.ForbiddenError) as exc:
        if isinstance(exc, aiocouch.ForbiddenError) and _locked_out(403, str(exc)):
            raise _from_status(what, 403, str(exc)) from exc
        if isinstance(exc, aiocouch.UnauthorizedError):
            raise LoginFailedError(f"{what}: CouchDB refused the credentials ({exc})") from exc
        raise AuthError(f"{what}: CouchDB refused the credentials ({exc})") from exc
    except aiocouch.NotFoundError as exc:
        raise NotFoundError(f"{what}: not found") from exc
    except aiocouch.exception.RemoteResponseError as exc:
        raise _from_status(what, exc.status, str(exc.reason or exc.message)) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Before ValueError: a refused TLS certificate is a ValueError too (ssl.CertificateError).
        detail = str(exc) or "no answer in time"  # aiohttp's total timeout says nothing
        raise RetryableError(f"{what}: {type(exc).__name__}: {detail}") from exc
    except ValueError as exc:
        # aiocouch raises a bare ValueError for statuses it has no class for (5xx).
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ClientResponseError):
            raise _from_status(what, cause.status, cause.message) from exc
        raise


def _from_status(what: str, status: int, reason: str) -> GatewayError:
    if _locked_out(status, reason):
        return AccountLockedError(
            f"{what}: CouchDB has temporarily locked this user after repeated failed logins "
            f"from this host (403: {reason}); it unlocks by itself within 5 minutes"
        )
    if status == 401:
        return LoginFailedError(f"{what}: CouchDB answered 401 ({reason})")
    if status == 403:
        return AuthError(f"{what}: CouchDB answered 403 ({reason})")
    if status == 404:
        return NotFoundError(f"{what}: not found ({reason})")
    if status == 409:
        return ConflictError(f"{what}: conflict")
    return RetryableError(f"{what}: CouchDB answered {status} ({reason})")


def tls_verification(ca_file: Path | None) -> ssl.SSLContext | bool:
    """How CouchDB's certificate is checked: against `ca_file`, or (True) the system's CAs.

    Either way the host name must match and the certificate must be valid now.
    """
    return True if ca_file is None else ssl.create_default_context(cafile=str(ca_file))


@dataclass(frozen=True, slots=True)
class WriteResult:
    """One row of a `_bulk_docs` answer.

    On a CouchDB cluster a row can be `ok` and `accepted` at once: the revision reached at
    least one copy of the shard but fewer than the write quorum, possibly because the other
    copies refused it as a conflict (couchdb-real.md §3). Only a `committed` write excludes
    every competing write from the same parent revision.
    """

    id: str
    rev: str | None
    error: str | None
    accepted: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def committed(self) -> bool:
        """Written with quorum (always so on a single node)."""
        return self.error is None and not self.accepted

    @property
    def conflict(self) -> bool:
        return self.error == "conflict"


@dataclass(frozen=True, slots=True)
class Leaf:
    """One leaf revision of a document, with its ancestry (`open_revs=all&revs=true`)."""

    rev: str
    ancestry: tuple[str, ...]  # this revision first, then its ancestors (full rev ids)
    deleted: bool
    doc: JsonDict

    def descends_from(self, rev: str) -> bool:
        """Whether `rev` is this leaf or one of its ancestors."""
        return rev in self.ancestry


def revision_key(rev: str) -> tuple[int, str]:
    """CouchDB's order of revisions: generation, then revision id (the winner is the max)."""
    head, _, tail = rev.partition("-")
    return (int(head) if head.isdigit() else 0, tail)


def _leaves_of(rows: list[Any]) -> list[Leaf]:
    """Leaves from `open_revs` rows (`{"ok": doc}`; `{"missing": rev}` is a leaf no copy
    read has the body of, and is left out)."""
    found = []
    for row in rows:
        doc = row.get("ok") if isinstance(row, dict) else None
        if not isinstance(doc, dict) or not isinstance(doc.get("_rev"), str):
            continue
        revisions = doc.pop("_revisions", None) or {}
        start, ids = revisions.get("start"), revisions.get("ids")
        if isinstance(start, int) and isinstance(ids, list) and ids:
            ancestry = tuple(f"{start - i}-{rev_id}" for i, rev_id in enumerate(ids))
        else:
            ancestry = (doc["_rev"],)
        found.append(
            Leaf(rev=doc["_rev"], ancestry=ancestry, deleted=bool(doc.get("_deleted")), doc=doc)
        )
    return found


@dataclass(frozen=True, slots=True)
class ChangesPage:
    results: list[JsonDict]
    last_seq: Any  # opaque: never parsed, compared or incremented
    #: Changes left after this page (CouchDB 3's `pending`; pouchdb-server sends none).
    pending: int | None = None


class CouchClient:
    """The CHT `medic` database (plus its `-vault` db and the server config)."""

    def __init__(self, couch: aiocouch.CouchDB, target: CouchTarget, *, timeout_s: float) -> None:
        self.target = target
        self._couch = couch
        # aiocouch has no public accessor for its session; the feed, views and config calls
        # reuse it so that every CouchDB request shares one pool, auth and middleware.
        self._session: aiohttp.ClientSession = couch._server._http_session
        self._is_couchdb: bool | None = None  # learnt on first use (`is_couchdb`)
        self._detecting = asyncio.Lock()
        self._base = str(target.server).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self.db = aiocouch.Database(couch, target.db)
        self.vault = aiocouch.Database(couch, target.vault_db)
        self._node: str | None = None

    @classmethod
    def connect(
        cls, target: CouchTarget, *, timeout_s: float, ca_file: Path | None = None
    ) -> CouchClient:
        """A client with its own aiocouch session; close it with `close()`.

        An https server's certificate is verified against `ca_file` (PEM CA certificates)
        when given, else against the system's CAs.
        """
        middlewares: list[aiohttp.ClientMiddlewareType] = [couch_compat]
        if target.user:
            middlewares.append(basic_auth(target.user, target.password or ""))
        couch = aiocouch.CouchDB(
            str(target.server).rstrip("/"),
            middlewares=tuple(middlewares),
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s)),
            # Idle connections are dropped before servers drop them (pouchdb-server: 5 s);
            # reusing a connection the server closed fails the request.
            connector=aiohttp.TCPConnector(
                limit=64, keepalive_timeout=3.0, ssl=tls_verification(ca_file)
            ),
        )
        return cls(couch, target, timeout_s=timeout_s)

    async def close(self) -> None:
        await self._session.close()

    # -- plain HTTP -----------------------------------------------------------------------

    def _url(self, *segments: str) -> str:
        return self._base + "/" + "/".join(quote(s, safe="") for s in segments)

    async def _request_json(
        self,
        method: str,
        url: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        with mapped_errors(what):
            async with self._session.request(
                method,
                url,
                params=params,
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=client_timeout or self._timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    reason = ""
                    with contextlib.suppress(ValueError, AttributeError):
                        reason = json.loads(raw).get("reason", "")
                    raise _from_status(what, resp.status, reason)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RetryableError(f"{what}: CouchDB sent invalid JSON") from exc

    async def server_info(self) -> JsonDict:
        info: JsonDict = await self._request_json("GET", self._base + "/", "server info")
        return info

    async def db_info(self) -> JsonDict:
        info: JsonDict = await self._request_json("GET", self._url(self.target.db), "db info")
        return info

    # -- documents (aiocouch) -------------------------------------------------------------

    async def get(
        self, doc_id: str, *, db: aiocouch.Database | None = None, conflicts: bool = False
    ) -> JsonDict | None:
        """A document, or None if it does not exist (or was deleted).

        `conflicts=True` adds `_conflicts` when the copies read know of conflicting branches.
        """
        design = doc_id.startswith("_design/")
        if conflicts or design:
            # `_design%2Fname` is answered with a redirect to `_design/name` built from the
            # Host header with plain http: behind TLS (CHT's nginx) that leads nowhere.
            segments = ["_design", doc_id[len("_design/") :]] if design else [doc_id]
            url = self._url(db.id if db is not None else self.target.db, *segments)
            params = {"conflicts": "true"} if conflicts else None
            try:
                doc: JsonDict = await self._request_json("GET", url, f"get {doc_id}", params=params)
            except NotFoundError:
                return None
            return doc
        database = db or self.db
        try:
            with mapped_errors(f"get {doc_id}"):
                found = await database.get(doc_id)
        except NotFoundError:
            return None
        return dict(found._data) if found.exists else None

    async def get_many(self, doc_ids: Sequence[str]) -> dict[str, JsonDict]:
        """Current revisions of existing documents among `doc_ids` (one request)."""
        if not doc_ids:
            return {}
        found: dict[str, JsonDict] = {}
        with mapped_errors("get docs"):
            async for doc in self.db.docs(list(doc_ids), create=True):
                if doc.exists:
                    found[doc.id] = dict(doc._data)
        return found

    async def current_docs(self, doc_ids: Sequence[str]) -> dict[str, JsonDict]:
        """The current revision of each existing document among `doc_ids`, with `_conflicts`
        where the copies read know of conflicting branches (one `_all_docs` request)."""
        if not doc_ids:
            return {}
        body = await self._request_json(
            "POST",
            self._url(self.target.db, "_all_docs"),
            "get docs",
            params={"include_docs": "true", "conflicts": "true"},
            body={"keys": list(doc_ids)},
        )
        return {
            row["id"]: row["doc"]
            for row in body.get("rows", [])
            if isinstance(row.get("doc"), dict) and isinstance(row.get("id"), str)
        }

    async def leaves(self, doc_id: str) -> list[Leaf]:
        """Every leaf revision of a document, deleted ones included (`open_revs=all`).

        On a cluster CouchDB merges the revision trees of at least a read quorum of copies
        (`fabric_doc_open_revs`), so a revision written with quorum is always among the
        leaves or their ancestors. Plain `GET ?conflicts=true` gives no such promise: it
        returns one copy's view of the conflicts.
        """
        params = {"open_revs": "all", "revs": "true"}
        try:
            rows = await self._request_json(
                "GET", self._url(self.target.db, doc_id), f"leaves {doc_id}", params=params
            )
        except NotFoundError:
            return []
        if not isinstance(rows, list):
            raise RetryableError(f"leaves {doc_id}: CouchDB answered with an unexpected body")
        return _leaves_of(rows)

    async def leaves_many(self, doc_ids: Sequence[str]) -> dict[str, list[Leaf] | RetryableError]:
        """`leaves` of several documents in one `_bulk_get` (no `rev`: every leaf).

        CouchDB 3 answers it with `fabric:open_revs` over the batch, which like the single
        read merges the leaves of at least a read quorum of copies (`fabric_open_revs`: a
        document's answer counts towards R only when it adds no leaf to those merged). A
        document the copies could not answer for comes back as a RetryableError of its own.
        """
        body = await self._request_json(
            "POST",
            self._url(self.target.db, "_bulk_get"),
            "leaves",
            params={"revs": "true"},
            body={"docs": [{"id": doc_id} for doc_id in doc_ids]},
        )
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list):
            raise RetryableError("leaves: CouchDB answered _bulk_get with an unexpected body")
        found: dict[str, list[Leaf] | RetryableError] = {}
        for result in results:
            doc_id = result.get("id") if isinstance(result, dict) else None
            rows = result.get("docs") if isinstance(result, dict) else None
            if not isinstance(doc_id, str) or not isinstance(rows, list):
                continue
            errors = [row["error"] for row in rows if isinstance(row.get("error"), dict)]
            if errors and all(error.get("error") == "not_found" for error in errors):
                found[doc_id] = _leaves_of([row for row in rows if "ok" in row])
            elif errors:
                reason = errors[0].get("reason") or errors[0].get("error")
                found[doc_id] = RetryableError(f"leaves {doc_id}: {reason}")
            else:
                found[doc_id] = _leaves_of(rows)
        for doc_id in doc_ids:
            found.setdefault(doc_id, RetryableError(f"leaves {doc_id}: not in the answer"))
        return found

    async def filters_by_selector(self) -> bool:
        """Whether the server is Apache CouchDB (2+), whose `_changes` takes a `_selector`
        filter (pouchdb-server crashes on one)."""
        return await self.is_couchdb()

    async def is_couchdb(self) -> bool:
        """Whether the server is Apache CouchDB 2+ (not a server that speaks its API, such
        as pouchdb-server, whose `_bulk_get` without a revision returns only the winner)."""
        if self._is_couchdb is not None:
            return self._is_couchdb  # every claim's read asks: known after the first look
        async with self._detecting:  # concurrent callers share one look
            if self._is_couchdb is None:
                info = await self.server_info()
                version = str(info.get("version", ""))
                self._is_couchdb = (
                    info.get("couchdb") == "Welcome" and version[:1].isdigit() and version[0] >= "2"
                )
        return self._is_couchdb

    async def replica_count(self) -> int:
        """How many copies of each shard the database keeps (`cluster.n`; 1 if not a cluster)."""
        info = await self.db_info()
        cluster = info.get("cluster")
        n = cluster.get("n") if isinstance(cluster, dict) else None
        return n if isinstance(n, int) and n > 0 else 1

    async def bulk_write(self, docs: Sequence[JsonDict]) -> list[WriteResult]:
        """Write documents with `_bulk_docs`; conflicts come back per row, not raised.

        A written dict gets its new `_rev`. Plain HTTP rather than aiocouch's BulkOperation,
        which asserts (and so crashes the caller) on a response it does not expect, as a
        restarting server can send.
        """
        if not docs:
            return []
        rows = await self._request_json(
            "POST", self._url(self.target.db, "_bulk_docs"), "bulk write", body={"docs": list(docs)}
        )
        if not isinstance(rows, list) or len(rows) != len(docs):
            raise RetryableError("bulk write: CouchDB answered with an unexpected body")
        results = []
        for body, row in zip(docs, rows, strict=True):
            if not isinstance(row, dict) or row.get("id") != body["_id"]:
                raise RetryableError("bulk write: CouchDB answered rows out of order")
            result = WriteResult(
                id=row["id"],
                rev=row.get("rev"),
                error=row.get("error"),
                accepted=row.get("accepted") is True,
            )
            if result.ok:
                body["_rev"] = result.rev
            results.append(result)
        return results

    async def create(self, body: JsonDict) -> str:
        """Create a document with a chosen `_id`; ConflictError if that id exists."""
        doc = Document(self.db, body["_id"], data=body)
        with mapped_errors(f"create {body['_id']}"):
            await doc.save()
        return str(doc.rev)

    async def put_local(self, local_id: str, body: JsonDict) -> None:
        """Write a `_local/` doc, whatever its current revision.

        CouchDB 3 overwrites `_local` docs without checking `_rev`; pouchdb-server checks it.
        Reading the current rev first is correct on both.
        """
        doc_id = f"_local/{local_id}"
        current = await self.get(doc_id)
        data = dict(body)
        if current and "_rev" in current:
            data["_rev"] = current["_rev"]
        doc = Document(self.db, doc_id, data=data)
        with mapped_errors(f"write {doc_id}"):
            await doc.save()

    async def put(self, body: JsonDict) -> None:
        """Create or overwrite a small document of our own (last writer wins)."""
        for _ in range(3):
            current = await self.get(body["_id"])
            data = {k: v for k, v in body.items() if k != "_rev"}
            if current is not None:
                data["_rev"] = current["_rev"]
            [result] = await self.bulk_write([data])
            if not result.conflict:
                if not result.ok:
                    raise RetryableError(f"write {body['_id']}: {result.error}")
                return
        raise ConflictError(f"write {body['_id']}: kept conflicting")

    async def count_prefix(self, prefix: str, *, cap: int, page: int = 10_000) -> int:
        """How many documents have an `_id` starting with `prefix` (ids only, a page at a
        time), counting up to `cap`."""
        count, start, skip = 0, json.dumps(prefix), 0
        while count < cap:
            limit = min(page, cap - count)
            params = {
                "startkey": start,
                "endkey": json.dumps(prefix + "\ufff0"),
                "limit": str(limit),
                "skip": str(skip),
            }
            body = await self._request_json(
                "GET", self._url(self.target.db, "_all_docs"), "count docs", params=params
            )
            rows = body.get("rows") or []
            count += len(rows)
            if len(rows) < limit:
                break
            start, skip = json.dumps(rows[-1]["id"]), 1
        return count

    async def docs_with_prefix(self, prefix: str) -> list[JsonDict]:
        """Documents whose `_id` starts with `prefix` (one `_all_docs` range read)."""
        params = {
            "startkey": json.dumps(prefix),
            "endkey": json.dumps(prefix + "\ufff0"),
            "include_docs": "true",
        }
        body = await self._request_json(
            "GET", self._url(self.target.db, "_all_docs"), "list docs", params=params
        )
        return [row["doc"] for row in body.get("rows", []) if isinstance(row.get("doc"), dict)]

    # -- changes feed ---------------------------------------------------------------------

    async def changes(
        self,
        since: Any,
        *,
        limit: int,
        heartbeat_s: float,
        longpoll: bool = True,
        include_docs: bool = True,
        all_leaves: bool = False,
        selector: JsonDict | None = None,
    ) -> ChangesPage:
        """One `_changes` request: returns at once if changes are waiting, else long-polls.

        Heartbeats keep the connection alive while it waits; a silent connection for two
        heartbeat periods counts as dead (retryable). CouchDB 3 (like pouchdb-server)
        ignores the long poll's `timeout` while it sends heartbeats, so on a quiet database
        the request would last until the next change: it is ended here after `timeout`
        and answered as a page without changes (the position does not move).

        `all_leaves` lists every leaf revision of a row (`style=all_docs`: more than one means
        conflicting branches); `selector` lets CouchDB 3 drop the rows whose document does not
        match (`filter=_selector`, which crashes pouchdb-server: never send it there).
        """
        # `conflicts=true`: a document with conflicting branches shows `_conflicts` (this
        # node's view of them), so that the daemon resolves the ones it caused.
        params = {
            "limit": str(limit),
            "style": "all_docs" if all_leaves else "main_only",
            "conflicts": "true",
        }
        if since is not None:
            params["since"] = since if isinstance(since, str) else json.dumps(since)
        if include_docs:
            params["include_docs"] = "true"
        if longpoll:
            heartbeat_ms = max(1000, int(heartbeat_s * 1000))
            params.update(
                feed="longpoll", heartbeat=str(heartbeat_ms), timeout=str(heartbeat_ms * 6)
            )
        if selector is not None:
            params["filter"] = "_selector"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._timeout.sock_connect, sock_read=2 * heartbeat_s + 5
        )
        request = self._request_json(
            "POST" if selector is not None else "GET",
            self._url(self.target.db, "_changes"),
            "changes feed",
            params=params,
            body={"selector": selector} if selector is not None else None,
            client_timeout=timeout,
        )
        if not longpoll:
            body = await request
        else:
            try:
                async with asyncio.timeout(max(1.0, heartbeat_s) * 6 + 1.0):
                    body = await request
            except TimeoutError:
                return ChangesPage(results=[], last_seq=since, pending=None)
        pending = body.get("pending")
        return ChangesPage(
            results=body.get("results") or [],
            last_seq=body.get("last_seq"),
            pending=pending if isinstance(pending, int) and not isinstance(pending, bool) else None,
        )

    # -- views ----------------------------------------------------------------------------

    async def has_view(self, ddoc: str, view: str) -> bool:
        """True if `_design/{ddoc}` defines `view` (checked before querying it)."""
        design = await self.get(f"_design/{ddoc}")
        views = design.get("views") if design else None
        return isinstance(views, dict) and view in views

    async def view(
        self, ddoc: str, view: str, *, keys: Sequence[Any] | None = None, **params: Any
    ) -> list[JsonDict]:
        """Rows of a view query; parameters are encoded as CouchDB expects.

        Keys are JSON; document ids (`startkey_docid`, `endkey_docid`) go raw, as CouchDB 3
        reads them.
        """
        query = {k: v if k in _RAW_VIEW_PARAMS else json.dumps(v) for k, v in params.items()}
        url = self._url(self.target.db, "_design", ddoc, "_view", view)
        what = f"view {ddoc}/{view}"
        if keys is None:
            body = await self._request_json("GET", url, what, params=query)
        else:
            body = await self._request_json(
                "POST", url, what, params=query, body={"keys": list(keys)}
            )
        rows: list[JsonDict] = body.get("rows") or []
        return rows

    async def view_pages(
        self, ddoc: str, view: str, start: Any, end: Any, *, page_size: int = 200
    ) -> AsyncIterator[list[JsonDict]]:
        """Every row of a key range (with its doc), a page at a time.

        Pages move on by key plus `skip` within the last key: views like CHT's
        `gateway_messages_by_state` give thousands of rows one key, and `startkey_docid`,
        CouchDB's way past them, is ignored by pouchdb-server.
        """
        startkey, skip = start, 0
        while True:
            rows = await self.view(
                ddoc, view, startkey=startkey, endkey=end, include_docs=True,
                reduce=False, limit=page_size, skip=skip,
            )  # fmt: skip
            if rows:
                yield rows
            if len(rows) < page_size:
                return
            last = rows[-1].get("key")
            trailing = 0
            for row in reversed(rows):
                if row.get("key") != last:
                    break
                trailing += 1
            if trailing == len(rows) and last == startkey:
                skip += trailing  # the whole page was the key we started from
            else:
                startkey, skip = last, trailing

    async def scan_docs(self, *, page_size: int = 500) -> AsyncIterator[list[JsonDict]]:
        """Every document in the db, a page at a time (design docs left out)."""
        start: str | None = None
        while True:
            params: dict[str, str] = {"include_docs": "true", "limit": str(page_size + 1)}
            if start is not None:
                params["startkey"] = json.dumps(start)
            body = await self._request_json(
                "GET", self._url(self.target.db, "_all_docs"), "scan docs", params=params
            )
            rows = body.get("rows") or []
            page = rows[:page_size]
            docs = [
                row["doc"]
                for row in page
                if isinstance(row.get("doc"), dict) and not row["id"].startswith("_design/")
            ]
            if docs:
                yield docs
            if len(rows) <= page_size:
                return
            start = rows[page_size]["id"]

    # -- server config and credentials -----------------------------------------------------

    async def node_name(self) -> str:
        """This server's node name, from `/_membership` (portable across CouchDB 3 and
        pouchdb-server, unlike `_node/_local`)."""
        if self._node is None:
            body = await self._request_json("GET", self._base + "/_membership", "membership")
            nodes = body.get("all_nodes") or []
            if not nodes:
                raise RetryableError("membership: no nodes listed")
            self._node = str(nodes[0])
        return self._node

    async def config_value(self, section: str, key: str) -> str | None:
        """A server config value (`/_node/{node}/_config/{section}/{key}`), None if unset."""
        node = await self.node_name()
        url = self._url("_node", node, "_config", section, key)
        try:
            value = await self._request_json("GET", url, f"config {section}/{key}")
        except NotFoundError:
            return None
        return value if isinstance(value, str) else None

    async def vault_password(self, key: str) -> str | None:
        """The encrypted `password` of CHT 4.x vault credential `key`, None if absent."""
        doc = await self.get(f"credential:{key}", db=self.vault)
        if doc is None:
            return None
        password = doc.get("password")
        return password if isinstance(password, str) and password else None


#: A request of at least this many documents means a burst is under way.
BURST_FROM = 8
#: Event-loop turns for a write's answer to reach the code that wrote it (`BulkWriter.settle`).
SETTLE_TURNS = 4


@dataclass(slots=True)
class _Queued:
    doc: JsonDict
    future: asyncio.Future[WriteResult]
    lazy: bool
    at: float  # monotonic time it was queued


class BulkWriter:
    """Group commit for `_bulk_docs`: concurrent writers share one request.

    A caller waits for its own row. While a request is in flight, new writes accumulate
    and go together in the next one, so batching grows with load and costs nothing when
    idle. During a burst (the last request carried BURST_FROM documents or more) the next
    one waits `linger_s` more to grow: CouchDB 3 spends about 15 ms of CPU on a `_bulk_docs`
    request whatever it carries (bench/RESULTS.md), so fewer, bigger requests leave it more
    for the documents. A lone write never waits.

    A *lazy* write (`lazy=True`: one no message waits for, such as a write-back after the
    POST or a status update) does not start a request of its own for up to `lazy_s`: it
    rides along with the next urgent write (a claim, an incoming report), or goes when it has
    waited that long.
    """

    def __init__(
        self,
        client: CouchClient,
        *,
        max_batch: int = 500,
        linger_s: float = 0.03,
        lazy_s: float = 0.1,
        on_request: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._lazy_s = lazy_s
        self._last_batch = 0
        self._last_start = 0.0  # monotonic time the last request started
        self._queue: list[_Queued] = []
        self._urgent = 0  # urgent writes in the queue
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None
        self._on_request = on_request  # documents in each request (metrics)
        self.requests = 0  # bulk requests made (for tests and benchmarks)
        self._in_flight: frozenset[str] = frozenset()  # ids in the request under way
        self._landed = asyncio.Event()  # set while no request is under way
        self._landed.set()

    async def write(self, doc: JsonDict, *, lazy: bool = False) -> WriteResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WriteResult] = loop.create_future()
        self._queue.append(_Queued(doc, future, lazy, time.monotonic()))
        if not lazy:
            self._urgent += 1
            self._kick()
        elif not self._flushing and self._timer is None:
            self._timer = loop.call_later(self._lazy_s, self._kick)
        return await future

    def writing(self, doc_id: str) -> bool:
        """Whether a write of `doc_id` is in the request under way."""
        return doc_id in self._in_flight

    async def settle(self, doc_ids: Iterable[str]) -> bool:
        """Wait until no write of these documents is under way and its writers have heard
        the answer (the changes feed can show a revision before its writer's request is
        answered). Returns whether there was one to wait for."""
        if self._in_flight.isdisjoint(doc_ids):
            return False
        await self._landed.wait()
        # The answer reaches each writer through a future, then a gather: a few loop turns.
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
        return True

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush(), name="bulk-writer")
        task.add_done_callback(_retrieve)

    def _due(self) -> bool:
        """Whether to send now: an urgent write waits, or the oldest lazy one is due."""
        return bool(self._queue) and (
            self._urgent > 0 or time.monotonic() - self._queue[0].at >= self._lazy_s
        )

    async def _flush(self) -> None:
        try:
            while self._due():
                if self._linger_s > 0 and self._last_batch >= BURST_FROM:
                    # Requests start at most every `linger_s`: after a long one, whatever
                    # came meanwhile goes at once.
                    wait = self._last_start + self._linger_s - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                # Two writes of one doc can't share a request: the second would conflict
                # with the first. Keep the first and push the rest to the next round.
                seen: set[str] = set()
                now: list[_Queued] = []
                later: list[_Queued] = []
                for item in batch:
                    (later if item.doc["_id"] in seen else now).append(item)
                    seen.add(item.doc["_id"])
                self._queue = later + self._queue
                self._urgent -= sum(1 for item in now if not item.lazy)
                self._last_batch = len(now)
                self.requests += 1
                if self._on_request is not None:
                    self._on_request(len(now))
                self._last_start = time.monotonic()
                self._in_flight = frozenset(item.doc["_id"] for item in now)
                self._landed.clear()
                try:
                    rows = await self._client.bulk_write([item.doc for item in now])
                except BaseException as exc:
                    for item in now:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                finally:
                    self._in_flight = frozenset()
                    self._landed.set()
                by_id = {row.id: row for row in rows}
                for item in now:
                    row = by_id.get(item.doc["_id"]) or WriteResult(
                        item.doc["_id"], None, "missing_row"
                    )
                    if not item.future.done():
                        item.future.set_result(row)
        finally:
            self._flushing = False
            if self._queue and self._timer is None:
                # Lazy writes left: they go when the oldest is due (or with an urgent one).
                wait = self._queue[0].at + self._lazy_s - time.monotonic()
                self._timer = asyncio.get_running_loop().call_later(max(0.0, wait), self._kick)


class GroupReader(Generic[T]):
    """Concurrent reads of single documents share one request (`fetch` of many ids).

    The first read goes at once; reads that come while a request is under way go together
    in the next. In a burst a whole batch of claims is answered at once and each then reads
    its document; one request for all of them costs CouchDB a fraction of one each.
    `copy` gives each extra caller of the same id its own value to change.
    """

    def __init__(
        self,
        fetch: Callable[[list[str]], Awaitable[Mapping[str, T | RetryableError]]],
        *,
        copy: Callable[[T], T],
        max_batch: int = 500,
    ) -> None:
        self._fetch = fetch
        self._copy = copy
        self._max_batch = max_batch
        self._queue: dict[str, list[asyncio.Future[T]]] = {}
        self._reading = False
        self.requests = 0  # for tests and benchmarks

    async def read(self, doc_id: str) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.setdefault(doc_id, []).append(future)
        if not self._reading:
            self._reading = True
            task = asyncio.get_running_loop().create_task(self._read(), name="group-reader")
            task.add_done_callback(_retrieve)
        return await future

    async def _read(self) -> None:
        try:
            while self._queue:
                ids = list(itertools.islice(self._queue, self._max_batch))
                waiting = {doc_id: self._queue.pop(doc_id) for doc_id in ids}
                self.requests += 1
                try:
                    found = await self._fetch(ids)
                except BaseException as exc:
                    for futures in waiting.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for doc_id, futures in waiting.items():
                    answer = found.get(doc_id, RetryableError(f"{doc_id}: not in the answer"))
                    for n, future in enumerate(futures):
                        if future.done():
                            continue
                        if isinstance(answer, RetryableError):
                            future.set_exception(answer)
                        else:
                            future.set_result(answer if n == 0 else self._copy(answer))
        finally:
            self._reading = False


class LeafReader:
    """`CouchClient.leaves` for concurrent callers (a claim's H2 read on a cluster, see
    `claims.py`): one `_bulk_get` for all of them on Apache CouchDB; on a server whose
    `_bulk_get` gives only the winning leaf (pouchdb-server), one read each."""

    def __init__(self, client: CouchClient) -> None:
        self._client = client
        self._group = GroupReader(
            client.leaves_many,
            copy=lambda leaves: [dataclasses.replace(leaf, doc=clone(leaf.doc)) for leaf in leaves],
        )

    @property
    def requests(self) -> int:
        return self._group.requests

    async def leaves(self, doc_id: str) -> list[Leaf]:
        if not await self._client.is_couchdb():
            return await self._client.leaves(doc_id)
        return await self._group.read(doc_id)


class DocReader:
    """`CouchClient.get(doc_id, conflicts=True)` for concurrent callers: one `_all_docs`
    read on Apache CouchDB (`current_docs`: CouchDB 3 opens each key as a single GET does,
    `fabric:open_doc`, a read quorum of copies on a cluster, with `_conflicts`); elsewhere
    one GET each, as before. None: no such document, or deleted."""

    def __init__(self, client: CouchClient) -> None:
        self._client = client

        async def fetch(ids: list[str]) -> dict[str, JsonDict | RetryableError | None]:
            docs = await client.current_docs(ids)
            return {doc_id: docs.get(doc_id) for doc_id in ids}

        self._group: GroupReader[JsonDict | None] = GroupReader(
            fetch, copy=lambda doc: None if doc is None else clone(doc)
        )

    @property
    def requests(self) -> int:
        return self._group.requests

    async def get(self, doc_id: str) -> JsonDict | None:
        if not await self._client.is_couchdb():
            return await self._client.get(doc_id, conflicts=True)
        return await self._group.read(doc_id)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
