"""The incoming webhook at HTTP level (spec cht-messaging §3.3, §4, §6.4 and §6.9)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

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
    # The same call again (RapidPro's v9 retry, a flow's failure branch calling again).
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


async def install_ref_view(couch: CouchAdmin) -> None:
    """CHT's `medic-sms/messages_by_gateway_ref`, as far as the webhook reads it."""
    await couch.put(
        {
            "_id": "_design/medic-sms",
            "views": {"messages_by_gateway_ref": {"map": MESSAGES_BY_GATEWAY_REF}},
        }
    )


async def test_message_stored_by_cht_itself_is_a_duplicate(couch: CouchAdmin, webhook: Any) -> None:
    await install_ref_view(couch)
    await couch.put(cht_stored_report("cht-stored", "hi"))
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


# -- an id used again for another message (issue item 9) -------------------------------------


async def test_another_message_under_a_known_id_is_stored_as_its_own_report(
    couch: CouchAdmin, webhook: Any
) -> None:
    """CHT's documented flow body sends the flow run's UUID as `id`: a flow that calls the
    webhook twice in one run sends two messages under one id. The second must not vanish
    as a 'duplicate' (spec §6.9 case 80 is CHT's behaviour, which drops it)."""
    first = {"id": "run-7", "from": "+50689999999", "content": "FORM first answer"}
    second = {**first, "content": "FORM second answer"}
    third = {**first, "from": "+50688888888"}  # same text, from someone else
    with capture_logs() as logs:
        for body in (first, second, third):
            assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
        # Each call repeated (a retry) is recognised, whichever came first.
        for body in (third, second, first):
            assert await post(webhook.url + V2, body, headers=AUTH) == (
                200,
                {"saved": 0, "duplicate": True},
            )
    docs = {doc["_id"]: doc for doc in await reports(couch)}
    assert len(docs) == 3
    stored = sorted((d["sms_message"]["from"], d["sms_message"]["message"]) for d in docs.values())
    assert stored == sorted((b["from"], b["content"]) for b in (first, second, third))
    # All three are RapidPro's `run-7` for CHT (gateway_ref); the first keeps the plain id.
    assert {d["sms_message"]["gateway_ref"] for d in docs.values()} == {"run-7"}
    assert docs["sms-rapidpro:run-7"]["sms_message"]["message"] == "FORM first answer"
    assert all(i == "sms-rapidpro:run-7" or i.startswith("sms-rapidpro:run-7~") for i in docs)
    assert sorted(d["fields"]["some_data"] for d in docs.values() if d.get("fields")) == [
        "first answer",
        "first answer",
        "second answer",
    ]
    # Said in the log (for the flow's author), without the text.
    reused = [line for line in logs if line["event"] == "webhook_id_reused"]
    assert [line["first_doc_id"] for line in reused] == ["sms-rapidpro:run-7"] * 2
    assert {line["doc_id"] for line in reused} == set(docs) - {"sms-rapidpro:run-7"}
    assert "answer" not in repr(logs)


async def test_concurrent_calls_under_one_id_store_each_message_once(
    couch: CouchAdmin, webhook: Any
) -> None:
    bodies = [
        {"id": "busy-run", "from": "+50689999999", "content": f"message {n}"} for n in range(5)
    ]
    answers = await asyncio.gather(
        *(post(webhook.url + V2, body, headers=AUTH) for body in bodies * 3)
    )
    assert all(status == 200 for status, _ in answers)
    assert sorted(answer["saved"] for _, answer in answers) == [0] * 10 + [1] * 5
    assert sorted(d["sms_message"]["message"] for d in await reports(couch)) == [
        f"message {n}" for n in range(5)
    ]


async def test_an_id_cht_stored_is_a_duplicate_only_for_the_same_message(
    couch: CouchAdmin, webhook: Any
) -> None:
    await install_ref_view(couch)
    await couch.put(cht_stored_report("cht-run", "hi"))
    same = {"id": "cht-run", "from": "+50689999999", "content": "hi"}
    assert await post(webhook.url + V2, same, headers=AUTH) == (
        200,
        {"saved": 0, "duplicate": True},
    )
    other = {**same, "content": "a second message in CHT's run"}
    assert await post(webhook.url + V2, other, headers=AUTH) == (200, {"saved": 1})
    assert await post(webhook.url + V2, other, headers=AUTH) == (
        200,
        {"saved": 0, "duplicate": True},
    )
    assert sorted(d["sms_message"]["message"] for d in await reports(couch)) == [
        "a second message in CHT's run",
        "hi",
    ]


# -- what no retry can store (issue item 7) --------------------------------------------------


