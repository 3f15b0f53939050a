"""The sandbox's RapidPro API over HTTP (spec rapidpro-api §1-§4), in process."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from yarl import URL

from cht_rapidpro.sandbox import DEFAULT_TOKEN, Sandbox, SandboxConfig, build_app

AUTH = {"Authorization": f"Token {DEFAULT_TOKEN}"}
BROADCASTS = "/api/v2/broadcasts.json"
MESSAGES = "/api/v2/messages.json"
PHONE = "tel:+254712345678"
EXCLUSIVE = "You may only specify one of the contact, folder, label, broadcast parameters"


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(real_time=False, step_seconds=1))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sandbox: Sandbox) -> TestClient[Any, Any]:
    return await aiohttp_client(build_app(sandbox), headers=AUTH)


async def post(client: TestClient[Any, Any], body: Any, **kwargs: Any) -> tuple[int, Any]:
    async with client.post(BROADCASTS, json=body, **kwargs) as response:
        return response.status, await response.json()


async def get(client: TestClient[Any, Any], url: str | URL, **params: Any) -> Any:
    async with client.get(url, params=params or None) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def send(sandbox: Sandbox, urns: list[str], text: str = "hello") -> int:
    return sandbox.create_broadcast(sandbox.validate_broadcast({"urns": urns, "text": text})).id


# --- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, "Authentication credentials were not provided."),
        (f"Bearer {DEFAULT_TOKEN}", "Authentication credentials were not provided."),
        ("Token " + "f" * 40, "Invalid token"),
        ("Token", "Invalid token header. No credentials provided."),
        ("Token a b", "Invalid token header. Token string should not contain spaces."),
        ("Basic " + base64.b64encode(b"me@x.org:nope").decode(), "Invalid token or email"),
    ],
    ids=["missing", "bearer", "unknown", "empty", "spaces", "basic-unknown"],
)
async def test_bad_auth_is_403_never_401(
    aiohttp_client: AiohttpClient, sandbox: Sandbox, header: str | None, detail: str
) -> None:
    client = await aiohttp_client(build_app(sandbox))
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", MESSAGES), ("POST", BROADCASTS)):
        async with client.request(method, path, headers=headers, json={}) as response:
            assert response.status == 403
            assert await response.json() == {"detail": detail}
            assert "WWW-Authenticate" not in response.headers
    assert sandbox.broadcasts == []


async def test_token_keyword_is_case_insensitive_and_basic_works(
    aiohttp_client: AiohttpClient, sandbox: Sandbox
) -> None:
    client = await aiohttp_client(build_app(sandbox))
    basic = "Basic " + base64.b64encode(f"me@x.org:{DEFAULT_TOKEN}".encode()).decode()
    for header in (f"token {DEFAULT_TOKEN}", basic):
        async with client.get(MESSAGES, headers={"Authorization": header}) as response:
            assert response.status == 200
            assert response.headers["X-Temba-Org"] == "1"


# --- POST /broadcasts ----------------------------------------------------------------------------


async def test_post_201_current_shape(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    status, body = await post(client, {"urns": ["tel:+1-800-123-4567"], "text": "Hello"})
    assert status == 201
    assert list(body) == [
        "uuid",
        "status",
        "progress",
        "urns",
        "contacts",
        "groups",
        "text",
        "attachments",
        "quick_replies",
        "base_language",
        "created_on",
        "id",
    ]
    assert body["status"] == "pending"
    assert body["progress"] == {"total": -1, "started": 0}
    assert body["urns"] == ["tel:+18001234567"]
    assert body["text"] == {"eng": "Hello"}
    assert body["attachments"] == {"eng": []} and body["quick_replies"] == {"eng": []}
    assert body["created_on"].endswith("Z")
    assert isinstance(body["id"], int)
    assert sandbox.posted_broadcasts() == [(("tel:+18001234567",), "Hello", body["id"])]


async def test_post_201_v9_shape(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.configure(dialect="v9")
    status, body = await post(client, {"urns": [PHONE], "text": "Hello"})
    assert status == 201
    assert list(body) == [
        "id",
        "urns",
        "contacts",
        "groups",
        "text",
        "attachments",
        "base_language",
        "status",
        "created_on",
    ]
    assert body["status"] == "queued"


@pytest.mark.parametrize(
    ("dialect", "later"),
    [("v9", ["queued", "sent"]), ("current", ["pending", "queued", "completed"])],
    ids=["v9", "current"],
)
async def test_broadcast_status_moves_on(
    client: TestClient[Any, Any], sandbox: Sandbox, dialect: str, later: list[str]
) -> None:
    sandbox.configure(dialect=dialect)
    _, created = await post(client, {"urns": [PHONE], "text": "Hello"})
    seen = []
    for _ in range(3):
        [row] = (await get(client, BROADCASTS, id=created["id"]))["results"]
        seen.append(row["status"])
        sandbox.advance(0.5)
    assert list(dict.fromkeys(seen)) == later


async def test_post_answers_the_initial_status_even_with_no_step(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.configure(step_seconds=0)
    _, created = await post(client, {"urns": [PHONE], "text": "Hello"})
    assert created["status"] == "pending"
    sandbox.advance(0.001)
    [row] = (await get(client, BROADCASTS))["results"]
    assert row["status"] == "completed" and row["progress"] == {"total": 1, "started": 1}
    [message] = (await get(client, MESSAGES, broadcast=created["id"]))["results"]
    assert message["status"] == "delivered"


async def test_broadcast_to_existing_contact_by_uuid(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    send(sandbox, [PHONE])
    [contact] = sandbox.contacts
    status, created = await post(client, {"contacts": [contact.uuid], "text": "again"})
    assert status == 201
    assert created["contacts"] == [{"uuid": contact.uuid, "name": None}]
    assert created["urns"] == []
    assert [m.urn for m in sandbox.messages] == [PHONE, PHONE]


async def test_post_400_shapes(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    status, body = await post(client, {"urns": ["tel:123"], "text": "x"})
    assert (status, body) == (
        400,
        {"urns": {"0": ["Invalid URN: tel:123. Ensure phone numbers contain country codes."]}},
    )
    async with client.post(
        BROADCASTS, data="{nope", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        assert (await r.json())["detail"].startswith("JSON parse error - Expecting property name")
    async with client.post(BROADCASTS, data="hi", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
        assert await r.json() == {"detail": 'Unsupported media type "text/plain" in request.'}
    async with client.post(BROADCASTS) as r:  # no body: DRF sees {}
        assert r.status == 400
        assert await r.json() == {"non_field_errors": ["Must provide either text or attachments."]}
    assert sandbox.broadcasts == []
    assert [r.status for r in sandbox.requests] == [400, 400, 415, 400]


async def test_text_is_stored_trimmed(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    """As RapidPro stores it (DRF `trim_whitespace`): what a duplicate check must compare."""
    sandbox.configure(dialect="v9")
    status, created = await post(client, {"urns": [PHONE], "text": "x" * 640 + " \n"})
    assert status == 201 and created["text"] == {"eng": "x" * 640}
    status, created = await post(client, {"urns": [PHONE], "text": " two\r\nlines\t"})
    assert status == 201 and created["text"] == {"eng": "two\r\nlines"}
    rows = (await get(client, BROADCASTS))["results"]
    assert [r["text"]["eng"] for r in rows] == ["two\r\nlines", "x" * 640]
    assert [b.text for b in sandbox.posted_broadcasts()] == ["x" * 640, "two\r\nlines"]


async def test_nul_in_text_is_refused(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    status, body = await post(client, {"urns": [PHONE], "text": "visit\x00today"})
    assert (status, body) == (400, {"text": {"eng": ["Null characters are not allowed."]}})
    assert sandbox.broadcasts == []


async def test_local_numbers_use_the_workspace_country(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    assert sandbox.config.default_country == "KE"  # every real workspace has one
    status, created = await post(client, {"urns": ["tel:0712345678"], "text": "hi"})
    assert (status, created["urns"]) == (201, [PHONE])


@pytest.mark.parametrize(
    ("urn", "stored"),
    [
        ("tel:+2547123", "tel:2547123"),
        ("tel:+999123456", "tel:999123456"),
        ("tel:+0712345678", "tel:0712345678"),
    ],
    ids=["too-short", "unknown-country-code", "plus-zero"],
)
async def test_impossible_plus_number_is_reinterpreted_not_refused(
    client: TestClient[Any, Any], sandbox: Sandbox, urn: str, stored: str
) -> None:
    """RapidPro drops the `+` and takes the digits as a local number: a stranger's SMS."""
    status, created = await post(client, {"urns": [urn], "text": "hi"})
    assert (status, created["urns"]) == (201, [stored])
    sandbox.advance(1)
    assert [m.urn for m in sandbox.messages] == [stored]
    sandbox.configure(default_country=None)  # a workspace whose time zone names no country
    status, body = await post(client, {"urns": [urn], "text": "hi"})
    message = f"Invalid URN: {urn}. Ensure phone numbers contain country codes."
    assert (status, body) == (400, {"urns": {"0": [message]}})


