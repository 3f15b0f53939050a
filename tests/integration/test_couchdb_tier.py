"""The real-CouchDB tier itself (tests/couchdb_release.py): the single node, the 3-node cluster,
stopping and restarting nodes, and what a cluster does that a single writer never does.

Skipped unless CHT_RAPIDPRO_TEST_COUCHDB_RELEASE names a CouchDB 3 release
(../shared/spec/couchdb-real.md).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import aiohttp
import pytest

from couchdb_release import CouchCluster, SingleNode
from pouchdb import COUCH_SECRET, HEADERS
from support import CouchAdmin, eventually

pytestmark = pytest.mark.timeout(300)


async def send(admin: CouchAdmin, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request through `admin`'s node: (HTTP status, JSON body)."""
    data = None if body is None else json.dumps(body)
    headers = {"Content-Type": "application/json"} if body is not None else None
    async with admin.session.request(
        method, admin.server.url + path, data=data, headers=headers
    ) as resp:
        return resp.status, json.loads(await resp.text())


def doc_path(admin: CouchAdmin, doc_id: str, query: str = "") -> str:
    return f"/{admin.db}/{urllib.parse.quote(doc_id, safe='')}" + (f"?{query}" if query else "")


# -- the single node ----------------------------------------------------------------------------


@pytest.fixture
def single(couchdb_single: SingleNode | None) -> SingleNode:
    if couchdb_single is None:
        pytest.skip("the release's single node is off (needs CHT_RAPIDPRO_TEST_COUCHDB_RELEASE "
                    "without CHT_RAPIDPRO_TEST_COUCH_URL)")  # fmt: skip
    return couchdb_single


async def test_single_node_answers_with_the_configured_admin(
    single: SingleNode, couch: CouchAdmin
) -> None:
    assert couch.server.url == single.url  # the suite's server is this node
    welcome = await couch.request("GET", "/")
    assert welcome["couchdb"] == "Welcome" and welcome["version"].startswith("3.")
    session = await couch.request("GET", "/_session")
    assert session["userCtx"] == {"name": single.user, "roles": ["_admin"]}
    membership = await couch.request("GET", "/_membership")
    assert membership["cluster_nodes"] == [single.node.name]
    config = await couch.request("GET", "/_node/_local/_config/couch_httpd_auth/secret")
    assert config == COUCH_SECRET
    assert await couch.request("GET", "/_node/_local/_config/couchdb/single_node") == "true"
    info = await couch.request("GET", f"/{couch.db}")
    assert isinstance(info["update_seq"], str)  # opaque, unlike pouchdb-server's integers
    # No admin party: without credentials, admin-only endpoints refuse.
    async with (
        aiohttp.ClientSession(headers=HEADERS) as anonymous,
        anonymous.get(single.url + "/_all_dbs") as resp,
    ):
        assert resp.status == 401


# -- the cluster --------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_cluster_has_three_members_and_a_db_has_three_copies(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin]
) -> None:
    for i in range(3):
        membership = couch_cluster.membership(i)
        assert sorted(membership["cluster_nodes"]) == sorted(couch_cluster.node_names)
        assert sorted(membership["all_nodes"]) == sorted(couch_cluster.node_names)
    info = await cluster_admins[2].request("GET", f"/{cluster_admins[2].db}")
    assert info["cluster"]["n"] == 3
    assert info["cluster"]["q"] == 2
    for admin in cluster_admins:  # the system dbs exist cluster-wide, the secret on every node
        await admin.request("GET", "/_users")
        await admin.request("GET", "/_replicator")
        secret = await admin.request("GET", "/_node/_local/_config/couch_httpd_auth/secret")
        assert secret == COUCH_SECRET


@pytest.mark.cluster
async def test_a_write_through_node_0_is_readable_through_node_2(
    cluster_admins: list[CouchAdmin],
) -> None:
    first, _, last = cluster_admins
    written = await first.put({"_id": "through-node-0", "value": 42})
    # A quorum write (w=2 of 3) and a quorum read (r=2 of 3) share at least one copy.
    read = await last.get("through-node-0")
    assert read is not None
    assert (read["_rev"], read["value"]) == (written["_rev"], 42)


