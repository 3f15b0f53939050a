"""Claims: at most one sender per message, on a single CouchDB node or a cluster.

RapidPro has no idempotency key, so the daemon must decide, through CouchDB alone, which
process posts a message. It does so with a *claim*: a revision of the message's document in
which the task is `forwarded-to-gateway` and `state_details` names the claiming process
(`{claimed_by: "cht-rapidpro", instance, boot}`). CHT's own `setTaskState` writes it, so
every claim is an entry of `state_history` too.

## The rules

A process posts a task's messages only while it *holds* the claim:

- **H1 (commit).** Its latest claim write W, a child of revision P, was *committed*: answered
  without `accepted` (HTTP 201; a `_bulk_docs` row without `"accepted": true`). On a
  cluster that means W reached a write quorum (2 of 3 copies). On a single node every
  successful write is committed. A write answered `accepted` reached fewer copies, possibly
  while the others refused it as a conflict: it is *uncommitted*. The claimant writes the
  claim once more on top of it; if that commits, H1 holds for the new write; if not, it steps
  back (below).
- **H2 (confirm).** After W was answered, a read of every leaf of the document
  (`open_revs=all`, which merges the revision trees of a read quorum of copies) showed, for
  the task, in every live leaf L:
  - L descends from P but not from W (a sibling branch forking at P): nothing is required
    (lemma 1);
  - L descends from W: the task still carries our claim;
  - otherwise the task is still sendable and has no `gateway_ref`;
  - and (but for the siblings) the task carries no other claimant's entry beyond those the
    claim was planned with ("known": a takeover's lookup covers exactly those).
  A claim written again on a newer revision (a conflict re-read, a renewal) is held only if
  that revision, too, shows no entry beyond the known ones: knowledge comes from the plan,
  never from whatever revision the claim ends up on.
  A task whose read shows anything else is *contested*: it is not posted; the document is
  resolved (`conflicts.py`: branches merged, claim entries united) and planned again. On a
  single node no branch can come from our writes, and H2 is not read.
- **H3 (lease).** Each POST starts within TTL/4 of the commit of the claim it relies on
  (monotonic clock), else the claim is renewed first: a new claim write on top, with H1 and
  H2 again.
- **H4 (takeover).** A task whose current attempt already carries a claim entry that is not
  this process's own unposted claim (a peer's, an earlier boot's, one merged from a contested
  branch) is a takeover. A peer's live claim is taken only once its newest entry is older
  than TTL; a claim of this instance's earlier boot (that process is gone) at once. A
  takeover holds its claim by H1-H3 like any other, then waits until any POST of the earlier
  claimants must have landed (newest claim entry + TTL/2 + SEND_TIMEOUT; for an earlier boot
  of this instance: this process's start + SEND_TIMEOUT), then looks the message up in
  RapidPro (broadcasts since the attempt's first claim entry, minus the clock skew); a found
  broadcast is adopted, not posted again.

## Why at most one POST per message (per attempt) happens without a lookup that would find
## the earlier one

Write w(X) for the time X's committing claim write was answered, r(X) for its H2 read.

- *Lemma 1.* If W (child of P) is committed, no write on a branch forking at P was committed
  before W: such a write extends a revision that is a leaf on 2 copies, which then no longer
  have P as a leaf, and W could reach only the third. A committed write on such a branch
  after W is followed, for its writer to post, by an H2 read; that read reaches a copy
  holding W or its descendants, whose claim entry the branch (forking above W) lacks: its
  writer finds the task contested and does not post.
- *Lemma 2 (write, then read).* For two holders X and Y with w(X) < w(Y): r(Y) > w(Y) > w(X),
  and any two copies include one holding W_X's line, so Y's H2 read sees it. By lemma 1 and
  H2, Y holds only if Y's version of the task already contains X's claim entry, i.e. Y's
  claim is a takeover of X's (H4).
- So every holder after the first is a takeover of every earlier holder's claim, and its
  lookup covers them: a holder posts only within TTL/4 (+ SEND_TIMEOUT to land) of a commit
  whose entry the taker sees, the taker waits TTL/2 + SEND_TIMEOUT after the newest entry,
  and its window starts at the oldest. An earlier holder that renews after the takeover
  writes from a revision that is no longer a leaf on 2 copies: its renewal cannot commit.
- Every interleaving named in the cluster issue is a case of these: quorum + accepted (the
  accepted one never commits on that parent; the committed one holds by lemma 1);
  accepted + accepted (neither holds until one commits on top, and then lemma 2 applies);
  three claimants (pairwise); a claimant whose node dies mid-write (its write is at most
  uncommitted, so it does not post; the branch merges in when the node returns); a read
  through a lagging node (the claim extends a stale parent and cannot commit); a claimant
  that stalls past the TTL (its renewal cannot commit once a takeover has).

Assumptions: a read quorum answers the H2 read (with n=3, at most one node fails during a
claim); instance names are unique per replica (so a claim of this instance with another boot
is a dead process's); a POST lands within SEND_TIMEOUT of its start; clocks agree within
TTL/4 (the CLOCK_SKEW setting widens lookups, not leases).

*Stepping back* from a claim that could not commit (or was contested) means: never post on
it, and let resolution merge its branch into the document (its entry kept, so that later
claimants look up first).
"""

