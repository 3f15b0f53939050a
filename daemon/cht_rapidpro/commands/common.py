"""What the operations commands share: exit codes, CouchDB access and its errors, the daemon's
listener, and small formatting helpers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from ..config import Settings
from ..couch.client import AccountLockedError, CouchClient, JsonDict, NotFoundError
from ..errors import AuthError, GatewayError

#: Exit codes (sysexits.h where one fits).
EX_OK = 0  # all well / delivered
EX_FAILED = 1  # a check failed / the message failed
EX_USAGE = 64  # wrong arguments
EX_UNAVAILABLE = 69  # CouchDB (or another dependency) cannot be reached
EX_SOFTWARE = 70  # `run`: a bug (systemd restarts the daemon)
EX_OSERR = 71  # `run`: the listener's port is taken (systemd retries)
EX_TEMPFAIL = 75  # `send`: no final state within --timeout (the message may still go)
EX_CONFIG = 78  # the settings, COUCH_URL credentials or database name are wrong

#: CouchDB requests of a command wait at most this long (the daemon's may wait longer).
COMMAND_COUCH_TIMEOUT_S = 15.0
#: The daemon's own listener answers at once or not at all.
LISTENER_TIMEOUT_S = 5.0


class CommandError(Exception):
    """A command cannot go on; `message` says why and what to do, `exit_code` is returned."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


#: OpenSSL verify codes (X509_V_ERR_*) of a certificate from a CA this host does not trust.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = frozenset({62, 64})  # host name, IP address


@dataclass(frozen=True, slots=True)
class TlsProblem:
    """Why an https COUCH_URL failed the TLS handshake, and what to do about it."""

    detail: str
    fix: str


async def plain_http_instead(settings: Settings) -> TlsProblem | None:
    """A TlsProblem if COUCH_URL's https port answers plain HTTP (a CouchDB port), else None."""
    server = settings.couch.server
    url = server.with_scheme("http").with_path("/")
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp,
        ):
            if resp.status >= 500:
                return None
            await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return TlsProblem(
        f"TLS handshake with {server.host} failed: the port answers plain HTTP",
        "COUCH_URL is https: its port must serve HTTPS (CHT's nginx on 443 does; CouchDB's "
        "own port 5984 speaks plain HTTP, reached with http://)",
    )


def tls_problem(exc: BaseException, settings: Settings) -> TlsProblem | None:
    """What a TLS failure reaching CouchDB means (None if `exc` is not one).

    Certificate failures are told apart by OpenSSL's verify code: a CA this host does not
    trust (a deployment's own CA), a certificate for another name, an expired one.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, aiohttp.ClientSSLError):
        cause = cause.__cause__
    if cause is None:
        return None
    host = settings.couch.server.host
    ca_file = settings.couch_ca_file
    if not isinstance(cause, aiohttp.ClientConnectorCertificateError):
        return TlsProblem(
            f"TLS handshake with {host} failed: {cause}",
            "COUCH_URL is https: its port must serve HTTPS (CHT's nginx on 443 does; CouchDB's "
            "own port 5984 speaks plain HTTP, reached with http://)",
        )
    error = cause.certificate_error
    code = getattr(error, "verify_code", None)
    reason = getattr(error, "verify_message", None) or str(error)
    detail = f"the TLS certificate of {host} was refused: {reason}"
    if code in _UNTRUSTED:
        if ca_file is None:
            fix = (
                "the certificate comes from a CA this host does not trust (a deployment's own "
                "CA?): save that CA's certificate (PEM) on this host, readable by the daemon's "
                "user, and set CHT_RAPIDPRO_COUCH_CA_FILE to its path"
            )
        else:
            fix = (
                f"CHT_RAPIDPRO_COUCH_CA_FILE ({ca_file}) does not hold the CA that issued this "
                "certificate: put that CA's certificate (PEM) in it, with any intermediate "
                "certificate the server does not send"
            )
        return TlsProblem(detail, fix)
    if code in _NAME_MISMATCH:
        return TlsProblem(
            detail,
            f"the certificate does not name {host!r}: use in COUCH_URL a host name the "
            "certificate was issued for (e.g. CHT's public name, not an IP address or "
            "localhost; on the CHT host itself an /etc/hosts entry can point it at "
            f"127.0.0.1), or have the certificate reissued to include {host!r}",
        )
    if code in (_EXPIRED, _NOT_YET_VALID):
        return TlsProblem(
            detail,
            "renew the certificate of CHT's nginx (or whatever serves COUCH_URL); if it looks "
            "valid, this host's clock is wrong: check it (timedatectl)",
        )
    return TlsProblem(detail, "see the reason: the server's certificate needs fixing")


@contextlib.contextmanager
def couch_errors(settings: Settings) -> Iterator[None]:
    """Turn CouchDB failures into CommandErrors that tell the operator what to fix."""
    where = settings.couch.redacted
    try:
        yield
    except AuthError as exc:
        raise CommandError(
            f"CouchDB refused the credentials in COUCH_URL ({exc}): COUCH_URL must name a "
            "CouchDB server admin (CHT's admin user) and its password",
            EX_CONFIG,
        ) from exc
    except AccountLockedError as exc:
        raise CommandError(
            f"CouchDB at {where} has temporarily locked user {settings.couch.user!r} after "
            f"repeated failed logins from this host ({exc}): wait, it unlocks by itself within "
            "5 minutes of the first failure; meanwhile stop whatever retries a wrong password",
            EX_UNAVAILABLE,
        ) from exc
    except NotFoundError as exc:
        raise CommandError(
            f"{exc} at {where}: check the database name at the end of COUCH_URL "
            "(CHT's is usually /medic)",
            EX_CONFIG,
        ) from exc
    except GatewayError as exc:  # RetryableError and the rest: CouchDB is not usable now
        tls = tls_problem(exc, settings)
        if tls is not None:
            raise CommandError(
                f"CouchDB at {where} is unavailable: {tls.detail}. Fix: {tls.fix}", EX_UNAVAILABLE
            ) from exc
        raise CommandError(f"CouchDB at {where} is unavailable: {exc}", EX_UNAVAILABLE) from exc


@contextlib.asynccontextmanager
async def open_couch(settings: Settings) -> AsyncIterator[CouchClient]:
    """A CouchDB client for one command; its failures become CommandErrors."""
    couch = CouchClient.connect(
        settings.couch,
        timeout_s=min(settings.couch_timeout_s, COMMAND_COUCH_TIMEOUT_S),
        ca_file=settings.couch_ca_file,
    )
    try:
        with couch_errors(settings):
            yield couch
    finally:
        await couch.close()


async def require_db(couch: CouchClient) -> JsonDict:
    """The medic db's info; NotFoundError (→ exit 78) if it does not exist."""
    return await couch.db_info()


