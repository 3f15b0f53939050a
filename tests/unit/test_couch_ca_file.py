"""CHT_RAPIDPRO_COUCH_CA_FILE: the CA bundle an https COUCH_URL is verified against.

A wrong file is a configuration problem at start (exit 78), not a TLS failure later.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cht_rapidpro.config import Settings
from cht_rapidpro.couch.client import tls_verification
from cht_rapidpro.errors import ConfigError
from tls import Authority

BASE = {"COUCH_URL": "https://admin:s3cret@cht.example.org/medic"}
VAR = "CHT_RAPIDPRO_COUCH_CA_FILE"


def test_unset_means_the_systems_cas() -> None:
    settings = Settings.from_env(BASE)
    assert settings.couch_ca_file is None
    assert tls_verification(settings.couch_ca_file) is True


def test_a_pem_ca_bundle_is_accepted_and_verifies(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(Authority.create().pem())
    settings = Settings.from_env({**BASE, VAR: f" {ca_file} "})
    assert settings.couch_ca_file == ca_file
    context = tls_verification(settings.couch_ca_file)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert len(context.get_ca_certs()) == 1  # only the given CA: not the system's as well


def test_it_can_come_from_the_config_file(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(Authority.create().pem())
    settings = Settings.from_env(BASE, {"couch_ca_file": str(ca_file)})
    assert settings.couch_ca_file == ca_file


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file or directory"),
        (b"", "holds no PEM CA certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "holds no PEM"),
        (b"not a certificate at all", "holds no PEM CA certificate"),
    ],
    ids=["missing", "empty", "a-key-not-a-certificate", "text"],
)
def test_a_wrong_file_is_reported_with_the_variable(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, VAR: str(ca_file)})
    (problem,) = raised.value.problems
    assert problem.startswith(f"{VAR}: {ca_file}: ")
    assert expected in problem


def test_a_directory_is_not_a_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, VAR: str(tmp_path)})
    (problem,) = raised.value.problems
    assert problem == f"{VAR}: {tmp_path}: Is a directory"


def test_help_documents_the_setting() -> None:
    from cht_rapidpro.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert f"{VAR} For an https:// COUCH_URL: a PEM file of the CA certificates" in text
