"""The daemon as operators run it: a process, SIGTERM, exit codes, what its logs may show."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import sys
from collections import Counter
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from cht_rapidpro.app import listen_failure, serve
from cht_rapidpro.config import Settings
from cht_rapidpro.sandbox import DEFAULT_TOKEN
from pouchdb import free_port
from support import CouchAdmin, all_tasks, eventually, message_doc, task

SECRET_TEXT = "Dear Amina, your HIV test result is ready"
PHONES = [f"+2547123{n:05d}" for n in range(40)]


async def start_process(couch_url: str, port: int, **extra: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "COUCH_URL": couch_url,
        "CHT_RAPIDPRO_PORT": str(port),
        "CHT_RAPIDPRO_INSTANCE": "proc",
        "CHT_RAPIDPRO_POLL_INTERVAL": "0.2",
        "CHT_RAPIDPRO_CHECKPOINT_INTERVAL": "0.2",
        "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
        "CHT_RAPIDPRO_LOG_LEVEL": "debug",
        # Claims left by a stopped run are looked up in RapidPro once any POST of that run
        # must have landed (TTL/2 + SEND_TIMEOUT after the claim): keep that short here.
        "CHT_RAPIDPRO_SEND_TIMEOUT": "2",
        "CHT_RAPIDPRO_CLAIM_TTL": "6",
        **extra,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cht_rapidpro", "run",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def healthz(port: int) -> int:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            return resp.status
    except aiohttp.ClientError:
        return 0


async def test_sigterm_drains_saves_checkpoint_and_exits_zero(
    cht: CouchAdmin, rapidpro: Any
) -> None:
    # Slow RapidPro so that sends are in flight when SIGTERM arrives.
    rapidpro.sandbox.add_fault(method="POST", path="broadcasts.json", status=None, delay=0.3,
                               count=None)  # fmt: skip
    port = free_port()
    proc = await start_process(cht.couch_url, port)
    output = asyncio.ensure_future(proc.stdout.read())  # type: ignore[union-attr]
    await eventually(lambda: healthz(port), lambda status: status == 200, what="healthy")
    await cht.bulk([message_doc([task(phone, SECRET_TEXT)]) for phone in PHONES])
    await eventually(lambda: asyncio.sleep(0, len(rapidpro.sandbox.posted_broadcasts())),
                     lambda n: n >= 3, what="some sends")  # fmt: skip

    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 15)
    logs = (await output).decode()
    assert code == 0, logs

    # Drained: nothing it posted is left without its write-back.
    docs = await cht.all_docs()
    posted = {b.urns[0] for b in rapidpro.sandbox.posted_broadcasts()}
    for doc in docs:
        for item in all_tasks(doc):
            if "tel:" + item["messages"][0]["to"] in posted:
                assert item["state"] != "pending"
                assert item.get("gateway_ref"), item
    assert await cht.get("_local/cht-rapidpro.proc") is not None

    # Health data never reaches the logs: no text, no token, no full number.
    assert "gateway_stopping" in logs
    assert SECRET_TEXT not in logs and "Amina" not in logs
    assert DEFAULT_TOKEN not in logs
    for phone in PHONES:
        assert phone not in logs and phone[1:] not in logs

    # A restart finishes the rest, and nothing is sent twice.
    rapidpro.sandbox.clear_faults()
    proc = await start_process(cht.couch_url, port)
    try:

        async def finished() -> int:
            return sum(
                1 for d in await cht.all_docs() for t in all_tasks(d) if t["state"] == "delivered"
            )

        await eventually(finished, lambda n: n == len(PHONES), within=40, what="all delivered")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    counts = Counter(b.urns for b in rapidpro.sandbox.posted_broadcasts())
    assert len(counts) == len(PHONES)
    assert set(counts.values()) == {1}


async def test_configuration_errors_exit_78_listing_every_problem() -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CHT_RAPIDPRO_") and key != "COUCH_URL"
    }
    env.update(CHT_RAPIDPRO_PORT="not-a-port", CHT_RAPIDPRO_POLL_INTERVAL="-1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cht_rapidpro", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 78
    text = (out + err).decode()
    for name in ("COUCH_URL", "CHT_RAPIDPRO_PORT", "CHT_RAPIDPRO_POLL_INTERVAL"):
        assert name in text


async def test_port_in_use_exits_71(couch: CouchAdmin) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = await start_process(couch.couch_url, busy.getsockname()[1])
        out, _ = await proc.communicate()
    assert proc.returncode == 71
    assert b"listen_failed" in out


async def test_an_address_that_is_not_this_machines_exits_78_not_71(couch: CouchAdmin) -> None:
    """Issue item 6: `run` answered a listen address of another machine with 71 ("port
    taken"), which systemd retries for ever. `serve` itself, past the CLI's check."""
    settings = Settings.from_env(
        {
            "COUCH_URL": couch.couch_url,
            "CHT_RAPIDPRO_HOST": "192.0.2.1",  # TEST-NET-1: no machine's address
            "CHT_RAPIDPRO_PORT": str(free_port()),
            "CHT_RAPIDPRO_INSTANCE": "elsewhere",
        }
    )
    with capture_logs() as logs:
        assert await serve(settings) == 78
    [failed] = [line for line in logs if line["event"] == "listen_failed"]
    assert failed["exit_code"] == 78
    assert "not an address of this machine" in failed["hint"]


def _bind_error(host: str, port: int) -> OSError:
    try:
        with socket.socket() as sock:
            sock.bind((host, port))
    except OSError as exc:
        return exc
    raise AssertionError("bound")


def test_listen_failures_are_configuration_errors_except_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        in_use = _bind_error("127.0.0.1", busy.getsockname()[1])
    try:
        socket.getaddrinfo("no-such-host.invalid", 5989)
        raise AssertionError("resolved")
    except socket.gaierror as exc:
        unresolvable = exc
    assert listen_failure(in_use)[0] == 71
    assert listen_failure(unresolvable)[0] == 78
    assert listen_failure(_bind_error("192.0.2.1", 0))[0] == 78
    assert listen_failure(OSError(errno.EACCES, "Permission denied"))[0] == 78


async def test_a_normal_start_logs_no_false_alarm_and_no_empty_keys(
    cht: CouchAdmin, rapidpro: Any
) -> None:
    """Issue item 10: every start logged `sending_disabled reason="reading the RapidPro
    credentials"` (a transitional state, not a problem), and keys without a value rendered
    as `problem=`."""
    port = free_port()
    proc = await start_process(cht.couch_url, port)
    output = asyncio.ensure_future(proc.stdout.read())  # type: ignore[union-attr]
    await eventually(lambda: healthz(port), lambda status: status == 200, what="healthy")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    lines = (await output).decode().splitlines()
    events = [line for line in lines if "event=" in line]
    assert any("event=sending_enabled" in line for line in events)
    assert any("event=credential_loaded" in line for line in events)
    assert not [line for line in events if "event=sending_disabled" in line]
    empty = [line for line in events if re.search(r" [a-z_]+=(?= |$)", line)]
    assert empty == []


async def test_metrics_have_no_created_series(daemon_factory: Any, cht: CouchAdmin) -> None:
    daemon = await daemon_factory()
    async with aiohttp.ClientSession() as session, session.get(daemon.url + "/metrics") as resp:
        text = await resp.text()
    assert "chtrp_messages_sent_total 0.0" in text
    assert "_created" not in text
