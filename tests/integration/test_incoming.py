"""The incoming webhook at HTTP level (spec cht-messaging §3.3, §4, §6.4 and §6.9)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pouchdb import PouchServer
from support import INCOMING_KEY, CouchAdmin, CouchServer, eventually

V1 = "/api/v1/sms/radpidpro/incoming-messages"
V2 = "/api/v2/sms/rapidpro/incoming-messages"
AUTH = {"Authorization": f"Token {INCOMING_KEY}"}
CANNOT_CHECK = "Cannot check the key now: the database is unavailable, try again"

FORM = {
    "meta": {"code": "FORM", "label": "A form"},
    "fields": {
        "some_data": {
            "labels": {"short": "Some data", "tiny": "sd"},
            "type": "string",
            "required": True,
        }
    },
}


@pytest.fixture
async def webhook(couch: CouchAdmin, daemon_factory: Any) -> Any:
    """A running daemon whose incoming key is set (CHT 4.x vault) and app settings loaded."""
    await couch.put_settings(forms={"FORM": FORM}, default_country_code=506)
    await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    daemon = await daemon_factory()
    await eventually(lambda: asyncio.sleep(0, daemon.gateway.started.is_set()))
    return daemon


async def post(
    url: str, body: Any = None, *, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=sent) as r:
        return r.status, await r.json()


async def reports(couch: CouchAdmin) -> list[dict[str, Any]]:
    return [doc for doc in await couch.all_docs() if doc.get("type") == "data_record"]


@pytest.mark.parametrize("path", [V1, V2], ids=["v1-typo-route", "v2-route"])
async def test_free_text_message_is_stored_as_cht_would(
    couch: CouchAdmin, webhook: Any, path: str
) -> None:
    # spec §6.4 case 42 and the §4.2 example.
    body = {"id": "the_gateway_ref", "from": "+50689999999", "content": "the sms message content"}
    assert await post(webhook.url + path, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["from"] == "+50689999999"
    assert (doc["errors"], doc["tasks"], doc["fields"]) == ([], [], {})
    assert "form" not in doc
    assert isinstance(doc["reported_date"], int)
    assert doc["sms_message"] == {
        "type": "sms_message",
        "message": "the sms message content",
        "form": "THE",
        "from": "+50689999999",
        "gateway_ref": "the_gateway_ref",
    }


async def test_form_message_is_parsed(couch: CouchAdmin, webhook: Any) -> None:
    # spec §6.4 case 43.
    body = {"id": "run-1", "from": "+50689999999", "content": "FORM the data"}
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["form"] == "FORM"
    assert doc["fields"] == {"some_data": "the data"}
    assert doc["errors"] == []


async def test_form_message_missing_required_field_is_stored_with_cht_error(
    couch: CouchAdmin, webhook: Any
) -> None:
    body = {"id": "run-2", "from": "+50689999999", "content": "FORM"}
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert [e["code"] for e in doc["errors"]] == ["sys.missing_fields"]


async def test_local_number_is_normalised(couch: CouchAdmin, webhook: Any) -> None:
    body = {"id": "run-3", "from": "89999999", "content": "hello"}
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["from"] == "+50689999999"
    assert doc["sms_message"]["from"] == "89999999"


AUTH_CASES = [
    ({}, "Missing authorization token"),
    ({"Authorization": f"Tokens {INCOMING_KEY}"}, "Missing authorization token"),
    ({"Authorization": f"Bearer {INCOMING_KEY}"}, "Missing authorization token"),
    ({"Authorization": "Token wrong"}, "Incorrect token"),
    ({"Authorization": f"Token {INCOMING_KEY}x"}, "Incorrect token"),
]


@pytest.mark.parametrize(
    ("headers", "error"), AUTH_CASES, ids=["none", "tokens", "bearer", "wrong", "longer"]
)
async def test_authorization_errors(
    couch: CouchAdmin, webhook: Any, headers: dict[str, str], error: str
) -> None:
    # spec §6.4 cases 38-40.
    body = {"id": "x", "from": "+50689999999", "content": "hi"}
    assert await post(webhook.url + V2, body, headers=headers) == (
        403,
        {"code": 403, "error": error},
    )
    assert await reports(couch) == []


async def test_no_incoming_key_configured(couch: CouchAdmin, daemon_factory: Any) -> None:
    # spec §6.4 case 37.
    await couch.put_settings(forms={})
    daemon = await daemon_factory()
    body = {"id": "x", "from": "+50689999999", "content": "hi"}
    assert await post(daemon.url + V2, body, headers=AUTH) == (
        403,
        {"code": 403, "error": "No incoming key configured"},
    )


async def test_cht3_config_key_and_key_change_without_restart(
    couch: CouchAdmin, daemon_factory: Any, config_credential: Any
) -> None:
    await couch.put_settings(forms={})
    await config_credential("rapidpro:incoming", "old-key")
    daemon = await daemon_factory()
    body = {"id": "k1", "from": "+50689999999", "content": "hi"}
    old = {"Authorization": "Token old-key"}
    assert await post(daemon.url + V2, body, headers=old) == (200, {"saved": 1})

    await config_credential("rapidpro:incoming", "new-key")
    probe = {"id": "", "from": "+50689999999", "content": "hi"}  # never stored (empty id)
    await eventually(
        lambda: post(daemon.url + V2, probe, headers=old),
        lambda answer: answer[0] == 403,
        what="old key refused",
    )
    body["id"] = "k2"
    assert await post(daemon.url + V2, body, headers={"Authorization": "Token new-key"}) == (
        200,
        {"saved": 1},
    )


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'"text"', 400, "must be a JSON object"),
    (b'{"from": "+50689999999", "content": "hi"}', 400, 'missing required field "id"'),
    (b'{"id": "", "from": "+50689999999", "content": "hi"}', 400, 'field "id"'),
    (b'{"id": "a", "content": "hi"}', 400, 'field "from"'),
    (b'{"id": "a", "from": "+50689999999", "content": ""}', 400, 'field "content"'),
    (b'{"id": "a", "from": "+50689999999", "content": 5}', 400, 'field "content"'),
    (b'{"id": true, "from": "+50689999999", "content": "hi"}', 400, 'field "id"'),
    (b'{"id": "a", "from": "+1", "content": "' + b"x" * 70_000 + b'"}', 413, "too large"),
]


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    BAD_BODIES,
    ids=[
        "malformed",
        "array",
        "string",
        "no-id",
        "empty-id",
        "no-from",
        "empty-content",
        "number-content",
        "bool-id",
        "oversized",
    ],
)
async def test_bad_input_gets_a_clear_error_and_writes_nothing(
    couch: CouchAdmin, webhook: Any, raw: bytes, status: int, error: str
) -> None:
    got_status, got = await post(webhook.url + V2, raw=raw, headers=AUTH)
    assert (got_status, got["code"]) == (status, status)
    assert error in got["error"]
    assert await reports(couch) == []


async def test_wrong_content_type(couch: CouchAdmin, webhook: Any) -> None:
    body = b'{"id": "a", "from": "+50689999999", "content": "hi"}'
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            webhook.url + V2, data=body, headers={**AUTH, "Content-Type": "text/plain"}
        ) as resp,
    ):
        assert resp.status == 400
        assert "application/json" in (await resp.json())["error"]
    assert await reports(couch) == []


async def test_duplicate_answers_200_and_stores_nothing_more(
    couch: CouchAdmin, webhook: Any
) -> None:
    body = {"id": "same-run", "from": "+50689999999", "content": "first"}
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    body["content"] = "different content, same id"  # spec §6.9 case 80
    assert await post(webhook.url + V1, body, headers=AUTH) == (
        200,
        {"saved": 0, "duplicate": True},
    )
    [doc] = await reports(couch)
    assert doc["sms_message"]["message"] == "first"


async def test_concurrent_duplicates_store_exactly_one(couch: CouchAdmin, webhook: Any) -> None:
    body = {"id": "burst", "from": "+50689999999", "content": "hello"}
    answers = await asyncio.gather(*(post(webhook.url + V2, body, headers=AUTH) for _ in range(20)))
    assert sorted(a[1].get("saved") for a in answers) == [0] * 19 + [1]
    assert all(status == 200 for status, _ in answers)
    assert len(await reports(couch)) == 1


MESSAGES_BY_GATEWAY_REF = """function(doc) {
  if (doc.type === 'data_record' && doc.sms_message && doc.sms_message.gateway_ref) {
    emit(doc.sms_message.gateway_ref, doc.sms_message.uuid);
  }
}"""


async def test_message_stored_by_cht_itself_is_a_duplicate(couch: CouchAdmin, webhook: Any) -> None:
    await couch.put(
        {
            "_id": "_design/medic-sms",
            "views": {"messages_by_gateway_ref": {"map": MESSAGES_BY_GATEWAY_REF}},
        }
    )
    await couch.put(
        {
            "type": "data_record",
            "from": "+50689999999",
            "errors": [],
            "tasks": [],
            "fields": {},
            "reported_date": 1,
            "sms_message": {
                "type": "sms_message",
                "message": "hi",
                "from": "+50689999999",
                "gateway_ref": "cht-stored",
            },
        }
    )
    body = {"id": "cht-stored", "from": "+50689999999", "content": "hi"}
    assert await post(webhook.url + V2, body, headers=AUTH) == (
        200,
        {"saved": 0, "duplicate": True},
    )
    assert len(await reports(couch)) == 1


async def test_sms_from_the_sandbox_flow_becomes_a_report(
    couch: CouchAdmin, webhook: Any, rapidpro: Any
) -> None:
    outcome = await rapidpro.sandbox.deliver_incoming(
        webhook.url + V2,
        from_="+50689999999",
        text="FORM from the flow",
        headers={**AUTH, "Content-Type": "application/json"},  # as CHT's flow set-up says
    )
    assert outcome.status == 200
    assert outcome.category == "Success"
    [doc] = await reports(couch)
    assert doc["fields"] == {"some_data": "from the flow"}
    assert doc["sms_message"]["gateway_ref"] == outcome.run_uuid


async def test_error_texts_use_cht_translation_documents(
    couch: CouchAdmin, daemon_factory: Any
) -> None:
    await couch.put(
        {
            "_id": "messages-fr",
            "type": "translations",
            "code": "fr",
            "generic": {"sys.missing_fields": "Champs manquants : {{fields}}."},
        }
    )
    await couch.put_settings(forms={"FORM": FORM}, locale="fr")
    await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    daemon = await daemon_factory()
    await eventually(lambda: asyncio.sleep(0, daemon.gateway.started.is_set()))
    body = {"id": "fr-1", "from": "+50689999999", "content": "FORM"}
    assert await post(daemon.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["errors"] == [
        {"code": "sys.missing_fields", "message": "Champs manquants : some_data."}
    ]


# -- CouchDB unavailable: retryable answers, keys kept --------------------------------------


async def test_while_couchdb_is_down_the_webhook_answers_503_never_403(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """Issue 12: a daemon that cannot read CouchDB keeps its last good key and answers 503
    (retryable), never 403 (which sends RapidPro's flow down its failure branch), whether it
    had read the key before the outage or not."""
    server = PouchServer(tmp_path, in_memory=False)  # survives its restarts
    server.start()
    admin = CouchAdmin(CouchServer(server.url), "medic")
    body = {"id": "during-outage", "from": "+50689999999", "content": "hi"}
    wrong = {"Authorization": "Token not-the-key"}
    unavailable = (503, {"code": 503, "error": CANNOT_CHECK})
    try:
        await admin.create_db()
        await admin.put_settings(forms={"FORM": FORM}, default_country_code=506)
        await admin.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
        port = server.port

        # Down from the start: the key was never read. Nothing can be checked.
        server.stop()
        daemon = await daemon_factory(COUCH_URL=admin.couch_url, CHT_RAPIDPRO_COUCH_TIMEOUT="2")
        assert await post(daemon.url + V2, body, headers=AUTH) == unavailable
        assert await post(daemon.url + V2, body, headers=wrong) == unavailable

        server.start(port)
        await eventually(
            lambda: post(daemon.url + V2, body, headers=AUTH),
            lambda answer: answer == (200, {"saved": 1}),
            what="the message saved once CouchDB is back",
        )

        # Down again, the key read before: it is kept; the message cannot be saved (503).
        server.stop()
        body["id"] = "second-outage"
        status, answer = await post(daemon.url + V2, body, headers=AUTH)
        assert (status, answer["code"]) == (503, 503)
        assert daemon.gateway.cht.incoming_key == INCOMING_KEY
        # Once a re-read of the key failed, a different key cannot be judged either.
        await eventually(
            lambda: post(daemon.url + V2, body, headers=wrong),
            lambda answer: answer == unavailable,
            what="a wrong key answered 503 once the key cannot be re-read",
        )
        assert daemon.gateway.cht.incoming_key == INCOMING_KEY

        server.start(port)
        await eventually(
            lambda: post(daemon.url + V2, body, headers=AUTH),
            lambda answer: answer == (200, {"saved": 1}),
            what="the second message saved once CouchDB is back",
        )
        # With the credentials readable again, a wrong key is the caller's fault.
        assert await post(daemon.url + V2, body, headers=wrong) == (
            403,
            {"code": 403, "error": "Incorrect token"},
        )
        assert {doc["_id"] for doc in await reports(admin)} == {
            "sms-rapidpro:during-outage",
            "sms-rapidpro:second-outage",
        }
    finally:
        await admin.close()
        server.stop()
