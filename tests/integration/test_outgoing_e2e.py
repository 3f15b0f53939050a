"""The outgoing path end to end: pouchdb-server, the daemon and the RapidPro sandbox.

Spec cht-messaging §6.2, §6.3, §6.6 (as they apply to a changes-feed sender), §8 weaknesses,
and rapidpro-api §1.4-1.6.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from cht_rapidpro.config import OPTIONS, Bounded
from cht_rapidpro.sandbox import DEFAULT_TOKEN
from support import (
    MESSAGES_BY_STATE,
    CouchAdmin,
    all_tasks,
    eventually,
    message_doc,
    rapidpro_settings,
    task,
)

FINAL = {"delivered", "failed"}


async def states(couch: CouchAdmin, doc_id: str) -> list[str]:
    doc = await couch.get(doc_id)
    assert doc is not None
    return [t["state"] for t in all_tasks(doc)]


async def wait_states(
    couch: CouchAdmin, doc_id: str, want: list[str], within: float = 20
) -> dict[str, Any]:
    await eventually(lambda: states(couch, doc_id), lambda s: s == want, within=within,
                     what=f"{doc_id} states {want}")  # fmt: skip
    doc = await couch.get(doc_id)
    assert doc is not None
    return doc


def history(item: dict[str, Any]) -> list[str]:
    return [entry["state"] for entry in item["state_history"]]


def broadcast_bodies(rapidpro: Any) -> list[Any]:
    return [
        r.body
        for r in rapidpro.sandbox.requests
        if r.method == "POST" and r.path.endswith("broadcasts.json") and r.status == 201
    ]


async def test_sends_pending_tasks_and_scheduled_tasks_once(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # spec §6.6 case 60/61: only pending tasks go, each exactly once, with CHT's body.
    for n in range(1, 6):
        rapidpro.sandbox.script(f"tel:+25470000000{n}", ["wired", "sent"])  # no delivery report
    doc = message_doc(
        [task("+254700000001", "message1"), task("+254700000002", "message2", state="sent")],
        [
            task(f"+25470000000{n}", f"message{n}", due="2026-01-01T08:00:00.000Z")
            for n in (3, 4, 5)
        ],
    )
    await cht.put(doc)
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["sent", "sent", "sent", "sent", "sent"])

    bodies = broadcast_bodies(rapidpro)
    assert sorted(bodies, key=lambda b: b["text"]) == [
        {"urns": [f"tel:+25470000000{n}"], "text": f"message{n}"} for n in (1, 3, 4, 5)
    ]
    posts = [r for r in rapidpro.sandbox.requests if r.method == "POST"]
    assert len(posts) == 4
    refs = {b.urns[0]: b.id for b in rapidpro.sandbox.posted_broadcasts()}
    sent_task = done["tasks"][1]
    assert "gateway_ref" not in sent_task
    assert history(sent_task) == ["sent"]
    for item in [done["tasks"][0], *done["scheduled_tasks"]]:
        urn = "tel:" + item["messages"][0]["to"]
        assert item["gateway_ref"] == refs[urn]
        assert history(item)[:3] == ["pending", "forwarded-to-gateway", "received-by-gateway"]
        assert history(item)[-1] == "sent"
        assert item["state_details"] == "Sent"


async def test_task_and_history_shape_is_byte_compatible(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    rapidpro.sandbox.script("tel:+254700000001", ["wired", "sent", "delivered"])
    doc = await cht.put(message_doc([task("+254700000001", "hello")]))
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["delivered"])
    item = done["tasks"][0]
    assert set(item) == {"messages", "state", "state_details", "state_history", "gateway_ref"}
    assert isinstance(item["gateway_ref"], int)
    assert item["state_details"] == "Delivered"
    entries = item["state_history"]
    seen = [e["state"] for e in entries]
    assert seen[:3] == ["pending", "forwarded-to-gateway", "received-by-gateway"]
    # Poll rounds may skip a short-lived status, as CHT's do; the order never changes.
    progression = ["received-by-gateway", "forwarded-by-gateway", "sent", "delivered"]
    assert seen[-1] == "delivered"
    assert [progression.index(state) for state in seen[2:]] == sorted(
        {progression.index(state) for state in seen[2:]}
    )
    received = entries[2]
    assert list(received) == ["state", "state_details", "timestamp"]
    assert received["state_details"] == "Queued"
    for entry in entries:
        stamp = entry["timestamp"]
        assert len(stamp) == 24 and stamp.endswith("Z") and stamp[19] == ".", stamp
    details = {"forwarded-by-gateway": "Wired", "sent": "Sent", "delivered": "Delivered"}
    for entry in entries[3:]:
        assert entry["state_details"] == details[entry["state"]]


async def test_phone_is_normalised_and_at_sign_escaped(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    doc = await cht.put(message_doc([task("0712 345-678", "visit @ 5pm, mail a@b.org")]))
    await daemon_factory()
    await wait_states(cht, doc["_id"], ["delivered"])
    assert broadcast_bodies(rapidpro) == [
        {"urns": ["tel:+254712345678"], "text": "visit @@ 5pm, mail a@@b.org"}
    ]
    [message] = rapidpro.sandbox.messages
    assert message.text == "visit @ 5pm, mail a@b.org"


async def test_rejected_by_rapidpro_is_failed_with_its_reason(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # RapidPro refuses NUL characters (DRF's ProhibitNullCharactersValidator) with a 400.
    doc = await cht.put(
        message_doc([task("+254700000008", "visit\x00today"), task("+254700000009", "ok")])
    )
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["failed", "delivered"])
    failed = done["tasks"][0]
    assert "gateway_ref" not in failed
    assert failed["state_details"] == "text.eng: Null characters are not allowed."
    assert history(failed) == ["pending", "forwarded-to-gateway", "failed"]


async def test_lone_surrogate_in_text_fails_with_rapidpros_reason(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any, is_pouchdb: bool
) -> None:
    # Half of an emoji: JSON (and pouchdb-server) carry it, UTF-8 cannot, DRF refuses it with
    # a 400. Apache CouchDB 3 refuses to store such a document at all (400 invalid UTF-8 JSON).
    if not is_pouchdb:
        pytest.skip("CouchDB 3 stores no lone surrogate: such a message cannot exist there")
    doc = await cht.put(message_doc([task("+254700000008", "habari \ud83d")]))
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["failed"])
    assert done["tasks"][0]["state_details"] == (
        "text.eng: Surrogate characters are not allowed: U+D83D."
    )


# Issue 11: RapidPro stores these as local numbers of its workspace (`tel:2547123`...), so the
# SMS would reach a stranger: they fail without any POST. The sandbox's workspace is in Kenya.
UNSENDABLE = ["+2547123", "+999123456", "+0712345678", "12", "++--"]


async def test_numbers_rapidpro_would_reinterpret_fail_unposted(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await daemon_factory()
    for validation in ("full", "none"):
        # The settings change reaches the daemon on the feed before the document does.
        await cht.put_settings(**rapidpro_settings(rapidpro.url, phone_validation=validation))
        doc = await cht.put(message_doc([task(to, f"hello {validation}") for to in UNSENDABLE]))
        done = await wait_states(cht, doc["_id"], ["failed"] * len(UNSENDABLE))
        for item, to in zip(done["tasks"], UNSENDABLE, strict=True):
            assert history(item) == ["pending", "forwarded-to-gateway", "failed"], to
            assert "gateway_ref" not in item
            details = item["state_details"]
            assert details.startswith("Invalid phone number") and details.endswith("not sent")
            assert to.lstrip("+") not in details, details
    assert rapidpro.sandbox.count_requests("POST") == 0


async def test_numbers_cht_normalises_are_sent_in_international_format(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await cht.put_settings(**rapidpro_settings(rapidpro.url, phone_validation="full"))
    numbers = ["0712345678", "712345678", "254712345678", "+254 712 345 678"]
    doc = await cht.put(message_doc([task(to, f"hello {n}") for n, to in enumerate(numbers)]))
    await daemon_factory()
    await wait_states(cht, doc["_id"], ["delivered"] * len(numbers))
    assert [body["urns"] for body in broadcast_bodies(rapidpro)] == [["tel:+254712345678"]] * 4
    assert {m.urn for m in rapidpro.sandbox.messages} == {"tel:+254712345678"}


async def test_delivery_status_outcomes(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    script = {
        "+254700000011": ["wired", "sent", "delivered"],
        "+254700000012": ["failed"],
        "+254700000013": ["errored", "errored", "failed"],
        "+254700000014": ["wired", "sent"],
    }
    for number, outcome in script.items():
        rapidpro.sandbox.script(f"tel:{number}", outcome)
    # Errored for 0.5 + 1.0 s before it fails: several status polls (every 0.2 s) see it,
    # even on a loaded machine (at 0.1 s a late round could miss it).
    rapidpro.sandbox.configure(retry_backoff_seconds=0.5)
    doc = await cht.put(message_doc([task(number, f"m{number}") for number in script]))
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["delivered", "failed", "failed", "sent"])
    errored = done["tasks"][2]
    assert "received-by-gateway" in history(errored)
    assert any(e.get("state_details") == "Errored" for e in errored["state_history"])
    assert done["tasks"][1]["state_details"] == "Failed"


async def test_nothing_sent_without_credential_then_sent_once_it_is_set(
    couch: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # spec §6.6 case 59, and the credential is re-read without a restart.
    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    doc = await couch.put(message_doc([task("+254700000001", "hello")]))
    daemon = await daemon_factory()
    await eventually(lambda: _reason(daemon), lambda r: "No api key configured" in r)
    assert rapidpro.sandbox.count_requests() == 0
    assert await states(couch, doc["_id"]) == ["pending"]

    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    await wait_states(couch, doc["_id"], ["delivered"])
    assert len(rapidpro.sandbox.posted_broadcasts()) == 1


async def _reason(daemon: Any) -> str:
    return str(daemon.gateway.cht.gate.reason)


async def test_other_outgoing_service_means_idle_until_switched(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    settings = rapidpro_settings(rapidpro.url)
    settings["sms"]["outgoing_service"] = "medic-gateway"
    await cht.put_settings(**settings)
    doc = await cht.put(message_doc([task("+254700000001", "hello")]))
    daemon = await daemon_factory()
    await eventually(lambda: _reason(daemon), lambda r: "another sender is in charge" in r)
    assert rapidpro.sandbox.count_requests() == 0

    settings["sms"]["outgoing_service"] = "cht-rapidpro"
    await cht.put_settings(**settings)  # picked up from the changes feed
    await wait_states(cht, doc["_id"], ["delivered"])
    assert len(rapidpro.sandbox.posted_broadcasts()) == 1


async def test_throttled_and_failing_rapidpro_is_retried_never_failed(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    sandbox = rapidpro.sandbox
    sandbox.add_fault(method="POST", path="broadcasts.json", status=429, retry_after=1, count=2)
    sandbox.add_fault(method="POST", path="broadcasts.json", status=503, count=2)
    sandbox.add_fault(method="POST", path="broadcasts.json", status=None, delay=4.0, count=1)
    doc = await cht.put(message_doc([task(f"+25470000002{n}", f"m{n}") for n in range(3)]))
    await daemon_factory()
    await wait_states(cht, doc["_id"], ["delivered"] * 3, within=40)
    assert Counter(b.urns for b in sandbox.posted_broadcasts()) == Counter(
        {(f"tel:+25470000002{n}",): 1 for n in range(3)}
    )
    done = await cht.get(doc["_id"])
    assert done is not None
    assert all("failed" not in history(item) for item in done["tasks"])


async def test_ambiguous_send_is_reconciled_not_resent(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # The broadcast is created but the answer is lost: the daemon must find it, not resend.
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=502, commit=True)
    doc = await cht.put(message_doc([task("+254700000031", "once only")]))
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["delivered"])
    [posted] = rapidpro.sandbox.posted_broadcasts()
    assert done["tasks"][0]["gateway_ref"] == posted.id


async def test_bad_token_pauses_sending_until_fixed(
    couch: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    await couch.put_vault_credential("rapidpro:outgoing", "f" * 40)
    doc = await couch.put(message_doc([task("+254700000041", "hello")]))
    daemon = await daemon_factory()
    await eventually(
        lambda: asyncio.sleep(0, daemon.gateway.health()[1]),
        lambda problems: any("RapidPro refused" in p for p in problems),
        what="a health problem naming the rejected token",
    )
    assert rapidpro.sandbox.posted_broadcasts() == []
    assert await states(couch, doc["_id"]) != ["failed"]

    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    await wait_states(couch, doc["_id"], ["delivered"], within=30)
    assert len(rapidpro.sandbox.posted_broadcasts()) == 1


async def test_cleared_meanwhile_is_not_overwritten(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # The POST is slow; CHT clears the task while it is in flight (a conflict for our write-back).
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=None, delay=1.0)
    doc = await cht.put(message_doc([task("+254700000051", "hello")]))
    await daemon_factory()
    await eventually(lambda: states(cht, doc["_id"]), lambda s: s == ["forwarded-to-gateway"])

    def clear(current: dict[str, Any]) -> None:
        current["tasks"][0]["state"] = "cleared"
        current["tasks"][0]["state_history"].append({"state": "cleared", "timestamp": "x"})

    await cht.update(doc["_id"], clear)
    await eventually(lambda: asyncio.sleep(0, rapidpro.sandbox.posted_broadcasts()))
    await asyncio.sleep(1.0)  # let the write-back (and any wrong retry) happen
    assert await states(cht, doc["_id"]) == ["cleared"]


async def test_restart_resumes_from_checkpoint(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    first = await cht.put(message_doc([task("+254700000061", "one")]))
    daemon = await daemon_factory(CHT_RAPIDPRO_INSTANCE="node-a")
    await wait_states(cht, first["_id"], ["delivered"])
    await daemon.stop()
    checkpoint = await cht.get("_local/cht-rapidpro.node-a")
    assert checkpoint is not None

    second = await cht.put(message_doc([task("+254700000062", "two")]))
    await daemon_factory(CHT_RAPIDPRO_INSTANCE="node-a")
    await wait_states(cht, second["_id"], ["delivered"])
    texts = Counter(b.text for b in rapidpro.sandbox.posted_broadcasts())
    assert texts == Counter({"one": 1, "two": 1})


async def test_resume_sweeps_work_the_feed_will_not_show_again(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # A message left pending by an earlier run (RapidPro down), feed checkpoint already past it.
    await cht.put(
        {"_id": "_design/medic", "views": {"messages_by_state": {"map": MESSAGES_BY_STATE}}}
    )
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=503, count=None)
    doc = await cht.put(message_doc([task("+254700000071", "later", due="not a date")]))
    daemon = await daemon_factory(CHT_RAPIDPRO_INSTANCE="node-b")
    await eventually(lambda: asyncio.sleep(0, rapidpro.sandbox.count_requests("POST")))
    await daemon.stop()
    assert await states(cht, doc["_id"]) in (["pending"], ["forwarded-to-gateway"])

    rapidpro.sandbox.clear_faults()
    restarted = await daemon_factory(CHT_RAPIDPRO_INSTANCE="node-b")
    await wait_states(cht, doc["_id"], ["delivered"], within=30)
    assert restarted.gateway.sweeps >= 1
    assert len(rapidpro.sandbox.posted_broadcasts()) == 1


async def test_many_messages_each_sent_exactly_once(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    docs = [message_doc([task(f"+2547001{n:05d}", f"bulk {n}")]) for n in range(150)]
    await cht.bulk(docs)
    await daemon_factory()

    async def finished() -> int:
        return sum(
            1 for d in await cht.all_docs() if d.get("tasks") and d["tasks"][0]["state"] in FINAL
        )

    await eventually(finished, lambda n: n == len(docs), within=60, what="all delivered")
    texts = Counter(b.text for b in rapidpro.sandbox.posted_broadcasts())
    assert len(texts) == len(docs)
    assert set(texts.values()) == {1}


async def test_cht3_config_credential_sends(
    couch: CouchAdmin, rapidpro: Any, daemon_factory: Any, config_credential: Any
) -> None:
    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    await config_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    doc = await couch.put(message_doc([task("+254700000081", "via 3.x credential")]))
    await daemon_factory()
    await wait_states(couch, doc["_id"], ["delivered"])
    [request] = [r for r in rapidpro.sandbox.requests if r.method == "POST"]
    assert request.status == 201


async def test_nothing_to_track_means_no_status_requests(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    # spec §6.6 case 63: these states (and in-flight states without a gateway_ref) are not polled.
    states = ["scheduled", "muted", "duplicate", "cleared", "sent", "received-by-gateway"]
    await cht.put(
        message_doc([task(f"+2547000001{n}", "x", state=s) for n, s in enumerate(states)])
    )
    daemon = await daemon_factory()
    polls = daemon.gateway.metrics.status_polls
    await eventually(lambda: asyncio.sleep(0, polls._value.get()), lambda n: n >= 3,
                     what="three poll rounds")  # fmt: skip
    assert rapidpro.sandbox.count_requests("GET", "messages.json") == 0
    assert rapidpro.sandbox.count_requests("POST") == 0


async def test_throttled_status_polls_back_off_and_finish(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    rapidpro.sandbox.add_fault(
        method="GET", path="messages.json", status=429, retry_after=1, count=3
    )
    doc = await cht.put(message_doc([task("+254700000091", "polled through 429s")]))
    await daemon_factory()
    await wait_states(cht, doc["_id"], ["delivered"], within=30)
    throttled = [r for r in rapidpro.sandbox.requests if r.status == 429]
    assert len(throttled) == 3


async def test_health_and_metrics_endpoints(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    import aiohttp

    doc = await cht.put(message_doc([task("+254700000095", "counted")]))
    daemon = await daemon_factory()
    await wait_states(cht, doc["_id"], ["delivered"])
    async with aiohttp.ClientSession() as session:
        async with session.get(daemon.url + "/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok", "problems": []})
        async with session.get(daemon.url + "/metrics") as resp:
            text = await resp.text()
    assert "chtrp_messages_sent_total 1.0" in text
    assert "chtrp_messages_delivered_total 1.0" in text
    assert "chtrp_rapidpro_requests_total{" in text
    # One broadcast taken from the default budget of 3000 an hour.
    assert 'chtrp_rapidpro_budget_remaining{scope="broadcasts"} 2999.0' in text


async def test_the_largest_allowed_settings_send_track_and_deliver(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    """Issue item 3: values such as CLAIM_TTL=1e300 or SENT_GRACE=1e300 passed check-config
    and then crashed the sender's constructor or the poller. Each upper bound the settings
    now allow must work: a message goes out and is tracked to delivered, no worker crashes
    (`daemon_factory` asserts no fatal exit). Only the poll interval and the timings a
    test waits on stay short."""
    highest = {
        option.env: str(int(option.parse.high) if option.parse.whole else option.parse.high)
        for option in OPTIONS
        if isinstance(option.parse, Bounded)
        and option.name not in ("poll_interval_s", "checkpoint_interval_s", "listen_port")
    }
    daemon = await daemon_factory(**highest)
    assert daemon.settings.claim_ttl_s == 86400 and daemon.settings.sent_grace_s == 30 * 86400
    doc = message_doc([task("+254700000001", "at the limits")])
    await cht.put(doc)
    await wait_states(cht, doc["_id"], ["delivered"])
    assert daemon.fatal == []


# Issue 12: a message longer than RapidPro's broadcast text (640 characters on RapidPro 9)
# goes out in parts, in order, each within the limit; the task records every part.
LONG = " ".join(f"Step {n}: take the tablets with food and water." for n in range(1, 36))


async def test_a_message_too_long_for_rapidpro_goes_out_in_parts(
    cht: CouchAdmin, rapidpro: Any, daemon_factory: Any
) -> None:
    rapidpro.sandbox.configure(dialect="v9")
    assert 1200 < len(LONG) < 1700  # about ten SMS, as CHT allows by default
    doc = await cht.put(message_doc([task("+254700000009", LONG)]))
    await daemon_factory()
    done = await wait_states(cht, doc["_id"], ["delivered"])
    posted = rapidpro.sandbox.posted_broadcasts()
    texts = [b.text for b in posted]
    assert len(texts) == 3 and all(len(t) <= 640 for t in texts)
    assert [t[:6] for t in texts] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert " ".join(t[6:] for t in texts) == LONG
    item = done["tasks"][0]
    assert item["gateway_refs"] == [b.id for b in posted]
    assert item["gateway_ref"] == posted[0].id
    refused = [r for r in rapidpro.sandbox.requests if r.status == 400]
    assert len(refused) == 1  # the whole text, once: how the daemon learns the limit
