"""The `_changes` follower and its checkpoint.

The feed is read in long-poll pages (`limit` rows, `include_docs`), which gives exact
`last_seq` values, natural back-pressure and the same behaviour on CouchDB 3 and on the test
server. Sequences are opaque: stored and sent back verbatim, never parsed or compared.

The checkpoint (a `_local/` doc, per instance) only moves past a page once every change in it
and before it is handled: each piece of work handed out takes a *hold* on its page and
releases it when done.

Documents come with the feed (`include_docs`): measured on CouchDB 3.4.3, reading them
there costs the server about 0.1 ms a row, a third of reading them afterwards with
`_bulk_get` and a seventh of `_all_docs?keys` (bench/RESULTS.md). Revisions this daemon wrote
itself are recognised and skipped by whoever consumes the rows.

*Lean pages.* While the daemon works through a burst, most rows are its own writes coming
back (each message's claim and write-back), whose documents it already knows. After a page
that was at least LEAN_SHARE its own (and at least BURST_ROWS long), the next page is read
without documents (`style=all_docs`, every leaf revision, about 0.05 ms a row on CouchDB 3):
a row whose only leaf is a revision of ours is dropped, and the documents of the others
(a new message, another writer's revision, a document with conflicting branches) are read in
one `_all_docs` request, with `_conflicts`. That read returns each document's current
revision, which may be newer than the row's: handling it early is what a later row would do
anyway. Rows are handled in feed order either way; only the cost differs. A lean page is
read without the feed's selector: to match one, CouchDB 3 opens every document, which costs
it 0.18-0.20 ms a row instead of 0.06 (measured on 3.4.3); the few rows of documents the
selector would have dropped are read with the others and skipped by the consumer, as on a
server without selectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..errors import AuthError, GatewayError, RetryableError
from ..logs import get_logger
from ..metrics import Metrics
from ..retry import Backoff, sleep_or_wake
from .client import BulkWriter, ChangesPage, CouchClient, JsonDict, NotFoundError

Release = Callable[[], None]
#: A page of this many rows (but not a full one) means a burst of writes under way ...
BURST_ROWS = 10
#: ... and the next request waits this long, so that it carries more.
BURST_PAUSE_S = 0.02
#: A page at least this much of our own writes makes the next one lean (see the docstring).
LEAN_SHARE = 0.75

#: Whether a revision of a document is one this process wrote and already knows.
OwnRevision = Callable[[str, str], bool]


class Page:
    """One page of the feed: its position, and the work still outstanding for it."""

    __slots__ = ("_tracker", "outstanding", "sealed", "seq")

    def __init__(self, tracker: CheckpointTracker, seq: Any) -> None:
        self._tracker = tracker
        self.seq = seq
        self.outstanding = 0
        self.sealed = False

    def hold(self) -> Release:
        """Take a hold on this page; call the returned function (once) when handled."""
        self.outstanding += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.outstanding -= 1
            self._tracker.advance()

        return release

    def seal(self) -> None:
        """Every row of the page has been looked at."""
        self.sealed = True
        self._tracker.advance()


class CheckpointTracker:
    """The furthest feed position before which everything is handled."""

    def __init__(self, start: Any) -> None:
        self.safe = start
        self._pages: deque[Page] = deque()

    def begin(self, seq: Any) -> Page:
        page = Page(self, seq)
        self._pages.append(page)
        return page

    def advance(self) -> None:
        while self._pages and self._pages[0].sealed and self._pages[0].outstanding == 0:
            self.safe = self._pages.popleft().seq

    @property
    def pending_pages(self) -> int:
        return len(self._pages)


class FatalError(GatewayError):
    """A problem the daemon cannot get past by waiting; `exit_code` for the process."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ChangesFollower:
    """Follows the medic db's changes and hands each row to `handle(row, page)`."""

    def __init__(
        self,
        couch: CouchClient,
        handle: Callable[[JsonDict, Page], None],
        *,
        checkpoint_id: str,
        batch: int,
        heartbeat_s: float,
        checkpoint_interval_s: float,
        retry_initial_s: float,
        retry_max_s: float,
        metrics: Metrics,
        selector: JsonDict | None = None,
        own_revision: OwnRevision | None = None,
        writer: BulkWriter | None = None,
    ) -> None:
        self._couch = couch
        self._handle = handle
        self.selector = selector  # set when the server filters by selector (CouchDB 3)
        self._own_revision = own_revision  # None: every page comes with its documents
        self._writer = writer  # whose requests under way may be the rows' revisions
        self._lean = False  # the next page without documents
        self.lean_pages = 0
        self.lean_reads = 0  # documents read for lean pages
        self.checkpoint_id = checkpoint_id
        self._batch = batch
        self._heartbeat_s = heartbeat_s
        self._checkpoint_interval_s = checkpoint_interval_s
        self._backoff = Backoff(initial=retry_initial_s, maximum=retry_max_s)
        self._metrics = metrics
        self._log = get_logger(component="feed")
        self.since: Any = None
        self.tracker = CheckpointTracker(None)
        self.saved: Any = None
        self.saved_at: float | None = None
        self.resumed = False  # started from a stored checkpoint
        self.caught_up_at: float | None = None  # monotonic time the feed last reached the tip
        self._fetch_started: float | None = None
        self.live = False  # the last request succeeded
        self.problem: str | None = None
        self.rows = 0

    async def load_checkpoint(self) -> Any:
        """Read the stored position; None (start of the feed) if there is none."""
        doc = await self._couch.get(f"_local/{self.checkpoint_id}")
        seq = doc.get("seq") if doc else None
        self.since = seq
        self.saved = seq
        self.tracker = CheckpointTracker(seq)
        self.resumed = seq is not None
        self._log.info("checkpoint_loaded", since=_short(seq), resumed=self.resumed)
        return seq

    async def save_checkpoint(self) -> None:
        """Store the safe position if it moved since the last save."""
        safe = self.tracker.safe
        if safe is None or safe == self.saved:
            return
        await self._couch.put_local(
            self.checkpoint_id,
            {"seq": safe, "saved_at": datetime.now(UTC).isoformat(timespec="milliseconds")},
        )
        self.saved = safe
        self.saved_at = time.monotonic()
        self._log.debug("checkpoint_saved", since=_short(safe))

    async def _checkpointer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep_or_wake(stop, self._checkpoint_interval_s)
            try:
                await self.save_checkpoint()
            except GatewayError as exc:
                self._log.warning("checkpoint_save_retrying", error=str(exc))
            if self.saved_at is not None:
                self._metrics.checkpoint_age.set(time.monotonic() - self.saved_at)
            if self.caught_up_at is not None:
                self._metrics.feed_lag.set(time.monotonic() - self.caught_up_at)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the feed until `stop` is set. Raises FatalError on refused credentials."""
        saver = asyncio.create_task(self._checkpointer(stop), name="checkpointer")
        try:
            await self._follow(stop)
        finally:
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver

    def stalled_s(self) -> float:
        """How long the current feed request has been waiting (0 between requests).

        A request ends within its read timeout, so a long stall means a stuck loop: the
        systemd watchdog stops being fed and systemd restarts the daemon.
        """
        return 0.0 if self._fetch_started is None else time.monotonic() - self._fetch_started

    async def _fetch(self, stop: asyncio.Event) -> Any:
        """One feed request, abandoned as soon as `stop` is set."""
        self._fetch_started = time.monotonic()
        try:
            return await self._fetch_once(stop)
        finally:
            self._fetch_started = None

    async def read_page(self) -> ChangesPage:
        """A page of changes with their documents (`doc`), but for our own revisions on a
        lean page."""
        lean = self._lean
        page = await self._couch.changes(
            self.since,
            limit=self._batch,
            heartbeat_s=self._heartbeat_s,
            selector=None if lean else self.selector,
            include_docs=not lean,
            all_leaves=lean,
        )
        own = await self._fill(page) if lean else self._own_rows(page)
        rows = len(page.results)
        self._lean = rows >= BURST_ROWS and own >= LEAN_SHARE * rows
        return page

    def _own_rows(self, page: ChangesPage) -> int:
        """Rows of a page read with documents that show a revision of ours."""
        if self._own_revision is None:
            return 0
        own = 0
        for row in page.results:
            doc = row.get("doc")
            if isinstance(doc, dict) and isinstance(rev := doc.get("_rev"), str):
                own += self._own_revision(str(row.get("id")), rev)
        return own

    def _sole_own_leaf(self, row: JsonDict) -> bool:
        leaves = row.get("changes")
        if self._own_revision is None or not isinstance(leaves, list) or len(leaves) != 1:
            return False  # more than one leaf: conflicting branches, or deleted ones
        rev = leaves[0].get("rev") if isinstance(leaves[0], dict) else None
        return isinstance(rev, str) and self._own_revision(str(row.get("id")), rev)

    async def _fill(self, page: ChangesPage) -> int:
        """Give a lean page's rows their documents, but for our own revisions; returns how
        many rows were ours."""
        self.lean_pages += 1
        rows = [row for row in page.results if isinstance(row.get("id"), str)]
        others = [row for row in rows if not row.get("deleted") and not self._sole_own_leaf(row)]
        # A revision can be on the feed before our request that wrote it is answered.
        if (
            others
            and self._writer is not None
            and await self._writer.settle(row["id"] for row in others)
        ):
            others = [row for row in others if not self._sole_own_leaf(row)]
        if others:
            docs = await self._couch.current_docs(list(dict.fromkeys(r["id"] for r in others)))
            self.lean_reads += len(docs)
            for row in others:
                doc = docs.get(row["id"])
                if doc is not None:
                    row["doc"] = doc
        return sum(1 for row in rows if self._sole_own_leaf(row))

    async def _fetch_once(self, stop: asyncio.Event) -> Any:
        request = asyncio.ensure_future(self.read_page())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({request, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, GatewayError):
                await request
            return None
        return request.result()

    async def _follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                page = await self._fetch(stop)
            except AuthError as exc:
                self.live, self.problem = False, str(exc)
                raise FatalError(
                    f"{exc}: check the user and password in COUCH_URL (a CouchDB admin)", 78
                ) from exc
            except (RetryableError, NotFoundError) as exc:
                self.live = False
                self.problem = (
                    f"database {self._couch.target.db} not found"
                    if isinstance(exc, NotFoundError)
                    else str(exc)
                )
                delay = self._backoff.next_delay()
                self._log.warning(
                    "changes_feed_reconnecting",
                    error=self.problem,
                    attempt=self._backoff.attempt,
                    delay_s=round(delay, 2),
                )
                await sleep_or_wake(stop, delay)
                continue
            if page is None:
                break
            if not self.live:
                self._log.info("changes_feed_connected", since=_short(self.since))
            self._backoff.reset()
            self.live, self.problem = True, None
            tracked = self.tracker.begin(page.last_seq)
            for row in page.results:
                try:
                    self._handle(row, tracked)
                except Exception:
                    # One bad document must never stop the feed.
                    self._log.exception("change_skipped", doc_id=row.get("id"))
            tracked.seal()
            self.rows += len(page.results)
            if page.last_seq is not None:
                self.since = page.last_seq
            if len(page.results) < self._batch:
                self.caught_up_at = time.monotonic()
                self._metrics.feed_lag.set(0)
                if len(page.results) >= BURST_ROWS:
                    # A burst of writes is under way: let the next page gather more rows.
                    # Each `_changes` request costs CouchDB 3 about 12 ms of CPU.
                    await sleep_or_wake(stop, BURST_PAUSE_S)


def _short(seq: Any) -> str | None:
    """A sequence for logs: CouchDB's are long opaque strings."""
    if seq is None:
        return None
    text = str(seq)
    return text if len(text) <= 24 else text[:20] + "…"