@pytest.mark.cluster
@pytest.mark.parametrize("graceful", [False, True], ids=["killed", "shut-down"])
async def test_with_a_node_stopped_writes_get_quorum_and_the_node_rejoins(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin], graceful: bool
) -> None:
    first = cluster_admins[0]
    await couch_cluster.astop_node(2, graceful=graceful)
    assert not couch_cluster.running(2)
    membership = couch_cluster.membership(0)
    assert couch_cluster.node_names[2] not in membership["all_nodes"]  # not connected
    assert couch_cluster.node_names[2] in membership["cluster_nodes"]  # still a member

    status, body = await send(first, "PUT", doc_path(first, "while-down"), {"n": 1})
    assert (status, body["ok"]) == (201, True)  # 2 of 3 copies: quorum, not "accepted"
    status, rows = await send(first, "POST", f"/{first.db}/_bulk_docs", {"docs": [{"n": 2}]})
    assert status == 201
    assert rows[0]["ok"] is True and "accepted" not in rows[0]

    await couch_cluster.astart_node(2)
    for i in range(3):
        assert sorted(couch_cluster.membership(i)["all_nodes"]) == sorted(couch_cluster.node_names)
    # The restarted node serves the document written while it was down.
    await eventually(lambda: cluster_admins[2].get("while-down"), lambda d: d is not None,
                     what="the document through the restarted node")  # fmt: skip


@pytest.mark.cluster
async def test_conflicting_writes_from_one_parent_are_both_answered_ok(
    couch_cluster: CouchCluster, cluster_admins: list[CouchAdmin]
) -> None:
    """Observation (spec couchdb-real.md §3): two writes from the same parent revision, through
    different nodes, are both answered `ok`, one of them only `accepted`, and the document then
    holds both branches.

    Made deterministic by choosing which copies each write reaches: write A goes through node 1
    while node 0 is down (copies 1 and 2: quorum), write B through node 0 while nodes 1 and 2
    are down (copy 0 only, which never saw A: `accepted`). Concurrent writers on a live cluster
    produce the same outcomes whenever their writes reach the copies in different orders.
    """
    node0, node1, _ = cluster_admins
    parent = await node0.put({"_id": "contested", "state": "pending"})
    # Every copy holds the parent before the nodes go down (r=3 waits for all three).
    await eventually(
        lambda: send(node0, "GET", doc_path(node0, "contested", "r=3")),
        lambda answer: answer[0] == 200 and answer[1]["_rev"] == parent["_rev"],
        what="the parent revision on all three copies",
    )

    await couch_cluster.astop_node(0)
    claim_a = {"_id": "contested", "_rev": parent["_rev"], "state": "claimed-by-a"}
    status_a, [row_a] = await send(node1, "POST", f"/{node1.db}/_bulk_docs", {"docs": [claim_a]})

    await couch_cluster.astop_node(1)
    await couch_cluster.astop_node(2)
    await couch_cluster.astart_node(0)
    claim_b = {"_id": "contested", "_rev": parent["_rev"], "state": "claimed-by-b"}
    status_b, [row_b] = await send(node0, "POST", f"/{node0.db}/_bulk_docs", {"docs": [claim_b]})
    # A plain PUT that reaches one copy only is ok too, with HTTP 202 as its only sign.
    status_put, put = await send(node0, "PUT", doc_path(node0, "lonely"), {"copies": 1})

    # Both claims were told ok: A with quorum, B only "accepted" (one copy of three).
    assert (status_a, row_a.get("ok"), row_a.get("accepted")) == (201, True, None)
    assert (status_b, row_b.get("ok"), row_b.get("accepted")) == (202, True, True)
    assert (status_put, put) == (202, {"ok": True, "id": "lonely", "rev": put["rev"]})
    assert row_a["rev"] != row_b["rev"]

    await couch_cluster.astart_node(1)
    await couch_cluster.astart_node(2)
    # Once the copies have synced, every node shows one winner and the other leaf as a conflict.
    leaves = {row_a["rev"], row_b["rev"]}
    for admin in cluster_admins:
        _, doc = await eventually(
            lambda admin=admin: send(admin, "GET", doc_path(admin, "contested", "conflicts=true")),
            lambda answer: (
                answer[0] == 200 and {answer[1]["_rev"], *answer[1].get("_conflicts", [])} == leaves
            ),
            what=f"both branches visible through {admin.server.url}",
        )
        assert len(doc["_conflicts"]) == 1
        assert doc["state"] in ("claimed-by-a", "claimed-by-b")
