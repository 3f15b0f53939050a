"""CHT settings and credentials, read where CHT keeps them (spec cht-messaging §5)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from cht_rapidpro.cht import credentials
from cht_rapidpro.chtconfig import ChtConfig, read_credential
from cht_rapidpro.config import parse_couch_url
from cht_rapidpro.couch.client import CouchClient
from support import OUTGOING_KEY, CouchAdmin, CouchServer, rapidpro_settings


@pytest.fixture
async def client(couch: CouchAdmin) -> AsyncIterator[CouchClient]:
    couch_client = CouchClient.connect(parse_couch_url(couch.couch_url), timeout_s=10)
    yield couch_client
    await couch_client.close()


async def test_cht4_vault_credential_is_decrypted(couch: CouchAdmin, client: CouchClient) -> None:
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY)
    read = await read_credential(client, credentials.OUTGOING)
    assert (read.value, read.source, read.problem) == (OUTGOING_KEY, "vault", None)


async def test_cht3_config_credential(
    couch: CouchAdmin, client: CouchClient, config_credential
) -> None:
    await config_credential(credentials.OUTGOING, "from-config-section")
    read = await read_credential(client, credentials.OUTGOING)
    assert (read.value, read.source) == ("from-config-section", "config")


async def test_vault_wins_over_config_section(
    couch: CouchAdmin, client: CouchClient, config_credential
) -> None:
    await config_credential(credentials.OUTGOING, "old-3x-value")
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY)
    read = await read_credential(client, credentials.OUTGOING)
    assert (read.value, read.source) == (OUTGOING_KEY, "vault")


async def test_vault_credential_with_another_secret_is_reported(
    couch: CouchAdmin, client: CouchClient
) -> None:
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY, secret="not-the-secret")
    read = await read_credential(client, credentials.OUTGOING)
    assert read.value is None
    assert read.problem is not None
    assert "does not decrypt" in read.problem
    assert "PUT /api/v1/credentials/rapidpro:outgoing" in read.problem


async def test_missing_credential(client: CouchClient) -> None:
    read = await read_credential(client, credentials.INCOMING)
    assert (read.value, read.source, read.problem) == (None, None, None)


async def test_credential_key_is_url_encoded(couch: CouchAdmin, client: CouchClient) -> None:
    # spec §6.7 case 68: the key cannot escape the vault db.
    await couch.put_vault_credential("/../x", "v")
    assert await client.vault_password("/../x") is not None


async def _loaded(client: CouchClient) -> ChtConfig:
    cht = ChtConfig(client, service="cht-rapidpro", refresh_s=0)
    await cht.load_settings()
    await cht.refresh_credentials(force=True)
    return cht


async def test_gate_open_with_url_and_credential(couch: CouchAdmin, client: CouchClient) -> None:
    await couch.put_settings(**rapidpro_settings("http://rapidpro.example"))
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY)
    cht = await _loaded(client)
    assert cht.gate.open
    assert cht.gate.target is not None
    assert cht.gate.target.token == OUTGOING_KEY
    assert str(cht.gate.target.url) == "http://rapidpro.example"


@pytest.mark.parametrize(
    ("sms", "reason"),
    [
        ({"outgoing_service": "medic-gateway"}, "another sender is in charge"),
        (
            {"outgoing_service": "rapidpro", "rapidpro": {"url": "http://rp"}},
            "set sms.outgoing_service to 'cht-rapidpro' (CHT's own sender then stays idle)",
        ),
        ({"outgoing_service": "cht-rapidpro"}, "No RapidPro URL configured"),
        ({"outgoing_service": "cht-rapidpro", "rapidpro": {}}, "No RapidPro URL configured"),
        (
            {"outgoing_service": "cht-rapidpro", "rapidpro": {"url": "ftp://x"}},
            "not an http(s) URL",
        ),
        ({"outgoing_service": "cht-rapidpro", "rapidpro": {"url": "http://rp"}}, "No api key"),
        ({"rapidpro": {"url": "http://rp"}}, "sms.outgoing_service is not set, not 'cht-rapidpro'"),
    ],
    ids=[
        "other-service",
        "chts-own-rapidpro-sender",
        "no-rapidpro",
        "no-url",
        "bad-url",
        "no-credential",
        "no-service",
    ],
)
async def test_gate_closed_with_actionable_reason(
    couch: CouchAdmin, client: CouchClient, sms: dict[str, object], reason: str
) -> None:
    await couch.put_settings(sms=sms)
    cht = await _loaded(client)
    assert not cht.gate.open
    assert reason in (cht.gate.reason or "")


async def test_settings_doc_revisions_reopen_the_gate(
    couch: CouchAdmin, client: CouchClient
) -> None:
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY)
    await couch.put_settings(sms={"outgoing_service": "none"})
    cht = await _loaded(client)
    assert not cht.gate.open
    doc = await couch.put_settings(**rapidpro_settings("https://textit.com"))
    cht.apply_settings_doc(doc)
    assert cht.gate.open


async def test_no_settings_doc_means_no_sending(client: CouchClient) -> None:
    cht = await _loaded(client)
    assert cht.settings_loaded
    assert not cht.gate.open


# -- credentials CouchDB refuses to give -------------------------------------------------------


@pytest.fixture
async def own_admin(couch: CouchAdmin) -> AsyncIterator[CouchServer]:
    """A server admin of this test's own (failed logins lock a user: never the suite's admin)."""
    user = f"cred-{uuid.uuid4().hex[:8]}"
    yield await couch.set_admin(user, uuid.uuid4().hex)
    await couch.delete_config("admins", user)


def connect_as(server: CouchServer, db: str, password: str | None = None) -> CouchClient:
    as_user = CouchServer(server.url, server.user, password or server.password)
    return CouchClient.connect(parse_couch_url(as_user.db_url(db)), timeout_s=10)


async def test_refused_credentials_are_reported_per_key_after_one_attempt(
    couch: CouchAdmin, own_admin: CouchServer
) -> None:
    # Issue 12: the `credential_missing` line of rapidpro:incoming named rapidpro:outgoing.
    client = connect_as(own_admin, couch.db, password="wrong-password")
    try:
        cht = ChtConfig(client, service="rapidpro", refresh_s=60)
        with capture_logs() as logs:
            await cht.refresh_credentials(force=True)
    finally:
        await client.close()
    missing = {e["key"]: e["problem"] for e in logs if e["event"] == "credential_missing"}
    assert set(missing) == {credentials.OUTGOING, credentials.INCOMING}
    for key, problem in missing.items():
        assert problem.startswith(f"cannot read credential {key}: "), problem
        assert "COUCH_URL must name a CouchDB server admin" in problem
    # Reading stopped at the first refusal (another attempt would count towards the lockout).
    assert "not tried after CouchDB refused" in missing[credentials.INCOMING]
    [failed] = [e for e in logs if e["event"] == "credentials_read_failed"]
    assert failed["key"] == credentials.OUTGOING
    assert not cht.credentials_current
    assert cht.incoming_key is None


async def test_a_failed_read_keeps_the_keys_read_before(
    couch: CouchAdmin, own_admin: CouchServer
) -> None:
    await couch.put_settings(**rapidpro_settings("https://textit.com"))
    await couch.put_vault_credential(credentials.OUTGOING, OUTGOING_KEY)
    await couch.put_vault_credential(credentials.INCOMING, "the-incoming-key")
    client = connect_as(own_admin, couch.db)
    try:
        cht = await _loaded(client)
        assert (cht.incoming_key, cht.gate.open, cht.credentials_current) == (
            "the-incoming-key",
            True,
            True,
        )
        # CouchDB now refuses the daemon's user (its password changed under it).
        await couch.set_admin(own_admin.user, "a-new-password")
        with capture_logs() as logs:
            await cht.refresh_credentials(force=True)
        assert [e["event"] for e in logs if e["event"].startswith("credential")] == [
            "credentials_read_failed"
        ]  # no credential_missing: nothing was dropped
        assert cht.incoming_key == "the-incoming-key"
        assert cht.gate.open and cht.gate.target is not None
        assert cht.gate.target.token == OUTGOING_KEY
        assert not cht.credentials_current
        assert "server admin" in (cht.credentials_problem or "")
        # A refused login is not retried at the refresh period (0 s here): each one counts
        # towards CouchDB's lockout of the user.
        with capture_logs() as logs:
            await cht.refresh_credentials()
            await cht.refresh_credentials(force=True)
        assert [(e["event"], e["retry_in_s"]) for e in logs] == [("credentials_read_failed", 120)]
    finally:
        await client.close()
