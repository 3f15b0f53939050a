"""The daemon's own settings: environment variables, optionally a TOML file, validated at once.

CHT-side configuration (app settings, credentials) is *not* here: it lives in CouchDB where CHT
keeps it and is read at run time (see `chtconfig`). The environment holds only what the
daemon needs to reach CouchDB and to run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from yarl import URL

from .cht.outgoing import CHT_OUTGOING_SERVICES
from .errors import ConfigError

LogFormat = Literal["auto", "console", "logfmt", "json"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PREFIX = "CHT_RAPIDPRO_"
#: Values copied from `cht-rapidpro.env.example` that were never filled in.
#: What the example env file puts where a real value must go (any case).
PLACEHOLDER = "change_me"


@dataclass(frozen=True, slots=True)
class CouchTarget:
    """Where the CHT `medic` database lives, split out of CHT's `COUCH_URL` convention."""

    server: URL  # without credentials, without the db name
    db: str
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def vault_db(self) -> str:
        return f"{self.db}-vault"

    @property
    def redacted(self) -> str:
        """For logs: the URL without credentials."""
        return str(self.server / self.db)


def parse_couch_url(value: str) -> CouchTarget:
    """Split `http://user:pass@host:5984/medic` into server, db and credentials."""
    try:
        url = URL(value.strip())
    except ValueError:
        # yarl's reason ("port can't be converted to integer") is about the password part
        # a `/`, `?` or `#` cut short; the value itself is never echoed (it holds a password).
        raise ValueError(f"is not a valid URL{_PERCENT_ENCODE}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{_redact(value)!r} is not an http(s) URL")
    if "@" in url.raw_path + url.raw_query_string + url.raw_fragment:
        # `http://admin:12/34@host/medic` parses as host `admin`, port 12: the real host
        # follows an `@` in the path (CouchDB database names cannot contain `@`).
        raise ValueError(f"has an '@' after the host{_PERCENT_ENCODE}")
    path = url.path.rstrip("/")
    server_path, _, db = path.rpartition("/")
    if not db:
        raise ValueError("has no database name (expected e.g. http://admin:pass@host:5984/medic)")
    if url.user is None or url.password is None:
        raise ValueError(
            "has no credentials: CouchDB 3 needs an admin user, e.g. http://admin:pass@host:5984/medic"
        )
    server = url.with_user(None).with_password(None).with_path(server_path or "/")
    server = server.with_query(None).with_fragment(None)
    return CouchTarget(server=server, db=db, user=url.user, password=url.password)


_PERCENT_ENCODE = (
    ": a '/', '?', '#' or '@' in the user name or password must be percent-encoded "
    "('/' as %2F, '?' as %3F, '#' as %23, '@' as %40), "
    "e.g. http://admin:p%2Fss@127.0.0.1:5984/medic"
)


def _redact(value: str) -> str:
    try:
        url = URL(value)
        return str(url.with_password("***")) if url.password else value
    except ValueError:
        return "<unparseable>"


def _shown(text: str) -> str:
    """A value for a problem message: quoted, and cut short if long."""
    shown = repr(text.strip())
    return shown if len(shown) <= 40 else shown[:36] + "...'"


# ASCII digits only: Python's int()/float() also take "1_0", "٥٩٨٩" (Arabic-Indic digits),
# "nan" and "inf", none of which an operator means as a setting.
_WHOLE = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class Bounded:
    """A number setting's parser: ASCII digits, within `low`..`high` (both included)."""

    low: float
    high: float
    whole: bool = False
    unit: str = ""

    def __call__(self, text: str) -> Any:
        value = text.strip()
        if self.whole:
            if not _WHOLE.fullmatch(value) or len(value) > 20:
                raise ValueError(f"{_shown(text)} is not a whole number (digits 0-9)")
            number: float = int(value)
        else:
            if not _DECIMAL.fullmatch(value) or len(value) > 40:
                raise ValueError(f"{_shown(text)} is not a number (digits 0-9, e.g. 2.5)")
            number = float(value)
        if not self.low <= number <= self.high:
            raise ValueError(f"{_shown(text)} is out of range: must be {self.describe()}")
        return number

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"from {_plain(self.low)} to {_plain(self.high)}{unit}"