from __future__ import annotations

import enum
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .cht.outgoing import (
    Claim,
    ClaimEntry,
    MalformedTaskError,
    OutgoingMessage,
    SendableTask,
    TaskRef,
    claim_details,
    claim_entries,
    find_claim,
    same_messages,
    sendable_tasks,
    task_at,
)
from .cht.state import SENDABLE_STATES, State, js_truthy, parse_iso, set_task_state
from .config import Settings
from .conflicts import ConflictResolver
from .couch.client import BulkWriter, CouchClient, JsonDict, Leaf, clone
from .errors import RetryableError
from .logs import get_logger
from .metrics import Metrics
from .retry import Outage

#: Rounds of conflict → re-read → re-plan a claim gets before it is left to the feed.
MAX_WRITE_ROUNDS = 8
#: When to look again at a document whose claim kept conflicting.
GAVE_UP_RECHECK = timedelta(seconds=30)
#: Writes on top of an uncommitted claim before stepping back from it.
MAX_COMMIT_TRIES = 2
#: Message ids remembered as claimed by this process and never posted.
UNPOSTED_MEMORY = 20_000

Pause = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who claims: the configured instance name and this process's boot id."""

    instance: str
    boot: str

    @classmethod
    def new(cls, instance: str) -> Identity:
        return cls(instance=instance, boot=uuid.uuid4().hex[:12])

    def owns(self, claim: Claim | None) -> bool:
        return claim is not None and claim.instance == self.instance and claim.boot == self.boot

    def foreign(self, entries: frozenset[ClaimEntry]) -> frozenset[ClaimEntry]:
        """Claim entries not written by this process."""
        return frozenset(
            e for e in entries if not (e.instance == self.instance and e.boot == self.boot)
        )


@dataclass(slots=True)
class ClaimedTask:
    """A task to claim (or held): how its messages must go out."""

    ref: TaskRef
    messages: tuple[OutgoingMessage, ...]
    takeover: bool  # H4: look the messages up in RapidPro before posting
    since: datetime  # the lookup window starts here (minus clock skew)
    settle_until: float = 0.0  # monotonic: any earlier claimant's POST has landed by then
    # Other claimants' entries this claim was planned with (its lookup covers them): a
    # revision that shows any other is another claimant's news, and the claim is not held.
    known: frozenset[ClaimEntry] = frozenset()


@dataclass(slots=True)
class Hold:
    """Claims this process holds on one document (H1 and H2 met)."""

    doc: JsonDict  # our latest claim revision, as written
    tasks: list[ClaimedTask]
    committed_at: float  # monotonic time of the commit the lease runs from
    siblings: bool = False  # the H2 read showed other branches (resolved after write-back)


