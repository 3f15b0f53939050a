"""The workspace's own traffic in the sandbox (issue 13): RapidPro-originated messages, incoming
SMS handled by flows, flow runs, and the `messages.json` filters a log follower uses."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from cht_rapidpro.sandbox import DEFAULT_TOKEN, Sandbox, SandboxConfig, build_app
from cht_rapidpro.sandbox.state import (
    INCOMING_FLOW,
    REMINDERS_FLOW,
    MessageRecord,
    build_timeline,
)

AUTH = {"Authorization": f"Token {DEFAULT_TOKEN}"}
MESSAGES = "/api/v2/messages.json"
RUNS = "/api/v2/runs.json"
PHONE = "+254712345678"


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(real_time=False, step_seconds=1, webhook_timeout=0.5))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sandbox: Sandbox) -> TestClient[Any, Any]:
    return await aiohttp_client(build_app(sandbox), headers=AUTH)


async def get(client: TestClient[Any, Any], url: str | URL, **params: Any) -> Any:
    async with client.get(url, params=params or None) as response:
        assert response.status == 200, await response.text()
        return await response.json()


class Hook:
    """A webhook that records bodies and checks, while it is called, what the API lists."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.bodies: list[dict[str, Any]] = []
        self.listed_during_call: list[bool] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.text()))
        now = self.sandbox.now()
        self.listed_during_call.append(
            any(self.sandbox.listed(m, now) for m in self.sandbox.messages)
        )
        return web.json_response({"saved": 1})


@pytest.fixture
async def hook(aiohttp_server: AiohttpServer, sandbox: Sandbox) -> tuple[Hook, TestServer]:
    receiver = Hook(sandbox)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    return receiver, await aiohttp_server(app)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


async def test_incoming_sms_is_listed_only_once_its_flow_ran(
    client: TestClient[Any, Any], sandbox: Sandbox, hook: tuple[Hook, TestServer]
) -> None:
    receiver, server = hook
    outcome = await sandbox.deliver_incoming(
        str(server.make_url("/hook")),
        from_=PHONE,
        text="VISIT 1",
        run_uuid="b1c6f1f0-0000-4000-8000-000000000001",
    )
    assert outcome.category == "Success"
    assert receiver.listed_during_call == [False]  # status P while the flow (webhook) runs
    [row] = (await get(client, MESSAGES))["results"]
    assert (row["direction"], row["status"], row["text"]) == ("in", "handled", "VISIT 1")
    assert row["flow"] == INCOMING_FLOW and row["broadcast"] is None
    assert row["urn"] == f"tel:{PHONE}"
    [run] = (await get(client, RUNS))["results"]
    assert list(run) == [
        "id", "uuid", "flow", "contact", "start", "responded", "path", "values",
        "created_on", "modified_on", "exited_on", "exit_type",
    ]  # fmt: skip
    assert run["uuid"] == receiver.bodies[0]["id"] == "b1c6f1f0-0000-4000-8000-000000000001"
    assert run["contact"] == {**row["contact"], "urn": f"tel:{PHONE}"}
    assert run["start"] is None and run["flow"] == INCOMING_FLOW
    assert run["modified_on"] >= row["created_on"]


async def test_extended_body_carries_the_message_identity(
    client: TestClient[Any, Any], sandbox: Sandbox, hook: tuple[Hook, TestServer]
) -> None:
    receiver, server = hook
    await sandbox.deliver_incoming(
        str(server.make_url("/hook")), from_=PHONE, text="hi", body="message"
    )
    [row] = (await get(client, MESSAGES))["results"]
    [body] = receiver.bodies
    assert body == {
        "content": "hi",
        "from": PHONE,
        "id": row["uuid"],
        "sent_timestamp": row["created_on"],
    }


