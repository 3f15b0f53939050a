"""cht.credentials: CHT 4.x medic-vault encryption (cht-messaging §5.1, vectors §6.7)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cht_rapidpro.cht.credentials import CredentialError, decrypt, encrypt, vault_key

IV = bytes(range(16))  # 000102030405060708090a0b0c0d0e0f
LONG_SECRET = "myreallylongsecret - myreallylongsecret - myreallylongsecret"
INVALID_CYPHER = (
    "Invalid cypher. CouchDB Secret needs to be set in order to use secure credentials."
)
DECRYPT_FAILED = "Error decrypting credential. Try setting the credential again."

# §6.7 item 71: encrypted by CHT's Node code, decrypted by ours.
NODE_VECTORS = [
    pytest.param(
        "secret",
        "my-rapidpro-token",
        "000102030405060708090a0b0c0d0e0f:"
        "db7fc73e69a4b31afc3ef7b272bfe2d7ef3d77b8eee05c3673808aff6c7027c2",
        id="short-secret",
    ),
    pytest.param(
        LONG_SECRET,
        "mypass",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa5",
        id="long-secret",
    ),
    pytest.param(
        "0123456789abcdef0123456789abcdef",
        "Token with spaces & ünïcödé",
        "000102030405060708090a0b0c0d0e0f:"
        "8f3969513e8823539c5a523940ec8e4b6e877772dc93ba0c2a818e6d68883164",
        id="exact-32-byte-secret-unicode-text",
    ),
]


@pytest.mark.parametrize(("secret", "plaintext", "stored"), NODE_VECTORS)
def test_decrypt_node_vectors(secret: str, plaintext: str, stored: str) -> None:
    assert decrypt(secret, stored) == plaintext


@pytest.mark.parametrize(("secret", "plaintext", "stored"), NODE_VECTORS)
def test_encrypt_with_fixed_iv_matches_node(secret: str, plaintext: str, stored: str) -> None:
    assert encrypt(secret, plaintext, iv=IV) == stored


@pytest.mark.parametrize(("secret", "plaintext", "stored"), NODE_VECTORS)
def test_changed_secret_fails_with_chts_message(secret: str, plaintext: str, stored: str) -> None:
    """§6.7 item 70: a changed CouchDB secret gives CHT's own error, never garbage."""
    with pytest.raises(CredentialError, match=re.escape(DECRYPT_FAILED)):
        decrypt("changed-" + secret, stored)


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("mysecret", b"mysecretmysecretmysecretmysecret"),
        ("secret", b"secretsecretsecretsecretsecretse"),
        ("0123456789abcdef0123456789abcdef", b"0123456789abcdef0123456789abcdef"),
        (LONG_SECRET, LONG_SECRET.encode()[:32]),
        ("é", "é".encode() * 16),
        ("x", b"x" * 32),
    ],
    ids=["6.7-69-mysecret", "short", "exactly-32", "long-is-cut", "utf8-bytes", "one-char"],
)
def test_vault_key(secret: str, key: bytes) -> None:
    derived = vault_key(secret)
    assert derived == key
    assert len(derived) == 32


@pytest.mark.parametrize(
    "call",
    [
        lambda: vault_key(""),
        lambda: encrypt("", "token"),
        lambda: decrypt("", "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa5"),
    ],
    ids=["vault-key", "encrypt", "decrypt"],
)
def test_empty_secret_is_invalid_cypher(call: object) -> None:
    assert callable(call)
    with pytest.raises(CredentialError, match=re.escape(INVALID_CYPHER)):
        call()


@pytest.mark.parametrize(
    "secret",
    ["secret", LONG_SECRET, "0123456789abcdef0123456789abcdef", "ünïcödé"],
    ids=["short", "long", "exactly-32", "unicode"],
)
@pytest.mark.parametrize(
    "plaintext",
    ["my-rapidpro-token", "", "x" * 16, "Token with spaces & ünïcödé", "a:b:c"],
    ids=["token", "empty", "one-block", "unicode", "with-colons"],
)
def test_round_trip_with_random_iv(secret: str, plaintext: str) -> None:
    stored = encrypt(secret, plaintext)
    iv_hex, _, data_hex = stored.partition(":")
    assert re.fullmatch(r"[0-9a-f]{32}", iv_hex)
    assert re.fullmatch(r"(?:[0-9a-f]{32})+", data_hex)
    assert decrypt(secret, stored) == plaintext


def test_random_iv_differs_between_encryptions() -> None:
    first, second = encrypt("secret", "token"), encrypt("secret", "token")
    assert first != second
    assert decrypt("secret", first) == decrypt("secret", second) == "token"


@given(secret=st.text(min_size=1, max_size=80), plaintext=st.text(max_size=200))
def test_round_trip_property(secret: str, plaintext: str) -> None:
    assert decrypt(secret, encrypt(secret, plaintext)) == plaintext


VALID = "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa5"


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not-a-credential",
        "000102030405060708090a0b0c0d0e0f",
        "000102030405060708090a0b0c0d0e0f:",
        "zz0102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa5",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fzz",
        "0001020304050607:942a090a85d608b0936751c6f3a02fa5",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02f",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa5aa",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0:936751c6f3a02fa5",
        "000102030405060708090a0b0c0d0e0f:942a090a85d608b0936751c6f3a02fa",
        " " + VALID,
    ],
    ids=[
        "empty",
        "no-colon",
        "iv-only",
        "empty-ciphertext",
        "iv-not-hex",
        "ciphertext-not-hex",
        "iv-too-short",
        "ciphertext-not-whole-blocks",
        "ciphertext-extra-byte",
        "extra-colon",
        "odd-hex-length",
        "leading-space",
    ],
)
def test_bad_stored_value_raises_clear_error(stored: str) -> None:
    with pytest.raises(CredentialError, match=re.escape(DECRYPT_FAILED)):
        decrypt("myreallylongsecret - myreallylongsecret - myreallylongsecret", stored)


def test_credential_error_is_a_value_error() -> None:
    """Callers that catch ValueError (bad data) also catch credential failures."""
    assert issubclass(CredentialError, ValueError)