@dataclass(slots=True)
class Plan:
    take: list[ClaimedTask]
    recheck: datetime | None  # when a peer's live claim expires, or an earlier POST lands


@dataclass(slots=True)
class ClaimResult:
    hold: Hold | None
    recheck: datetime | None = None


class Verdict(enum.Enum):
    HELD = "held"
    LOST = "lost"  # our claim was replaced or deleted: someone else decides now
    CONTESTED = "contested"  # another branch may have a holder: resolve, then look up


def confirm_verdicts(
    leaves: Sequence[Leaf],
    *,
    written: str,
    parent: str | None,
    claimed: Mapping[TaskRef, ClaimedTask],
    identity: Identity,
) -> dict[TaskRef, Verdict]:
    """H2 for each claimed task: `written` is our committed claim revision, `parent` the
    revision it was written on; each task's `known` entries are the other claimants' it was
    planned with."""
    verdicts = dict.fromkeys(claimed, Verdict.HELD)
    seen_live = False
    for leaf in leaves:
        ours = leaf.descends_from(written)
        if leaf.deleted:
            if ours:
                for ref in claimed:
                    verdicts[ref] = Verdict.LOST  # a resolver merged our branch away
            continue
        if not ours and parent is not None and leaf.descends_from(parent):
            continue  # a sibling branch forking at our parent (lemma 1)
        seen_live = seen_live or ours
        for ref, mine in claimed.items():
            task = task_at(leaf.doc, ref)
            if task is None or not same_messages(task, mine.messages):
                if ours:
                    verdicts[ref] = Verdict.LOST
                continue  # (not ours) an older version of the document, before the task
            if ours and not identity.owns(find_claim(task)):
                verdicts[ref] = Verdict.LOST
                continue
            progressed = not ours and (
                task.get("state") not in SENDABLE_STATES or js_truthy(task.get("gateway_ref"))
            )
            news = not identity.foreign(claim_entries(task)) <= mine.known
            if (progressed or news) and verdicts[ref] is Verdict.HELD:
                verdicts[ref] = Verdict.CONTESTED
    if not seen_live:
        return dict.fromkeys(claimed, Verdict.LOST)  # our branch was merged away
    return verdicts


