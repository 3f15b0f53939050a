"""RapidPro's message log into CHT (issue 13): mirrored outgoing messages, recovered incoming
SMS, exactly once across re-scans, restarts, replicas and the webhook; pouchdb-server (or real
CouchDB) and the sandbox, the daemon in process."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cht_rapidpro.commands.parse import run_parse_rapidpro
from cht_rapidpro.commands.status import collect, render
from cht_rapidpro.config import Settings
from cht_rapidpro.couch.client import CouchClient
from cht_rapidpro.messagelog import MessageLog
from cht_rapidpro.replicas import Presence
from cht_rapidpro.sandbox import cht_headers
from cht_rapidpro.sandbox.state import INCOMING_FLOW, REMINDERS_FLOW
from support import (
    INCOMING_KEY,
    CouchAdmin,
    all_tasks,
    eventually,
    install_cht_views,
    message_doc,
    task,
    view_rows,
)

GRACE = "0.3"
MIRROR = {"CHT_RAPIDPRO_MIRROR_OUTGOING": "true", "CHT_RAPIDPRO_LOG_GRACE": GRACE}
RECOVER = {"CHT_RAPIDPRO_INCOMING_FLOWS": INCOMING_FLOW["uuid"], "CHT_RAPIDPRO_LOG_GRACE": GRACE}
WEBHOOK = "/api/v2/sms/rapidpro/incoming-messages"
JANE = "+254712345678"


async def mirrored(couch: CouchAdmin) -> list[dict[str, Any]]:
    return [d for d in await couch.all_docs() if d["_id"].startswith("rapidpro-msg:")]


async def reports(couch: CouchAdmin) -> list[dict[str, Any]]:
    return [d for d in await couch.all_docs() if d.get("sms_message")]


def states(doc: dict[str, Any]) -> list[str]:
    return [t["state"] for t in all_tasks(doc)]


def dead_url() -> str:
    """A webhook URL nothing listens on (the daemon is down): RapidPro's call fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{WEBHOOK}"


async def rounds_after(daemon: Any, count: int) -> None:
    """Wait for `count` more rounds of the daemon's log follower."""
    poller = daemon.gateway.poller
    target = poller.rounds + count
    await eventually(lambda: asyncio.sleep(0, poller.rounds), lambda n: n >= target,
                     within=30, what=f"{count} more rounds")  # fmt: skip


async def jane(couch: CouchAdmin) -> dict[str, Any]:
    return await couch.put(
        {
            "_id": "person-jane",
            "type": "person",
            "name": "Jane",
            "phone": JANE,
            "parent": {"_id": "household-1", "parent": {"_id": "area-1"}},
        }
    )


# --- mirroring -----------------------------------------------------------------------------------


