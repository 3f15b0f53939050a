"""CouchDB through HTTPS: COUCH_URL=https://… behind a TLS proxy with the deployment's own CA.

On CHT 4.x hosts CouchDB is often reached only through CHT's nginx. Here a real TLS endpoint
(tests/tls.py: a throwaway CA, server certificates, a TLS-terminating proxy) stands in front
of the test server. With CHT_RAPIDPRO_COUCH_CA_FILE the daemon and the commands work through
it; without it, or with the wrong host name or an expired certificate, `check` says what is
wrong and how to fix it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from cht_rapidpro.commands import EX_FAILED, EX_OK, EX_UNAVAILABLE, CommandError, run_check
from cht_rapidpro.commands.status import run_status
from cht_rapidpro.config import Settings
from pouchdb import free_port
from support import INCOMING_KEY, CouchAdmin, CouchServer, all_tasks, eventually, message_doc, task
from tls import Authority, TlsEndpoint, tls_proxy

CA_VAR = "CHT_RAPIDPRO_COUCH_CA_FILE"
COUCH_ROWS = ("couch.reachable", "couch.admin", "couch.db", "cht.settings")


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Path]:
    """The deployment's own CA, and its certificate as a PEM file."""
    ca = Authority.create()
    ca_file = tmp_path_factory.mktemp("ca") / "deployment-ca.pem"
    ca_file.write_bytes(ca.pem())
    return ca, ca_file


@pytest.fixture
async def nginx(
    authority: tuple[Authority, Path], couch_server: CouchServer, tmp_path: Path
) -> AsyncIterator[TlsEndpoint]:
    """TLS in front of the test server, with a certificate for `localhost` from the CA."""
    ca, _ = authority
    async with tls_proxy(ca.server_context(tmp_path, "localhost"), couch_server.url) as endpoint:
        yield endpoint


def https_settings(couch: CouchAdmin, endpoint: TlsEndpoint, **env: str) -> Settings:
    return Settings.from_env(
        {
            "COUCH_URL": endpoint.couch_url(couch.couch_url, env.pop("host", "localhost")),
            "CHT_RAPIDPRO_PORT": str(free_port()),
            **env,
        }
    )


async def check_rows(settings: Settings) -> tuple[int, dict[str, dict[str, Any]]]:
    out = io.StringIO()
    code = await run_check(settings, out=out, as_json=True)
    return code, {row["name"]: row for row in json.loads(out.getvalue())["checks"]}


# -- with the CA file: everything works through TLS -------------------------------------------


async def test_the_daemon_sends_through_couchdb_behind_tls(
    cht: CouchAdmin,
    nginx: TlsEndpoint,
    authority: tuple[Authority, Path],
    daemon_factory: Any,
) -> None:
    _, ca_file = authority
    doc = await cht.put(message_doc([task("+254700000301", "through tls")]))
    daemon = await daemon_factory(
        COUCH_URL=nginx.couch_url(cht.couch_url), **{CA_VAR: str(ca_file)}
    )

    async def state() -> str:
        found = await cht.get(doc["_id"])
        assert found is not None
        return str(all_tasks(found)[0]["state"])

    # Settings, vault credential, feed, claim and write-back all went through the proxy.
    await eventually(state, lambda s: s == "delivered", what="message delivered")
    assert daemon.gateway.health() == (True, [])
    assert nginx.relayed > 0


async def test_check_passes_through_tls_with_the_ca_file(
    cht: CouchAdmin, nginx: TlsEndpoint, authority: tuple[Authority, Path]
) -> None:
    _, ca_file = authority
    await cht.put_vault_credential("rapidpro:incoming", INCOMING_KEY)
    code, rows = await check_rows(https_settings(cht, nginx, **{CA_VAR: str(ca_file)}))
    assert code == EX_OK, rows
    for name in COUCH_ROWS:
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["couch.reachable"]["detail"].startswith(f"https://localhost:{nginx.port}/")
    assert rows["cht.credential.rapidpro:outgoing"]["status"] == "ok"


async def test_commands_use_the_ca_file(
    cht: CouchAdmin, nginx: TlsEndpoint, authority: tuple[Authority, Path]
) -> None:
    _, ca_file = authority
    out = io.StringIO()
    assert await run_status(https_settings(cht, nginx, **{CA_VAR: str(ca_file)}), out=out) == 0
    # As a process, the way an operator runs it (the setting comes from the environment).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHT_RAPIDPRO_")}
    env.update(COUCH_URL=nginx.couch_url(cht.couch_url), CHT_RAPIDPRO_PORT=str(free_port()))
    with_ca = await _run("status", env={**env, CA_VAR: str(ca_file)})
    assert with_ca[0] == EX_OK, with_ca
    code, _, err = await _run("status", env=env)
    assert code == EX_UNAVAILABLE, err
    assert "unable to get local issuer certificate" in err
    assert CA_VAR in err
    assert cht.server.password not in err


