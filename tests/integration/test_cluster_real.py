"""The cluster issue's scenarios on a real Apache CouchDB 3 cluster (3 nodes, n=3, q=2).

One daemon per node, each talking to its own node, messages written through all three nodes
50 at a time, as in the runs that sent 1-171 messages twice before claims needed quorum. Each
scenario ends with: every message posted exactly once, none left pending, no document with
a live conflicting branch (checked leaf by leaf through a quorum read).

Skipped unless CHT_RAPIDPRO_TEST_COUCHDB_RELEASE names a CouchDB 3 release
(../shared/spec/couchdb-real.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from cht_rapidpro.sandbox import DEFAULT_TOKEN
from couchdb_release import CouchCluster
from support import CouchAdmin, all_tasks, eventually, message_doc, rapidpro_settings, task

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

ACCEPTED = {"received-by-gateway", "forwarded-by-gateway", "sent", "delivered"}
METRICS = (
    "chtrp_claims_uncommitted_total",
    "chtrp_claims_contested_total",
    "chtrp_conflicts_resolved_total",
    "chtrp_messages_adopted_total",
)


async def states(admin: CouchAdmin) -> Counter[str]:
    return Counter(item["state"] for doc in await admin.all_docs() for item in all_tasks(doc))


async def live_leaves(admin: CouchAdmin, doc_ids: list[str]) -> dict[str, int]:
    """Documents with more than one live leaf (a quorum read of every branch)."""
    found = {}
    for doc_id in doc_ids:
        rows = await admin.request("GET", f"/{admin.db}/{doc_id}?open_revs=all")
        alive = [row for row in rows if "ok" in row and not row["ok"].get("_deleted")]
        if len(alive) > 1:
            found[doc_id] = len(alive)
    return found


async def run(
    cluster: CouchCluster,
    admins: list[CouchAdmin],
    rapidpro: Any,
    daemon_factory: Any,
    *,
    total: int,
    node_event: str | None = None,
) -> dict[str, Any]:
    await admins[0].put_settings(**rapidpro_settings(rapidpro.url))
    await admins[0].put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    daemons = [
        await daemon_factory(COUCH_URL=admin.couch_url, CHT_RAPIDPRO_INSTANCE=f"node{i}")
        for i, admin in enumerate(admins)
    ]
    started = time.monotonic()
    down: set[int] = set()
    doc_ids: list[str] = []
    for chunk in range(total // 50):
        if node_event is not None and chunk == total // 150:
            await cluster.astop_node(1)  # a third of the way in
            down.add(1)
        if node_event == "restart" and chunk == total // 75:
            await cluster.astart_node(1)
            down.discard(1)
        docs = [
            message_doc([task(f"+25472{chunk:02d}{n:05d}", f"visit {chunk}-{n}")])
            for n in range(50)
        ]
        doc_ids += [doc["_id"] for doc in docs]
        through = [a for i, a in enumerate(admins) if i not in down]
        await through[chunk % len(through)].bulk(docs)
    reader = admins[0]
    try:
        await eventually(
            lambda: states(reader),
            lambda s: sum(s[x] for x in ACCEPTED) == total,
            within=600,
            every=1.0,
            what="every message accepted",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; states: {dict(await states(reader))}") from None
    elapsed = time.monotonic() - started
    if node_event == "kill":
        await cluster.astart_node(1)  # it comes back: its copies catch up
    conflicted = await eventually(
        lambda: live_leaves(reader, doc_ids), lambda found: not found, within=120, every=2.0,
        what="no live conflicting branch left",
    )  # fmt: skip

    posted = Counter((b.urns, b.text) for b in rapidpro.sandbox.posted_broadcasts())
    twice = {key: n for key, n in posted.items() if n > 1}
    never = total - len(posted)
    left = await states(reader)
    figures = {
        "messages": total,
        "sent twice": len(twice),
        "never sent": never,
        "left pending": left["pending"] + left["forwarded-to-gateway"],
        "docs with conflicts": len(conflicted),
        "seconds": round(elapsed, 1),
        "split": dict(
            Counter(
                next(
                    e["state_details"]["instance"]
                    for e in reversed(item["state_history"])
                    if e["state"] == "forwarded-to-gateway"
                    and isinstance(e.get("state_details"), dict)
                )
                for doc in await reader.all_docs()
                for item in all_tasks(doc)
            )
        ),
    }
    for name in METRICS:
        figures[name.removeprefix("chtrp_").removesuffix("_total")] = sum(
            int(d.gateway.metrics.registry.get_sample_value(name) or 0) for d in daemons
        )
    print(f"real cluster ({node_event or 'all nodes up'}): {figures}")
    assert twice == {}, f"sent more than once: {list(twice)[:5]}"
    assert never == 0 and figures["left pending"] == 0
    return figures


async def test_three_replicas_on_a_real_cluster(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin], rapidpro: Any,
    daemon_factory: Any,
) -> None:  # fmt: skip
    await run(couch_cluster, cluster_admins, rapidpro, daemon_factory, total=900)


async def test_a_node_killed_a_third_of_the_way_in(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin], rapidpro: Any,
    daemon_factory: Any,
) -> None:  # fmt: skip
    await run(couch_cluster, cluster_admins, rapidpro, daemon_factory, total=900,
              node_event="kill")  # fmt: skip


async def test_a_node_restarted_mid_run(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin], rapidpro: Any,
    daemon_factory: Any,
) -> None:  # fmt: skip
    await run(couch_cluster, cluster_admins, rapidpro, daemon_factory, total=900,
              node_event="restart")  # fmt: skip


async def test_concurrent_claims_through_different_nodes_hold_once(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin]
) -> None:
    """Many claimants racing on the same documents through all three nodes, without the
    daemon's work sharing: at most one holds each document, every time."""
    from cht_rapidpro.claims import Claims, Identity
    from cht_rapidpro.config import Settings, parse_couch_url
    from cht_rapidpro.conflicts import ConflictResolver
    from cht_rapidpro.couch.client import BulkWriter, CouchClient
    from cht_rapidpro.metrics import Metrics
    from cht_rapidpro.retry import Backoff, Outage

    async def pause(seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.2))

    contenders = []
    for i, admin in enumerate(cluster_admins * 2):  # two claimants per node
        env = {"COUCH_URL": admin.couch_url, "CHT_RAPIDPRO_INSTANCE": f"c{i}"}
        client = CouchClient.connect(parse_couch_url(admin.couch_url), timeout_s=10)
        metrics = Metrics()
        claims = Claims(
            couch=client, writer=BulkWriter(client), resolver=ConflictResolver(client, metrics),
            identity=Identity.new(f"c{i}"), settings=Settings.from_env(env), metrics=metrics,
            pause=pause, couch_outage=Outage(Backoff(initial=0.05, maximum=0.2)),
            on_written=lambda doc_id, rev: None,
        )  # fmt: skip
        await claims.detect()
        assert claims.clustered
        contenders.append((claims, client))
    holds = Counter[int]()
    try:
        for round_no in range(60):
            doc = await cluster_admins[round_no % 3].put(
                message_doc([task("+254700000001", f"race {round_no}")])
            )
            results = await asyncio.gather(*(claims.claim(dict(doc)) for claims, _ in contenders))
            holds[sum(1 for r in results if r.hold is not None)] += 1
    finally:
        for _, client in contenders:
            await client.close()
    print(f"racing claims on a real cluster: rounds by number of holders {dict(holds)}")
    assert set(holds) <= {0, 1}
