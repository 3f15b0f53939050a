"""The claim protocol (`claims.py`) through every cluster interleaving, deterministically.

The daemon's own `Claims`, `CouchClient`, `BulkWriter` and `ConflictResolver` run against the
test server behind `QuorumProxy`, which answers chosen writes as a 3-node cluster can
(accepted, a minority branch beside a competing write, a write lost with its node) and
serves chosen reads from a copy that has not caught up. Each test names the interleaving of
the cluster issue it plays, and checks that at most one claimant holds a message's claim
without a lookup, and that no conflicting branch is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from cht_rapidpro.cht.outgoing import claim_entries, find_claim
from cht_rapidpro.claims import ClaimResult, Claims, Identity
from cht_rapidpro.config import Settings, parse_couch_url
from cht_rapidpro.conflicts import ConflictResolver
from cht_rapidpro.couch.client import BulkWriter, CouchClient, JsonDict
from cht_rapidpro.metrics import Metrics
from cht_rapidpro.retry import Backoff, Outage
from conftest import FAST_ENV
from quorum import QuorumProxy, Write
from support import CouchAdmin, message_doc, task

TTL = 4.0
SEND_TIMEOUT = 1.0


@dataclasses.dataclass
class Claimant:
    identity: Identity
    claims: Claims
    couch: CouchClient
    metrics: Metrics

    async def claim(self, doc: JsonDict) -> ClaimResult:
        return await self.claims.claim(doc)


@pytest.fixture
async def proxy(couch: CouchAdmin) -> AsyncIterator[QuorumProxy]:
    server = QuorumProxy(couch.server.url, (couch.server.user, couch.server.password))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def claimant(couch: CouchAdmin, proxy: QuorumProxy) -> AsyncIterator[Any]:
    """`await claimant("a")`: a claiming process talking to the cluster (through the proxy)."""
    made: list[Claimant] = []

    async def make(instance: str) -> Claimant:
        env = {
            **FAST_ENV,
            "COUCH_URL": proxy.db_url(couch.db, couch.server.user, couch.server.password),
            "CHT_RAPIDPRO_CLAIM_TTL": str(TTL),
            "CHT_RAPIDPRO_SEND_TIMEOUT": str(SEND_TIMEOUT),
            "CHT_RAPIDPRO_INSTANCE": instance,
        }
        settings = Settings.from_env(env)
        client = CouchClient.connect(parse_couch_url(env["COUCH_URL"]), timeout_s=10)
        metrics = Metrics()
        identity = Identity.new(instance)

        async def pause(seconds: float) -> None:
            await asyncio.sleep(min(seconds, 0.2))

        claims = Claims(
            couch=client,
            writer=BulkWriter(client),
            resolver=ConflictResolver(client, metrics),
            identity=identity,
            settings=settings,
            metrics=metrics,
            pause=pause,
            couch_outage=Outage(Backoff(initial=0.05, maximum=0.2)),
            on_written=lambda doc_id, rev: None,
        )
        await claims.detect()
        assert claims.clustered  # the proxy reports n=3
        found = Claimant(identity, claims, client, metrics)
        made.append(found)
        return found

    yield make
    for found in made:
        await found.couch.close()


def by(instance: str) -> Callable[[str, dict[str, Any]], bool]:
    """Matches a write that claims a task for `instance`."""

    def matches(db: str, doc: dict[str, Any]) -> bool:
        for item in doc.get("tasks") or []:
            claim = find_claim(item)
            if claim is not None and claim.instance == instance:
                return True
        return False

    return matches


def first_writes(proxy: QuorumProxy, fates: dict[str, Write]) -> None:
    """The first claim write of each named instance meets the given fate; later ones pass."""
    pending = dict(fates)

    def policy(db: str, doc: dict[str, Any]) -> Write:
        for instance, fate in list(pending.items()):
            if by(instance)(db, doc):
                del pending[instance]
                return fate
        return Write.PASS

    proxy.policy = policy


async def pending_doc(couch: CouchAdmin) -> JsonDict:
    doc = message_doc([task("+254700000001", "hello")])
    await couch.put(doc)
    fresh = await couch.get(doc["_id"])
    assert fresh is not None
    return fresh


async def leaves(couch: CouchAdmin, doc_id: str) -> list[dict[str, Any]]:
    rows = await couch.request("GET", f"/{couch.db}/{doc_id}?open_revs=all")
    return [row["ok"] for row in rows if "ok" in row and not row["ok"].get("_deleted")]


async def resolved(couch: CouchAdmin, proxy_claimant: Claimant, doc_id: str) -> dict[str, Any]:
    """Resolve the document the way the daemon does, then check it has one live leaf."""
    resolver = ConflictResolver(proxy_claimant.couch, Metrics())
    await resolver.resolve(doc_id)
    alive = await leaves(couch, doc_id)
    assert len(alive) == 1, f"conflicting branches left: {[d['_rev'] for d in alive]}"
    doc = await couch.get(doc_id)
    assert doc is not None and "_conflicts" not in doc
    return doc


def instances(doc: dict[str, Any]) -> set[str]:
    return {entry.instance for entry in claim_entries(doc["tasks"][0])}


async def test_quorum_and_accepted(couch: CouchAdmin, proxy: QuorumProxy, claimant: Any) -> None:
    """A commits; B, claiming from the same parent, lands on the third copy only (accepted):
    A holds, B never does, and B's branch is merged away with its claim entry kept."""
    a, b = await claimant("a"), await claimant("b")
    doc = await pending_doc(couch)
    first_writes(proxy, {"b": Write.MINORITY})
    held_a = await a.claim(doc)
    held_b = await b.claim(doc)  # the same parent revision: B's view was stale
    assert held_a.hold is not None and [t.takeover for t in held_a.hold.tasks] == [False]
    assert held_b.hold is None
    assert held_b.recheck is not None  # B looks again once the claim may have expired
    final = await resolved(couch, a, doc["_id"])
    assert instances(final) == {"a", "b"}  # no claim that happened is forgotten
    assert final["tasks"][0]["state"] == "forwarded-to-gateway"