async def _run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cht_rapidpro", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- certificate failures: a row that says what is wrong and the fix --------------------------


async def test_check_explains_a_ca_this_host_does_not_trust(
    cht: CouchAdmin, nginx: TlsEndpoint, tmp_path: Path
) -> None:
    code, rows = await check_rows(https_settings(cht, nginx))
    assert code == EX_FAILED
    reachable = rows["couch.reachable"]
    assert reachable["status"] == "fail"
    assert "TLS certificate of localhost was refused" in reachable["detail"]
    assert "unable to get local issuer certificate" in reachable["detail"]
    assert f"set {CA_VAR} to its path" in reachable["fix"]
    for name in COUCH_ROWS[1:]:
        assert rows[name]["status"] == "skip", rows[name]
    assert cht.server.password not in json.dumps(rows)

    # A CA file that holds another CA: the fix names the file.
    other = tmp_path / "other-ca.pem"
    other.write_bytes(Authority.create("Some Other CA").pem())
    code, rows = await check_rows(https_settings(cht, nginx, **{CA_VAR: str(other)}))
    assert code == EX_FAILED
    assert f"{CA_VAR} ({other}) does not hold the CA" in rows["couch.reachable"]["fix"]


@pytest.mark.parametrize(
    ("certified", "url_host", "reason"),
    [
        ("cht.example.org", "localhost", "Hostname mismatch"),
        ("localhost", "127.0.0.1", "IP address mismatch"),
    ],
    ids=["another-host-name", "an-ip-address"],
)
async def test_check_explains_a_wrong_host_name(
    cht: CouchAdmin,
    couch_server: CouchServer,
    authority: tuple[Authority, Path],
    tmp_path: Path,
    certified: str,
    url_host: str,
    reason: str,
) -> None:
    ca, ca_file = authority
    context = ca.server_context(tmp_path, certified)
    async with tls_proxy(context, couch_server.url) as endpoint:
        settings = https_settings(cht, endpoint, host=url_host, **{CA_VAR: str(ca_file)})
        code, rows = await check_rows(settings)
    assert code == EX_FAILED
    reachable = rows["couch.reachable"]
    assert reachable["status"] == "fail"
    assert reason in reachable["detail"]
    assert f"the certificate does not name '{url_host}'" in reachable["fix"]


async def test_check_explains_an_expired_certificate(
    cht: CouchAdmin, couch_server: CouchServer, authority: tuple[Authority, Path], tmp_path: Path
) -> None:
    ca, ca_file = authority
    context = ca.server_context(tmp_path, "localhost", expired=True)
    async with tls_proxy(context, couch_server.url) as endpoint:
        code, rows = await check_rows(https_settings(cht, endpoint, **{CA_VAR: str(ca_file)}))
    assert code == EX_FAILED
    reachable = rows["couch.reachable"]
    assert "certificate has expired" in reachable["detail"]
    assert "renew the certificate" in reachable["fix"]
    assert "clock" in reachable["fix"]


async def test_check_explains_https_to_a_plain_http_port(
    couch: CouchAdmin, couch_server: CouchServer
) -> None:
    plain = TlsEndpoint(int(couch_server.url.rsplit(":", 1)[1]))  # no TLS on this port
    code, rows = await check_rows(https_settings(couch, plain))
    assert code == EX_FAILED
    reachable = rows["couch.reachable"]
    assert "TLS handshake with localhost failed" in reachable["detail"]
    assert "speaks plain HTTP" in reachable["fix"]


async def test_the_daemon_logs_a_refused_certificate_and_keeps_trying(
    cht: CouchAdmin, nginx: TlsEndpoint, daemon_factory: Any
) -> None:
    with structlog.testing.capture_logs() as logs:
        daemon = await daemon_factory(COUCH_URL=nginx.couch_url(cht.couch_url))

        def refused() -> list[dict[str, Any]]:
            return [
                e
                for e in logs
                if e["event"] == "startup_retrying"
                and "certificate verify failed" in e.get("error", "")
            ]

        async def attempts() -> int:
            return len(refused())

        await eventually(attempts, lambda n: n >= 2, what="retries after a refused certificate")
    healthy, problems = daemon.gateway.health()
    assert not healthy and problems[0].startswith("starting")
    assert cht.server.password not in str(refused())


async def test_status_without_the_ca_file_is_a_command_error_with_the_fix(
    cht: CouchAdmin, nginx: TlsEndpoint
) -> None:
    with pytest.raises(CommandError) as raised:
        await run_status(https_settings(cht, nginx), out=io.StringIO())
    assert raised.value.exit_code == EX_UNAVAILABLE
    assert "the TLS certificate of localhost was refused" in raised.value.message
    assert "Fix: the certificate comes from a CA this host does not trust" in raised.value.message
