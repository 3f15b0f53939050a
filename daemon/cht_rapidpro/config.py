"""The daemon's own settings: environment variables, optionally a TOML file, validated at once.

CHT-side configuration (app settings, credentials) is *not* here: it lives in CouchDB where CHT
keeps it and is read at run time (see `chtconfig`). The environment holds only what the
daemon needs to reach CouchDB and to run.
"""

from __future__ import annotations

import os
import socket
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
    url = URL(value.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{_redact(value)!r} is not an http(s) URL")
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


def _redact(value: str) -> str:
    try:
        url = URL(value)
        return str(url.with_password("***")) if url.password else value
    except ValueError:
        return "<unparseable>"


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _positive_float(text: str) -> float:
    number = _float(text)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"{text!r} must be a number greater than 0")
    return number


def _non_negative_float(text: str) -> float:
    number = _float(text)
    if number < 0:
        raise ValueError(f"{text!r} must be 0 or more")
    return number


def _positive_int(text: str) -> int:
    number = _int(text)
    if number <= 0:
        raise ValueError(f"{text!r} must be a whole number greater than 0")
    return number


def _non_negative_int(text: str) -> int:
    number = _int(text)
    if number < 0:
        raise ValueError(f"{text!r} must be a whole number, 0 or more")
    return number


def _port(text: str) -> int:
    number = _int(text)
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r} is not a TCP port")
    return number


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _flow_uuids(text: str) -> tuple[str, ...]:
    flows = []
    for part in text.strip().strip("[]").split(","):  # a TOML list arrives as "['a', 'b']"
        value = part.strip().strip("'\"").lower()
        if not value:
            continue
        try:
            flows.append(str(uuid.UUID(value)))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a flow uuid") from None
    return tuple(dict.fromkeys(flows))


def _non_empty(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


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
        "listen_host",
        PREFIX + "HOST",
        _non_empty,
        "Address of the webhook/health/metrics listener.",
    ),
    Option("listen_port", PREFIX + "PORT", _port, "Port of that listener."),
    Option(
        "service",
        PREFIX + "SERVICE",
        _non_empty,
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
        _non_empty,
        "This daemon's name in its claims; must be unique per replica (default: hostname:port).",
    ),
    Option(
        "poll_interval_s",
        PREFIX + "POLL_INTERVAL",
        _positive_float,
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
        _positive_int,
        "Broadcast POSTs in flight at once.",
    ),
    Option(
        "send_timeout_s",
        PREFIX + "SEND_TIMEOUT",
        _positive_float,
        "Seconds before a RapidPro request is abandoned (then looked up before any resend).",
    ),
    Option(
        "claim_ttl_s",
        PREFIX + "CLAIM_TTL",
        _positive_float,
        "Seconds after which another replica's unfinished claim is taken over. "
        "Keep it well above twice SEND_TIMEOUT.",
    ),
    Option(
        "broadcasts_per_hour",
        PREFIX + "BROADCASTS_PER_HOUR",
        _non_negative_int,
        "Client-side budget for RapidPro's broadcasts throttle scope (0: no limit). "
        "TextIt allows 3600/h shared with other endpoints; community RapidPro 36000/h.",
    ),
    Option(
        "messages_per_hour",
        PREFIX + "MESSAGES_PER_HOUR",
        _non_negative_int,
        "Client-side budget for the v2.messages scope used by status polling (0: no limit). "
        "RapidPro allows 2500/h (TextIt 3600/h) per workspace.",
    ),
    Option(
        "sent_grace_s",
        PREFIX + "SENT_GRACE",
        _positive_float,
        "Stop polling a message left in 'sent' (no delivery report) after this many seconds.",
    ),
    Option(
        "max_tracking_s",
        PREFIX + "MAX_TRACKING",
        _positive_float,
        "Stop polling any message after this many seconds (RapidPro fails stale ones at 7 days).",
    ),
    Option(
        "clock_skew_s",
        PREFIX + "CLOCK_SKEW",
        _non_negative_float,
        "Allowance for clock differences between this host and RapidPro in time windows.",
    ),
    Option(
        "credentials_refresh_s",
        PREFIX + "CREDENTIALS_REFRESH",
        _positive_float,
        "Seconds between re-reads of the RapidPro credentials from CouchDB.",
    ),
    Option(
        "checkpoint_interval_s",
        PREFIX + "CHECKPOINT_INTERVAL",
        _positive_float,
        "At most this many seconds between saves of the feed position.",
    ),
    Option("feed_batch", PREFIX + "FEED_BATCH", _positive_int, "Changes read per feed request."),
    Option(
        "feed_heartbeat_s",
        PREFIX + "FEED_HEARTBEAT",
        _positive_float,
        "Heartbeat asked of CouchDB on the changes feed; a silent feed is reconnected "
        "after twice this.",
    ),
    Option(
        "couch_timeout_s",
        PREFIX + "COUCH_TIMEOUT",
        _positive_float,
        "Seconds before an ordinary CouchDB request is abandoned and retried.",
    ),
    Option(
        "retry_max_s",
        PREFIX + "RETRY_MAX",
        _positive_float,
        "Longest wait between retries of a failing dependency.",
    ),
    Option(
        "shutdown_grace_s",
        PREFIX + "SHUTDOWN_GRACE",
        _positive_float,
        "On SIGTERM, seconds allowed to finish in-flight sends before they are cancelled.",
    ),
    Option(
        "webhook_max_bytes",
        PREFIX + "WEBHOOK_MAX_BYTES",
        _positive_int,
        "Largest incoming-webhook body accepted (413 above).",
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
        _non_negative_float,
        "Seconds a message read from RapidPro's log waits before it is mirrored or "
        "recovered; keep it above RapidPro's 15 s webhook timeout plus COUCH_TIMEOUT.",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated daemon settings. Build with `Settings.load()` or `Settings.from_env()`."""

    couch: CouchTarget
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
                    raw = Path(file_env).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    problems.append(f"{source}: {file_env}: {exc.strerror or exc}")
                    continue
            from_file = file_values.pop(key, None)
            if raw is None and from_file is not None:
                source = f"{key} (config file)"
                raw = str(from_file).lower() if isinstance(from_file, bool) else str(from_file)
            if raw is None:
                if option.name in _REQUIRED:
                    problems.append(f"{option.env}: required ({option.help})")
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
                with open(config_file, "rb") as handle:
                    file_values = tomllib.load(handle)
            except OSError as exc:
                raise ConfigError([f"--config {config_file}: {exc.strerror or exc}"]) from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError([f"--config {config_file}: not valid TOML: {exc}"]) from exc
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