async def test_failed_webhook_leaves_the_sms_in_rapidpro_only(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    outcome = await sandbox.deliver_incoming(closed_port_url(), from_=PHONE, text="lost?")
    assert (outcome.status, outcome.category) == (0, "Failure")
    [row] = (await get(client, MESSAGES))["results"]
    assert (row["direction"], row["status"], row["text"]) == ("in", "handled", "lost?")
    assert len((await get(client, RUNS))["results"]) == 1


async def test_rapidpro_originated_messages_with_and_without_broadcast(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    [reply] = sandbox.send_from_rapidpro(
        [f"tel:{PHONE}"], "Your visit is tomorrow", flow=REMINDERS_FLOW
    )
    sandbox.advance(1)
    made = sandbox.send_from_rapidpro(
        ["tel:+254700000001", "tel:+254700000002"], "Clinic closed", broadcast=True
    )
    sandbox.advance(10)
    rows = (await get(client, MESSAGES))["results"]
    assert [r["id"] for r in rows] == [m.id for m in reversed(made)] + [reply.id]
    flow_row = rows[-1]
    assert flow_row["broadcast"] is None and flow_row["flow"] == REMINDERS_FLOW
    assert flow_row["direction"] == "out" and flow_row["status"] == "delivered"
    broadcast = made[0].broadcast
    assert broadcast is not None and {r["broadcast"] for r in rows[:2]} == {broadcast}
    assert [r["flow"] for r in rows[:2]] == [None, None]
    [listed] = (await get(client, "/api/v2/broadcasts.json"))["results"]
    assert listed["id"] == broadcast and listed["text"] == {"eng": "Clinic closed"}
    by_broadcast = (await get(client, MESSAGES, broadcast=str(broadcast)))["results"]
    assert sorted(r["id"] for r in by_broadcast) == sorted(m.id for m in made)
    assert [r["id"] for r in (await get(client, MESSAGES, id=str(reply.id)))["results"]] == [
        reply.id
    ]
    assert [r["id"] for r in (await get(client, MESSAGES, uuid=reply.uuid))["results"]] == [
        reply.id
    ]


async def test_flows_and_inbox_folders(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    sandbox.add_incoming_message(f"tel:{PHONE}", "via flow")
    sandbox.add_incoming_message(f"tel:{PHONE}", "no flow", flow=None)
    sandbox.send_from_rapidpro([f"tel:{PHONE}"], "reply", flow=REMINDERS_FLOW)
    sandbox.advance(5)
    flows = (await get(client, MESSAGES, folder="flows"))["results"]
    inbox = (await get(client, MESSAGES, folder="inbox"))["results"]
    assert [r["text"] for r in flows] == ["via flow"]
    assert [r["text"] for r in inbox] == ["no flow"]


async def test_runs_filters(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    other = {"uuid": "9e4f7c1a-0000-4000-8000-00000000000a", "name": "Other"}
    first = sandbox.handle_incoming(
        sandbox.add_incoming_message(f"tel:{PHONE}", "a", handled=False)
    )
    sandbox.advance(10)
    second = sandbox.handle_incoming(
        sandbox.add_incoming_message("tel:+254700000009", "b", flow=other, handled=False)
    )
    rows = (await get(client, RUNS))["results"]
    assert [r["uuid"] for r in rows] == [second.uuid, first.uuid]
    assert [
        r["uuid"] for r in (await get(client, RUNS, flow=INCOMING_FLOW["uuid"]))["results"]
    ] == [first.uuid]
    cut = rows[0]["modified_on"]
    assert [r["uuid"] for r in (await get(client, RUNS, after=cut))["results"]] == [second.uuid]
    assert [r["uuid"] for r in (await get(client, RUNS, before=cut))["results"]] == [
        second.uuid,
        first.uuid,
    ]
    contact = rows[1]["contact"]["uuid"]
    assert [r["uuid"] for r in (await get(client, RUNS, contact=contact))["results"]] == [
        first.uuid
    ]


async def test_runs_have_their_own_throttle_bucket(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    sandbox.configure(rates={"v2.messages": 1, "v2.runs": 1})
    assert (await get(client, MESSAGES))["results"] == []
    assert (await get(client, RUNS))["results"] == []
    for path in (MESSAGES, RUNS):
        async with client.get(path) as response:
            assert response.status == 429


async def test_a_large_history_pages_by_window_without_gaps(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    start = sandbox.now() - timedelta(days=2)
    contact = sandbox.contact_for("tel:+254700000100")
    history = [
        MessageRecord(
            sandbox.next_message_id(),
            f"00000000-0000-4000-8000-{n:012d}",
            None,
            contact,
            "tel:+254700000100",
            f"foreign {n}",
            build_timeline(start + timedelta(seconds=n * 7), ["wired"], step=1, backoff=300),
        )
        for n in range(20_000)
    ]
    # Loaded out of order on purpose: the store keeps them ordered by creation.
    sandbox.add_messages(history[10_000:] + history[:10_000])
    low = history[12_345].created_on
    high = history[12_345 + 700].created_on
    page = await get(client, MESSAGES, after=low.isoformat(), before=high.isoformat())
    seen = []
    while True:
        seen += [r["id"] for r in page["results"]]
        if not page["next"]:
            break
        page = await get(client, URL(page["next"]).relative())
    assert seen == [m.id for m in reversed(history[12_345 : 12_345 + 701])]
    # Rows not listed yet (an incoming SMS still P) are skipped inside a page, not cut off it.
    sandbox.add_incoming_message(f"tel:{PHONE}", "not handled", handled=False)
    sandbox.advance(1)
    newest = (await get(client, MESSAGES))["results"]
    assert len(newest) == 250 and newest[0]["id"] == history[-1].id


async def test_control_outgoing_and_incoming_with_flow(
    aiohttp_client: AiohttpClient, sandbox: Sandbox, hook: tuple[Hook, TestServer]
) -> None:
    control = await aiohttp_client(build_app(sandbox))
    async with control.post(
        "/_sandbox/outgoing",
        json={
            "urns": [f"tel:{PHONE}"],
            "text": "hello",
            "flow": REMINDERS_FLOW,
            "outcome": ["wired"],
        },
    ) as response:
        assert response.status == 201
        [message_id] = (await response.json())["messages"]
    assert sandbox.message_by_id(message_id) is not None
    receiver, server = hook
    other = {"uuid": "9e4f7c1a-0000-4000-8000-00000000000b", "name": "Registrations"}
    async with control.post(
        "/_sandbox/incoming",
        json={
            "url": str(server.make_url("/hook")),
            "from": PHONE,
            "text": "x",
            "flow": other,
            "body": "message",
        },
    ) as response:
        assert response.status == 200
    incoming = [m for m in sandbox.messages if m.direction == "in"]
    assert [m.flow for m in incoming] == [other]
    assert receiver.bodies[0]["id"] == incoming[0].uuid