async def test_text_is_evaluated_per_contact(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    await post(client, {"urns": [PHONE], "text": "visit @@ 5pm @contact.name, a@b.org"})
    await post(client, {"urns": ["tel:+254712345679"], "text": "@contact.name"})
    sandbox.advance(1)
    [message] = sandbox.messages  # an empty evaluated text creates no message
    assert message.text == "visit @ 5pm , a@b.org"
    assert sandbox.broadcasts[1].message_ids == []


async def test_messages_appear_after_a_step_with_the_broadcast_id(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    _, created = await post(client, {"urns": [PHONE, "tel:+254712345679"], "text": "hi"})
    assert (await get(client, MESSAGES, broadcast=created["id"]))["results"] == []
    sandbox.advance(1)
    rows = (await get(client, MESSAGES, broadcast=created["id"]))["results"]
    assert {r["urn"] for r in rows} == {PHONE, "tel:+254712345679"}
    assert {r["broadcast"] for r in rows} == {created["id"]}
    assert all(r["id"] != created["id"] and r["direction"] == "out" for r in rows)
    assert list(rows[0])[:2] == ["uuid", "contact"] and list(rows[0])[-2:] == ["id", "broadcast"]
    assert {r["status"] for r in rows} == {"queued"} and rows[0]["sent_on"] is None


# --- scripted outcomes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (["wired", "sent", "delivered"], ["queued", "wired", "sent", "delivered", "delivered"]),
        (["wired", "sent"], ["queued", "wired", "sent", "sent", "sent"]),
        (["failed"], ["queued", "failed", "failed", "failed", "failed"]),
    ],
    ids=["delivered", "no-dlr", "failed"],
)
async def test_scripted_progression(
    client: TestClient[Any, Any], sandbox: Sandbox, outcome: list[str], expected: list[str]
) -> None:
    sandbox.script(PHONE, outcome)
    _, created = await post(client, {"urns": [PHONE], "text": "hi"})
    seen = []
    for _ in expected:
        sandbox.advance(1)
        [row] = (await get(client, MESSAGES, broadcast=created["id"]))["results"]
        seen.append(row["status"])
    assert seen == expected


