"""CHT 4.x `medic-vault` credential encryption (AES-256-CBC keyed by the CouchDB secret)."""

from __future__ import annotations

import os
import re

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Credential keys this gateway reads.
OUTGOING = "rapidpro:outgoing"
INCOMING = "rapidpro:incoming"

_HEX = re.compile(r"[0-9a-fA-F]*")


class CredentialError(ValueError):
    """The stored credential cannot be decrypted (CHT's own messages)."""


def vault_key(secret: str) -> bytes:
    """CHT's key derivation: the secret's UTF-8 bytes, repeated to 32 bytes and cut to 32."""
    raw = secret.encode("utf-8")
    if not raw:
        raise CredentialError(
            "Invalid cypher. CouchDB Secret needs to be set in order to use secure credentials."
        )
    return (raw * -(-32 // len(raw)))[:32]


def decrypt(secret: str, stored: str) -> str:
    """Decrypt a vault `password` value `"<iv hex>:<ciphertext hex>"`."""
    key = vault_key(secret)
    iv_hex, _, data_hex = stored.partition(":")
    # CHT joins everything after the first ':' back together as the ciphertext.
    try:
        if not (_HEX.fullmatch(iv_hex) and _HEX.fullmatch(data_hex)):
            raise ValueError("not hex")
        iv, data = bytes.fromhex(iv_hex), bytes.fromhex(data_hex)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        plain = unpadder.update(padded) + unpadder.finalize()
        return plain.decode("utf-8")
    except ValueError as exc:
        raise CredentialError(
            "Error decrypting credential. Try setting the credential again."
        ) from exc


def encrypt(secret: str, plaintext: str, *, iv: bytes | None = None) -> str:
    """Encrypt as CHT's `PUT /api/v1/credentials/<key>` does (random IV unless given)."""
    key = vault_key(secret)
    iv = iv if iv is not None else os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    data = encryptor.update(padded) + encryptor.finalize()
    return f"{iv.hex()}:{data.hex()}"
