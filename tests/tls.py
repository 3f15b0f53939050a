"""A real TLS endpoint for tests: a throwaway CA, server certificates, and a TLS-terminating
TCP proxy in front of the test server (as CHT's nginx fronts CouchDB on CHT 4.x hosts).

The proxy relays bytes unchanged after the handshake, so the daemon speaks real HTTPS to a
real CouchDB-compatible server; only the certificate it is shown varies per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cht-rapidpro tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class Authority:
    """A certificate authority that exists only for a test session."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "Test Deployment CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, host: str, *, expired: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate for `host` (a DNS name or an IP address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def server_context(
        self, directory: Path, host: str, *, expired: bool = False
    ) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for `host` signed by this CA."""
        cert, key = self.issue(host, expired=expired)
        stem = f"{host}{'-expired' if expired else ''}"
        cert_file = directory / f"{stem}.crt"
        key_file = directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context


@dataclass
class TlsEndpoint:
    """A running TLS proxy: `port` on 127.0.0.1, relaying to the test server."""

    port: int
    relayed: int = 0  # connections that completed the handshake and reached the server

    def couch_url(self, plain_url: str, host: str = "localhost") -> str:
        """`plain_url` (an http COUCH_URL with credentials) as an https URL through the proxy."""
        parts = urllib.parse.urlsplit(plain_url)
        netloc = f"{parts.username}:{parts.password}@{host}:{self.port}"
        return urllib.parse.urlunsplit(("https", netloc, parts.path, "", ""))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
            writer.close()


@contextlib.asynccontextmanager
async def tls_proxy(context: ssl.SSLContext, upstream: str) -> AsyncIterator[TlsEndpoint]:
    """Terminate TLS with `context` on a free local port; relay to `upstream` (http URL)."""
    target = urllib.parse.urlsplit(upstream)
    assert target.hostname is not None and target.port is not None
    tasks: set[asyncio.Task[None]] = set()
    endpoint = TlsEndpoint(0)

    async def relay(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            server_reader, server = await asyncio.open_connection(target.hostname, target.port)
        except OSError:
            client.close()
            return
        endpoint.relayed += 1
        both = [
            asyncio.ensure_future(_pipe(client_reader, server)),
            asyncio.ensure_future(_pipe(server_reader, client)),
        ]
        tasks.update(both)
        try:
            # Cancelled pipes (the proxy stopping) end the connection quietly.
            await asyncio.gather(*both, return_exceptions=True)
        finally:
            tasks.difference_update(both)

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    endpoint.port = server.sockets[0].getsockname()[1]
    try:
        yield endpoint
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
