"""The `/_sandbox/` control API, the incoming-SMS simulator and `start_sandbox`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from cht_rapidpro.sandbox import (
    DEFAULT_TOKEN,
    Sandbox,
    SandboxConfig,
    build_app,
    call_webhook,
    start_sandbox,
)

AUTH = {"Authorization": f"Token {DEFAULT_TOKEN}"}
PHONE = "+254712345678"


class Receiver:
    """A tiny webhook receiver: records each request, answers from a queue (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], str]] = []
        self.answers: list[web.Response] = []
        self.slow = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.text()))
        if self.slow:
            await asyncio.sleep(self.slow)
        return self.answers.pop(0) if self.answers else web.json_response({"saved": 1})


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> tuple[Receiver, TestServer]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/api/v2/sms/rapidpro/incoming-messages", receiver.handle)
    return receiver, await aiohttp_server(app)


def hook_url(server: TestServer) -> str:
    return str(server.make_url("/api/v2/sms/rapidpro/incoming-messages"))


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(real_time=False, step_seconds=1, webhook_timeout=0.5))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sandbox: Sandbox) -> TestClient[Any, Any]:
    return await aiohttp_client(build_app(sandbox))


async def call(client: TestClient[Any, Any], method: str, path: str, body: Any = None) -> Any:
    async with client.request(method, path, json=body) as response:
        assert response.status in (200, 201), await response.text()
        return await response.json()


# --- webhook simulator ---------------------------------------------------------------------------


async def test_webhook_is_posted_like_the_cht_flow(
    sandbox: Sandbox, receiver: tuple[Receiver, TestServer]
) -> None:
    hook, server = receiver
    headers = {"Authorization": "Token cht-key", "Content-Type": "application/json"}
    outcome = await sandbox.deliver_incoming(
        hook_url(server), from_=PHONE, text="Habari é", headers=headers, run_uuid="run-1"
    )
    [(sent_headers, body)] = hook.requests
    assert body == '{"content":"Habari é","from":"+254712345678","id":"run-1"}'
    assert sent_headers["Authorization"] == "Token cht-key"
    assert sent_headers["Content-Type"] == "application/json"
    assert sent_headers["User-Agent"] == "Mailroom/26.3"
    assert sent_headers["X-Mailroom-Mode"] == "normal"
    assert (outcome.status, outcome.category, outcome.attempts) == (200, "Success", 1)
    assert json.loads(outcome.body) == {"saved": 1}
    assert sandbox.incoming == [outcome]
    [message] = sandbox.messages  # listed like RapidPro lists it
    assert (message.direction, message.urn, message.text) == ("in", f"tel:{PHONE}", "Habari é")


async def test_webhook_adds_no_content_type_by_itself(
    sandbox: Sandbox, receiver: tuple[Receiver, TestServer]
) -> None:
    hook, server = receiver
    await sandbox.deliver_incoming(hook_url(server), from_=PHONE, text="x")
    [(sent_headers, body)] = hook.requests
    assert "Content-Type" not in sent_headers and "Accept" not in sent_headers
    assert sent_headers["Accept-Encoding"] == "gzip"
    assert json.loads(body)["id"]  # a fresh run uuid


@pytest.mark.parametrize("status", [400, 500, 503], ids=["rejected", "error", "unavailable"])
async def test_webhook_failure_is_not_retried(
    sandbox: Sandbox, receiver: tuple[Receiver, TestServer], status: int
) -> None:
    hook, server = receiver
    hook.answers = [web.Response(status=status, text="no")]
    outcome = await sandbox.deliver_incoming(hook_url(server), from_=PHONE, text="x")
    assert (outcome.status, outcome.category, outcome.attempts) == (status, "Failure", 1)


async def test_webhook_timeout_and_connection_error_are_status_0(
    sandbox: Sandbox, receiver: tuple[Receiver, TestServer], unused_tcp_port: int
) -> None:
    hook, server = receiver
    hook.slow = 1.0  # above the sandbox's webhook_timeout of 0.5 s
    outcome = await sandbox.deliver_incoming(hook_url(server), from_=PHONE, text="x")
    assert (outcome.status, outcome.category) == (0, "Failure")
    assert outcome.error is not None and "timed out" in outcome.error
    refused = await sandbox.deliver_incoming(
        f"http://127.0.0.1:{unused_tcp_port}/hook", from_=PHONE, text="x"
    )
    assert (refused.status, refused.category) == (0, "Failure")
    hook.slow = 0