@dataclass(frozen=True, slots=True)
class AppSettings:
    """CHT's app settings as found in the db, and where they were found."""

    values: dict[str, Any]
    source: str | None  # "settings doc", "_design/medic app_settings (pre-3.0)", None: missing
    rev: str | None = None
    problem: str | None = None  # the doc exists but is unusable


async def load_app_settings(couch: CouchClient) -> AppSettings:
    """The app settings where CHT keeps them: the `settings` doc, else pre-3.0 `_design/medic`."""
    doc = await couch.get("settings")
    if doc is not None:
        rev = doc.get("_rev") if isinstance(doc.get("_rev"), str) else None
        inner = doc.get("settings")
        if not isinstance(inner, dict):
            return AppSettings({}, "settings doc", rev, "the settings doc has no 'settings' object")
        return AppSettings(inner, "settings doc", rev)
    legacy = await couch.get("_design/medic")
    if legacy is not None and isinstance(legacy.get("app_settings"), dict):
        return AppSettings(legacy["app_settings"], "_design/medic app_settings (pre-3.0)")
    return AppSettings({}, None)


def sms_settings(app_settings: dict[str, Any]) -> dict[str, Any]:
    sms = app_settings.get("sms")
    return sms if isinstance(sms, dict) else {}


# -- the daemon's listener -------------------------------------------------------------------


def listener_url(settings: Settings) -> str | None:
    """Where a daemon with these settings listens (None for port 0: any free port)."""
    if settings.listen_port == 0:
        return None
    host = settings.listen_host
    # A wildcard bind is reached on the loopback address of the same family.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.listen_port}"


@dataclass(frozen=True, slots=True)
class ListenerAnswer:
    """What the daemon's listener answered to one GET (status None: nothing answered)."""

    url: str
    status: int | None
    body: str = ""
    error: str | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


async def get_listener(base_url: str, path: str) -> ListenerAnswer:
    """GET a path of the daemon's listener, never raising for a dead or foreign listener."""
    url = base_url + path
    timeout = aiohttp.ClientTimeout(total=LISTENER_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            body = await resp.text(errors="replace")
            return ListenerAnswer(url, resp.status, body)
    except aiohttp.ClientConnectorError as exc:
        return ListenerAnswer(url, None, error=f"nothing listening ({exc.os_error})")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ListenerAnswer(url, None, error=f"{type(exc).__name__}: no answer")


# -- formatting ------------------------------------------------------------------------------


def format_age(seconds: float) -> str:
    """`4s`, `3m 12s`, `5h 02m`, `3d 4h`: for humans, not for parsing."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def now_utc() -> datetime:
    return datetime.now(UTC)


def short_id(value: str, keep: int = 8) -> str:
    return value if len(value) <= keep + 1 else value[:keep] + "…"