def _plain(number: float) -> str:
    """`2592000` rather than `2.592e+06`, `0.05` as it is."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _seconds(low: float, high: float) -> Bounded:
    return Bounded(low, high, unit="seconds")


def _whole(low: int, high: int) -> Bounded:
    return Bounded(low, high, whole=True)


DAY = 86400.0
#: The daemon as shipped runs under systemd with WatchdogSec=180 and TimeoutStopSec=20
#: (systemd/cht-rapidpro.service): the feed's heartbeat and the shutdown grace are bounded
#: so that the daemon stays within them.
_MAX_HEARTBEAT_S = 25.0  # a quiet long poll lasts 6 heartbeats + 1 s: 151 s < 180 s
_MAX_SHUTDOWN_GRACE_S = 15.0  # + 3 s of clean-up: 18 s < 20 s


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{_shown(text)} is not one of {', '.join(choices)}")
        return value

    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{_shown(text)} is not true or false")


def _name(max_length: int) -> Callable[[str], str]:
    """A free-form name: not empty, printable, not longer than `max_length`."""

    def parse(text: str) -> str:
        value = text.strip()
        if not value:
            raise ValueError("must not be empty")
        if not value.isprintable():
            raise ValueError(f"{_shown(text)} contains control characters")
        if len(value) > max_length:
            raise ValueError(f"is longer than {max_length} characters")
        return value

    return parse


def _flow_uuids(text: str) -> tuple[str, ...]:
    flows = []
    for part in text.strip().strip("[]").split(","):  # a TOML list arrives as "['a', 'b']"
        value = part.strip().strip("'\"").lower()
        if not value:
            continue
        try:
            flows.append(str(uuid.UUID(value)))
        except ValueError:
            raise ValueError(f"{_shown(part.strip())} is not a flow uuid") from None
    return tuple(dict.fromkeys(flows))


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _listen_host(text: str) -> str:
    """An IP address or a host name (RFC 1123); `999.1.1.1` is neither."""
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    numeric = all(label.isascii() and label.isdigit() for label in labels)
    if numeric or len(value) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in labels):
        raise ValueError(
            f"{_shown(text)} is neither an IP address nor a host name "
            "(e.g. 127.0.0.1, 0.0.0.0, ::1 or localhost)"
        )
    return value


def check_listen_address(host: str, port: int) -> list[str]:
    """Problems with listening on `host`: a name that does not resolve, or an address that
    is not one of this machine's. Binds only ephemeral ports, so a running daemon on `port`
    does not count as a problem (`check-config` may run beside it).
    """
    where = f"{PREFIX}HOST: {host!r}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return [f"{where} does not resolve to an address ({reason})"]
    problems: list[str] = []
    for family, kind, proto, _, address in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this host lacks: asyncio's create_server skips it too
        try:
            with probe:
                probe.bind((address[0], 0, *address[2:]))
        except OSError as exc:
            problems.append(
                f"{where} ({address[0]}) cannot be listened on: {exc.strerror or exc}; "
                "use an address of this machine (e.g. 127.0.0.1, or 0.0.0.0 for all)"
            )
    return problems


def _utf8_problem(raw: str) -> str | None:
    """Why a value read from the environment is not text (os.environ keeps undecodable
    bytes as lone surrogates), or None."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 text (an undecodable byte at character {exc.start})"
    return None