class Claims:
    """Claim, confirm, renew, step back: the rules above, over one database."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        writer: BulkWriter,
        resolver: ConflictResolver,
        identity: Identity,
        settings: Settings,
        metrics: Metrics,
        pause: Pause,
        couch_outage: Outage,
        on_written: Callable[[str, str | None], None],
        started: float | None = None,
        leaves: Callable[[str], Awaitable[list[Leaf]]] | None = None,
        reread: Callable[[str], Awaitable[JsonDict | None]] | None = None,
    ) -> None:
        self._couch = couch
        # H2's read: a `LeafReader`'s, which shares one request among concurrent claims.
        self._read_leaves = leaves
        self._read_doc = reread  # a `DocReader`'s, likewise
        self._writer = writer
        self._resolver = resolver
        self.identity = identity
        self._settings = settings
        self._metrics = metrics
        self._pause = pause
        self._couch_outage = couch_outage
        self._on_written = on_written
        self._ttl = timedelta(seconds=settings.claim_ttl_s)
        self._started = time.monotonic() if started is None else started  # process start
        self._unposted: OrderedDict[str, None] = OrderedDict()
        self.clustered = False  # set from the database's `cluster.n`, or by an `accepted`
        self._log = get_logger(component="claims")

    async def detect(self) -> None:
        """Whether the database keeps several copies of each shard (then H2 is read)."""
        self.clustered = await self._couch.replica_count() > 1

    # -- what this process knows of its own posts -----------------------------------------

    def posting(self, message_uuid: str) -> None:
        """A POST for this message is about to start: its claim is no longer unposted."""
        self._unposted.pop(message_uuid, None)

    def not_posted(self, message_uuid: str) -> None:
        """A POST for this message failed before it reached RapidPro (no ambiguity)."""
        self._unposted[message_uuid] = None

    def _claimed_unposted(self, messages: Sequence[OutgoingMessage]) -> None:
        for message in messages:
            self._unposted[message.uuid] = None
            self._unposted.move_to_end(message.uuid)
        while len(self._unposted) > UNPOSTED_MEMORY:
            self._unposted.popitem(last=False)

    # -- planning -------------------------------------------------------------------------

    def plan(self, doc: JsonDict, now: datetime) -> Plan:
        """Which sendable tasks to claim now, and when to look at the document again.

        A peer's claim is left alone until its lease (TTL) has run out. A takeover whose
        earlier claimants' POSTs may still be landing is claimed only once they have: the
        lookup must come after them, and the new claim's lease starts with its write.
        """
        take: list[ClaimedTask] = []
        recheck: datetime | None = None
        clock = time.monotonic()
        for task in sendable_tasks(doc, on_malformed=lambda ref, problem: None):
            claim = task.claim
            if (
                claim is not None
                and claim.instance != self.identity.instance
                and claim.at is not None
                and now - claim.at < self._ttl
            ):
                expiry = claim.at + self._ttl
                recheck = expiry if recheck is None else min(recheck, expiry)
                continue
            claimed = self._takeover(doc, task, now)
            if claimed.settle_until > clock:
                ready = now + timedelta(seconds=claimed.settle_until - clock)
                recheck = ready if recheck is None else min(recheck, ready)
                continue
            take.append(claimed)
        return Plan(take, recheck)

    def _takeover(self, doc: JsonDict, task: SendableTask, now: datetime) -> ClaimedTask:
        """How the claim on `task` must proceed (H4), decided before writing it."""
        current = task_at(doc, task.ref) or {}
        entries = sorted(claim_entries(current), key=lambda e: e.timestamp)
        mine = all(
            e.instance == self.identity.instance and e.boot == self.identity.boot for e in entries
        )
        if not entries and task.claim is None:
            return ClaimedTask(task.ref, task.messages, False, now)  # a fresh task
        if entries and mine and all(m.uuid in self._unposted for m in task.messages):
            # Only our own claims of this attempt, and we never posted: nothing to look up.
            return ClaimedTask(task.ref, task.messages, False, now)
        known = self.identity.foreign(frozenset(entries))
        if not entries:
            # A claim without a usable entry (written by hand?): any earlier time may matter.
            since = now - timedelta(seconds=self._settings.max_tracking_s)
            return ClaimedTask(task.ref, task.messages, True, since, 0.0, known)
        stamps = [parse_iso(e.timestamp) for e in entries]
        parsed = [s for s in stamps if s is not None]
        since = (
            min(parsed)
            if len(parsed) == len(stamps)
            else now - timedelta(seconds=self._settings.max_tracking_s)
        )
        send_timeout = self._settings.send_timeout_s
        settle = 0.0
        for entry, stamp in zip(entries, stamps, strict=True):
            if entry.instance == self.identity.instance and entry.boot != self.identity.boot:
                # An earlier boot of this instance: that process is gone, and any POST it
                # started has landed SEND_TIMEOUT after we started.
                landed = self._started + send_timeout
            elif stamp is None:
                landed = 0.0
            else:
                latest_post = stamp + self._ttl / 2 + timedelta(seconds=send_timeout)
                landed = time.monotonic() + (latest_post - now).total_seconds()
            settle = max(settle, landed)
        return ClaimedTask(task.ref, task.messages, True, since, settle, known)

    # -- claiming -------------------------------------------------------------------------

    async def claim(self, doc: JsonDict) -> ClaimResult:
        """Claim every task of `doc` that is ours to send, and hold the claims (H1, H2)."""
        doc_id = str(doc["_id"])
        rounds = 0
        while rounds < MAX_WRITE_ROUNDS:
            if ConflictResolver.conflicted(doc):
                resolved = await self._resolve(doc_id)
                if resolved is None:
                    return ClaimResult(None)
                doc = resolved
            now = datetime.now(UTC)
            try:
                plan = self.plan(doc, now)
            except MalformedTaskError as exc:
                self._log.warning("document_skipped", doc_id=doc_id, problem=str(exc))
                return ClaimResult(None)
            if not plan.take:
                return ClaimResult(None, plan.recheck)
            outcome = await self._write_claims(doc, plan.take)
            if isinstance(outcome, Hold):
                for task in outcome.tasks:
                    if task.takeover:
                        self._log.info(
                            "claim_taken_over",
                            doc_id=doc_id,
                            task=task.ref.key,
                            since=task.since.isoformat(),
                        )
                return ClaimResult(outcome, plan.recheck)
            rounds += 1
            if outcome is None:
                return ClaimResult(None, plan.recheck)
            doc = outcome
        # Others keep writing the document: look again once they may have settled.
        self._log.warning("claim_gave_up", doc_id=doc_id, rounds=rounds)
        return ClaimResult(None, datetime.now(UTC) + GAVE_UP_RECHECK)

    async def _write_claims(
        self, doc: JsonDict, tasks: list[ClaimedTask]
    ) -> Hold | JsonDict | None:
        """Write the claims and hold them: a Hold, or the document to plan again from (a
        conflict, a contest, a lost claim), or None (nothing more to do now)."""
        doc_id = str(doc["_id"])
        details = claim_details(self.identity.instance, self.identity.boot)
        claimed = clone(doc)
        for task in tasks:
            target = task_at(claimed, task.ref)
            assert target is not None
            set_task_state(target, State.FORWARDED_TO_GATEWAY, dict(details))
        written = await self._write(claimed)
        if written is None:
            return await self._reread(doc_id)  # conflict: plan again from what is there
        if isinstance(written, str):
            self._log.error("claim_refused", doc_id=doc_id, error=written)
            return None
        result_rev, committed = written
        self._claimed_unposted([m for task in tasks for m in task.messages])
        hold = Hold(claimed, tasks, time.monotonic())
        parent = doc.get("_rev")
        tries = 0
        while not committed:
            # H1: an `accepted` claim may share its parent with a committed one elsewhere.
            self._metrics.claims_uncommitted.inc()
            self._log.info("claim_uncommitted", doc_id=doc_id, rev=result_rev)
            tries += 1
            if tries > MAX_COMMIT_TRIES:
                return await self._step_back(doc_id)
            again = await self._rewrite(hold)
            if again is None:
                return await self._step_back(doc_id)
            committed, parent = again
            result_rev = str(hold.doc["_rev"])
        hold.committed_at = time.monotonic()
        verdict = await self._confirm(hold, parent)
        if verdict is Verdict.HELD:
            return hold
        if verdict is Verdict.CONTESTED:
            return await self._step_back(doc_id)
        return await self._reread(doc_id)

    async def renew(self, hold: Hold) -> bool:
        """H3: write our claims again (on top of what is there) and hold them; False if
        none is held any more."""
        tries = 0
        while True:
            again = await self._rewrite(hold)
            if again is None:
                return False
            committed, parent = again
            if committed:
                break
            self._metrics.claims_uncommitted.inc()
            tries += 1
            if tries > MAX_COMMIT_TRIES:
                await self._step_back(str(hold.doc["_id"]))
                return False
        hold.committed_at = time.monotonic()
        verdict = await self._confirm(hold, parent)
        if verdict is Verdict.CONTESTED:
            await self._step_back(str(hold.doc["_id"]))
        return verdict is Verdict.HELD and bool(hold.tasks)

    async def _rewrite(self, hold: Hold) -> tuple[bool, str | None] | None:
        """One more claim write for the held tasks, on top of our latest revision (re-read
        and re-applied on a conflict while the tasks still carry our claim)."""
        details = claim_details(self.identity.instance, self.identity.boot)
        doc_id = str(hold.doc["_id"])
        current = hold.doc
        for _ in range(MAX_WRITE_ROUNDS):
            candidate = clone(current)
            kept = []
            for task in hold.tasks:
                target = task_at(candidate, task.ref)
                if (
                    target is None
                    or not self.identity.owns(find_claim(target))
                    or not same_messages(target, task.messages)
                    or not self.identity.foreign(claim_entries(target)) <= task.known
                ):
                    continue  # not ours any more, or another claimant's entry merged in
                set_task_state(target, State.FORWARDED_TO_GATEWAY, dict(details))
                kept.append(task)
            hold.tasks[:] = kept
            if not kept:
                return None
            parent = candidate.get("_rev")
            written = await self._write(candidate)
            if isinstance(written, tuple):
                hold.doc = candidate
                return written[1], parent
            if isinstance(written, str):
                self._log.error("claim_renewal_refused", doc_id=doc_id, error=written)
                return None
            latest = await self._reread(doc_id)
            if latest is None:
                return None
            current = latest
        return None

    async def _write(self, doc: JsonDict) -> tuple[str, bool] | str | None:
        """Write one revision: (rev, committed), None on a conflict, or the error text.
        A CouchDB outage is waited out, however long."""
        while True:
            try:
                result = await self._writer.write(doc)
            except RetryableError as exc:
                self._log.warning("claim_retrying", doc_id=doc["_id"], error=str(exc))
                await self._pause(self._couch_outage.failed())
                continue
            self._couch_outage.recovered()
            break
        if result.conflict:
            self._metrics.write_conflicts.inc()
            return None
        if not result.ok or result.rev is None:
            return result.error or "no revision in the answer"
        doc["_rev"] = result.rev
        self._on_written(str(doc["_id"]), result.rev)
        if result.accepted:
            self.clustered = True
        return result.rev, result.committed

    async def _confirm(self, hold: Hold, parent: str | None) -> Verdict:
        """H2; drops lost tasks from the hold. HELD if any task is held and none contested."""
        if not self.clustered:
            return Verdict.HELD
        doc_id = str(hold.doc["_id"])
        leaves = await self._leaves(doc_id)
        claimed = {task.ref: task for task in hold.tasks}
        verdicts = confirm_verdicts(
            leaves,
            written=str(hold.doc["_rev"]),
            parent=parent,
            claimed=claimed,
            identity=self.identity,
        )
        hold.siblings = sum(1 for leaf in leaves if not leaf.deleted) > 1
        if any(v is Verdict.CONTESTED for v in verdicts.values()):
            self._metrics.claims_contested.inc()
            self._log.warning(
                "claim_contested",
                doc_id=doc_id,
                tasks=[ref.key for ref, v in verdicts.items() if v is Verdict.CONTESTED],
            )
            return Verdict.CONTESTED
        lost = [task for task in hold.tasks if verdicts[task.ref] is Verdict.LOST]
        for task in lost:
            self._log.warning("claim_lost", doc_id=doc_id, task=task.ref.key)
        hold.tasks[:] = [task for task in hold.tasks if verdicts[task.ref] is Verdict.HELD]
        return Verdict.HELD if hold.tasks else Verdict.LOST

    async def _step_back(self, doc_id: str) -> JsonDict | None:
        """Never post on this claim; merge the branches, and plan again from the result."""
        return await self._resolve(doc_id)

    async def _resolve(self, doc_id: str) -> JsonDict | None:
        while True:
            try:
                return (await self._resolver.resolve(doc_id)).doc
            except RetryableError as exc:
                self._log.warning("resolve_retrying", doc_id=doc_id, error=str(exc))
                await self._pause(self._couch_outage.failed())

    async def _leaves(self, doc_id: str) -> list[Leaf]:
        while True:
            try:
                read = self._read_leaves or self._couch.leaves
                return await read(doc_id)
            except RetryableError as exc:
                self._log.warning("confirm_retrying", doc_id=doc_id, error=str(exc))
                await self._pause(self._couch_outage.failed())

    async def _reread(self, doc_id: str) -> JsonDict | None:
        while True:
            try:
                if self._read_doc is not None:
                    return await self._read_doc(doc_id)
                return await self._couch.get(doc_id, conflicts=True)
            except RetryableError as exc:
                self._log.warning("reread_retrying", doc_id=doc_id, error=str(exc))
                await self._pause(self._couch_outage.failed())
