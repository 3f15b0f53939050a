"""The `_changes` follower and its checkpoint.

The feed is read in long-poll pages (`limit` rows, `include_docs`), which gives exact
`last_seq` values, natural back-pressure and the same behaviour on CouchDB 3 and on the test
server. Sequences are opaque: stored and sent back verbatim, never parsed or compared.

The checkpoint (a `_local/` doc, per instance) only moves past a page once every change in it
and before it is handled: each piece of work handed out takes a *hold* on its page and
releases it when done.

Documents come with the feed (`include_docs`): measured on CouchDB 3.4.3, reading them
there costs the server about 0.08 ms a row, a third of reading them afterwards with
`_bulk_get` and a seventh of `_all_docs?keys` (bench/RESULTS.md). Revisions this daemon wrote
itself are recognised and skipped by whoever consumes the rows.
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
from .client import ChangesPage, CouchClient, JsonDict, NotFoundError

Release = Callable[[], None]
#: A page of this many rows (but not a full one) means a burst of writes under way ...
BURST_ROWS = 10
#: ... and the next request waits this long, so that it carries more.
BURST_PAUSE_S = 0.02


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
    ) -> None:
        self._couch = couch
        self._handle = handle
        self.selector = selector  # set when the server filters by selector (CouchDB 3)
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

    async def _read_page(self) -> ChangesPage:
        """A page of changes with their documents (`doc`)."""
        return await self._couch.changes(
            self.since,
            limit=self._batch,
            heartbeat_s=self._heartbeat_s,
            selector=self.selector,
        )

    async def _fetch_once(self, stop: asyncio.Event) -> Any:
        request = asyncio.ensure_future(self._read_page())
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