async def test_errored_is_retried_after_backoff(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.script(PHONE, ["errored", "errored", "failed"])
    await post(client, {"urns": [PHONE], "text": "hi"})
    sandbox.advance(2)
    [row] = (await get(client, MESSAGES, folder="outbox"))["results"]
    assert row["status"] == "errored" and row["sent_on"] is None
    sandbox.advance(299)
    assert (await get(client, MESSAGES, id=row["id"]))["results"][0]["status"] == "errored"
    sandbox.advance(1 + 1 + 600 + 1)
    [row] = (await get(client, MESSAGES, folder="failed"))["results"]
    assert row["status"] == "failed"


async def test_scripted_no_message(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.script(PHONE, None)
    _, created = await post(client, {"urns": [PHONE], "text": "hi"})
    sandbox.advance(60)
    assert (await get(client, MESSAGES, broadcast=created["id"]))["results"] == []
    [row] = (await get(client, BROADCASTS))["results"]
    assert row["status"] == "completed" and row["progress"] == {"total": 1, "started": 0}


# --- lists: pagination, filters ------------------------------------------------------------------


async def test_600_messages_paginate_250_with_absolute_next(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    for batch in range(6):
        send(sandbox, [f"tel:+2547{batch:02d}{n:06d}" for n in range(100)])
        sandbox.advance(1)
    sandbox.advance(5)
    after = "2000-01-01T00:00:00Z"
    page = await get(client, MESSAGES, after=after)
    pages, ids = [page], [r["id"] for r in page["results"]]
    send(sandbox, [PHONE])  # newer rows must not shift the scan
    sandbox.advance(5)
    while page["next"]:
        url = URL(page["next"])
        assert url.is_absolute() and url.query["after"] == after and "cursor" in url.query
        page = await get(client, url.relative())
        pages.append(page)
        ids += [r["id"] for r in page["results"]]
    assert [len(p["results"]) for p in pages] == [250, 250, 100]
    assert len(set(ids)) == 600
    created = [r["created_on"] for p in pages for r in p["results"]]
    assert created == sorted(created, reverse=True)
    assert pages[0]["previous"] is None and pages[2]["next"] is None
    back = await get(client, URL(pages[1]["previous"]).relative())
    assert [r["id"] for r in back["results"]] == [r["id"] for r in pages[0]["results"]]


async def test_message_filters(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.script("tel:+254712345679", ["failed"])
    first = send(sandbox, [PHONE])
    sandbox.advance(10)
    second = send(sandbox, ["tel:+254712345679"])
    sandbox.advance(10)
    rows = (await get(client, MESSAGES))["results"]
    assert [r["broadcast"] for r in rows] == [second, first]
    cut = rows[0]["created_on"]  # inclusive bounds on created_on
    assert [r["broadcast"] for r in (await get(client, MESSAGES, after=cut))["results"]] == [second]
    assert [r["broadcast"] for r in (await get(client, MESSAGES, before=cut))["results"]] == [
        second,
        first,
    ]
    assert (await get(client, MESSAGES, after="not a date"))["results"] == []
    assert [r["broadcast"] for r in (await get(client, MESSAGES, folder="FAILED"))["results"]] == [
        second
    ]
    assert [r["broadcast"] for r in (await get(client, MESSAGES, folder="sent"))["results"]] == [
        first
    ]
    assert (await get(client, MESSAGES, folder="nonsense"))["results"] == []
    contact = rows[1]["contact"]["uuid"]
    assert [r["broadcast"] for r in (await get(client, MESSAGES, contact=contact))["results"]] == [
        first
    ]
    assert (await get(client, MESSAGES, id=rows[0]["id"], broadcast=first))["results"] == []


@pytest.mark.parametrize(
    ("params", "status", "body"),
    [
        ({"folder": "sent", "broadcast": "1"}, 400, {"detail": EXCLUSIVE}),
        ({"id": "x"}, 400, {"detail": "Value for id must be an integer"}),
        ({"uuid": "x"}, 400, {"detail": "Value for uuid must be a valid UUID"}),
        ({"cursor": "bogus"}, 404, {"detail": "Invalid cursor"}),
    ],
    ids=["exclusive", "bad-id", "bad-uuid", "bad-cursor"],
)
async def test_query_errors(
    client: TestClient[Any, Any], params: dict[str, str], status: int, body: dict[str, str]
) -> None:
    async with client.get(MESSAGES, params=params) as response:
        assert response.status == status
        assert await response.json() == body


async def test_broadcast_list_filters(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    first = send(sandbox, [PHONE])
    sandbox.advance(5)
    second = send(sandbox, [PHONE])
    rows = (await get(client, BROADCASTS))["results"]
    assert [r["id"] for r in rows] == [second, first]
    assert [r["id"] for r in (await get(client, BROADCASTS, id=first))["results"]] == [first]
    after = rows[0]["created_on"]
    assert [r["id"] for r in (await get(client, BROADCASTS, after=after))["results"]] == [second]
    async with client.get(BROADCASTS, params={"id": "1.5"}) as response:
        assert response.status == 400


async def test_contacts_are_listed(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    send(sandbox, [PHONE])
    [contact] = (await get(client, "/api/v2/contacts.json", urn="tel:+254 712 345 678"))["results"]
    assert contact["urns"] == [PHONE] and contact["status"] == "active"


# --- URL forms -----------------------------------------------------------------------------------


async def test_url_forms(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    async with client.get("/api/v2/messages/") as response:
        assert response.status == 404
        assert response.content_type == "text/html"
    async with client.get("/api/v2/messages") as response:
        assert response.status == 200 and await response.json() == []
    async with client.get("/api/v2/nothing.json") as response:
        assert response.status == 404
    async with client.delete(BROADCASTS) as response:
        assert response.status == 405
        assert await response.json() == {"detail": 'Method "DELETE" not allowed.'}
    assert [r.status for r in sandbox.requests] == [404, 200, 404, 405]


async def test_json_answers_carry_no_charset_allow_or_vary(
    client: TestClient[Any, Any],
) -> None:
    for method, path in (("GET", BROADCASTS), ("DELETE", BROADCASTS), ("GET", "/api/v2/messages")):
        async with client.request(method, path) as response:
            assert response.headers["Content-Type"] == "application/json", (method, path)
            assert "Allow" not in response.headers and "Vary" not in response.headers


@pytest.mark.parametrize(
    ("header", "status", "detail"),
    [
        (f"Token {DEFAULT_TOKEN}", 405, 'Method "DELETE" not allowed.'),
        (None, 405, 'Method "DELETE" not allowed.'),
        ("Token " + "f" * 40, 403, "Invalid token"),
    ],
    ids=["valid-token-throttled", "anonymous", "bad-token"],
)
async def test_method_is_checked_before_anonymity_and_throttling(
    aiohttp_client: AiohttpClient,
    sandbox: Sandbox,
    header: str | None,
    status: int,
    detail: str,
) -> None:
    """RapidPro's `APIPermission` answers 405 before it looks at the user or the throttle."""
    sandbox.configure(rates={"v2": 1})
    client = await aiohttp_client(build_app(sandbox))
    headers = {"Authorization": header} if header else {}
    await client.get(BROADCASTS, headers=AUTH)  # uses up the quota
    async with client.delete(BROADCASTS, headers=headers) as response:
        assert (response.status, await response.json()) == (status, {"detail": detail})
        assert ("X-Temba-Org" in response.headers) == (header == AUTH["Authorization"])
    async with client.get(BROADCASTS, headers=headers) as response:
        assert response.status == (429 if header == AUTH["Authorization"] else 403)


# --- throttling ----------------------------------------------------------------------------------


async def test_throttle_429_with_retry_after(
    aiohttp_client: AiohttpClient, client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.configure(rates={"v2.messages": 2})
    anonymous = await aiohttp_client(build_app(sandbox))
    async with anonymous.get(MESSAGES) as response:
        assert response.status == 403  # no quota used
    for _ in range(2):
        await get(client, MESSAGES)
    sandbox.advance(100)
    async with client.get(MESSAGES) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "3500"
        assert await response.json() == {
            "detail": "Request was throttled. Expected available in 3500 seconds."
        }
    await get(client, BROADCASTS)  # another scope
    sandbox.advance(3500)
    await get(client, MESSAGES)


async def test_throttle_429_without_retry_after(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.configure(rates={"v2": 1}, retry_after_header=False)
    status, _ = await post(client, {"urns": [PHONE], "text": "hi"})  # current: broadcasts are v2
    assert status == 201
    status, body = await post(client, {"urns": [PHONE], "text": "hi"})
    assert (status, body) == (429, {"detail": "Request was throttled."})
    async with client.get(BROADCASTS) as response:
        assert response.status == 429 and "Retry-After" not in response.headers
    assert len(sandbox.broadcasts) == 1


async def test_v9_broadcasts_have_their_own_bucket(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.configure(dialect="v9", rates=dict(default_rates_v9(), **{"v2.broadcasts": 1}))
    assert (await post(client, {"urns": [PHONE], "text": "hi"}))[0] == 201
    assert (await post(client, {"urns": [PHONE], "text": "hi"}))[0] == 429
    await get(client, MESSAGES)


def default_rates_v9() -> dict[str, int | None]:
    from cht_rapidpro.sandbox import default_rates

    return default_rates("v9")


# --- faults --------------------------------------------------------------------------------------


async def test_fault_before_handling(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.add_fault(method="POST", path="broadcasts.json", status=503)
    sandbox.add_fault(method="GET", status=500, count=2)
    async with client.post(BROADCASTS, json={"urns": [PHONE], "text": "hi"}) as response:
        assert response.status == 503 and response.content_type == "text/html"
        assert "503 Service Unavailable" in await response.text()
    for _ in range(2):
        async with client.get(MESSAGES) as response:
            assert response.status == 500
            assert await response.text() == "Server Error. Site administrators have been notified."
    await get(client, MESSAGES)
    assert sandbox.broadcasts == [] and sandbox.faults == []
    assert (await post(client, {"urns": [PHONE], "text": "hi"}))[0] == 201


async def test_injected_429_with_and_without_header(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.add_fault(status=429, retry_after=7)
    sandbox.add_fault(status=429)
    async with client.get(MESSAGES) as response:
        assert response.status == 429 and response.headers["Retry-After"] == "7"
        assert (await response.json())["detail"].endswith("in 7 seconds.")
    async with client.get(MESSAGES) as response:
        assert response.status == 429 and "Retry-After" not in response.headers


async def test_commit_then_fail_creates_the_broadcast(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.add_fault(method="POST", path="broadcasts.json", status=502, commit=True)
    async with client.post(BROADCASTS, json={"urns": [PHONE], "text": "once"}) as response:
        assert response.status == 502
    [posted] = sandbox.posted_broadcasts()
    assert posted.urns == (PHONE,) and posted.text == "once"
    [row] = (await get(client, BROADCASTS, after="2000-01-01"))["results"]
    assert row["id"] == posted.id  # what a client reconciles against
    assert sandbox.requests[0].status == 502 and sandbox.requests[0].body["text"] == "once"


async def test_commit_then_drop_the_connection(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.add_fault(method="POST", path="broadcasts.json", commit=True, drop=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(client, {"urns": [PHONE], "text": "once"})
    assert len(sandbox.posted_broadcasts()) == 1
    assert sandbox.requests[0].status == 0


async def test_commit_then_slow_answer_times_out(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.add_fault(method="POST", status=None, delay=0.3, commit=True)
    with pytest.raises(asyncio.TimeoutError):
        await post(
            client, {"urns": [PHONE], "text": "once"}, timeout=aiohttp.ClientTimeout(total=0.05)
        )
    assert len(sandbox.posted_broadcasts()) == 1  # created before the answer was due
    await asyncio.sleep(0.3)  # let the slow handler finish before the server closes


async def test_fault_every_nth_request(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.add_fault(method="POST", path="broadcasts.json", status=502, every=4, count=None)
    statuses = []
    for n in range(8):
        async with client.post(BROADCASTS, json={"urns": [PHONE], "text": f"m{n}"}) as response:
            statuses.append(response.status)
    assert statuses == [201, 201, 201, 502] * 2
    with pytest.raises(ValueError, match="every"):
        sandbox.add_fault(every=0)


async def test_probabilistic_faults_are_seeded(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.add_fault(status=503, probability=0.3, count=None)
    statuses = []
    for _ in range(30):
        async with client.get(MESSAGES) as response:
            statuses.append(response.status)
    assert 0 < statuses.count(503) < 30
    assert set(statuses) == {200, 503}
    again = Sandbox(SandboxConfig(real_time=False))
    again.add_fault(status=503, probability=0.3, count=None)
    replay = [503 if again.take_fault("GET", MESSAGES) else 200 for _ in range(30)]
    assert replay == statuses


async def test_replica_lag_and_retention(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.configure(replica_lag=5, retention_days=90)
    send(sandbox, [PHONE])
    sandbox.advance(3)
    assert (await get(client, BROADCASTS))["results"] == []
    sandbox.advance(3)
    assert len((await get(client, BROADCASTS))["results"]) == 1
    sandbox.advance(91 * 86400)
    assert (await get(client, BROADCASTS))["results"] == []
    assert (await get(client, MESSAGES))["results"] == []
