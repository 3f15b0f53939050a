"""Lean pages of the changes feed, against the real test server.

After a page that was mostly the daemon's own writes coming back, the next page is read
without documents: rows whose only leaf is a revision of ours are dropped, every other row
gets its document (with `_conflicts`) from one `_all_docs` read. See `couch/changes.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cht_rapidpro.config import parse_couch_url
from cht_rapidpro.couch.changes import BURST_ROWS, ChangesFollower
from cht_rapidpro.couch.client import BulkWriter, ChangesPage, CouchClient, JsonDict
from cht_rapidpro.gateway import feed_selector
from cht_rapidpro.metrics import Metrics
from support import CouchAdmin


@pytest.fixture
async def client(couch: CouchAdmin) -> AsyncIterator[CouchClient]:
    couch_client = CouchClient.connect(parse_couch_url(couch.couch_url), timeout_s=10)
    yield couch_client
    await couch_client.close()


class Ours:
    """The revisions this "daemon" wrote, as the sender remembers them."""

    def __init__(self, writer: BulkWriter) -> None:
        self.writer = writer
        self.revs: set[tuple[str, str]] = set()

    def __call__(self, doc_id: str, rev: str) -> bool:
        return (doc_id, rev) in self.revs

    async def write(self, docs: list[JsonDict]) -> None:
        results = await asyncio.gather(*(self.writer.write(doc) for doc in docs))
        for result in results:
            assert result.ok and result.rev is not None
            self.revs.add((result.id, result.rev))


def follower(client: CouchClient, ours: Ours) -> ChangesFollower:
    return ChangesFollower(
        client,
        lambda row, page: None,
        checkpoint_id="lean-test",
        batch=100,
        heartbeat_s=0.5,
        checkpoint_interval_s=60,
        retry_initial_s=0.1,
        retry_max_s=1,
        metrics=Metrics(),
        own_revision=ours,
        writer=ours.writer,
    )


def by_id(page: ChangesPage) -> dict[str, JsonDict]:
    return {row["id"]: row for row in page.results}


async def test_own_writes_make_the_next_page_lean_and_others_come_with_documents(
    couch: CouchAdmin, client: CouchClient
) -> None:
    ours = Ours(BulkWriter(client))
    feed = follower(client, ours)
    docs = [{"_id": f"own-{n:02d}", "n": n} for n in range(20)]
    await ours.write(docs)

    first = await feed.read_page()  # read with documents: every row is ours
    assert len(first.results) == 20 and all("doc" in row for row in first.results)
    assert feed.lean_pages == 0
    feed.since = first.last_seq

    # Next: 15 more writes of ours, 3 documents of someone else, a deletion by someone else,
    # and a document whose winning revision is ours but which has a conflicting branch.
    await ours.write([dict(doc, n=doc["n"] + 100) for doc in docs[:15]])
    await couch.bulk([{"_id": f"theirs-{n}", "n": n} for n in range(3)])
    gone = await couch.get("own-19")
    assert gone is not None
    await couch.request("DELETE", f"/{couch.db}/own-19?rev={gone['_rev']}")
    base = await couch.put({"_id": "split", "v": 1})
    await ours.write([dict(base, v=2)])
    sibling = {
        "_id": "split",
        "_rev": "2-" + "0" * 32,  # sorts below ours: ours wins, theirs is the conflict
        "v": 3,
        "_revisions": {"start": 2, "ids": ["0" * 32, base["_rev"].split("-")[1]]},
    }
    await couch.request("POST", f"/{couch.db}/_bulk_docs", {"docs": [sibling], "new_edits": False})

    second = await feed.read_page()
    rows = by_id(second)
    assert feed.lean_pages == 1
    assert all("doc" not in rows[f"own-{n:02d}"] for n in range(15))  # ours: dropped
    assert [rows[f"theirs-{n}"]["doc"]["n"] for n in range(3)] == [0, 1, 2]
    assert rows["own-19"].get("deleted") is True and "doc" not in rows["own-19"]
    split = rows["split"]["doc"]
    assert split["v"] == 2 and split["_conflicts"] == ["2-" + "0" * 32]
    assert feed.lean_reads == 4  # one `_all_docs` read: three documents and the split one
    feed.since = second.last_seq

    # 15 of 20 rows ours: still lean. A page of someone else's documents ends it.
    await couch.bulk([{"_id": f"burst-{n:02d}"} for n in range(BURST_ROWS)])
    third = await feed.read_page()
    assert feed.lean_pages == 2 and all("doc" in row for row in third.results)
    feed.since = third.last_seq
    await couch.put({"_id": "after"})
    fourth = await feed.read_page()
    assert feed.lean_pages == 2  # read with documents again
    assert by_id(fourth)["after"]["doc"]["_id"] == "after"


async def test_a_short_page_is_never_followed_by_a_lean_one(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """A trickle of our own writes (the latency case) keeps documents on the feed: a lean
    page would cost a second request for the next new message."""
    ours = Ours(BulkWriter(client))
    feed = follower(client, ours)
    await ours.write([{"_id": f"own-{n}"} for n in range(BURST_ROWS - 1)])
    first = await feed.read_page()
    feed.since = first.last_seq
    await couch.put({"_id": "new-message"})
    second = await feed.read_page()
    assert feed.lean_pages == 0 and by_id(second)["new-message"]["doc"]["_id"] == "new-message"


async def test_settle_waits_until_the_writer_heard_the_answer(client: CouchClient) -> None:
    """The feed can show a revision before the request that wrote it is answered: `settle`
    lets the writer hear its answer (and remember the revision) before the row is judged."""
    writer = BulkWriter(client)
    heard: list[str | None] = []

    async def write() -> None:
        result = await writer.write({"_id": "racing"})
        heard.append(result.rev)

    job = asyncio.ensure_future(write())
    for _ in range(1000):
        if writer.writing("racing"):
            break
        await asyncio.sleep(0)
    assert writer.writing("racing")
    assert await writer.settle(["racing", "other"])
    assert len(heard) == 1 and heard[0] is not None
    assert not await writer.settle(["racing"])  # nothing under way: no wait
    await job


async def test_couchdb_sends_only_what_the_daemon_acts_on(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """`gateway.feed_selector()`: on Apache CouchDB the feed leaves out what the dispatcher
    would only skip (contacts, reports without messages, design documents) and keeps the
    rest, deletions included. pouchdb-server crashes on `filter=_selector`: never sent there."""
    if not await client.is_couchdb():
        pytest.skip("filter=_selector is for Apache CouchDB only (the real tier runs this)")
    contact = await couch.put({"_id": "contact", "type": "person"})
    await couch.bulk(
        [
            {"_id": "report", "type": "data_record", "form": "V"},
            {"_id": "with-tasks", "type": "data_record", "tasks": []},
            {"_id": "scheduled", "type": "data_record", "scheduled_tasks": []},
            {"_id": "cht-rapidpro-replica:a"},
            {"_id": "messages-en", "type": "translations"},
            {"_id": "sms-rapidpro:123"},
            {"_id": "_design/medic", "views": {}},
        ]
    )
    await couch.put_settings()
    await couch.request("DELETE", f"/{couch.db}/contact?rev={contact['_rev']}")
    page = await client.changes(None, limit=100, heartbeat_s=0.5, selector=feed_selector())
    assert sorted(row["id"] for row in page.results) == sorted(
        ["with-tasks", "scheduled", "cht-rapidpro-replica:a", "messages-en",
         "sms-rapidpro:123", "settings", "contact"]
    )  # fmt: skip
    assert next(r for r in page.results if r["id"] == "contact").get("deleted") is True


async def test_a_lean_page_is_read_without_the_selector(
    couch: CouchAdmin, client: CouchClient
) -> None:
    """To match a selector CouchDB 3 opens every document (0.18-0.20 ms a row against 0.06
    without): a lean page, mostly our own writes, is read without it. A document it would
    have dropped (a contact) then comes with its document, for the consumer to skip."""
    if not await client.is_couchdb():
        pytest.skip("filter=_selector is for Apache CouchDB only (the real tier runs this)")
    ours = Ours(BulkWriter(client))
    feed = follower(client, ours)
    feed.selector = feed_selector()
    docs = [{"_id": f"own-{n:02d}", "tasks": []} for n in range(20)]
    await ours.write(docs)
    await couch.put({"_id": "contact-before", "type": "person"})
    first = await feed.read_page()  # with documents, through the selector: no contact
    assert sorted(by_id(first)) == [f"own-{n:02d}" for n in range(20)]
    feed.since = first.last_seq

    await ours.write([dict(doc, n=1) for doc in docs[:15]])
    await couch.put({"_id": "contact", "type": "person"})
    second = await feed.read_page()
    rows = by_id(second)
    assert feed.lean_pages == 1
    assert rows["contact"]["doc"]["type"] == "person"
    assert all("doc" not in rows[f"own-{n:02d}"] for n in range(15))
    feed.since = second.last_seq

    # A page of someone else's documents ends lean reading: the selector is back.
    await couch.bulk([{"_id": f"burst-{n:02d}", "tasks": []} for n in range(BURST_ROWS)])
    third = await feed.read_page()
    feed.since = third.last_seq
    await couch.bulk([{"_id": "contact-after", "type": "person"}, {"_id": "msg", "tasks": []}])
    fourth = await feed.read_page()
    assert feed.lean_pages == 2 and sorted(by_id(fourth)) == ["msg"]