LONE_SURROGATES = [
    (b'{"id": "s-1", "from": "+50689999999", "content": "\\ud800"}', "content"),
    (b'{"id": "s-2", "from": "+50689999999", "content": "ok \\udfff then"}', "content"),
    (b'{"id": "s-3", "from": "+5068999\\ud83d", "content": "hi"}', "from"),
    (b'{"id": "s-4\\udc00", "from": "+50689999999", "content": "hi"}', "id"),
    # The same, UTF-8-encoded: Python's JSON decoder lets it through as a lone surrogate.
    (b'{"id": "s-5", "from": "+50689999999", "content": "\xed\xa0\x80"}', "content"),
]


@pytest.mark.parametrize(
    ("raw", "field"), LONE_SURROGATES, ids=["escaped", "in-text", "from", "id", "utf8-encoded"]
)
async def test_a_lone_surrogate_is_refused_with_400_and_nothing_is_stored(
    couch: CouchAdmin, webhook: Any, raw: bytes, field: str
) -> None:
    """CouchDB answers `400 invalid UTF-8 JSON` to a document holding a lone UTF-16
    surrogate: no retry can succeed, so the answer is 400 (the daemon said 503 "the database
    is unavailable"), and nothing is written."""
    with capture_logs() as logs:
        status, answer = await post(webhook.url + V2, raw=raw, headers=AUTH)
    assert (status, answer) == (
        400,
        {
            "code": 400,
            "error": f'Message was not saved: "{field}" is not valid Unicode text (it holds '
            "a lone UTF-16 surrogate, which cannot be stored)",
        },
    )
    assert await reports(couch) == []
    assert [line["outcome"] for line in logs if line["event"] == "webhook_handled"] == ["refused"]


async def test_a_lone_surrogate_does_not_fail_messages_written_with_it(
    couch: CouchAdmin, webhook: Any
) -> None:
    """Concurrent messages share `_bulk_docs` requests, and CouchDB refuses a whole request
    that holds one invalid string: the bad one must never reach the writer."""
    good = [
        json.dumps({"id": f"g-{n}", "from": "+50689999999", "content": f"m{n}"}).encode()
        for n in range(10)
    ]
    bad = LONE_SURROGATES[0][0]
    answers = await asyncio.gather(
        *(post(webhook.url + V2, raw=raw, headers=AUTH) for raw in [*good[:5], bad, *good[5:]])
    )
    assert [status for status, _ in answers] == [200] * 5 + [400] + [200] * 5
    assert len(await reports(couch)) == 10


# -- a hanging CouchDB (issue item 8) --------------------------------------------------------


