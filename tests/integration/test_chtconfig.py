"""CHT settings and credentials, read where CHT keeps them (spec cht-messaging §5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cht_rapidpro.cht import credentials
from cht_rapidpro.chtconfig import ChtConfig, read_credential
from cht_rapidpro.config import parse_couch_url
from cht_rapidpro.couch.client import CouchClient
from support import OUTGOING_KEY, CouchAdmin, rapidpro_settings


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
    ],
    ids=[
        "other-service",
        "chts-own-rapidpro-sender",
        "no-rapidpro",
        "no-url",
        "bad-url",
        "no-credential",
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