def read_text_file(path: str) -> str:
    """A settings file's text: UTF-8 (a UTF-8 byte-order mark is ignored).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not UTF-8, with the offset of the first bad byte (never the
            content: the file may hold a password).
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ValueError(
                "is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"
            ) from None
        raise ValueError(
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "save it as UTF-8"
        ) from None


def _ca_file(text: str) -> Path:
    """A PEM bundle of CA certificates, loaded once here so that a wrong file fails at start."""
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    path = Path(value)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:  # an OSError too: before the others
        raise ValueError(f"{path}: holds no PEM CA certificate ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    return path


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its environment variable, parser, default and help text."""

    name: str
    env: str
    parse: Callable[[str], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "couch",
        "COUCH_URL",
        parse_couch_url,
        "CouchDB URL with admin credentials and the CHT db name, "
        "e.g. http://admin:pass@127.0.0.1:5984/medic (CHT's own convention). Required.",
    ),
    Option(
        "couch_ca_file",
        PREFIX + "COUCH_CA_FILE",
        _ca_file,
        "For an https:// COUCH_URL: a PEM file of the CA certificates to trust instead of the "
        "system's, e.g. the deployment's own CA that signed CHT's nginx certificate. Every "
        "CouchDB request (the daemon's and the commands') verifies the server against it.",
    ),
    Option(
        "listen_host",
        PREFIX + "HOST",
        _listen_host,
        "Address of the webhook/health/metrics listener: an IP address of this machine "
        "(0.0.0.0: all) or a host name that resolves to one.",
    ),
    Option("listen_port", PREFIX + "PORT", _whole(1, 65535), "Port of that listener."),
    Option(
        "service",
        PREFIX + "SERVICE",
        _name(100),
        "Send and poll only while app settings sms.outgoing_service equals this value. Keep a "
        "value CHT does not know (the default): CHT's API then sends nothing itself, and its "
        "incoming webhooks keep working. CHT's own services (rapidpro, africas-talking, "
        "nepal-doit-sms, medic-gateway) are refused: CHT would send every message too.",
    ),
    Option(
        "no_cht_api",
        PREFIX + "NO_CHT_API",
        _bool,
        "true states that no CHT API serves this database (none would send), which allows "
        "SERVICE to be one of CHT's own services. Leave it false beside a CHT instance.",
    ),
    Option(
        "instance",
        PREFIX + "INSTANCE",
        _name(200),
        "This daemon's name in its claims; must be unique per replica (default: hostname:port).",
    ),
    Option(
        "poll_interval_s",
        PREFIX + "POLL_INTERVAL",
        _seconds(0.1, DAY),
        "Seconds between delivery-status poll rounds.",
    ),
    Option("log_level", PREFIX + "LOG_LEVEL", _choice(*LOG_LEVELS), "Log level."),
    Option(
        "log_format",
        PREFIX + "LOG_FORMAT",
        _choice("auto", "console", "logfmt", "json"),
        "auto (console on a TTY, logfmt otherwise), console, logfmt or json.",
    ),
    Option(
        "send_concurrency",
        PREFIX + "SEND_CONCURRENCY",
        _whole(1, 256),
        "Broadcast POSTs in flight at once.",
    ),
    Option(
        "send_timeout_s",
        PREFIX + "SEND_TIMEOUT",
        _seconds(0.5, 300),
        "Seconds before a RapidPro request is abandoned (then looked up before any resend).",
    ),
    Option(
        "claim_ttl_s",
        PREFIX + "CLAIM_TTL",
        _seconds(1, DAY),
        "Seconds after which another replica's unfinished claim is taken over. "
        "Keep it well above twice SEND_TIMEOUT.",
    ),
    Option(
        "broadcasts_per_hour",
        PREFIX + "BROADCASTS_PER_HOUR",
        _whole(0, 1_000_000),
        "Client-side budget for RapidPro's broadcasts throttle scope (0: no limit). "
        "TextIt allows 3600/h shared with other endpoints; community RapidPro 36000/h.",
    ),
    Option(
        "messages_per_hour",
        PREFIX + "MESSAGES_PER_HOUR",
        _whole(0, 1_000_000),
        "Client-side budget for the v2.messages scope used by status polling (0: no limit). "
        "RapidPro allows 2500/h (TextIt 3600/h) per workspace.",
    ),
    Option(
        "throttle_window_s",
        PREFIX + "THROTTLE_WINDOW",
        _seconds(1, DAY),
        "Seconds over which RapidPro counts the requests of a budget (one hour on RapidPro; "
        "change it only to match a sandbox whose throttle runs faster).",
    ),
    Option(
        "sent_grace_s",
        PREFIX + "SENT_GRACE",
        _seconds(1, 30 * DAY),
        "Stop polling a message left in 'sent' (no delivery report) after this many seconds.",
    ),
    Option(
        "max_tracking_s",
        PREFIX + "MAX_TRACKING",
        _seconds(1, 30 * DAY),
        "Stop polling any message after this many seconds (RapidPro fails stale ones at 7 days).",
    ),
    Option(
        "clock_skew_s",
        PREFIX + "CLOCK_SKEW",
        _seconds(0, DAY),
        "Allowance for clock differences between this host and RapidPro in time windows.",
    ),
    Option(
        "credentials_refresh_s",
        PREFIX + "CREDENTIALS_REFRESH",
        _seconds(0.1, DAY),
        "Seconds between re-reads of the RapidPro credentials from CouchDB.",
    ),
    Option(
        "checkpoint_interval_s",
        PREFIX + "CHECKPOINT_INTERVAL",
        _seconds(0.05, 3600),
        "At most this many seconds between saves of the feed position.",
    ),
    Option(
        "feed_batch", PREFIX + "FEED_BATCH", _whole(1, 10_000), "Changes read per feed request."
    ),
    Option(
        "feed_heartbeat_s",
        PREFIX + "FEED_HEARTBEAT",
        _seconds(0.1, _MAX_HEARTBEAT_S),
        "Heartbeat asked of CouchDB on the changes feed; a silent feed is reconnected "
        "after twice this. A quiet long poll lasts 6 heartbeats: the maximum keeps it "
        "within the unit's WatchdogSec=180.",
    ),
    Option(
        "couch_timeout_s",
        PREFIX + "COUCH_TIMEOUT",
        _seconds(0.5, 300),
        "Seconds before an ordinary CouchDB request is abandoned and retried.",
    ),
    Option(
        "retry_max_s",
        PREFIX + "RETRY_MAX",
        _seconds(0.1, 3600),
        "Longest wait between retries of a failing dependency.",
    ),
    Option(
        "shutdown_grace_s",
        PREFIX + "SHUTDOWN_GRACE",
        _seconds(0.1, _MAX_SHUTDOWN_GRACE_S),
        "On SIGTERM, seconds allowed to finish in-flight sends before they are cancelled "
        "(3 s more for the rest: the maximum keeps it within the unit's TimeoutStopSec=20).",
    ),
    Option(
        "webhook_max_bytes",
        PREFIX + "WEBHOOK_MAX_BYTES",
        _whole(1024, 32 * 1024 * 1024),
        "Largest incoming-webhook body accepted (413 above).",
    ),
    Option(
        "webhook_timeout_s",
        PREFIX + "WEBHOOK_TIMEOUT",
        _seconds(0.1, 14),
        "Seconds the webhook waits for CouchDB before it answers 503 (the message may still "
        "be saved; a retry of the same call is recognised). RapidPro gives up after 15 s.",
    ),
    Option(
        "mirror_outgoing",
        PREFIX + "MIRROR_OUTGOING",
        _bool,
        "true: messages RapidPro sends on its own (flow replies, campaign events, broadcasts "
        "made in RapidPro or by other API clients) become CHT outgoing messages, shown in the "
        "recipient's conversation in the Messages tab.",
    ),
    Option(
        "incoming_flows",
        PREFIX + "INCOMING_FLOWS",
        _flow_uuids,
        "Comma-separated uuids of the RapidPro flows that call CHT's webhook: their incoming "
        "SMS that have no CHT report (the webhook call failed) are stored as the webhook would "
        "have. Empty: no recovery.",
    ),
    Option(
        "incoming_id",
        PREFIX + "INCOMING_ID",
        _choice("run", "message"),
        "What those flows send as the webhook body's id: run (CHT's documented body, "
        "run.uuid) or message (the recommended body, input.uuid).",
    ),
    Option(
        "log_grace_s",
        PREFIX + "LOG_GRACE",
        _seconds(0, DAY),
        "Seconds a message read from RapidPro's log waits before it is mirrored or "
        "recovered; keep it above RapidPro's 15 s webhook timeout plus COUCH_TIMEOUT.",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated daemon settings. Build with `Settings.load()` or `Settings.from_env()`."""

    couch: CouchTarget
    couch_ca_file: Path | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 5989
    service: str = "cht-rapidpro"
    no_cht_api: bool = False
    instance: str = ""
    poll_interval_s: float = 60.0
    log_level: str = "info"
    log_format: str = "auto"
    send_concurrency: int = 16
    send_timeout_s: float = 20.0
    claim_ttl_s: float = 120.0
    broadcasts_per_hour: int = 3000
    messages_per_hour: int = 2000
    throttle_window_s: float = 3600.0
    sent_grace_s: float = 86400.0
    max_tracking_s: float = 7 * 86400.0
    clock_skew_s: float = 120.0
    credentials_refresh_s: float = 60.0
    checkpoint_interval_s: float = 2.0
    feed_batch: int = 500
    feed_heartbeat_s: float = 10.0
    couch_timeout_s: float = 30.0
    retry_max_s: float = 300.0
    retry_initial_s: float = 1.0
    shutdown_grace_s: float = 6.0
    webhook_max_bytes: int = 64 * 1024
    webhook_timeout_s: float = 10.0
    mirror_outgoing: bool = False
    incoming_flows: tuple[str, ...] = ()
    incoming_id: str = "run"
    log_grace_s: float = 60.0

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        file_values: Mapping[str, Any] | None = None,
        *,
        allow_second_sender: bool = False,
    ) -> Settings:
        """Build settings from an environment mapping (and a parsed TOML file).

        The environment wins over the file. Every problem is collected and raised as one
        `ConfigError`. `allow_second_sender` lets `check` load a configuration that would
        send beside CHT's own sender (`second_sender`), to report it as a failing row.
        """
        problems: list[str] = []
        values: dict[str, Any] = {}
        file_values = dict(file_values or {})
        for option in OPTIONS:
            key = option.env.removeprefix(PREFIX).lower()
            raw: Any = env.get(option.env)
            source = option.env
            file_env = env.get(option.env + "_FILE")
            if raw is None and file_env:
                source = option.env + "_FILE"
                try:
                    raw = read_text_file(file_env).strip()
                except OSError as exc:
                    problems.append(f"{source}: {file_env}: {exc.strerror or exc}")
                    continue
                except ValueError as exc:
                    problems.append(f"{source}: {file_env} {exc}")
                    continue
            from_file = file_values.pop(key, None)
            if raw is None and from_file is not None:
                source = f"{key} (config file)"
                raw = str(from_file).lower() if isinstance(from_file, bool) else str(from_file)
            if raw is None:
                if option.name in _REQUIRED:
                    problems.append(f"{option.env}: required ({option.help})")
                continue
            not_text = _utf8_problem(raw)
            if not_text is not None:
                problems.append(f"{source}: {not_text}")
                continue
            if PLACEHOLDER in raw.lower():
                problems.append(f"{source}: still holds the placeholder from the example file")
                continue
            try:
                values[option.name] = option.parse(raw)
            except ValueError as exc:
                problems.append(f"{source}: {exc}")
        for unknown in sorted(file_values):
            problems.append(f"{unknown} (config file): unknown setting")
        ttl = values.get("claim_ttl_s", DEFAULTS["claim_ttl_s"])
        send_timeout = values.get("send_timeout_s", DEFAULTS["send_timeout_s"])
        if ttl < 2 * send_timeout:
            problems.append(
                f"{PREFIX}CLAIM_TTL ({ttl:g}) must be at least twice {PREFIX}SEND_TIMEOUT "
                f"({send_timeout:g}): a claim must outlive any send made under it"
            )
        service = values.get("service", DEFAULTS["service"])
        no_cht_api = values.get("no_cht_api", DEFAULTS["no_cht_api"])
        conflict = second_sender_problem(service, no_cht_api)
        if conflict is not None and not allow_second_sender:
            problems.append(conflict)
        if problems:
            raise ConfigError(problems)
        if not values.get("instance"):
            port = values.get("listen_port", DEFAULTS["listen_port"])
            values["instance"] = f"{socket.gethostname()}:{port}"
        return cls(**values)

    @property
    def second_sender(self) -> str | None:
        """Why this daemon would send beside CHT's own sender, if it would (see `from_env`)."""
        return second_sender_problem(self.service, self.no_cht_api)

    @classmethod
    def load(
        cls,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        allow_second_sender: bool = False,
    ) -> Settings:
        """Settings from `os.environ` and an optional TOML file."""
        file_values: dict[str, Any] = {}
        if config_file:
            try:
                file_values = tomllib.loads(read_text_file(config_file))
            except OSError as exc:
                raise ConfigError([f"--config {config_file}: {exc.strerror or exc}"]) from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError([f"--config {config_file}: not valid TOML: {exc}"]) from exc
            except ValueError as exc:  # not UTF-8 (TOML files are UTF-8 by definition)
                raise ConfigError([f"--config {config_file} {exc}"]) from exc
        return cls.from_env(
            os.environ if env is None else env,
            file_values,
            allow_second_sender=allow_second_sender,
        )

    def redacted(self) -> dict[str, Any]:
        """Every setting, printable: no credentials."""
        shown: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            shown[item.name] = value.redacted if isinstance(value, CouchTarget) else value
        return shown


def second_sender_problem(service: str, no_cht_api: bool) -> str | None:
    """The problem with sending while `sms.outgoing_service` is `service`, if there is one.

    While it names one of CHT's own services, CHT's API sends every `pending` and
    `forwarded-to-gateway` message itself (or hands it to medic-gateway phones), including the
    ones this daemon has claimed: each SMS could go out twice. Only an operator can know that
    no CHT API serves the database, so only `CHT_RAPIDPRO_NO_CHT_API=true` allows it.
    """
    if service not in CHT_OUTGOING_SERVICES or no_cht_api:
        return None
    return (
        f"{PREFIX}SERVICE: {service!r} is one of CHT's own outgoing services: while "
        f"sms.outgoing_service is {service!r}, CHT's API sends every pending message itself, "
        f"so this daemon would send each one a second time. Leave {PREFIX}SERVICE at its "
        f"default 'cht-rapidpro' and set sms.outgoing_service to 'cht-rapidpro' in the app "
        f"settings (CHT then sends nothing; its incoming webhooks keep working). Only if no "
        f"CHT API serves this database, set {PREFIX}NO_CHT_API=true"
    )


DEFAULTS = {item.name: item.default for item in fields(Settings) if item.default is not MISSING}
_REQUIRED = frozenset(item.name for item in fields(Settings) if item.name not in DEFAULTS)
