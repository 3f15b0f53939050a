"""The gateway's workers and their life cycle: feed → dispatcher → sender / tracked index;
the follower of RapidPro's message log (status, mirroring, recovery).

Start-up (in the background, so the listener and READY=1 never wait for CouchDB): load app
settings and credentials, load the checkpoint, then follow the feed, send and poll. When the
feed resumes from a checkpoint, a *sweep* finds the work it will not show again (pending
messages parked after a failure, claims of a crashed run, in-flight messages to poll): CHT's
own views when present, else a streamed scan. A sweep also runs whenever sending is switched
back on.

Shutdown: stop reading the feed, let sends in flight finish and write back (bounded), save
the checkpoint, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .backlog import UnsentBacklog
from .cht.state import IN_FLIGHT_STATES
from .chtconfig import TRANSLATIONS_PREFIX, ChtConfig
from .claims import Identity
from .config import Settings
from .conflicts import INCOMING_PREFIX, ConflictResolver
from .couch.changes import ChangesFollower, FatalError, Page
from .couch.client import BulkWriter, CouchClient, JsonDict
from .errors import AuthError, GatewayError
from .incoming import IncomingStore
from .ledger import PREFIX as BUDGET_PREFIX
from .ledger import Ledger
from .logs import get_logger
from .messagelog import MessageLog
from .metrics import Metrics
from .outbound import OutgoingSender
from .rapidpro.client import RapidProClient
from .replicas import PREFIX as REPLICA_PREFIX
from .replicas import Presence
from .retry import Backoff, sleep_or_wake
from .tracking import OwnContent, TrackedIndex


class Dispatcher:
    """Routes each document (from the feed or a sweep) to whoever must act on it."""

    def __init__(
        self,
        cht: ChtConfig,
        sender: OutgoingSender,
        index: TrackedIndex,
        presence: Presence,
        own: OwnContent,
        ledger: Ledger,
        backlog: UnsentBacklog,
    ) -> None:
        self._ledger = ledger
        self._presence = presence
        self._cht = cht
        self._sender = sender
        self._index = index
        self._own = own
        self._backlog = backlog

    def handle_row(self, row: JsonDict, page: Page) -> None:
        doc_id = row.get("id")
        if not isinstance(doc_id, str):
            return
        if row.get("deleted"):
            self._index.remove_doc(doc_id, time.time())
            self._own.remove_doc(doc_id)
            self._backlog.remove_doc(doc_id)
            if doc_id == "settings":
                self._cht.apply_settings_doc({"_deleted": True})
            return
        doc = row.get("doc")
        if isinstance(doc, dict):
            self.handle_doc(doc, page.hold)

    def handle_doc(self, doc: JsonDict, hold: Callable[[], Callable[[], None]] | None) -> None:
        doc_id = doc.get("_id")
        if isinstance(doc_id, str) and ConflictResolver.conflicted(doc) and _ours(doc):
            self._sender.resolve_soon(doc_id)
        if doc_id == "settings":
            self._cht.apply_settings_doc(doc)
            return
        if not isinstance(doc_id, str) or doc_id.startswith("_design/"):
            return
        if doc_id.startswith(REPLICA_PREFIX):
            self._presence.handle_doc(doc)
            return
        if doc_id.startswith(BUDGET_PREFIX):
            self._ledger.handle_doc(doc)
            return
        if doc_id.startswith(TRANSLATIONS_PREFIX):
            self._cht.apply_translations_doc(doc)
            return
        if "tasks" not in doc and "scheduled_tasks" not in doc:
            self._backlog.remove_doc(doc_id)
            return
        self._index.update_doc(doc, time.time())
        self._own.update_doc(doc, self._cht.app_settings)
        if not self._sender.is_own_revision(doc_id, doc.get("_rev")):
            # Not for a revision of ours: the backlog learnt what it says when it was written
            # (a claim leaves a message unsent, a write-back is told directly). A claim can
            # come on the feed after the write-back that followed it: taking it would count
            # the message unsent again, and the write-back may come on a lean page, skipped.
            self._backlog.update_doc(doc)
        release = hold() if hold else None
        if not self._sender.offer(doc, release) and release:
            release()


def feed_selector() -> JsonDict:
    """The documents the dispatcher acts on, as a `_selector` for the changes feed of a
    server that filters (Apache CouchDB 2+; never pouchdb-server, which crashes on one).

    Everything else (contacts, reports without messages, design documents) the dispatcher
    only skips; on a busy CHT instance that is most of the feed, and CouchDB then neither
    sends it nor the daemon decodes it. Deleted documents always come (a deletion ends
    tracking); so does every document of ours, by prefix, and anything with messages.
    """
    prefixes = (REPLICA_PREFIX, BUDGET_PREFIX, TRANSLATIONS_PREFIX, INCOMING_PREFIX)
    return {
        "$or": [
            {"_deleted": True},
            {"tasks": {"$exists": True}},
            {"scheduled_tasks": {"$exists": True}},
            {"_id": "settings"},
            *({"_id": {"$gte": prefix, "$lt": prefix + "\ufff0"}} for prefix in prefixes),
        ]
    }


def _ours(doc: JsonDict) -> bool:
    """Documents the daemon writes, whose conflicts it resolves (CHT's own it leaves)."""
    doc_id = str(doc.get("_id", ""))
    return (
        "tasks" in doc
        or "scheduled_tasks" in doc
        or doc_id.startswith((REPLICA_PREFIX, INCOMING_PREFIX, BUDGET_PREFIX))
    )


class Sweeper:
    """Finds pending, claimed and in-flight tasks without the feed's help."""

    PAGE = 200

    def __init__(self, couch: CouchClient, dispatcher: Dispatcher) -> None:
        self._couch = couch
        self._dispatcher = dispatcher
        self._log = get_logger(component="sweep")

    async def sweep(self) -> dict[str, Any]:
        started = time.monotonic()
        docs = 0
        has_pending_view = await self._couch.has_view("medic", "messages_by_state")
        has_flight_view = await self._couch.has_view("medic-sms", "gateway_messages_by_state")
        if has_pending_view and has_flight_view:
            method = "views"
            # `null` first: CHT's own query starts at 0 and so never sends tasks whose
            # `due` does not parse (spec §8.15); we do.
            docs += await self._view_docs(
                "medic",
                "messages_by_state",
                ["pending-or-forwarded", None],
                ["pending-or-forwarded", "\ufff0"],
            )
            for state in sorted(IN_FLIGHT_STATES):
                docs += await self._view_docs(
                    "medic-sms", "gateway_messages_by_state", state, state
                )
        else:
            method = "scan"
            async for page in self._couch.scan_docs():
                for doc in page:
                    self._dispatcher.handle_doc(doc, None)
                docs += len(page)
        report = {
            "method": method,
            "docs": docs,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        self._log.info("sweep_completed", **report)
        return report

    async def _view_docs(self, ddoc: str, view: str, start: Any, end: Any) -> int:
        """Hand every document a view range emits to the dispatcher, a page at a time."""
        seen = 0
        last_id: str | None = None
        async for rows in self._couch.view_pages(ddoc, view, start, end, page_size=self.PAGE):
            for row in rows:
                doc = row.get("doc")
                # A document emits a row per message: hand it over once per run of rows.
                if isinstance(doc, dict) and row.get("id") != last_id:
                    self._dispatcher.handle_doc(doc, None)
                    seen += 1
                last_id = row.get("id")
        return seen


class Gateway:
    """Owns the workers. `start()` returns at once; `stop()` drains in order."""

    def __init__(
        self,
        *,
        settings: Settings,
        couch: CouchClient,
        rapidpro: RapidProClient,
        metrics: Metrics,
        on_fatal: Callable[[int], None],
        identity: Identity | None = None,
    ) -> None:
        self.settings = settings
        self.couch = couch
        self.rapidpro = rapidpro
        self.metrics = metrics
        self._on_fatal = on_fatal
        self._log = get_logger(component="gateway")
        self.cht = ChtConfig(
            couch, service=settings.service, refresh_s=settings.credentials_refresh_s
        )
        self.writer = BulkWriter(couch, on_request=self._count_write)
        self.index = TrackedIndex()
        self.own = OwnContent()
        self.backlog = UnsentBacklog()
        self.incoming = IncomingStore(couch, self.writer, self.cht)
        self.identity = identity or Identity.new(settings.instance)
        self.presence = Presence(couch, settings.instance)
        # The workspace's RapidPro budget is shared with the other replicas and earlier runs.
        self.ledger = Ledger(couch, rapidpro.budget, self.presence, settings.instance)
        rapidpro.budget.share = self.ledger
        self.sender = OutgoingSender(
            couch=couch,
            writer=self.writer,
            rapidpro=rapidpro,
            cht=self.cht,
            settings=settings,
            identity=self.identity,
            metrics=metrics,
            presence=self.presence,
            is_taken=self.index.has_ref,
            on_doc=self._written_back,
        )
        self.poller = MessageLog(
            couch=couch,
            writer=self.writer,
            rapidpro=rapidpro,
            cht=self.cht,
            settings=settings,
            index=self.index,
            own=self.own,
            store=self.incoming,
            presence=self.presence,
            metrics=metrics,
            on_accepted=self.sender.resolve_soon,
            on_written=self.sender.remember_write,
            clock=lambda: datetime.now(UTC),
        )
        self.dispatcher = Dispatcher(
            self.cht, self.sender, self.index, self.presence, self.own, self.ledger, self.backlog
        )
        self.sweeper = Sweeper(couch, self.dispatcher)
        self.follower = ChangesFollower(
            couch,
            self.dispatcher.handle_row,
            checkpoint_id=f"cht-rapidpro.{settings.instance}",
            batch=settings.feed_batch,
            heartbeat_s=settings.feed_heartbeat_s,
            checkpoint_interval_s=settings.checkpoint_interval_s,
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
            metrics=metrics,
            own_revision=self.sender.is_own_revision,
            writer=self.writer,
        )
        self.stop_event = asyncio.Event()
        self.started = asyncio.Event()  # settings, credentials and checkpoint loaded
        self.sweeps = 0
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def _written_back(self, doc: JsonDict) -> None:
        """A write-back of the sender's: the indexes learn it before the feed brings it (a
        lean page of the feed does not bring it at all)."""
        self.index.update_doc(doc, time.time())
        self.own.update_doc(doc, self.cht.app_settings)
        self.backlog.update_doc(doc)

    def _count_write(self, docs: int) -> None:
        self.metrics.couch_write_requests.inc()
        self.metrics.couch_writes.inc(docs)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._spawn("startup", self._startup())

    def _spawn(self, name: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task.get_name(), None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, FatalError):
            self._log.critical("gateway_fatal", error=str(exc), exit_code=exc.exit_code)
            self._on_fatal(exc.exit_code)
        else:
            # Loops handle expected failures themselves: this is a bug. Exit so that
            # systemd restarts us (EX_SOFTWARE).
            self._log.critical("worker_crashed", worker=task.get_name(), exc_info=exc)
            self._on_fatal(70)

    async def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        backoff = Backoff(initial=self.settings.retry_initial_s, maximum=self.settings.retry_max_s)
        while True:
            try:
                return await call()
            except AuthError as exc:
                raise FatalError(
                    f"{what}: {exc}: check the user and password in COUCH_URL (a CouchDB admin)",
                    78,
                ) from exc
            except GatewayError as exc:
                delay = backoff.next_delay()
                self._log.warning(
                    "startup_retrying",
                    step=what,
                    error=str(exc),
                    attempt=backoff.attempt,
                    delay_s=round(delay, 2),
                )
                if await sleep_or_wake(self.stop_event, delay):
                    raise asyncio.CancelledError from exc

    async def _startup(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._retrying("load settings", self.cht.load_settings)
            await self._retrying("load translations", self.cht.load_translations)
            await self._retrying(
                "read credentials", lambda: self.cht.refresh_credentials(force=True)
            )
            await self._retrying("load checkpoint", self.follower.load_checkpoint)
            await self._retrying("ask what the server is", self._choose_feed)
            await self._retrying("read the database's layout", self.sender.claims.detect)
            await self._retrying("look for CHT's views", self.poller.prepare)
            await self._retrying("announce replica", self._join)
            self.started.set()
            self._spawn("feed", self.follower.run(self.stop_event))
            self._spawn("sender", self.sender.run())
            self._spawn("poller", self.poller.run(self.stop_event))
            self._spawn("credentials", self.cht.run(self.stop_event))
            self._spawn("sweeps", self._sweeps())
            self._spawn("presence", self.presence.run(self.stop_event))
            self._spawn("budget", self.ledger.run(self.stop_event))
            self._log.info(
                "gateway_running",
                instance=self.settings.instance,
                boot=self.identity.boot,
                resumed=self.follower.resumed,
                clustered=self.sender.claims.clustered,
            )

    async def _choose_feed(self) -> None:
        """Let CouchDB drop the feed's rows the dispatcher would only skip."""
        if await self.couch.filters_by_selector():
            self.follower.selector = feed_selector()

    async def _join(self) -> None:
        await self.presence.load()
        await self.presence.announce()
        await self.ledger.load()

    async def _sweeps(self) -> None:
        """Sweep at start (when resuming) and whenever sending is switched back on."""
        was_open = False
        initial = True
        while not self.stop_event.is_set():
            is_open = self.cht.gate.open
            # A fresh start with sending on needs no sweep: the feed shows every document.
            if is_open and not was_open and not (initial and not self.follower.resumed):
                with contextlib.suppress(asyncio.CancelledError):
                    await self._retrying("sweep", self.sweeper.sweep)
                    self.sweeps += 1
            initial = False
            was_open = is_open
            waiter = asyncio.ensure_future(self.cht.wait_changed(within=60.0))
            stopper = asyncio.ensure_future(self.stop_event.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    async def stop(self) -> None:
        """Stop taking work, drain sends in flight, save the checkpoint."""
        self.stop_event.set()
        await self.sender.stop(self.settings.shutdown_grace_s)
        for name in ("sender", "startup", "sweeps"):
            task = self._tasks.get(name)
            if task is not None:
                task.cancel()
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=2.0)
            for task in still:
                task.cancel()
        try:
            await self.follower.save_checkpoint()
        except GatewayError as exc:
            self._log.warning("checkpoint_not_saved", error=str(exc))
        try:
            await asyncio.wait_for(self.poller.save(force=True), 2.0)
        except (GatewayError, TimeoutError) as exc:
            self._log.warning("log_position_not_saved", error=str(exc))
        if self.started.is_set():
            try:  # peers stop leaving this replica's documents to it
                await asyncio.wait_for(self.presence.announce(stopped=True), 2.0)
                await asyncio.wait_for(self.ledger.publish(), 2.0)  # the next run needs it
            except (GatewayError, TimeoutError) as exc:
                self._log.warning("replica_leave_not_written", error=str(exc))
        self._log.info("gateway_stopped", checkpoint=self.follower.saved is not None)

    # -- health ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, list[str]]:
        """Whether the gateway works now, and what is wrong if not."""
        problems: list[str] = []
        if not self.started.is_set():
            problems.append("starting: settings, credentials or checkpoint not loaded yet")
        elif not self.follower.live:
            problems.append(f"changes feed down: {self.follower.problem or 'connecting'}")
        gate = self.cht.gate
        if not gate.open and gate.severity == "error":
            problems.append(f"sending disabled: {gate.reason}")
        refused = self.cht.credentials_problem
        if refused and not any(refused in problem for problem in problems):
            problems.append(f"credentials not re-read (the last ones read stay in use): {refused}")
        if self.sender.problem:
            problems.append(self.sender.problem)
        return not problems, problems
