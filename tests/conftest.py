"""Shared fixtures: the CouchDB-compatible test server, a fresh db per test, the daemon.

The server is pouchdb-server (pinned in package.json), one per test session, started in its own
working directory with an admin configured (no admin party). Two ways to run on real Apache
CouchDB 3 instead (then `couchdb_only` tests run too):

- `CHT_RAPIDPRO_TEST_COUCHDB_RELEASE=<release dir>`: a single node started from that release
  (tests/couchdb_release.py) is the suite's server, and `cluster` tests get a 3-node cluster
  (`couch_cluster`, started the first time a test asks for it);
- `CHT_RAPIDPRO_TEST_COUCH_URL=http://admin:pass@host:5984`: a server someone else runs (it
  wins over the release's single node for the suite's server).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from cht_rapidpro import logs
from cht_rapidpro.app import build_app, gateway_of
from cht_rapidpro.config import Settings
from cht_rapidpro.gateway import Gateway
from couchdb_release import (
    RELEASE_ENV,
    CouchCluster,
    SingleNode,
    make_session_dir,
    release_from_env,
)
from pouchdb import PouchServer
from support import (
    ADMIN_USER,
    COUCH_SECRET,
    CouchAdmin,
    CouchServer,
    rapidpro_settings,
)

EXTERNAL_ENV = "CHT_RAPIDPRO_TEST_COUCH_URL"
NEEDS_REAL_COUCHDB = f"needs real Apache CouchDB 3: set {RELEASE_ENV} or {EXTERNAL_ENV}"
NEEDS_CLUSTER = (
    f"needs a 3-node CouchDB cluster: set {RELEASE_ENV}=<CouchDB 3 release dir> "
    "(see ../shared/spec/couchdb-real.md)"
)


def _external_url() -> str:
    return os.environ.get(EXTERNAL_ENV, "").strip()


# -- real CouchDB from a release (CHT_RAPIDPRO_TEST_COUCHDB_RELEASE) ------------------------


@pytest.fixture(scope="session")
def couchdb_release() -> Path | None:
    """The CouchDB release directory of the real-CouchDB tier, None when it is off."""
    return release_from_env()


@pytest.fixture(scope="session")
def couchdb_workdir(couchdb_release: Path | None) -> Iterator[Path | None]:
    """This session's directory for CouchDB nodes; removed after the last node stopped."""
    if couchdb_release is None:
        yield None
        return
    path = make_session_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def couchdb_single(
    couchdb_release: Path | None, couchdb_workdir: Path | None
) -> Iterator[SingleNode | None]:
    """The release's single node (the suite's server), None when the tier is off."""
    if couchdb_release is None or couchdb_workdir is None or _external_url():
        yield None
        return
    node = SingleNode(couchdb_release, couchdb_workdir / "single")
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def couch_cluster(
    couchdb_release: Path | None, couchdb_workdir: Path | None
) -> Iterator[CouchCluster]:
    """A 3-node CouchDB cluster (n=3, q=2) for this session, started on first use.

    Yields a `CouchCluster`: `.urls[i]` (no credentials), `.user`/`.password` (admin),
    `.stop_node(i, graceful=False)` / `.start_node(i)` and their async twins `astop_node` /
    `astart_node`, `.membership(i)`. A node a test leaves stopped is restarted after it.
    Skipped when `CHT_RAPIDPRO_TEST_COUCHDB_RELEASE` is not set.
    """
    if couchdb_release is None or couchdb_workdir is None:
        pytest.skip(NEEDS_CLUSTER)
    cluster = CouchCluster(couchdb_release, couchdb_workdir / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_admins(couch_cluster: CouchCluster) -> AsyncIterator[list[CouchAdmin]]:
    """A fresh database on the cluster, and an admin client bound to it through each node
    (`cluster_admins[i]` talks to node i)."""
    db = f"cluster_{uuid.uuid4().hex[:12]}"
    admins = [
        CouchAdmin(CouchServer(url, couch_cluster.user, couch_cluster.password), db)
        for url in couch_cluster.urls
    ]
    await admins[0].create_db()
    try:
        yield admins
    finally:
        couch_cluster.heal()
        await admins[0].delete_db()
        for admin in admins:
            await admin.close()


# -- the suite's server ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pouch(
    tmp_path_factory: pytest.TempPathFactory, couchdb_single: SingleNode | None
) -> Iterator[PouchServer | None]:
    if _external_url() or couchdb_single is not None:
        yield None
        return
    server = PouchServer(tmp_path_factory.mktemp("pouchdb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def couch_server(pouch: PouchServer | None, couchdb_single: SingleNode | None) -> CouchServer:
    external = _external_url()
    if external:
        parts = urllib.parse.urlsplit(external)
        base = urllib.parse.urlunsplit(
            (parts.scheme, f"{parts.hostname}:{parts.port or 5984}", "", "", "")
        )
        return CouchServer(base, parts.username or ADMIN_USER, parts.password or "")
    if couchdb_single is not None:
        return CouchServer(couchdb_single.url, couchdb_single.user, couchdb_single.password)
    assert pouch is not None
    return CouchServer(pouch.url)


@pytest.fixture(autouse=True)
def _server_health(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail loudly (and restart) when a test crashed the test server; restart cluster nodes
    a test left stopped."""
    yield
    if "couch_cluster" in request.fixturenames and os.environ.get(RELEASE_ENV, "").strip():
        cluster: CouchCluster = request.getfixturevalue("couch_cluster")
        cluster.heal()
    if "couchdb_single" in request.fixturenames:
        single: SingleNode | None = request.getfixturevalue("couchdb_single")
        if single is not None and not single.alive():
            log = single.node.tail()
            single.start()
            pytest.fail(f"the CouchDB node died during this test; its log:\n{log}")
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
    has_release = bool(os.environ.get(RELEASE_ENV, "").strip())
    real = has_release or bool(_external_url())
    for item in items:
        if "couchdb_only" in item.keywords and not real:
            item.add_marker(pytest.mark.skip(reason=NEEDS_REAL_COUCHDB))
        if "cluster" in item.keywords and not has_release:
            item.add_marker(pytest.mark.skip(reason=NEEDS_CLUSTER))


@pytest.fixture
async def couch(couch_server: CouchServer, pouch: PouchServer | None) -> AsyncIterator[CouchAdmin]:
    """A fresh, empty medic-like database for this test (and its `-vault` twin)."""
    admin = CouchAdmin(couch_server, f"medic_{uuid.uuid4().hex[:12]}")
    await admin.create_db()
    if _external_url():  # someone else's server: make sure the vault secret is the tests' one
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
        if "CHT_RAPIDPRO_PORT" not in overrides:
            # Any free port, chosen by the OS when the listener binds: something a test may
            # do, an operator may not (a daemon RapidPro cannot find; CHT_RAPIDPRO_PORT >= 1).
            settings = dataclasses.replace(settings, listen_port=0)
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