async def test_accepted_and_accepted(couch: CouchAdmin, proxy: QuorumProxy, claimant: Any) -> None:
    """Both claims land on one copy each: neither holds; after the branches are merged and
    the earlier POSTs could have landed, exactly one takes over, and it looks up first."""
    a, b = await claimant("a"), await claimant("b")
    doc = await pending_doc(couch)
    first_writes(proxy, {"a": Write.MINORITY, "b": Write.MINORITY})
    results = await asyncio.gather(a.claim(doc), b.claim(doc))
    assert [r.hold for r in results] == [None, None]
    rechecks = [r.recheck for r in results]
    assert all(r is not None for r in rechecks)
    await resolved(couch, a, doc["_id"])
    # Once every recheck time has passed, the claimants look again.
    wait = max(r for r in rechecks if r is not None) - datetime.now(UTC)
    await asyncio.sleep(max(0.0, wait.total_seconds()) + 0.1)
    current = await couch.get(doc["_id"])
    assert current is not None
    again = await asyncio.gather(a.claim(current), b.claim(current))
    holders = [r.hold for r in again if r.hold is not None]
    assert len(holders) == 1
    assert [t.takeover for t in holders[0].tasks] == [True]  # a lookup before any POST
    await resolved(couch, a, doc["_id"])


async def test_three_claimants(couch: CouchAdmin, proxy: QuorumProxy, claimant: Any) -> None:
    a, b, c = await claimant("a"), await claimant("b"), await claimant("c")
    doc = await pending_doc(couch)
    first_writes(proxy, {"b": Write.MINORITY, "c": Write.MINORITY})
    results = [await a.claim(doc), await b.claim(doc), await c.claim(doc)]
    assert [r.hold is not None for r in results] == [True, False, False]
    final = await resolved(couch, a, doc["_id"])
    assert instances(final) == {"a", "b", "c"}


