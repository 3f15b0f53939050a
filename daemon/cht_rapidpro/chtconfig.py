"""CHT's own configuration, read where CHT keeps it and kept current without a restart.

- App settings: the `settings` doc of the medic db (`.settings`), legacy
  `_design/medic.app_settings` as a fallback; reloaded when the changes feed shows it.
- Credentials `rapidpro:outgoing` / `rapidpro:incoming`: CHT 4.x `medic-vault` (AES, keyed by
  the CouchDB secret), else CHT 3.x config section `medic-credentials`; re-read periodically
  and on demand (e.g. after RapidPro refuses the token). A read that fails (CouchDB down, the
  daemon's user locked out or refused) never drops a key read before: only a successful read
  that finds a key gone or undecryptable does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from .cht import credentials as creds
from .cht.outgoing import CHT_OUTGOING_SERVICES
from .cht.translations import DEFAULT_TRANSLATIONS, Translator
from .couch.client import CouchClient, LoginFailedError, NotFoundError
from .errors import AuthError, GatewayError
from .logs import get_logger
from .rapidpro.models import Target
from .retry import sleep_or_wake

SECRET_LOCATIONS = (("couch_httpd_auth", "secret"), ("chttpd_auth", "secret"))
#: After CouchDB refused the daemon's password, the credentials are re-read no sooner than
#: this, doubling per refusal up to REFUSED_MAX_S: CouchDB locks a user after 5 failed logins
#: within 5 minutes, and the lock stops CHT too.
REFUSED_RETRY_S = 60.0
REFUSED_MAX_S = 3600.0
TRANSLATIONS_PREFIX = "messages-"


@dataclass(frozen=True, slots=True)
class Gate:
    """Whether the daemon should send and poll now, and if not, why (an actionable text)."""

    target: Target | None
    reason: str | None
    # "error" when a human must fix something; "starting" while start-up reads what it needs
    # (not worth a log line: the next gate follows within moments)
    severity: str = "info"

    @property
    def open(self) -> bool:
        return self.target is not None


@dataclass(frozen=True, slots=True)
class CredentialRead:
    value: str | None
    source: str | None  # "vault" | "config" | None
    problem: str | None


async def read_credential(couch: CouchClient, key: str) -> CredentialRead:
    """Read a CHT credential: the 4.x vault first, then the 3.x config section."""
    try:
        stored = await couch.vault_password(key)
    except NotFoundError:
        stored = None
    if stored is not None:
        secrets: list[str] = []
        for section, name in SECRET_LOCATIONS:
            value = await couch.config_value(section, name)
            if value and value not in secrets:
                secrets.append(value)
        if not secrets:
            return CredentialRead(
                None,
                "vault",
                f"credential {key} is in {couch.target.vault_db} but the CouchDB secret "
                "(couch_httpd_auth/secret or chttpd_auth/secret) is not set, so it cannot be "
                "decrypted",
            )
        for secret in secrets:
            try:
                return CredentialRead(creds.decrypt(secret, stored), "vault", None)
            except creds.CredentialError:
                continue
        return CredentialRead(
            None,
            "vault",
            f"credential {key} in {couch.target.vault_db} does not decrypt with the CouchDB "
            "secret (was the secret changed?): set it again with "
            f"PUT /api/v1/credentials/{key}",
        )
    value = await couch.config_value("medic-credentials", key)
    if value:
        return CredentialRead(value, "config", None)
    return CredentialRead(None, None, None)


class ChtConfig:
    """The live CHT configuration this daemon acts on."""

    def __init__(self, couch: CouchClient, *, service: str, refresh_s: float) -> None:
        self._couch = couch
        self._service = service
        self._refresh_s = refresh_s
        self._log = get_logger(component="config")
        self.app_settings: dict[str, Any] = {}
        self.settings_rev: str | None = None
        self.settings_loaded = False
        self._translations: dict[str, dict[str, str]] = {}
        self._outgoing: CredentialRead = CredentialRead(None, None, None)
        self._incoming: CredentialRead = CredentialRead(None, None, None)
        self._next_read = 0.0  # monotonic time of the next periodic read
        self._failed_logins = 0  # consecutive reads refused with 401
        self._credentials_read = False  # no verdict on a missing key before the first read
        self._read_failure: str | None = None  # why the last read failed (None: it worked)
        self._refused: str | None = None  # CouchDB refused the daemon's user (not transient)
        self._refresh_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._gate = self._compute_gate()

    # -- app settings ---------------------------------------------------------------------

    async def load_settings(self) -> None:
        """Read the settings doc (or the pre-3.0 location) once, at start-up."""
        doc = await self._couch.get("settings")
        if doc is not None:
            self.apply_settings_doc(doc)
            return
        legacy = await self._couch.get("_design/medic")
        if legacy is not None and isinstance(legacy.get("app_settings"), dict):
            self._set_settings(legacy["app_settings"], legacy.get("_rev"))
        else:
            self._set_settings({}, None)
            self._log.warning(
                "settings_missing",
                hint="no 'settings' doc in the medic db: is COUCH_URL pointing at CHT's db?",
            )

    async def load_translations(self) -> None:
        """CHT's translation documents (`messages-<locale>`), for report error texts."""
        for doc in await self._couch.docs_with_prefix(TRANSLATIONS_PREFIX):
            self.apply_translations_doc(doc)

    def apply_translations_doc(self, doc: Mapping[str, Any]) -> None:
        """Take a translations document (`generic` + `custom` texts; older CHT: `values`)."""
        code = doc.get("code")
        if doc.get("type") != "translations" or not isinstance(code, str):
            return
        if doc.get("_deleted"):
            self._translations.pop(code, None)
            return
        values: dict[str, str] = {}
        for part in ("values", "generic", "custom"):
            texts = doc.get(part)
            if isinstance(texts, dict):
                values.update({k: v for k, v in texts.items() if isinstance(v, str)})
        self._translations[code] = values

    def translator(self) -> Translator:
        """CHT's `config.translate` with the loaded translations (English defaults beneath)."""
        cache = {locale: dict(texts) for locale, texts in DEFAULT_TRANSLATIONS.items()}
        for locale, texts in self._translations.items():
            cache.setdefault(locale, {}).update(texts)
        return Translator(self.app_settings, cache)

    def apply_settings_doc(self, doc: Mapping[str, Any]) -> None:
        """Take a new revision of the `settings` doc (from the changes feed)."""
        if doc.get("_deleted"):
            self._set_settings({}, None)
            return
        if doc.get("_rev") is not None and doc.get("_rev") == self.settings_rev:
            return
        settings = doc.get("settings")
        if not isinstance(settings, dict):
            self._log.error("settings_invalid", problem="the settings doc has no 'settings' object")
            settings = {}
        self._set_settings(settings, doc.get("_rev"))

    def _set_settings(self, settings: dict[str, Any], rev: Any) -> None:
        self.app_settings = settings
        self.settings_rev = rev if isinstance(rev, str) else None
        self.settings_loaded = True
        self._log.info("settings_loaded", rev=self.settings_rev, forms=len(self.forms))
        self._update_gate()

    @property
    def forms(self) -> dict[str, Any]:
        forms = self.app_settings.get("forms")
        return forms if isinstance(forms, dict) else {}

    @property
    def sms(self) -> dict[str, Any]:
        sms = self.app_settings.get("sms")
        return sms if isinstance(sms, dict) else {}

    # -- credentials ----------------------------------------------------------------------

    async def refresh_credentials(self, *, force: bool = False) -> None:
        """Re-read both credentials once the refresh period since the last read has passed
        (after a refused login: REFUSED_RETRY_S, doubling per refusal).

        Reading stops at the first failure: after a refused login another request would only
        count towards CouchDB's lockout of the user. A failed read keeps the values read
        before (the keys did not change because CouchDB cannot be asked); only keys never read
        get a problem, which names them.
        """
        async with self._refresh_lock:
            if not force and time.monotonic() < self._next_read:
                return
            reads: dict[str, CredentialRead] = {}
            for key in (creds.OUTGOING, creds.INCOMING):
                try:
                    reads[key] = await read_credential(self._couch, key)
                except AuthError as exc:
                    self._read_refused(key, exc)
                    return
                except GatewayError as exc:
                    # CouchDB down, or the user locked for a while: keep what we had.
                    self._read_failure = str(exc)
                    self._log.warning("credentials_read_retrying", error=str(exc))
                    return
            self._next_read = time.monotonic() + self._refresh_s
            self._failed_logins = 0
            self._read_failure = self._refused = None
            self._store(reads[creds.OUTGOING], reads[creds.INCOMING])

    def _read_refused(self, failed_key: str, exc: AuthError) -> None:
        """CouchDB refused the daemon's user: a configuration problem, not an outage."""
        # Counted as a read: retrying sooner would only add failed logins.
        delay = self._refresh_s
        if isinstance(exc, LoginFailedError):
            self._failed_logins += 1
            delay = max(delay, min(REFUSED_RETRY_S * 2 ** (self._failed_logins - 1), REFUSED_MAX_S))
        self._next_read = time.monotonic() + delay
        self._read_failure = self._refused = (
            f"cannot read credential {failed_key}: {exc}; COUCH_URL must name a CouchDB "
            "server admin (CHT's own admin user)"
        )
        self._log.error(
            "credentials_read_failed", key=failed_key, error=str(exc), retry_in_s=round(delay)
        )
        kept: dict[str, CredentialRead] = {}
        for key, previous in ((creds.OUTGOING, self._outgoing), (creds.INCOMING, self._incoming)):
            if previous.value:
                kept[key] = previous  # keep the last good value
            elif key == failed_key:
                kept[key] = CredentialRead(None, None, self._refused)
            else:
                kept[key] = CredentialRead(
                    None,
                    None,
                    f"cannot read credential {key}: not tried after CouchDB refused COUCH_URL's "
                    f"user reading {failed_key}; COUCH_URL must name a CouchDB server admin "
                    "(CHT's own admin user)",
                )
        self._store(kept[creds.OUTGOING], kept[creds.INCOMING])

    def _store(self, outgoing: CredentialRead, incoming: CredentialRead) -> None:
        self._credentials_read = True
        if (outgoing, incoming) != (self._outgoing, self._incoming):
            for key, read, previous in (
                (creds.OUTGOING, outgoing, self._outgoing),
                (creds.INCOMING, incoming, self._incoming),
            ):
                if read == previous:
                    continue
                self._log.info(
                    "credential_loaded" if read.value else "credential_missing",
                    key=key,
                    source=read.source,
                    problem=read.problem,
                )
        self._outgoing, self._incoming = outgoing, incoming
        self._update_gate()

    async def run(self, stop: asyncio.Event) -> None:
        """Background refresh of the credentials (they live outside the medic db)."""
        while not stop.is_set():
            await self.refresh_credentials()
            await sleep_or_wake(stop, self._refresh_s)

    @property
    def incoming_key(self) -> str | None:
        return self._incoming.value

    @property
    def incoming_problem(self) -> str | None:
        return self._incoming.problem

    @property
    def credentials_current(self) -> bool:
        """Whether the credentials were read and the last attempt to read them worked (else
        the values held are the last good ones, or none)."""
        return self._credentials_read and self._read_failure is None

    @property
    def credentials_problem(self) -> str | None:
        """CouchDB refuses the daemon's user the credentials (a human must act), else None."""
        return self._refused

    # -- the gate -------------------------------------------------------------------------

    def _compute_gate(self) -> Gate:
        if not self.settings_loaded:
            return Gate(None, "app settings not loaded yet", "starting")
        service = self.sms.get("outgoing_service")
        if service != self._service:
            switch = (
                f"; to have this daemon send instead, set sms.outgoing_service to "
                f"{self._service!r} (CHT's own sender then stays idle)"
                if service in CHT_OUTGOING_SERVICES
                else ""
            )
            shown = "not set" if service is None else repr(service)
            return Gate(
                None,
                f"app settings sms.outgoing_service is {shown}, not {self._service!r}: "
                f"another sender is in charge, so this daemon neither sends nor polls{switch}",
            )
        rapidpro = self.sms.get("rapidpro")
        raw_url = rapidpro.get("url") if isinstance(rapidpro, dict) else None
        if not raw_url or not isinstance(raw_url, str):
            return Gate(
                None,
                "No RapidPro URL configured: set app settings sms.rapidpro.url "
                "(e.g. https://textit.com)",
                "error",
            )
        try:
            url = URL(raw_url.strip())
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host:
            return Gate(None, f"sms.rapidpro.url {raw_url!r} is not an http(s) URL", "error")
        if not self._credentials_read:
            return Gate(None, "reading the RapidPro credentials", "starting")
        if not self._outgoing.value:
            problem = self._outgoing.problem or (
                "No api key configured: store the RapidPro API token as credential "
                "rapidpro:outgoing (CHT 4.x: PUT /api/v1/credentials/rapidpro:outgoing; "
                "CHT 3.x: CouchDB config medic-credentials/rapidpro:outgoing)"
            )
            return Gate(None, problem, "error")
        return Gate(Target(url=url, token=self._outgoing.value), None)

    def _update_gate(self) -> None:
        gate = self._compute_gate()
        if gate == self._gate:
            return
        self._gate = gate
        if gate.open:
            assert gate.target is not None
            self._log.info("sending_enabled", rapidpro_url=str(gate.target.url))
        elif gate.severity != "starting":
            log = self._log.error if gate.severity == "error" else self._log.info
            log("sending_disabled", reason=gate.reason)
        # Wake whoever waits for a change, then arm a fresh event for the next one.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def gate(self) -> Gate:
        return self._gate

    async def wait_changed(self, within: float) -> None:
        """Wait until the gate changes, or `within` seconds pass."""
        await sleep_or_wake(self._changed, within)
