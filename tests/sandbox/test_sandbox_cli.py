"""`python -m cht_rapidpro.sandbox` as a real process: start, serve, stop on a signal."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from cht_rapidpro.sandbox import DEFAULT_TOKEN
from cht_rapidpro.sandbox.__main__ import build_parser, config_from_args, parse_rates

AUTH = {"Authorization": f"Token {DEFAULT_TOKEN}"}


async def run_sandbox(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cht_rapidpro.sandbox",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def read_url(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line, "the sandbox exited before listening"
        found = re.search(r"listening at (http://\S+)", line)
        if found:
            return found.group(1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_serves_then_exits_0_on_signal(sig: signal.Signals) -> None:
    proc = await run_sandbox("--port", "0", "--step-seconds", "0.01", "--dialect", "v9")
    try:
        url = await read_url(proc)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(
                f"{url}/api/v2/broadcasts.json", json={"urns": ["tel:+254712345678"], "text": "hi"}
            ) as r:
                assert r.status == 201
                assert (await r.json())["status"] == "queued"  # v9
            async with session.get(f"{url}/_sandbox/state") as r:
                state = await r.json()
        assert state["config"]["rates"]["v2.broadcasts"] == 36000  # real rates by default
        assert len(state["broadcasts"]) == 1
    finally:
        proc.send_signal(sig)
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, output.decode()
    assert DEFAULT_TOKEN in output.decode()  # printed on start for the user
    assert "Traceback" not in output.decode()


async def test_busy_port_is_a_clear_error(unused_tcp_port: int) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", unused_tcp_port)
    try:
        proc = await run_sandbox("--port", str(unused_tcp_port))
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert proc.returncode == 69
    assert "cannot listen" in output.decode()


async def test_sends_one_incoming_sms(aiohttp_server: AiohttpServer) -> None:
    received: list[tuple[str | None, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((request.headers.get("Authorization"), await request.text()))
        return web.json_response({"saved": 1})

    app = web.Application()
    app.router.add_post("/incoming", hook)
    server = await aiohttp_server(app)
    proc = await run_sandbox(
        "--incoming-url",
        str(server.make_url("/incoming")),
        "--from",
        "+254712345678",
        "--text",
        "hello",
        "--incoming-token",
        "cht-key",
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, output.decode()
    outcome = json.loads(output.decode()[output.decode().index("{") :])
    assert outcome["category"] == "Success" and outcome["status"] == 200
    [(authorization, body)] = received
    assert authorization == "Token cht-key"
    assert json.loads(body)["content"] == "hello"


def test_rates_and_config_from_arguments() -> None:
    assert parse_rates(["v2=10", "v2.messages=none"], {"v2": 1, "v2.messages": 2}) == {
        "v2": 10,
        "v2.messages": None,
    }
    with pytest.raises(ValueError, match="SCOPE=N"):
        parse_rates(["v2"], {})
    args = build_parser().parse_args(
        ["--unthrottled", "--rate", "v2=5", "--token", "a" * 40, "--no-retry-after"]
    )
    config = config_from_args(args)
    assert config.rates == {"v2": 5}
    assert config.tokens == frozenset({"a" * 40})
    assert config.retry_after_header is False


@pytest.mark.parametrize(
    ("argv", "country"),
    [([], "KE"), (["--default-country", "RW"], "RW"), (["--default-country", "none"], None)],
    ids=["default", "given", "none"],
)
def test_default_country_from_arguments(argv: list[str], country: str | None) -> None:
    assert config_from_args(build_parser().parse_args(argv)).default_country == country
