"""Shared fixtures: the CouchDB-compatible test server, a fresh db per test, the daemon.

The server is pouchdb-server (pinned in package.json), one per test session, started in its own
working directory with an admin configured (no admin party). Set
`CHT_RAPIDPRO_TEST_COUCH_URL=http://admin:pass@host:5984` to run against another server, such
as a real Apache CouchDB 3 (then `couchdb_only` tests run too).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from aiohttp import web

from cht_rapidpro import logs
from cht_rapidpro.app import build_app, gateway_of
from cht_rapidpro.config import Settings
from cht_rapidpro.gateway import Gateway
from pouchdb import PouchServer
from support import (
    ADMIN_USER,
    COUCH_SECRET,
    CouchAdmin,
    CouchServer,
    rapidpro_settings,
)


@pytest.fixture(scope="session")
def pouch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PouchServer | None]:
    if os.environ.get("CHT_RAPIDPRO_TEST_COUCH_URL"):
        yield None
        return
    server = PouchServer(tmp_path_factory.mktemp("pouchdb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def couch_server(pouch: PouchServer | None) -> CouchServer:
    external = os.environ.get("CHT_RAPIDPRO_TEST_COUCH_URL")
    if external:
        parts = urllib.parse.urlsplit(external)
        base = urllib.parse.urlunsplit(
            (parts.scheme, f"{parts.hostname}:{parts.port or 5984}", "", "", "")
        )
        return CouchServer(base, parts.username or ADMIN_USER, parts.password or "")
    assert pouch is not None
    return CouchServer(pouch.url)


@pytest.fixture(autouse=True)
def _server_health(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail loudly (and restart) when a test crashed the test server."""
    yield
    if "pouch" not in request.fixturenames:
        return
    pouch: PouchServer | None = request.getfixturevalue("pouch")
    if pouch is not None and not pouch.alive():
        log = pouch.tail()
        pouch.start()
        pytest.fail(f"the test server died during this test; its log:\n{log}")


@pytest.fixture
def is_pouchdb(pouch: PouchServer | None) -> bool:
    return pouch is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CHT_RAPIDPRO_TEST_COUCH_URL"):
        return
    skip = pytest.mark.skip(reason="needs real Apache CouchDB 3 (CHT_RAPIDPRO_TEST_COUCH_URL)")
    for item in items:
        if "couchdb_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def couch(couch_server: CouchServer, pouch: PouchServer | None) -> AsyncIterator[CouchAdmin]:
    """A fresh, empty medic-like database for this test (and its `-vault` twin)."""
    admin = CouchAdmin(couch_server, f"medic_{uuid.uuid4().hex[:12]}")
    await admin.create_db()
    if pouch is None:  # an external server: make sure the vault secret is the tests' one
        await admin.set_config("couch_httpd_auth", "secret", COUCH_SECRET)
    try:
        yield admin
    finally:
        await admin.delete_db()
        await admin.delete_db(f"{admin.db}-vault")
        await admin.close()


@pytest.fixture
async def config_credential(couch: CouchAdmin) -> AsyncIterator[Any]:
    """Set CHT 3.x `medic-credentials` values for one test; removed afterwards."""
    keys: list[str] = []

    async def put(key: str, value: str) -> None:
        keys.append(key)
        await couch.set_config("medic-credentials", key, value)

    yield put
    for key in keys:
        await couch.delete_config("medic-credentials", key)


# -- the daemon, in process ---------------------------------------------------------------

#: Test timings: quick polls and checkpoints, short back-offs.
FAST_ENV = {
    "CHT_RAPIDPRO_HOST": "127.0.0.1",
    "CHT_RAPIDPRO_PORT": "0",
    "CHT_RAPIDPRO_POLL_INTERVAL": "0.2",
    "CHT_RAPIDPRO_CHECKPOINT_INTERVAL": "0.1",
    "CHT_RAPIDPRO_CREDENTIALS_REFRESH": "0.2",
    "CHT_RAPIDPRO_FEED_HEARTBEAT": "1",
    "CHT_RAPIDPRO_RETRY_MAX": "0.5",
    "CHT_RAPIDPRO_SEND_TIMEOUT": "3",
    # After a restart, our own earlier claims wait TTL/2 + SEND_TIMEOUT before the lookup.
    "CHT_RAPIDPRO_CLAIM_TTL": "8",
    "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
    "CHT_RAPIDPRO_LOG_LEVEL": "debug",
}


class RunningDaemon:
    """One in-process daemon (the real aiohttp app with all its workers)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fatal: list[int] = []
        self.app = build_app(settings, on_fatal=self.fatal.append)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        self.url = ""

    @property
    def gateway(self) -> Gateway:
        return gateway_of(self.app)

    async def start(self) -> None:
        # Tasks started here inherit the binding: several daemons in one test process
        # tell their log lines apart by it.
        with structlog.contextvars.bound_contextvars(daemon=self.settings.instance):
            await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.listen_host, self.settings.listen_port)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def daemon_factory(couch: CouchAdmin) -> AsyncIterator[Any]:
    """`await daemon_factory(**env_overrides)` starts a daemon on the test db; all are stopped."""
    started: list[RunningDaemon] = []

    async def start(**overrides: str) -> RunningDaemon:
        env = {**FAST_ENV, "COUCH_URL": couch.couch_url, **overrides}
        env.setdefault("CHT_RAPIDPRO_INSTANCE", f"test-{len(started)}")
        settings = dataclasses.replace(Settings.from_env(env), retry_initial_s=0.05)
        daemon = RunningDaemon(settings)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        await daemon.stop()
    for daemon in started:
        assert daemon.fatal == [], f"daemon {daemon.settings.instance} exited fatally"


@pytest.fixture(autouse=True, scope="session")
def _test_logging() -> None:
    logs.configure("debug", "logfmt")


# -- RapidPro: the project's sandbox, in process --------------------------------------------


@pytest.fixture
async def rapidpro() -> AsyncIterator[Any]:
    """A running RapidPro sandbox (`.url`, `.sandbox`), quick status steps."""
    from cht_rapidpro.sandbox import SandboxConfig, start_sandbox

    async with start_sandbox(SandboxConfig(step_seconds=0.05)) as running:
        yield running


@pytest.fixture
async def cht(couch: CouchAdmin, rapidpro: Any) -> CouchAdmin:
    """The test db set up as a CHT 4.x instance sending through the sandbox."""
    from cht_rapidpro.sandbox import DEFAULT_TOKEN

    await couch.put_settings(**rapidpro_settings(rapidpro.url))
    await couch.put_vault_credential("rapidpro:outgoing", DEFAULT_TOKEN)
    return couch