async def test_rapidpro_messages_are_mirrored_once_into_the_conversation(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await install_cht_views(cht)
    await jane(cht)
    own = await cht.put(message_doc([task(JANE, "Sent from CHT")]))
    daemon = await daemon_factory(**MIRROR)
    sandbox = rapidpro.sandbox
    [reply] = sandbox.send_from_rapidpro(
        [f"tel:{JANE}"], "Your visit is tomorrow", flow=REMINDERS_FLOW
    )
    closed = sandbox.send_from_rapidpro(
        [f"tel:{JANE}", "tel:+254700000002"], "Clinic closed Monday", broadcast=True
    )

    def settled(docs: list[dict[str, Any]]) -> bool:
        return len(docs) == 3 and all(states(d) == ["delivered"] for d in docs)

    docs = await eventually(lambda: mirrored(cht), settled, what="three mirrored, delivered")
    by_id = {d["rapidpro"]["message_id"]: d for d in docs}
    assert set(by_id) == {reply.id, *(m.id for m in closed)}
    flow_doc = by_id[reply.id]
    assert flow_doc["sent_by"] == "RapidPro (flow: ANC reminders)"
    assert flow_doc["_id"] == f"rapidpro-msg:127.0.0.1:{reply.id}"
    [message] = flow_doc["tasks"][0]["messages"]
    assert message["contact"] == {
        "_id": "person-jane",
        "parent": {"_id": "household-1", "parent": {"_id": "area-1"}},
    }
    assert (message["to"], message["message"], message["uuid"]) == (JANE, reply.text, reply.uuid)
    assert by_id[closed[0].id]["sent_by"] == "RapidPro"
    assert by_id[closed[0].id]["rapidpro"]["broadcast"] == closed[0].broadcast
    assert "contact" not in by_id[closed[1].id]["tasks"][0]["messages"][0]  # unknown number

    # CHT's own message is not mirrored: it was sent by the daemon.
    done = await cht.get(own["_id"])
    assert done is not None and states(done) == ["delivered"]
    # The Messages tab shows both RapidPro messages in Jane's conversation, by contact.
    rows = await view_rows(cht, "medic-client", "messages_by_contact_date",
                           startkey=["person-jane", 0], endkey=["person-jane", {}])  # fmt: skip
    assert sorted(r["value"]["message"] for r in rows) == [
        "Clinic closed Monday",
        "Your visit is tomorrow",
    ]
    # Nothing is mirrored twice, however many rounds re-read the log.
    await rounds_after(daemon, 10)
    assert len(await mirrored(cht)) == 3
    assert daemon.gateway.poller.stats["mirrored"] == 3


async def test_thousand_rapidpro_messages_mirrored_once_with_their_later_statuses(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # Issue 13 item 5: 1,000 RapidPro-originated messages, mirrored once each, with later
    # status changes, through a restart, visible through the Messages tab's view.
    await install_cht_views(cht)
    await jane(cht)
    sandbox = rapidpro.sandbox
    sandbox.configure(step_seconds=1.5)  # statuses change after the messages are mirrored
    env = {**MIRROR, "CHT_RAPIDPRO_INSTANCE": "node-m"}
    daemon = await daemon_factory(**env)
    made = []
    for batch in range(10):
        urns = [f"tel:+2547001{batch:02d}{n:03d}" for n in range(50)]
        made += sandbox.send_from_rapidpro(urns, f"Reminder {batch}", flow=REMINDERS_FLOW)
        made += sandbox.send_from_rapidpro(
            [*urns[:49], f"tel:{JANE}"], f"News {batch}", broadcast=True
        )
        if batch == 4:
            await eventually(lambda: mirrored(cht), lambda d: len(d) >= 200, within=60)
            await daemon.stop()  # a restart in the middle: the position resumes
            daemon = await daemon_factory(**env)
    assert len(made) == 1000

    def finished(docs: list[dict[str, Any]]) -> bool:
        return len(docs) >= 1000 and all(states(d) == ["delivered"] for d in docs)

    docs = await eventually(lambda: mirrored(cht), finished, within=120, every=0.5,
                            what="1,000 mirrored and delivered")  # fmt: skip
    assert len(docs) == 1000
    assert Counter(d["rapidpro"]["message_id"] for d in docs) == Counter(m.id for m in made)
    later = [d for d in docs if len(d["tasks"][0]["state_history"]) > 1]
    assert len(later) > 900, "statuses changed after mirroring were followed"
    for doc in later[:50]:
        seen = [e["state"] for e in doc["tasks"][0]["state_history"]]
        assert (
            seen[0] in ("received-by-gateway", "forwarded-by-gateway") and seen[-1] == "delivered"
        )
    rows = await view_rows(cht, "medic-client", "messages_by_contact_date",
                           startkey=["person-jane", 0], endkey=["person-jane", {}])  # fmt: skip
    assert len(rows) == 10 and {r["value"]["message"] for r in rows} == {
        f"News {b}" for b in range(10)
    }
    await rounds_after(daemon, 5)
    assert len(await mirrored(cht)) == 1000


async def test_two_followers_at_once_mirror_each_message_once(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # Replicas must not mirror twice even when two believe they lead: a follower whose
    # presence knows no peer runs beside the daemon's own, on the same database.
    await install_cht_views(cht)
    daemon = await daemon_factory(**MIRROR)
    gateway = daemon.gateway
    couch = CouchClient.connect(gateway.settings.couch, timeout_s=10)
    try:
        twin = MessageLog(
            couch=couch,
            writer=gateway.writer,
            rapidpro=gateway.rapidpro,
            cht=gateway.cht,
            settings=gateway.settings,
            index=gateway.index,
            own=gateway.own,
            store=gateway.incoming,
            presence=Presence(couch, "twin-without-peers"),
            metrics=gateway.metrics,
        )
        made = []
        for n in range(10):
            made += rapidpro.sandbox.send_from_rapidpro(
                [f"tel:+25470020{n:04d}" for n in range(n * 20, n * 20 + 20)], f"Flow reply {n}",
                flow=REMINDERS_FLOW,
            )  # fmt: skip
            await asyncio.gather(twin.run_once(), asyncio.sleep(0.1))
        await eventually(lambda: mirrored(cht), lambda d: len(d) >= 200, within=60)
        for _ in range(10):
            await asyncio.gather(twin.run_once(), asyncio.sleep(0.1))
        docs = await mirrored(cht)
        assert Counter(d["rapidpro"]["message_id"] for d in docs) == Counter(m.id for m in made)
        assert twin.stats["mirrored"] + gateway.poller.stats["mirrored"] >= 200
    finally:
        await couch.close()


async def test_an_uncertain_send_of_ours_is_never_mirrored(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # The broadcast is created but the answer lost: until the sender looks it up and adopts
    # it, CouchDB does not know its id. The follower sees the row meanwhile and must wait.
    await install_cht_views(cht)
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=502, commit=True)
    doc = await cht.put(message_doc([task("+254700000031", "once only, never mirrored")]))
    daemon = await daemon_factory(**MIRROR)
    await eventually(lambda: cht.get(doc["_id"]), lambda d: states(d) == ["delivered"],
                     within=40, what="adopted and delivered")  # fmt: skip
    [posted] = rapidpro.sandbox.posted_broadcasts()
    done = await cht.get(doc["_id"])
    assert done is not None and done["tasks"][0]["gateway_ref"] == posted.id
    await rounds_after(daemon, 5)
    assert await mirrored(cht) == []
    assert daemon.gateway.poller.stats["deferred"] > 0  # it waited for the claim to settle


async def test_mirroring_without_chts_views(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # No medic-sms or medic-client design docs: ours are told apart by the in-memory index,
    # mirrors by their deterministic ids; no contact is resolved (threads by number).
    own = await cht.put(message_doc([task(JANE, "from CHT")]))
    daemon = await daemon_factory(**MIRROR)
    made = rapidpro.sandbox.send_from_rapidpro([f"tel:{JANE}"] * 1 + ["tel:+254700000003"], "hi")
    docs = await eventually(lambda: mirrored(cht), lambda d: len(d) == 2
                            and all(states(x) == ["delivered"] for x in d))  # fmt: skip
    assert {d["rapidpro"]["message_id"] for d in docs} == {m.id for m in made}
    assert all("contact" not in d["tasks"][0]["messages"][0] for d in docs)
    done = await cht.get(own["_id"])
    assert done is not None and states(done) == ["delivered"]
    await rounds_after(daemon, 5)
    assert len(await mirrored(cht)) == 2


# --- recovery ------------------------------------------------------------------------------------


async def deliver(sandbox: Any, url: str, sender: str, text: str, **extra: Any) -> Any:
    return await sandbox.deliver_incoming(
        url, from_=sender, text=text, headers=cht_headers(INCOMING_KEY), **extra
    )


@pytest.mark.parametrize("body", ["cht", "message"], ids=["chts-body-run-uuid", "extended-body"])
async def test_sms_arriving_while_the_daemon_is_down_are_recovered_once(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any, body: str
) -> None:
    # Issue 13 item 5: the daemon stopped while 200 SMS arrive (some with identical text
    # from one number), then started: 200 reports, 0 duplicates.
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    mode = "run" if body == "cht" else "message"
    env = {**RECOVER, "CHT_RAPIDPRO_INCOMING_ID": mode, "CHT_RAPIDPRO_INSTANCE": "node-r"}
    sandbox = rapidpro.sandbox
    daemon = await daemon_factory(**env)
    for n in range(10):  # before the outage: stored by the webhook
        outcome = await deliver(sandbox, daemon.url + WEBHOOK, f"+2547003000{n:02d}", f"before {n}",
                                body=body)  # fmt: skip
        assert outcome.category == "Success"
    await rounds_after(daemon, 3)
    await daemon.stop()
    down = dead_url()
    expected: Counter[tuple[str, str]] = Counter()
    for n in range(200):
        sender, text = (
            ("+254700300099", "VISIT 12345 fever")
            if n % 4 == 0
            else (f"+2547004{n:05d}", f"DSP {n}")
        )
        outcome = await deliver(sandbox, down, sender, text, body=body)
        assert outcome.category == "Failure"
        expected[(sender, text)] += 1
    assert expected[("+254700300099", "VISIT 12345 fever")] == 50

    restarted = await daemon_factory(**env)
    stored = await eventually(lambda: reports(cht), lambda r: len(r) >= 210, within=60,
                              what="210 reports")  # fmt: skip
    await rounds_after(restarted, 5)
    stored = await reports(cht)
    assert len(stored) == 210
    got = Counter((d["sms_message"]["from"], d["sms_message"]["message"]) for d in stored)
    assert got == expected + Counter({(f"+2547003000{n:02d}", f"before {n}"): 1 for n in range(10)})
    refs = [d["sms_message"]["gateway_ref"] for d in stored]
    assert len(set(refs)) == 210
    incoming = [m for m in sandbox.messages if m.direction == "in"]
    if mode == "message":
        assert set(refs) == {m.uuid for m in incoming}
    else:
        assert set(refs) == {r.uuid for r in sandbox.runs}
    assert restarted.gateway.poller.stats["recovered"] == 200
    assert restarted.gateway.poller.position.totals["recovered"] >= 200
    recovered = next(d for d in stored if d["sms_message"]["message"] == "DSP 1")
    message = next(m for m in incoming if m.text == "DSP 1")
    assert recovered["reported_date"] == int(message.created_on.timestamp() * 1000)
    assert recovered["_id"] == f"sms-rapidpro:{recovered['sms_message']['gateway_ref']}"
    assert "form" not in recovered and recovered["from"] == "+254700400001"


async def test_webhook_and_recovery_racing_on_the_same_sms_store_one_report(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # RapidPro's call failed, then a late delivery of the same SMS (a v9 retry, a re-run)
    # reaches a replica's webhook just as the leader recovers it: one report each.
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    leader = await daemon_factory(
        **{**RECOVER, "CHT_RAPIDPRO_LOG_GRACE": "0"}, CHT_RAPIDPRO_INSTANCE="a"
    )
    other = await daemon_factory(CHT_RAPIDPRO_INSTANCE="b")
    sandbox = rapidpro.sandbox
    down = dead_url()
    sent = []
    async with aiohttp.ClientSession() as session:
        for n in range(20):
            run_uuid = str(uuid.uuid4())
            body = {"content": f"RACE {n}", "from": f"+25470050{n:04d}", "id": run_uuid}
            await deliver(sandbox, down, body["from"], body["content"], run_uuid=run_uuid)
            await asyncio.sleep(0.04 * (n % 8))  # land at different points of a 0.2 s round
            async with session.post(
                other.url + WEBHOOK, data=json.dumps(body),
                headers={**cht_headers(INCOMING_KEY), "Accept": "application/json"},
            ) as response:  # fmt: skip
                assert response.status == 200, await response.text()
            sent.append(run_uuid)
    stored = await eventually(lambda: reports(cht), lambda r: len(r) >= 20, within=30)
    await rounds_after(leader, 5)
    stored = await reports(cht)
    assert sorted(d["sms_message"]["gateway_ref"] for d in stored) == sorted(sent)
    assert len(stored) == 20


async def test_recovery_recognises_the_webhooks_report_sent_from_the_contacts_first_number(
    cht: CouchAdmin, daemon_factory: Any
) -> None:
    # CHT's flow body sends `urns.tel` (the contact's first number); recovery knows the number
    # the SMS came from. Landing on the webhook's report, the text decides: one report.
    daemon = await daemon_factory(CHT_RAPIDPRO_INSTANCE="r")
    store = daemon.gateway.incoming
    webhook = {"id": str(uuid.uuid4()), "from": "+254700600001", "content": "VISIT 7"}
    assert (await store.store(dict(webhook))).outcome == "saved"
    recovered = {**webhook, "from": "+254700600002"}
    again = await store.store(dict(recovered), check_cht=False, match_sender=False)
    assert again.outcome == "duplicate"
    assert len(await reports(cht)) == 1
    # The webhook itself keeps comparing the sender: another number under the id is another SMS.
    other = await store.store(dict(recovered))
    assert other.outcome == "saved" and other.doc_id != again.doc_id
    assert len(await reports(cht)) == 2


async def test_recovery_skips_what_the_webhook_stored_and_other_flows(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    daemon = await daemon_factory(**RECOVER)
    sandbox = rapidpro.sandbox
    other_flow = {"uuid": "9e4f7c1a-0000-4000-8000-0000000000cc", "name": "Survey"}
    ok = await deliver(sandbox, daemon.url + WEBHOOK, "+254700600001", "stored by the webhook")
    assert ok.category == "Success"
    await deliver(sandbox, dead_url(), "+254700600002", "survey answer", flow=other_flow)
    sandbox.add_incoming_message("tel:+254700600003", "inbox, no flow", flow=None)
    await rounds_after(daemon, 5)
    assert [d["sms_message"]["message"] for d in await reports(cht)] == ["stored by the webhook"]
    assert daemon.gateway.poller.stats["recovered"] == 0


async def test_late_listed_sms_is_recovered_by_the_hourly_sweep(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # A busy RapidPro handles an SMS long after it arrived: it is listed with an old
    # created_on, below what forward scans re-read. The sweep of the CHT flows finds it.
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    sandbox = rapidpro.sandbox
    message = sandbox.add_incoming_message(
        "tel:+254700700001",
        "handled late",
        handled=False,
        created_on=datetime.now(UTC) - timedelta(minutes=10),
    )
    daemon = await daemon_factory(**RECOVER)
    await rounds_after(daemon, 3)
    sandbox.handle_incoming(message)  # its webhook call failed; now listed, minutes "late"
    stored = await eventually(lambda: reports(cht), lambda r: len(r) == 1, within=30)
    assert stored[0]["sms_message"]["message"] == "handled late"


# --- what status and parse show ------------------------------------------------------------------


async def test_status_and_parse_show_what_was_mirrored_and_recovered(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await install_cht_views(cht)
    await jane(cht)
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    env = {**MIRROR, **RECOVER, "CHT_RAPIDPRO_INSTANCE": "node-s"}
    daemon = await daemon_factory(**env)
    sandbox = rapidpro.sandbox
    own = await cht.put(message_doc([task("+254700000041", "sent by CHT")]))
    [reply] = sandbox.send_from_rapidpro([f"tel:{JANE}"], "See you tomorrow", flow=REMINDERS_FLOW)
    await deliver(sandbox, dead_url(), JANE, "VISIT 7")
    await eventually(lambda: mirrored(cht), lambda d: len(d) == 1)
    await eventually(lambda: reports(cht), lambda r: len(r) == 1)
    await eventually(lambda: cht.get(own["_id"]), lambda d: states(d) == ["delivered"])
    await daemon.stop()  # the position is saved on the way out
    [incoming] = [m for m in sandbox.messages if m.direction == "in"]
    [ours] = [m for m in sandbox.messages if m.broadcast is not None]
    [later] = sandbox.send_from_rapidpro(["tel:+254700000042"], "not mirrored yet")

    settings = Settings.from_env({"COUCH_URL": cht.couch_url, "CHT_RAPIDPRO_PORT": "1", **env})
    report = await collect(settings)
    log = report.message_log
    assert (log.mirror, log.flows, log.incoming_id) == (True, [INCOMING_FLOW["uuid"]], "run")
    assert log.mirrored_docs == 1 and log.saved_by == "node-s"
    assert log.counted == {"mirrored": 1, "recovered": 1}
    text = render(report)
    assert "rapidpro log mirroring on, recovery for 1 flow (webhook ids: run)" in text
    assert (
        "in CouchDB: 1 mirrored messages; counted by the followers: 1 mirrored, 1 incoming" in text
    )
    assert "See you tomorrow" not in text and JANE not in text

    async def parse(message_id: int) -> dict[str, Any]:
        out, err = io.StringIO(), io.StringIO()
        assert await run_parse_rapidpro(settings, message_id=message_id, out=out, err=err) == 0
        result: dict[str, Any] = json.loads(out.getvalue())
        return result

    shown = await parse(reply.id)
    assert (shown["what"], shown["in_couchdb"]) == ("mirrored", True)
    assert shown["document"]["tasks"][0]["messages"][0]["contact"]["_id"] == "person-jane"
    shown = await parse(incoming.id)
    assert (shown["what"], shown["in_couchdb"]) == ("stored", True)
    assert shown["document"]["sms_message"]["message"] == "VISIT 7"
    shown = await parse(ours.id)
    assert (shown["what"], shown["doc_id"]) == ("sent by this daemon", own["_id"])
    shown = await parse(later.id)
    assert shown["what"].startswith("to be mirrored") and not shown["in_couchdb"]
    assert shown["doc_id"] == f"rapidpro-msg:127.0.0.1:{later.id}"
    assert shown["document"]["tasks"][0]["messages"][0]["to"] == "+254700000042"


async def test_community_rapidpro_9_without_message_uuids(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # RapidPro 9's API lists message ids but no uuids: mirrors get a stable made-up uuid,
    # recovery pairs messages with their runs (CHT's body); the message-uuid body cannot work.
    await install_cht_views(cht)
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    sandbox = rapidpro.sandbox
    sandbox.configure(dialect="v9")
    env = {**MIRROR, **RECOVER, "CHT_RAPIDPRO_INSTANCE": "node-9"}
    daemon = await daemon_factory(**env)
    await rounds_after(daemon, 2)
    await daemon.stop()
    down = dead_url()
    for n in range(5):
        await deliver(sandbox, down, "+254700800001", f"VISIT {n % 2}")  # repeats too
    replies = sandbox.send_from_rapidpro(
        ["tel:+254700800002", "tel:+254700800003"], "Thanks", flow=REMINDERS_FLOW
    )
    daemon = await daemon_factory(**env)
    stored = await eventually(lambda: reports(cht), lambda r: len(r) == 5, within=30)
    assert sorted(d["sms_message"]["gateway_ref"] for d in stored) == sorted(
        r.uuid for r in sandbox.runs
    )
    docs = await eventually(lambda: mirrored(cht), lambda d: len(d) == 2)
    assert {d["rapidpro"]["message_id"] for d in docs} == {m.id for m in replies}
    assert all(d["rapidpro"]["message_uuid"] is None for d in docs)
    assert len({d["tasks"][0]["messages"][0]["uuid"] for d in docs}) == 2
    await daemon.stop()

    # The extended body's message uuids cannot be matched on RapidPro 9: never stored twice,
    # never guessed; said in the log and counted.
    await deliver(sandbox, down, "+254700800009", "WHILE DOWN")
    message_mode = await daemon_factory(**env, CHT_RAPIDPRO_INCOMING_ID="message")
    await rounds_after(message_mode, 5)
    assert len(await reports(cht)) == 5
    unrecoverable = message_mode.gateway.metrics.incoming_unrecoverable._value.get()
    assert unrecoverable == 1


class FlakyCouch:
    """The test server behind a proxy that answers 503 to the first `failures` `_bulk_docs`
    requests carrying a document whose id starts with `prefix` (CouchDB unavailable)."""

    def __init__(self, server: str, prefix: str, failures: int) -> None:
        self.server = server
        self.prefix = prefix
        self.failures = failures
        self.refused = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if (
            request.path.endswith("/_bulk_docs")
            and self.refused < self.failures
            and f'"_id": "{self.prefix}'.encode() in body.replace(b'":"', b'": "')
        ):
            self.refused += 1
            return web.Response(status=503, text="Service Unavailable")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, self.server + request.path_qs, data=body, headers=headers
            ) as upstream,
        ):
            payload = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=payload,
                headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
            )


async def test_a_mirror_whose_write_failed_is_written_later_once(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any, aiohttp_server: Any
) -> None:
    flaky = FlakyCouch(cht.server.url, "rapidpro-msg:", failures=2)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", flaky.handle)
    proxy = await aiohttp_server(app)
    url = cht.couch_url.replace(cht.server.url.split("//", 1)[1], f"127.0.0.1:{proxy.port}")
    daemon = await daemon_factory(**MIRROR, COUCH_URL=url)
    made = rapidpro.sandbox.send_from_rapidpro(
        ["tel:+254700900001", "tel:+254700900002", "tel:+254700900003"],
        "Hello",
        flow=REMINDERS_FLOW,
    )
    docs = await eventually(lambda: mirrored(cht), lambda d: len(d) == 3, within=30)
    assert flaky.refused == 2
    assert {d["rapidpro"]["message_id"] for d in docs} == {m.id for m in made}
    await rounds_after(daemon, 5)
    assert len(await mirrored(cht)) == 3 and daemon.gateway.poller.stats["mirrored"] == 3
