"""The daemon's CouchDB client against the real test server: the calls the workers rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cht_rapidpro.config import parse_couch_url
from cht_rapidpro.couch.client import BulkWriter, CouchClient, DocReader, LeafReader
from support import CouchAdmin

BY_STATE = "function(doc) { if (doc.state) { emit(doc.state, null); } }"


@pytest.fixture
async def client(couch: CouchAdmin) -> AsyncIterator[CouchClient]:
    couch_client = CouchClient.connect(parse_couch_url(couch.couch_url), timeout_s=10)
    yield couch_client
    await couch_client.close()


@pytest.mark.parametrize("page_size", [1, 4, 10, 200], ids=lambda n: f"page-{n}")
async def test_view_pages_cover_every_row_once_through_equal_keys(
    couch: CouchAdmin, client: CouchClient, page_size: int
) -> None:
    # Many rows share one key, as in CHT's gateway_messages_by_state.
    await couch.put({"_id": "_design/t", "views": {"by_state": {"map": BY_STATE}}})
    states = ["pending"] * 3 + ["sent"] * 25 + ["delivered"] * 7
    await couch.bulk([{"_id": f"doc-{n:03d}", "state": s} for n, s in enumerate(states)])
    seen: list[tuple[str, str]] = []
    async for rows in client.view_pages("t", "by_state", "pending", "sent", page_size=page_size):
        assert len(rows) <= page_size
        seen += [(row["key"], row["id"]) for row in rows]
    want = sorted((s, f"doc-{n:03d}") for n, s in enumerate(states) if s != "delivered")
    assert seen == want


async def test_bulk_write_reports_conflicts_per_row(couch: CouchAdmin, client: CouchClient) -> None:
    await couch.put({"_id": "a", "v": 1})
    stale = {"_id": "a", "_rev": "1-00000000000000000000000000000000", "v": 2}
    fresh = {"_id": "b", "v": 1}
    results = await client.bulk_write([stale, fresh])
    assert [(r.id, r.conflict, r.ok) for r in results] == [("a", True, False), ("b", False, True)]
    assert fresh["_rev"] == results[1].rev
    assert "_rev" in fresh and stale["_rev"].startswith("1-0000")


async def test_put_overwrites_own_document(couch: CouchAdmin, client: CouchClient) -> None:
    await client.put({"_id": "mine", "n": 1})
    await client.put({"_id": "mine", "n": 2})
    doc = await couch.get("mine")
    assert doc is not None and doc["n"] == 2


async def test_docs_with_prefix(couch: CouchAdmin, client: CouchClient) -> None:
    await couch.bulk([{"_id": "messages-en"}, {"_id": "messages-fr"}, {"_id": "messagez"}])
    docs = await client.docs_with_prefix("messages-")
    assert [doc["_id"] for doc in docs] == ["messages-en", "messages-fr"]


async def test_config_and_node_name(client: CouchClient) -> None:
    assert await client.node_name()
    assert await client.config_value("couch_httpd_auth", "secret")
    assert await client.config_value("medic-credentials", "no-such-key") is None


async def test_a_quiet_long_poll_ends_without_an_error(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """CouchDB 3 and pouchdb-server ignore `timeout` while sending heartbeats: the client ends
    the long poll itself, as a page without changes, so a quiet database neither stalls the
    feed nor looks like an outage."""
    await couch.put({"_id": "one"})
    first = await client.changes(None, limit=10, heartbeat_s=0.2)
    assert [row["id"] for row in first.results] == ["one"]
    quiet = await client.changes(first.last_seq, limit=10, heartbeat_s=0.2)
    assert quiet.results == []
    assert quiet.last_seq == first.last_seq


async def split_document(couch: CouchAdmin, doc_id: str) -> str:
    """A document with two leaves of generation 2 (`v` 2, and a sibling with `v` 3, stored as
    replication stores one); returns their parent revision."""
    doc = await couch.put({"_id": doc_id, "v": 1})
    parent = str(doc["_rev"])
    await couch.put(dict(doc, v=2))
    sibling = {"_id": doc_id, "_rev": "2-" + "a" * 32, "v": 3,
               "_revisions": {"start": 2, "ids": ["a" * 32, parent.split("-")[1]]}}  # fmt: skip
    await couch.request("POST", f"/{couch.db}/_bulk_docs", {"docs": [sibling], "new_edits": False})
    return parent


async def test_leaves_and_conflicts(couch: CouchAdmin, client: CouchClient) -> None:
    """Every leaf with its ancestry (`open_revs=all`), and `_conflicts` on a plain read."""
    parent = await split_document(couch, "c")
    leaves = await client.leaves("c")
    assert len(leaves) == 2
    assert all(leaf.descends_from(parent) for leaf in leaves)
    assert {leaf.doc["v"] for leaf in leaves} == {2, 3}
    read = await client.get("c", conflicts=True)
    assert read is not None and len(read["_conflicts"]) == 1
    assert await client.leaves("missing") == []


async def test_leaves_of_many_documents_in_one_request(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """`_bulk_get` without a revision: every leaf of each document, as `leaves` reads one;
    concurrent readers share a request (`LeafReader`)."""
    await split_document(couch, "c")
    await couch.bulk([{"_id": f"plain-{n}", "n": n} for n in range(5)])
    gone = await couch.put({"_id": "gone"})
    await couch.request("DELETE", f"/{couch.db}/gone?rev={gone['_rev']}")

    couchdb = await client.is_couchdb()  # learnt once, before the readers come
    reader = LeafReader(client)
    ids = ["c", "c", *(f"plain-{n}" for n in range(5)), "missing"]
    answers = await asyncio.gather(*(reader.leaves(doc_id) for doc_id in ids))
    assert [len(a) for a in answers] == [2, 2, 1, 1, 1, 1, 1, 0]
    assert answers[0][0].doc is not answers[1][0].doc  # each caller its own copy
    if not couchdb:
        # pouchdb-server's `_bulk_get` gives the winning leaf alone: one read each there.
        assert reader.requests == 0
        return
    assert reader.requests == 1

    found = await client.leaves_many(["c", "plain-0", "missing", "gone"])
    single = await client.leaves("c")
    assert not isinstance(found["c"], Exception)
    assert sorted((leaf.rev, leaf.ancestry, leaf.doc["v"]) for leaf in found["c"]) == sorted(
        (leaf.rev, leaf.ancestry, leaf.doc["v"]) for leaf in single
    )
    assert found["missing"] == []
    assert [leaf.doc["n"] for leaf in found["plain-0"]] == [0]  # type: ignore[union-attr]
    assert [leaf.deleted for leaf in found["gone"]] == [True]  # type: ignore[union-attr]


async def test_concurrent_rereads_share_a_request_on_couchdb(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """`DocReader`: what `get(doc_id, conflicts=True)` returns, for many callers at once."""
    doc = await couch.put({"_id": "c", "v": 1})
    sibling = {"_id": "c", "_rev": "1-" + "0" * 32, "v": 0}
    await couch.request("POST", f"/{couch.db}/_bulk_docs", {"docs": [sibling], "new_edits": False})
    await couch.bulk([{"_id": f"plain-{n}", "n": n} for n in range(3)])
    gone = await couch.put({"_id": "gone"})
    await couch.request("DELETE", f"/{couch.db}/gone?rev={gone['_rev']}")
    ids = ["c", "c", "plain-0", "plain-1", "plain-2", "gone", "missing"]
    want = [await client.get(doc_id, conflicts=True) for doc_id in ids]
    couchdb = await client.is_couchdb()
    reader = DocReader(client)
    got = await asyncio.gather(*(reader.get(doc_id) for doc_id in ids))
    assert got == want
    assert want[0] is not None and want[0]["_rev"] == doc["_rev"] and want[0]["_conflicts"]
    assert got[0] is not got[1]  # each caller its own copy
    assert reader.requests == (1 if couchdb else 0)  # pouchdb-server: one GET each


async def test_lazy_writes_ride_along_with_the_next_urgent_one(client: CouchClient) -> None:
    writer = BulkWriter(client, lazy_s=5.0)
    lazy = asyncio.ensure_future(writer.write({"_id": "lazy-1", "n": 1}, lazy=True))
    await asyncio.sleep(0.2)
    assert not lazy.done() and writer.requests == 0  # no request of its own yet
    urgent = await writer.write({"_id": "urgent-1", "n": 2})
    assert urgent.ok and (await lazy).ok
    assert writer.requests == 1  # one request carried both


async def test_a_lone_lazy_write_goes_when_it_has_waited_lazy_s(client: CouchClient) -> None:
    writer = BulkWriter(client, lazy_s=0.3)
    started = time.monotonic()
    results = await asyncio.gather(
        writer.write({"_id": "lazy-a"}, lazy=True), writer.write({"_id": "lazy-b"}, lazy=True)
    )
    assert all(r.ok for r in results)
    assert time.monotonic() - started >= 0.3
    assert writer.requests == 1
    assert (await writer.write({"_id": "urgent-a"})).ok  # an urgent write never waits
    assert writer.requests == 2
