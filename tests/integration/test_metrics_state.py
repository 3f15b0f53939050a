"""The state gauges the alert rules rely on, as a real daemon exports them at /metrics.

chtrp_healthy (what /healthz says), chtrp_sending_paused (RapidPro refuses the token),
chtrp_unsent_messages and chtrp_oldest_unsent_age_seconds (the backlog seen on the feed).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cht_rapidpro.sandbox import DEFAULT_TOKEN
from support import CouchAdmin, all_tasks, eventually, iso, message_doc, rapidpro_settings, task

ACCEPTED = {"received-by-gateway", "forwarded-by-gateway", "sent", "delivered"}
GAUGES = (
    "chtrp_healthy",
    "chtrp_sending_paused",
    "chtrp_unsent_messages",
    "chtrp_oldest_unsent_age_seconds",
)


async def gauges(daemon: Any) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(daemon.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in GAUGES
    }


def waited_since(seconds_ago: float) -> dict[str, Any]:
    """A pending task whose history says it became pending `seconds_ago`."""
    stamp = iso((time.time() - seconds_ago) * 1000)
    return task(
        "+254700000401", "waiting", state_history=[{"state": "pending", "timestamp": stamp}]
    )


async def state_of(couch: CouchAdmin, doc_id: str) -> str:
    doc = await couch.get(doc_id)
    assert doc is not None
    return str(all_tasks(doc)[0]["state"])


async def test_backlog_and_health_while_sending_is_disabled_then_enabled(
    couch: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # CHT set up, but the RapidPro token not stored yet: sending is disabled.
    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    doc = await couch.put(message_doc([waited_since(3600)]))
    daemon = await daemon_factory()
    seen = await eventually(
        lambda: gauges(daemon),
        lambda g: g.get("chtrp_unsent_messages") == 1,
        what="the pending message in the backlog",
    )
    assert seen["chtrp_healthy"] == 0  # "sending disabled: No api key configured"
    assert seen["chtrp_sending_paused"] == 0  # RapidPro has refused nothing
    assert 3600 <= seen["chtrp_oldest_unsent_age_seconds"] < 3600 + 600

    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    await eventually(lambda: state_of(couch, doc["_id"]), lambda s: s in ACCEPTED,
                     what="message sent once the token is stored")  # fmt: skip
    after = await eventually(
        lambda: gauges(daemon),
        lambda g: g.get("chtrp_unsent_messages") == 0,
        what="the backlog emptied by the feed",
    )
    assert after["chtrp_oldest_unsent_age_seconds"] == 0
    assert after["chtrp_healthy"] == 1


async def test_sending_paused_while_rapidpro_refuses_the_token(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    rapidpro.sandbox.configure(tokens=["a-token-cht-does-not-have"])
    doc = await cht.put(message_doc([task("+254700000402", "refused")]))
    daemon = await daemon_factory()
    paused = await eventually(
        lambda: gauges(daemon),
        lambda g: g.get("chtrp_sending_paused") == 1,
        what="sending paused by the refused token",
    )
    assert paused["chtrp_healthy"] == 0
    assert paused["chtrp_unsent_messages"] == 1

    # The operator stores the workspace's token in CHT: no restart, the message goes out.
    await cht.put_vault_credential("rapidpro:outgoing", "a-token-cht-does-not-have")
    await eventually(lambda: state_of(cht, doc["_id"]), lambda s: s in ACCEPTED,
                     what="message sent with the new token")  # fmt: skip
    resumed = await eventually(
        lambda: gauges(daemon),
        lambda g: g.get("chtrp_sending_paused") == 0 and g.get("chtrp_unsent_messages") == 0,
        what="sending resumed",
    )
    assert resumed["chtrp_healthy"] == 1


async def test_backlog_empties_after_a_burst_read_on_lean_pages(
    couch: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    """In a burst the feed skips the daemon's own write-backs (lean pages): the backlog
    learns of them when they are written, so the gauge still comes back to 0."""
    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    daemon = await daemon_factory()
    await eventually(lambda: gauges(daemon), lambda g: g.get("chtrp_healthy") == 1,
                     what="the daemon up")  # fmt: skip
    docs = [message_doc([task(f"+2547004{n:05d}", f"burst {n}")]) for n in range(400)]
    await couch.bulk(docs)

    async def sent() -> int:
        return sum(1 for d in await couch.all_docs() if d.get("tasks")
                   and d["tasks"][0]["state"] in ACCEPTED)  # fmt: skip

    await eventually(sent, lambda n: n == len(docs), within=60, what="the burst sent")
    after = await eventually(
        lambda: gauges(daemon),
        lambda g: g.get("chtrp_unsent_messages") == 0,
        what="the backlog emptied",
    )
    assert after["chtrp_oldest_unsent_age_seconds"] == 0
    assert daemon.gateway.follower.lean_pages > 0  # the write-backs came on lean pages


async def test_an_own_claim_seen_after_its_write_back_does_not_bring_the_message_back(
    couch: CouchAdmin, daemon_factory: Any
) -> None:
    """The feed can bring a claim of ours (with its document) after the write-back that
    followed it was written and told the backlog: the stale revision must not count the
    message unsent again (the write-back itself may then come on a lean page, skipped)."""
    daemon = await daemon_factory()  # no outgoing credential: nothing is sent meanwhile
    gateway = daemon.gateway
    claimed = message_doc([task("+254700000402", "claimed", state="forwarded-to-gateway")])
    claimed["_rev"] = "2-" + "c" * 32
    written_back = message_doc(
        [task("+254700000402", "claimed", state="received-by-gateway", gateway_ref="101")],
        doc_id=claimed["_id"],
    )
    written_back["_rev"] = "3-" + "d" * 32
    gateway.sender.remember_write(claimed["_id"], claimed["_rev"])  # the claim, ours
    gateway.sender.remember_write(claimed["_id"], written_back["_rev"])
    gateway._written_back(written_back)
    assert gateway.backlog.messages == 0
    gateway.dispatcher.handle_doc(claimed, None)  # the claim, late on a page with documents
    assert gateway.backlog.messages == 0