class HoldingProxy:
    """Passes requests to the test server, except the `_bulk_docs` writes of incoming
    reports, which it holds until `release` is set (a CouchDB that hangs on them)."""

    def __init__(self, upstream: CouchServer) -> None:
        self.upstream = upstream
        self.release = asyncio.Event()
        self.held = 0  # writes waiting for `release`
        self.written = 0  # writes passed on after it
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def db_url(self, db: str) -> str:
        host = self.url.removeprefix("http://")
        return f"http://{self.upstream.user}:{self.upstream.password}@{host}/{db}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        incoming = request.path.endswith("/_bulk_docs") and b'"sms-rapidpro:' in body
        if incoming:
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1
            self.written += 1
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("accept", "content-type", "authorization")
        }
        async with self._session.request(
            request.method,
            self.upstream.url + request.path,
            params=request.query,
            data=body or None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            if "Content-Type" in upstream.headers:
                response.headers["Content-Type"] = upstream.headers["Content-Type"]
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # streamed: the feed's heartbeats pass through
            await response.write_eof()
            return response


@pytest.fixture
async def holding_proxy(couch: CouchAdmin) -> AsyncIterator[HoldingProxy]:
    """Set up before `daemon_factory` in a test's arguments: torn down after its daemons."""
    proxy = HoldingProxy(couch.server)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_a_hanging_couchdb_is_answered_within_rapidpros_timeout(
    couch: CouchAdmin, holding_proxy: HoldingProxy, daemon_factory: Any, rapidpro: Any
) -> None:
    """RapidPro waits 15 s for the webhook, then takes the flow's failure branch (status 0)
    and never calls again by itself. The daemon waited for CouchDB's own timeout (30 s by
    default) and then saved the SMS anyway. It answers 503 within its WEBHOOK_TIMEOUT, while
    the write is still in CouchDB's hands; the write may land later, and a retry of the same
    call (a flow's failure branch) then finds it and stores nothing twice."""
    await couch.put_settings(forms={"FORM": FORM}, default_country_code=506)
    await couch.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    proxy = holding_proxy
    daemon = await daemon_factory(
        COUCH_URL=proxy.db_url(couch.db),
        CHT_RAPIDPRO_COUCH_TIMEOUT="60",  # CouchDB's own timeout: far beyond RapidPro's
        CHT_RAPIDPRO_WEBHOOK_TIMEOUT="0.5",
    )
    await eventually(lambda: asyncio.sleep(0, daemon.gateway.started.is_set()))
    flow = {"from_": "+50689999999", "text": "FORM during the hang", "run_uuid": "run-hang"}
    headers = {**AUTH, "Content-Type": "application/json"}

    outcome = await rapidpro.sandbox.deliver_incoming(webhook_url(daemon), **flow,
                                                      headers=headers)  # fmt: skip
    assert outcome.error is None  # answered, not timed out (status 0)
    assert (outcome.status, json.loads(outcome.body)) == (
        503,
        {
            "code": 503,
            "error": "Not confirmed in time: the database did not answer within 0.5 s. "
            "The message may still be saved; calling again with the same id is safe",
        },
    )
    assert outcome.category == "Failure"
    assert (proxy.held, proxy.written) == (1, 0)  # answered while CouchDB still held it

    proxy.release.set()
    await eventually(reports_of(couch), lambda docs: len(docs) == 1, what="the late write")
    retried = await rapidpro.sandbox.deliver_incoming(webhook_url(daemon), **flow,
                                                      headers=headers)  # fmt: skip
    assert (retried.status, json.loads(retried.body)) == (200, {"saved": 0, "duplicate": True})
    [doc] = await reports(couch)
    assert doc["fields"] == {"some_data": "during the hang"}


def webhook_url(daemon: Any) -> str:
    return str(daemon.url) + V2


def reports_of(couch: CouchAdmin) -> Any:
    return lambda: reports(couch)


def cht_stored_report(gateway_ref: str, text: str) -> dict[str, Any]:
    return {
        "type": "data_record",
        "from": "+50689999999",
        "errors": [],
        "tasks": [],
        "fields": {},
        "reported_date": 1,
        "sms_message": {
            "type": "sms_message",
            "message": text,
            "from": "+50689999999",
            "gateway_ref": gateway_ref,
        },
    }


# -- the README's flow body: the message's own id and time ------------------------------------


async def test_the_readmes_flow_body_stores_the_messages_own_id_and_time(
    couch: CouchAdmin, webhook: Any
) -> None:
    """`@(json(object("id", input.uuid, "from", replace(input.urn, "tel:+", "+"), "content",
    input.text, "sent_timestamp", input.created_on)))`, as goflow renders it: keys sorted,
    the time in ISO 8601 with microseconds."""
    body = {
        "content": "FORM sent before the outage",
        "from": "+50689999999",
        "id": "0199b7f2-6c3e-7d4a-9f1e-2b8c5d7a1e90",
        "sent_timestamp": "2025-01-31T09:30:00.123456Z",
    }
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["_id"] == "sms-rapidpro:0199b7f2-6c3e-7d4a-9f1e-2b8c5d7a1e90"
    assert doc["reported_date"] == 1738315800123  # when RapidPro received it, not now
    assert doc["sms_message"]["reported_date"] == 1738315800123
    assert doc["sms_message"]["gateway_ref"] == body["id"]
    assert doc["fields"] == {"some_data": "sent before the outage"}


@pytest.mark.parametrize(
    ("value", "reported"),
    [
        ("2025-01-31T11:30:00.000000+02:00", 1738315800000),
        ("2025-01-31T09:30:00.123456789Z", 1738315800123),  # Go's RFC 3339 with nanoseconds
        (1738315800123, 1738315800123),
    ],
    ids=["offset", "nanoseconds", "epoch-ms"],
)
async def test_sent_timestamp_forms(
    couch: CouchAdmin, webhook: Any, value: Any, reported: int
) -> None:
    body = {"id": "t-1", "from": "+50689999999", "content": "hi", "sent_timestamp": value}
    assert await post(webhook.url + V2, body, headers=AUTH) == (200, {"saved": 1})
    [doc] = await reports(couch)
    assert doc["reported_date"] == reported


@pytest.mark.parametrize(
    "value",
    ["31-01-2025 09:30", "2025-01-31T09:30:00", "yesterday", True, 1.5, -1, {"t": 1}],
    ids=["org-format", "no-zone", "word", "bool", "float", "negative", "object"],
)
async def test_a_sent_timestamp_that_is_not_a_time_is_refused(
    couch: CouchAdmin, webhook: Any, value: Any
) -> None:
    body = {"id": "t-2", "from": "+50689999999", "content": "hi", "sent_timestamp": value}
    status, answer = await post(webhook.url + V2, body, headers=AUTH)
    assert (status, answer["code"]) == (400, 400)
    assert answer["error"].startswith('Message was not saved: "sent_timestamp" must be')
    assert await reports(couch) == []