async def test_v9_retries_only_with_a_short_retry_after(
    receiver: tuple[Receiver, TestServer],
) -> None:
    hook, server = receiver
    hook.answers = [web.Response(status=503, headers={"Retry-After": "0"})]
    body = {"content": "x", "from": PHONE, "id": "run-2"}
    outcome = await call_webhook(
        hook_url(server), body=body, headers={}, dialect="v9", retry_backoffs=(0.01, 0.01)
    )
    assert (outcome.status, outcome.attempts) == (200, 2)
    assert hook.requests[0][0]["User-Agent"] == "RapidProMailroom/9.0.0"
    hook.answers = [web.Response(status=503)]  # no Retry-After: a POST is not retried
    outcome = await call_webhook(
        hook_url(server), body=body, headers={}, dialect="v9", retry_backoffs=(0.01, 0.01)
    )
    assert (outcome.status, outcome.attempts) == (503, 1)
    hook.answers = [web.Response(status=503, headers={"Retry-After": "0"})]
    outcome = await call_webhook(hook_url(server), body=body, headers={}, dialect="current")
    assert (outcome.status, outcome.attempts) == (503, 1)


# --- control API ---------------------------------------------------------------------------------


async def test_control_script_advance_and_state(
    client: TestClient[Any, Any], sandbox: Sandbox
) -> None:
    await call(client, "POST", "/_sandbox/script", {"urn": f"tel:{PHONE}", "outcome": ["failed"]})
    async with client.post(
        "/api/v2/broadcasts.json", json={"urns": [f"tel:{PHONE}"], "text": "x"}, headers=AUTH
    ) as response:
        assert response.status == 201
    state = await call(client, "GET", "/_sandbox/state")
    assert state["messages"] == [] and len(state["broadcasts"]) == 1
    assert state["broadcasts"][0]["body"] == {"urns": [f"tel:{PHONE}"], "text": "x"}
    assert state["requests"]["by_route"] == {"POST /api/v2/broadcasts.json": 1}
    assert state["scripts"] == {f"tel:{PHONE}": ["failed"]}
    await call(client, "POST", "/_sandbox/advance", {"seconds": 2})
    state = await call(client, "GET", "/_sandbox/state")
    assert [m["status"] for m in state["messages"]] == ["failed"]
    assert "tokens" not in state["config"]


async def test_control_faults(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    fault = await call(
        client,
        "POST",
        "/_sandbox/faults",
        {"method": "POST", "path": "broadcasts.json", "status": 502, "commit": True, "count": 2},
    )
    assert fault["status"] == 502 and fault["commit"] is True
    assert len(sandbox.faults) == 1
    await call(client, "DELETE", "/_sandbox/faults")
    assert sandbox.faults == []
    async with client.post("/_sandbox/faults", json={"colour": "red"}) as response:
        assert response.status == 400
        assert "colour" in (await response.json())["error"]
    async with client.post("/_sandbox/faults", json={"status": None}) as response:
        assert response.status == 400


async def test_control_config_and_reset(client: TestClient[Any, Any], sandbox: Sandbox) -> None:
    config = await call(client, "POST", "/_sandbox/config", {"dialect": "v9", "rates": "default"})
    assert config["dialect"] == "v9" and config["rates"]["v2.broadcasts"] == 36000
    await call(client, "POST", "/_sandbox/config", {"rates": {"v2.messages": 0}})
    async with client.get("/api/v2/messages.json", headers=AUTH) as response:
        assert response.status == 429
    async with client.post("/_sandbox/config", json={"dialect": "v7"}) as response:
        assert response.status == 400
    sandbox.script(f"tel:{PHONE}", None)
    await call(client, "POST", "/_sandbox/reset")
    assert sandbox.requests == [] and sandbox.scripts == {}
    assert sandbox.config.dialect == "v9"  # config survives a reset


async def test_control_incoming(
    client: TestClient[Any, Any], receiver: tuple[Receiver, TestServer]
) -> None:
    hook, server = receiver
    outcome = await call(
        client,
        "POST",
        "/_sandbox/incoming",
        {"url": hook_url(server), "from": PHONE, "text": "hi", "token": "cht-key"},
    )
    assert outcome["category"] == "Success" and outcome["status"] == 200
    [(headers, _)] = hook.requests
    assert headers["Authorization"] == "Token cht-key"
    assert headers["Content-Type"] == "application/json"


# --- start_sandbox -------------------------------------------------------------------------------


async def test_start_sandbox_serves_on_a_free_port() -> None:
    async with start_sandbox(SandboxConfig(step_seconds=0.01)) as running:
        assert running.url.startswith("http://127.0.0.1:")
        assert running.token == DEFAULT_TOKEN
        body = {"urns": [f"tel:{PHONE}"], "text": "hi"}
        async with (
            aiohttp.ClientSession(headers=AUTH) as session,
            session.post(f"{running.url}/api/v2/broadcasts.json", json=body) as response,
        ):
            assert response.status == 201
        assert len(running.sandbox.posted_broadcasts()) == 1
