"""`cht-rapidpro check`: diagnose the whole set-up, one row per check, a fix for every problem.

The checks run in dependency order (CouchDB, the medic db, CHT's app settings and credentials,
RapidPro, the daemon's listener); a check whose prerequisite failed is shown as `skip` rather
than failing for the same reason twice. Nothing is written anywhere, and RapidPro gets one
cheap GET. Tokens and keys are never printed.

CouchDB locks a user for 5 minutes after 5 failed logins from one address (CouchDB 3.4
`[chttpd_auth_lockout]`), and the lock also stops CHT and the running daemon, which use the same
admin. So once CouchDB refuses the name or password (401), or reports the user locked, `check`
sends CouchDB nothing more: one run costs at most one failed login.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass
from typing import Any, TextIO, cast

import aiohttp
from yarl import URL

from ..cht import credentials as creds
from ..cht.outgoing import CHT_OUTGOING_SERVICES
from ..cht.phone import region_for
from ..chtconfig import read_credential
from ..config import Settings
from ..couch.client import AccountLockedError, CouchClient, LoginFailedError, NotFoundError
from ..errors import AuthError, GatewayError, RetryableError, UpstreamConfigError
from ..incoming import ROUTES as WEBHOOK_ROUTES
from ..rapidpro.client import RapidProClient
from ..rapidpro.models import Broadcast, Target
from ..rapidpro.throttle import BROADCASTS, Budget
from .common import (
    COMMAND_COUCH_TIMEOUT_S,
    EX_FAILED,
    EX_OK,
    AppSettings,
    get_listener,
    listener_url,
    load_app_settings,
    now_utc,
    plain_http_instead,
    sms_settings,
    tls_problem,
)

OK, FAIL, WARN, SKIP = "ok", "fail", "warn", "skip"
VALIDATION_MODES = ("full", "partial", "none")
_LOCKED_FIX = (
    "wait: CouchDB unlocks the user by itself 5 minutes after the first failed login "
    "([chttpd_auth_lockout] max_lifetime), then run check again. Meanwhile find and stop "
    "whatever keeps trying a wrong password for this user from this host (an old COUCH_URL in "
    "a script, a service or a shell; each failed check counts too). A running cht-rapidpro "
    "daemon with the right password waits it out and resumes by itself"
)
_REFUSED_SKIP = "CouchDB refused COUCH_URL's credentials (see above): no further attempts"
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}

_CREDENTIAL_FIX = {
    creds.OUTGOING: (
        "store RapidPro's API token (workspace settings → API tokens) as credential "
        "rapidpro:outgoing. CHT 4.x: curl -X PUT -H 'Content-Type: text/plain' "
        "https://admin:pass@<cht>/api/v1/credentials/rapidpro:outgoing -d '<token>'; "
        "CHT 3.x: curl -X PUT https://admin:pass@<couch>/_node/<node>/_config/"
        "medic-credentials/rapidpro:outgoing -d '\"<token>\"'"
    ),
    creds.INCOMING: (
        "store the key RapidPro's flow sends as 'Authorization: Token <key>' as credential "
        "rapidpro:incoming. CHT 4.x: curl -X PUT -H 'Content-Type: text/plain' "
        "https://admin:pass@<cht>/api/v1/credentials/rapidpro:incoming -d '<key>'; "
        "CHT 3.x: curl -X PUT https://admin:pass@<couch>/_node/<node>/_config/"
        "medic-credentials/rapidpro:incoming -d '\"<key>\"'"
    ),
}


@dataclass(slots=True)
class CheckResult:
    """One row of the report."""

    name: str  # stable identifier, e.g. "couch.admin" (for --json consumers)
    what: str  # what was checked, for people
    status: str  # ok | fail | warn | skip
    detail: str
    fix: str | None = None


class _Diagnosis:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.results: list[CheckResult] = []
        self._reachable = False
        # Set once CouchDB refused the name or password, or reported the user locked: no
        # request after that (each failed login counts towards CouchDB's lockout).
        self._refused: LoginFailedError | AccountLockedError | None = None
        self._couch_timeout_s = min(settings.couch_timeout_s, COMMAND_COUCH_TIMEOUT_S)

    def add(
        self, name: str, what: str, status: str, detail: str, fix: str | None = None
    ) -> CheckResult:
        result = CheckResult(name, what, status, detail, fix if status != OK else None)
        self.results.append(result)
        return result

    async def run(self) -> None:
        settings = self.settings
        couch = CouchClient.connect(
            settings.couch, timeout_s=self._couch_timeout_s, ca_file=settings.couch_ca_file
        )
        try:
            self._reachable = await self._couch_reachable(couch)
            await self._couch_admin(couch)
            db_ok = await self._database(couch)
            app = await self._app_settings(couch, db_ok)
            self._outgoing_service(app)
            url = self._rapidpro_url(app)
            self._phone_settings(app)
            token = await self._credential(couch, creds.OUTGOING)
            await self._credential(couch, creds.INCOMING)
            await self._message_log(couch, db_ok)
        finally:
            await couch.close()
        await self._rapidpro(url, token)
        await self._listener()

    # -- CouchDB ----------------------------------------------------------------------------

    def _couch_blocked(self) -> str | None:
        """Why no (further) CouchDB request is made, None to go on."""
        if not self._reachable:
            return "CouchDB is not reachable"
        if self._refused is not None:
            return _REFUSED_SKIP
        return None

    async def _couch_reachable(self, couch: CouchClient) -> bool:
        what, server = "CouchDB reachable", str(self.settings.couch.server)
        try:
            info = await couch.server_info()
        except (AuthError, AccountLockedError) as exc:
            # It answered; whether the credentials are right is the next row's business.
            if isinstance(exc, LoginFailedError | AccountLockedError):
                self._refused = exc
            self.add("couch.reachable", what, OK, f"{server} answers")
            return True
        except GatewayError as exc:
            tls = tls_problem(exc, self.settings)
            if tls is None and self.settings.couch.server.scheme == "https":
                # A plain-HTTP server may just wait for a request line instead of a TLS
                # handshake (Apache CouchDB does): the handshake then times out.
                tls = await plain_http_instead(self.settings)
            if tls is not None:
                self.add("couch.reachable", what, FAIL, f"{server}: {tls.detail}", tls.fix)
                return False
            self.add(
                "couch.reachable",
                what,
                FAIL,
                f"{server}: {self._describe(exc)}",
                "check the host and port in COUCH_URL, and that CouchDB is running and "
                "reachable from this host",
            )
            return False
        version = info.get("version")
        shown = f" (CouchDB {version})" if isinstance(version, str) and "couchdb" in info else ""
        self.add("couch.reachable", what, OK, f"{server} answers{shown}")
        return True

    def _describe(self, exc: GatewayError) -> str:
        """The error; for a request that ran out of time, how long it waited (a bare
        TimeoutError says nothing)."""
        cause = exc.__cause__
        if isinstance(cause, TimeoutError) and not str(cause):
            what = str(exc).split(": ", 1)[0]
            return f"{what}: no answer within {self._couch_timeout_s:g} s"
        return str(exc)

    async def _couch_admin(self, couch: CouchClient) -> None:
        what = "CouchDB admin credentials"
        if not self._reachable:
            self.add("couch.admin", what, SKIP, "CouchDB is not reachable")
            return
        user = self.settings.couch.user or "?"
        fix = (
            "COUCH_URL must carry a CouchDB server admin and its password (CHT's admin "
            "user), e.g. http://admin:pass@host:5984/medic: the daemon reads CHT's "
            "credentials from the server config and the vault"
        )
        if self._refused is None:
            try:
                # The node's config is readable by server admins only: exactly what the
                # daemon needs (the CouchDB secret, CHT 3.x credentials).
                await couch.node_name()
                await couch.config_value("couch_httpd_auth", "secret")
            except (LoginFailedError, AccountLockedError) as exc:
                self._refused = exc
            except AuthError as exc:
                self.add("couch.admin", what, FAIL, f"user {user!r}: {self._describe(exc)}", fix)
                return
            except GatewayError as exc:
                self.add(
                    "couch.admin",
                    what,
                    FAIL,
                    f"user {user!r}: {self._describe(exc)}",
                    "CouchDB did not answer properly: see its answer and log, then retry",
                )
                return
        if isinstance(self._refused, AccountLockedError):
            self.add(
                "couch.admin",
                what,
                FAIL,
                f"user {user!r} is locked: CouchDB refuses every request of this user for a "
                "while (whatever the password) after 5 failed logins from one address; "
                f"{self._refused}",
                _LOCKED_FIX,
            )
            return
        if self._refused is not None:
            self.add(
                "couch.admin",
                what,
                FAIL,
                f"user {user!r}: {self._refused}",
                fix + ". Each failed attempt counts towards CouchDB's lockout (5 within 5 "
                "minutes lock the user for CHT and the daemon too), so fix COUCH_URL before "
                "trying again",
            )
            return
        self.add("couch.admin", what, OK, f"user {user!r} is a server admin")

    async def _database(self, couch: CouchClient) -> bool:
        what, db = "medic database exists", self.settings.couch.db
        blocked = self._couch_blocked()
        if blocked:
            self.add("couch.db", what, SKIP, blocked)
            return False
        try:
            info = await couch.db_info()
        except NotFoundError:
            self.add(
                "couch.db",
                what,
                FAIL,
                f"no database {db!r} on {self.settings.couch.server}",
                "end COUCH_URL with CHT's database name (usually /medic)",
            )
            return False
        except GatewayError as exc:
            self._note_refusal(exc)
            self.add(
                "couch.db",
                what,
                FAIL,
                f"database {db!r}: {self._describe(exc)}",
                "see the rows above",
            )
            return False
        self.add("couch.db", what, OK, f"{db!r} ({info.get('doc_count', '?')} documents)")
        return True

    async def _app_settings(self, couch: CouchClient, db_ok: bool) -> AppSettings | None:
        what = "CHT app settings"
        if not db_ok:
            self.add("cht.settings", what, SKIP, "no database to read them from")
            return None
        try:
            app = await load_app_settings(couch)
        except GatewayError as exc:
            self._note_refusal(exc)
            self.add("cht.settings", what, FAIL, self._describe(exc), "see the rows above")
            return None
        if app.source is None:
            self.add(
                "cht.settings",
                what,
                FAIL,
                f"no 'settings' doc in {self.settings.couch.db!r}",
                "point COUCH_URL at CHT's own database (CHT's API writes the settings doc "
                "when it starts), or upload them with cht-conf",
            )
            return None
        if app.problem:
            self.add(
                "cht.settings",
                what,
                FAIL,
                app.problem,
                "re-upload the app settings (cht-conf upload-app-settings)",
            )
            return None
        rev = f", rev {app.rev.split('-', 1)[0]}" if app.rev else ""
        forms = app.values.get("forms")
        count = len(forms) if isinstance(forms, dict) else 0
        self.add("cht.settings", what, OK, f"{app.source}{rev}, {count} SMS forms")
        return app

    def _outgoing_service(self, app: AppSettings | None) -> None:
        """One sender per database: CHT's own, or this daemon (issue 12)."""
        what, wanted = "sms.outgoing_service", self.settings.service
        actual = sms_settings(app.values).get("outgoing_service") if app else None
        second_sender = self.settings.second_sender
        if second_sender is not None:
            now = f" (sms.outgoing_service is {actual!r} now)" if app else ""
            self.add(
                "cht.outgoing_service",
                what,
                FAIL,
                f"TWO SENDERS: CHT_RAPIDPRO_SERVICE is {wanted!r}, one of CHT's own services: "
                "CHT's API and this daemon would both send every message, so the daemon "
                f"refuses to run{now}",
                "unset CHT_RAPIDPRO_SERVICE (default 'cht-rapidpro') and set "
                "sms.outgoing_service to 'cht-rapidpro' in app settings; set "
                "CHT_RAPIDPRO_NO_CHT_API=true instead only if no CHT API serves this database",
            )
            return
        if app is None:
            self.add("cht.outgoing_service", what, SKIP, "no app settings")
            return
        if actual == wanted and wanted in CHT_OUTGOING_SERVICES:
            self.add(
                "cht.outgoing_service",
                what,
                WARN,
                f"{actual!r}, one of CHT's own services, allowed by CHT_RAPIDPRO_NO_CHT_API="
                "true: any CHT API serving this database sends every message too",
                "make sure no CHT API serves this database, or set both sms.outgoing_service "
                "and CHT_RAPIDPRO_SERVICE to 'cht-rapidpro'",
            )
            return
        if actual == wanted:
            self.add(
                "cht.outgoing_service",
                what,
                OK,
                f"{actual!r}, as CHT_RAPIDPRO_SERVICE (CHT's own senders stay idle)",
            )
            return
        if actual in CHT_OUTGOING_SERVICES:
            self.add(
                "cht.outgoing_service",
                what,
                FAIL,
                f"is {actual!r}: CHT's own sender sends the messages, and this daemon "
                f"(CHT_RAPIDPRO_SERVICE {wanted!r}) neither sends nor polls",
                f"to have this daemon send, set sms.outgoing_service to {wanted!r} in app "
                "settings (CHT's sender then stays idle; its incoming webhooks keep working). "
                f"Do not set CHT_RAPIDPRO_SERVICE to {actual!r}: CHT and the daemon would both "
                "send every message",
            )
            return
        other = (
            f" (or CHT_RAPIDPRO_SERVICE to {actual!r})"
            if isinstance(actual, str) and actual.strip()
            else ""
        )
        shown = "not set" if actual is None else repr(actual)
        self.add(
            "cht.outgoing_service",
            what,
            FAIL,
            f"is {shown}, but CHT_RAPIDPRO_SERVICE is {wanted!r}: the daemon neither "
            "sends nor polls",
            f"set sms.outgoing_service to {wanted!r} in app settings{other}",
        )

    def _rapidpro_url(self, app: AppSettings | None) -> URL | None:
        what = "sms.rapidpro.url"
        if app is None:
            self.add("cht.rapidpro_url", what, SKIP, "no app settings")
            return None
        rapidpro = sms_settings(app.values).get("rapidpro")
        raw = rapidpro.get("url") if isinstance(rapidpro, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            self.add(
                "cht.rapidpro_url",
                what,
                FAIL,
                "not set",
                "set sms.rapidpro.url in app settings (e.g. https://textit.com)",
            )
            return None
        try:
            url = URL(raw.strip())
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host:
            self.add(
                "cht.rapidpro_url",
                what,
                FAIL,
                f"{_public(raw)!r} is not an http(s) URL",
                "set sms.rapidpro.url in app settings to an http(s) URL, e.g. https://textit.com",
            )
            return None
        if url.scheme == "http" and url.host not in _LOOPBACK:
            self.add(
                "cht.rapidpro_url",
                what,
                WARN,
                f"{_public(url)}: plain http, the API token travels unencrypted",
                "use the https:// address of RapidPro in sms.rapidpro.url",
            )
            return url
        self.add("cht.rapidpro_url", what, OK, _public(url))
        return url

    def _phone_settings(self, app: AppSettings | None) -> None:
        """`default_country_code` and `phone_validation`, as CHT's normalisation reads them
        (spec §3.7): every outgoing `to` and incoming `from` goes through it."""
        what = "phone number settings"
        if app is None:
            self.add("cht.phone_numbers", what, SKIP, "no app settings")
            return
        values = app.values
        problems: list[str] = []
        fixes: list[str] = []
        code = values.get("default_country_code")
        region = region_for(code)
        if code is None:
            problems.append(
                "default_country_code is not set: a number without its +country code cannot "
                "be normalised, so a message to one fails (not sent) and an incoming one is "
                "stored as written"
            )
        elif region == "ZZ":
            problems.append(
                f"default_country_code {code!r} is not a country calling code as CHT reads it "
                "(a number or a string of digits, without + or a leading 0): numbers without "
                "their +country code cannot be normalised"
            )
        if code is None or region == "ZZ":
            fixes.append("set default_country_code in app settings, e.g. 254 for Kenya")
        validation = values.get("phone_validation")
        if validation is None:
            problems.append("phone_validation is not set: CHT validates numbers fully ('full')")
            fixes.append("set phone_validation to 'full', 'partial' or 'none' in app settings")
        elif not isinstance(validation, str) or validation.lower() not in VALIDATION_MODES:
            problems.append(
                f"phone_validation {validation!r} is not 'full', 'partial' or 'none': CHT (and "
                "the daemon) read it as 'full'"
            )
            fixes.append("set phone_validation to 'full', 'partial' or 'none' in app settings")
        if problems:
            self.add("cht.phone_numbers", what, WARN, "; ".join(problems), "; ".join(fixes))
            return
        self.add(
            "cht.phone_numbers",
            what,
            OK,
            f"default_country_code {code!r} ({region}), phone_validation {validation!r}",
        )

    def _note_refusal(self, exc: GatewayError) -> None:
        if self._refused is None and isinstance(exc, LoginFailedError | AccountLockedError):
            self._refused = exc

    async def _credential(self, couch: CouchClient, key: str) -> str | None:
        what = f"credential {key}"
        blocked = self._couch_blocked()
        if blocked:
            self.add(f"cht.credential.{key}", what, SKIP, blocked)
            return None
        try:
            read = await read_credential(couch, key)
        except AuthError as exc:
            self._note_refusal(exc)
            self.add(
                f"cht.credential.{key}",
                what,
                FAIL,
                f"cannot be read: {exc}",
                "COUCH_URL must name a CouchDB server admin (see couch.admin above)",
            )
            return None
        except GatewayError as exc:
            self._note_refusal(exc)
            fix = _LOCKED_FIX if isinstance(exc, AccountLockedError) else "retry"
            detail = f"cannot be read: {self._describe(exc)}"
            self.add(f"cht.credential.{key}", what, FAIL, detail, fix)
            return None
        if read.value:
            self.add(
                f"cht.credential.{key}",
                what,
                OK,
                f"present and readable ({_layout(read.source, couch)})",
            )
            return read.value
        if read.problem:
            self.add(
                f"cht.credential.{key}",
                what,
                FAIL,
                f"{_layout(read.source, couch)}: {read.problem}",
                _CREDENTIAL_FIX[key],
            )
            return None
        self.add(
            f"cht.credential.{key}",
            what,
            FAIL,
            f"not set (neither in the CHT 4.x vault {couch.target.vault_db!r} nor in the "
            "CHT 3.x config section medic-credentials)",
            _CREDENTIAL_FIX[key],
        )
        return None

    # -- RapidPro ---------------------------------------------------------------------------

    async def _rapidpro(self, url: URL | None, token: str | None) -> None:
        what = "RapidPro reachable, token valid"
        if url is None or token is None:
            missing = "sms.rapidpro.url" if url is None else "credential rapidpro:outgoing"
            self.add("rapidpro.api", what, SKIP, f"needs {missing}")
            return
        target = Target(url=url, token=token)
        endpoint = target.endpoint("broadcasts")
        timeout_s = min(self.settings.send_timeout_s, COMMAND_COUCH_TIMEOUT_S)
        async with aiohttp.ClientSession() as session:
            client = RapidProClient(session, Budget({}), timeout_s=timeout_s)
            try:
                # One cheap GET: newest broadcasts from now on (normally none).
                pages = cast(
                    AsyncGenerator[list[Broadcast], None],
                    client.broadcasts(target, after=now_utc()),
                )
                async with contextlib.aclosing(pages):
                    async for _ in pages:
                        break
            except AuthError as exc:
                self.add(
                    "rapidpro.api",
                    what,
                    FAIL,
                    f"GET {endpoint.path}: {_after_colon(exc)}",
                    "the token is wrong or revoked: " + _CREDENTIAL_FIX[creds.OUTGOING],
                )
                return
            except UpstreamConfigError as exc:
                self.add(
                    "rapidpro.api",
                    what,
                    FAIL,
                    f"{_public(url)}: {_after_colon(exc)}",
                    "set sms.rapidpro.url in app settings to the RapidPro/TextIt server's "
                    "address, without /api/v2 (e.g. https://textit.com)",
                )
                return
            except RetryableError as exc:
                self._rapidpro_retryable(what, url, exc, client)
                return
            except GatewayError as exc:
                self.add(
                    "rapidpro.api", what, FAIL, f"{_public(url)}: {exc}", "see RapidPro's answer"
                )
                return
        self.add("rapidpro.api", what, OK, f"{_public(url)} accepted the token (GET broadcasts)")

    def _rapidpro_retryable(
        self, what: str, url: URL, exc: RetryableError, client: RapidProClient
    ) -> None:
        if client.budget.throttled.get(BROADCASTS):
            # RapidPro authenticates before it throttles: a 429 means the token is valid.
            self.add(
                "rapidpro.api",
                what,
                WARN,
                f"{_public(url)}: token accepted, but RapidPro throttles this workspace now (429)",
                "wait; if it persists, lower CHT_RAPIDPRO_BROADCASTS_PER_HOUR or other "
                "integrations' use of the workspace",
            )
        elif isinstance(exc.__cause__, aiohttp.ClientConnectorError):
            self.add(
                "rapidpro.api",
                what,
                FAIL,
                f"{_public(url)}: {_after_colon(exc)}",
                "check the host and port of sms.rapidpro.url in app settings, and that this "
                "host can reach it (DNS, firewall, proxy)",
            )
        else:
            self.add(
                "rapidpro.api",
                what,
                FAIL,
                f"{_public(url)}: {_after_colon(exc)}",
                "RapidPro is not answering properly: try again later; if it persists, check "
                "sms.rapidpro.url and RapidPro's status",
            )

    # -- the daemon -------------------------------------------------------------------------

    async def _message_log(self, couch: CouchClient, db_ok: bool) -> None:
        """What following RapidPro's log does with these settings and this database's views."""
        what = "RapidPro's message log (status, mirroring, recovery)"
        settings = self.settings
        flows = len(settings.incoming_flows)
        recovery = (
            f"recovery for {flows} flow{'s' if flows != 1 else ''} (webhook ids: "
            f"{settings.incoming_id})"
            if flows
            else "recovery off"
        )
        parts = [f"mirroring {'on' if settings.mirror_outgoing else 'off'}, {recovery}"]
        blocked = self._couch_blocked()
        if blocked or not db_ok:
            self.add("rapidpro.log", what, SKIP, "; ".join(parts) + f"; {blocked or 'no db'}")
            return
        try:
            ref_view = await couch.has_view("medic-sms", "messages_by_gateway_ref")
            contacts_view = await couch.has_view("medic-client", "contacts_by_phone")
        except GatewayError as exc:
            self._note_refusal(exc)
            self.add("rapidpro.log", what, FAIL, f"cannot read CHT's views: {exc}", "retry")
            return
        parts.append(
            "tasks found by gateway_ref through CHT's medic-sms view"
            if ref_view
            else "no medic-sms/messages_by_gateway_ref view: tracked messages' document ids "
            "are kept in memory (about 150 bytes each)"
        )
        if settings.mirror_outgoing:
            parts.append(
                "mirrored messages join their contact's conversation (medic-client "
                "contacts_by_phone)"
                if contacts_view
                else "no medic-client/contacts_by_phone view: mirrored messages are threaded "
                "by number only"
            )
        # Without CHT's views the daemon works (as said); only mirrored messages lose
        # their place in the contact's conversation.
        status = WARN if settings.mirror_outgoing and not contacts_view else OK
        fix = (
            "this database lacks CHT's design documents (CHT installs medic-client): point "
            "COUCH_URL at CHT's database"
        )
        self.add("rapidpro.log", what, status, "; ".join(parts), fix)

    async def _listener(self) -> None:
        what = "webhook listener (daemon)"
        base = listener_url(self.settings)
        if base is None:
            self.add(
                "daemon.listener",
                what,
                SKIP,
                "CHT_RAPIDPRO_PORT is 0 (any free port): no fixed address to check",
            )
            return
        answer = await get_listener(base, "/healthz")
        body = answer.json()
        if answer.status is None:
            self.add(
                "daemon.listener",
                what,
                WARN,
                f"{base}: {answer.error}: is the daemon running?",
                "start it (cht-rapidpro run, or systemctl start cht-rapidpro): RapidPro's "
                "webhook and all sending need it",
            )
        elif not isinstance(body, dict) or "status" not in body:
            self.add(
                "daemon.listener",
                what,
                WARN,
                f"{base}/healthz answered {answer.status}, but not as this daemon does",
                "check CHT_RAPIDPRO_HOST/_PORT: another program may hold the port",
            )
        elif answer.status == 200:
            self.add(
                "daemon.listener",
                what,
                OK,
                f"daemon healthy at {base} (webhook: POST {base}{WEBHOOK_ROUTES[-1]})",
            )
        else:
            problems = body.get("problems")
            shown = "; ".join(str(p) for p in problems) if isinstance(problems, list) else "?"
            self.add(
                "daemon.listener",
                what,
                FAIL,
                f"daemon at {base} is running but unhealthy: {shown}",
                "act on the problems listed; the daemon's log says more "
                "(journalctl -u cht-rapidpro)",
            )


def _layout(source: str | None, couch: CouchClient) -> str:
    if source == "vault":
        return f"CHT 4.x vault {couch.target.vault_db!r}"
    if source == "config":
        return "CHT 3.x config section medic-credentials"
    return "not found"


def _public(url: URL | str) -> str:
    """A URL without any user or password in it."""
    try:
        parsed = URL(url) if isinstance(url, str) else url
    except ValueError:
        return "<unparseable URL>"
    return str(parsed.with_user(None)) if parsed.user or parsed.password else str(parsed)


def _after_colon(exc: Exception) -> str:
    """The client's message without its `list broadcasts: ` prefix."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("list ") else text


async def diagnose(settings: Settings) -> list[CheckResult]:
    """Run every check; never raises for a failing dependency (that is a row)."""
    diagnosis = _Diagnosis(settings)
    await diagnosis.run()
    return diagnosis.results


def render(results: list[CheckResult]) -> str:
    """The human table: status, what, detail, and `fix:` under every failure and warning."""
    width = max([len("CHECK"), *(len(r.what) for r in results)])
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for result in results:
        label = result.status.upper() if result.status == FAIL else result.status
        lines.append(f"{label:<6}  {result.what:<{width}}  {result.detail}")
        if result.fix:
            lines.append(f"{'':<6}  {'':<{width}}  fix: {result.fix}")
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    if failed:
        summary = f"{failed} check{'s' if failed != 1 else ''} failed"
        if warned:
            summary += f", {warned} warning{'s' if warned != 1 else ''}"
        lines.append(f"\n{summary}: see the fixes above")
    elif warned:
        lines.append(f"\nall is well, with {warned} warning{'s' if warned != 1 else ''}")
    else:
        lines.append(f"\nall {len(results)} checks passed")
    return "\n".join(lines)


def exit_code(results: list[CheckResult]) -> int:
    return EX_FAILED if any(r.status == FAIL for r in results) else EX_OK


async def run_check(settings: Settings, *, out: TextIO, as_json: bool = False) -> int:
    """`cht-rapidpro check`: print the diagnosis; 0 when nothing failed (warnings allowed),
    1 otherwise."""
    results = await diagnose(settings)
    code = exit_code(results)
    if as_json:
        report: dict[str, Any] = {"ok": code == EX_OK, "checks": [asdict(r) for r in results]}
        out.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(render(results) + "\n")
    return code