async def test_claimant_whose_node_dies_mid_write(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """A's claim reaches only a node that then dies: A cannot commit it, so it does not hold
    on it; B claims on the copies that are up meanwhile. Whichever of A (claiming again from
    what the live copies have) and B commits first holds; the other does not. When the node
    returns, A's lost branch is merged in, and its claim entry with it."""
    a, b = await claimant("a"), await claimant("b")
    doc = await pending_doc(couch)
    first_writes(proxy, {"a": Write.LOST})
    claim_a = asyncio.ensure_future(a.claim(doc))
    await proxy.lost_written.wait()
    held_b = await b.claim(doc)
    held_a = await claim_a
    assert (held_a.hold is None) != (held_b.hold is None)
    assert await proxy.release_lost() == 1
    final = await resolved(couch, b, doc["_id"])
    assert "a" in instances(final)


async def test_read_through_a_lagging_node(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """A holds; B reads through a copy that has not seen A's claim and claims from the old
    revision: on a cluster that write can only reach the lagging copy."""
    a, b = await claimant("a"), await claimant("b")
    doc = await pending_doc(couch)
    held_a = await a.claim(doc)
    assert held_a.hold is not None
    proxy.stale_reads[doc["_id"]] = doc["_rev"]
    first_writes(proxy, {"b": Write.MINORITY})
    stale = await b.couch.get(doc["_id"])
    assert stale is not None and stale["_rev"] == doc["_rev"]
    held_b = await b.claim(stale)
    assert held_b.hold is None
    await resolved(couch, a, doc["_id"])


async def test_a_stale_claimant_cannot_renew_after_a_takeover(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """A holds, then stalls past the TTL; C takes over (with a lookup). A's renewal before
    its POST cannot commit, so A does not post."""
    a, c = await claimant("a"), await claimant("c")
    doc = await pending_doc(couch)
    held_a = await a.claim(doc)
    assert held_a.hold is not None
    await asyncio.sleep(TTL + 0.2)
    current = await couch.get(doc["_id"])
    assert current is not None
    held_c = await c.claim(current)
    assert held_c.hold is not None and [t.takeover for t in held_c.hold.tasks] == [True]
    assert not await a.claims.renew(held_a.hold)


async def test_a_takeover_that_lands_on_one_copy_loses_to_the_renewal(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """C's takeover of A's stale claim reaches one copy only (its node then dies), while A,
    waking up, renews on the other two: A holds. When C's branch comes back and C commits on
    top of it, C's confirming read shows A's renewal, and C steps back."""
    a, c = await claimant("a"), await claimant("c")
    doc = await pending_doc(couch)
    held_a = await a.claim(doc)
    assert held_a.hold is not None
    await asyncio.sleep(TTL + 0.2)
    current = await couch.get(doc["_id"])
    assert current is not None
    first_writes(proxy, {"c": Write.LOST})
    claim_c = asyncio.ensure_future(c.claim(current))
    await proxy.lost_written.wait()
    assert await a.claims.renew(held_a.hold)  # committed on the live copies, confirmed
    await proxy.release_lost()
    held_c = await claim_c
    assert held_c.hold is None
    final = await resolved(couch, a, doc["_id"])
    assert instances(final) == {"a", "c"}


async def test_slow_copy_accepted_claim_is_committed_by_writing_it_again(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """No competitor, but a slow copy: the claim is answered `accepted`. Written once more on
    top, it commits, and the claimant holds without any lookup."""
    a = await claimant("a")
    doc = await pending_doc(couch)
    first_writes(proxy, {"a": Write.ACCEPTED})
    held = await a.claim(doc)
    assert held.hold is not None and [t.takeover for t in held.hold.tasks] == [False]
    assert proxy.stats.writes[Write.ACCEPTED] == 1
    assert a.metrics.registry.get_sample_value("chtrp_claims_uncommitted_total") == 1


async def test_a_claim_rewritten_on_a_merge_that_brought_news_is_not_held(
    couch: CouchAdmin, proxy: QuorumProxy, claimant: Any
) -> None:
    """A holds (and may have posted). B's claim from the same parent lands on one copy, and
    before B writes it again a third process merges the branches, keeping B's claim (the
    newer) as the task's current one. B's second write on the merged revision commits, but
    the merge brought A's claim entry, which B's plan did not know: B must not hold it."""
    a, b, c = await claimant("a"), await claimant("b"), await claimant("c")
    doc = await pending_doc(couch)
    assert (await a.claim(doc)).hold is not None
    first_writes(proxy, {"b": Write.MINORITY})
    resolver = ConflictResolver(c.couch, Metrics())

    async def merge(db: str, doc_id: str) -> None:
        await resolver.resolve(doc_id)
        merged = await couch.get(doc_id)
        assert merged is not None and find_claim(merged["tasks"][0]).instance == "b"

    proxy.after_branch = merge
    held_b = await b.claim(doc)
    assert held_b.hold is None
    final = await resolved(couch, a, doc["_id"])
    assert instances(final) == {"a", "b"}
