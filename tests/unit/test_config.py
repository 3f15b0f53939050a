"""config: Settings from an env mapping (and a TOML file), every problem reported at once."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from cht_rapidpro.config import (
    OPTIONS,
    PREFIX,
    Bounded,
    CouchTarget,
    Settings,
    check_listen_address,
    parse_couch_url,
)
from cht_rapidpro.errors import ConfigError

COUCH = "http://admin:s3cret@127.0.0.1:5984/medic"
BASE = {"COUCH_URL": COUCH}


def problems(env: dict[str, str], file_values: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env, file_values)
    return raised.value.problems


# --------------------------------------------------------------------------- defaults


def test_minimal_env_gives_documented_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.couch == CouchTarget(
        server=URL("http://127.0.0.1:5984/"), db="medic", user="admin", password="s3cret"
    )
    assert settings.listen_host == "127.0.0.1"
    assert settings.listen_port == 5989
    # Not one of CHT's own services: CHT's API stays idle while the daemon sends (issue 12).
    assert settings.service == "cht-rapidpro"
    assert settings.no_cht_api is False
    assert settings.instance == f"{socket.gethostname()}:5989"
    assert settings.poll_interval_s == 60.0
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    assert settings.send_concurrency == 16
    assert settings.send_timeout_s == 20.0
    assert settings.claim_ttl_s == 120.0
    # Below RapidPro's per-workspace rates (rapidpro-api §1.6: 2500-3600/h messages).
    assert 0 < settings.messages_per_hour <= 2500
    assert 0 < settings.broadcasts_per_hour <= 3600
    # Keep a claim alive well beyond one send attempt (OPTIONS help text).
    assert settings.claim_ttl_s >= 2 * settings.send_timeout_s


def test_unrelated_environment_is_ignored() -> None:
    env = {**BASE, "PATH": "/usr/bin", "HOME": "/root", "CHT_RAPIDPRO_UNKNOWN": "x"}
    assert Settings.from_env(env) == Settings.from_env(BASE)


@pytest.mark.parametrize(
    ("var", "raw", "attribute", "expected"),
    [
        ("HOST", "0.0.0.0", "listen_host", "0.0.0.0"),  # noqa: S104
        ("PORT", "6000", "listen_port", 6000),
        ("PORT", " 6000 ", "listen_port", 6000),
        ("SERVICE", "textit-daemon", "service", "textit-daemon"),
        ("NO_CHT_API", "true", "no_cht_api", True),
        ("NO_CHT_API", "No", "no_cht_api", False),
        ("INSTANCE", "replica-a", "instance", "replica-a"),
        ("POLL_INTERVAL", "2.5", "poll_interval_s", 2.5),
        ("LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("LOG_FORMAT", "json", "log_format", "json"),
        ("SEND_CONCURRENCY", "4", "send_concurrency", 4),
        ("SEND_TIMEOUT", "30", "send_timeout_s", 30.0),
        ("CLAIM_TTL", "300", "claim_ttl_s", 300.0),
        ("BROADCASTS_PER_HOUR", "0", "broadcasts_per_hour", 0),
        ("MESSAGES_PER_HOUR", "1250", "messages_per_hour", 1250),
        ("SENT_GRACE", "3600", "sent_grace_s", 3600.0),
        ("MAX_TRACKING", "86400", "max_tracking_s", 86400.0),
        ("CLOCK_SKEW", "0", "clock_skew_s", 0.0),
        ("CREDENTIALS_REFRESH", "15", "credentials_refresh_s", 15.0),
        ("CHECKPOINT_INTERVAL", "0.5", "checkpoint_interval_s", 0.5),
        ("FEED_BATCH", "100", "feed_batch", 100),
        ("FEED_HEARTBEAT", "5", "feed_heartbeat_s", 5.0),
        ("COUCH_TIMEOUT", "10", "couch_timeout_s", 10.0),
        ("RETRY_MAX", "60", "retry_max_s", 60.0),
        ("SHUTDOWN_GRACE", "3", "shutdown_grace_s", 3.0),
        ("WEBHOOK_MAX_BYTES", "1024", "webhook_max_bytes", 1024),
        ("WEBHOOK_TIMEOUT", "5", "webhook_timeout_s", 5.0),
        ("HOST", "::1", "listen_host", "::1"),
        ("HOST", "cht-gateway.example.org", "listen_host", "cht-gateway.example.org"),
        ("POLL_INTERVAL", "1e2", "poll_interval_s", 100.0),
        ("PORT", "+6000", "listen_port", 6000),
    ],
    ids=lambda value: str(value) if isinstance(value, str) and value.isupper() else None,
)
def test_each_option_is_parsed(var: str, raw: str, attribute: str, expected: Any) -> None:
    settings = Settings.from_env({**BASE, PREFIX + var: raw})
    assert getattr(settings, attribute) == expected


def test_default_instance_follows_the_port() -> None:
    settings = Settings.from_env({**BASE, "CHT_RAPIDPRO_PORT": "6001"})
    assert settings.instance == f"{socket.gethostname()}:6001"


def test_every_option_reads_the_documented_variable() -> None:
    """Each setting has one env variable with the prefix (COUCH_URL keeps CHT's own name)."""
    names = [option.env for option in OPTIONS]
    assert len(set(names)) == len(names)
    assert names[0] == "COUCH_URL"
    assert all(name.startswith(PREFIX) for name in names[1:])
    assert all(option.help for option in OPTIONS)


# --------------------------------------------------------------------------- COUCH_URL


@pytest.mark.parametrize(
    ("url", "server", "db"),
    [
        ("http://admin:pass@127.0.0.1:5984/medic", "http://127.0.0.1:5984/", "medic"),
        ("http://admin:pass@127.0.0.1:5984/medic/", "http://127.0.0.1:5984/", "medic"),
        (
            "https://admin:pass@cht.example.org/couch/medic",
            "https://cht.example.org/couch",
            "medic",
        ),
        ("  http://admin:pass@couch:5984/other-db  ", "http://couch:5984/", "other-db"),
        ("http://admin:pass@couch:5984/medic?x=1#f", "http://couch:5984/", "medic"),
    ],
    ids=["plain", "trailing-slash", "path-prefix", "whitespace", "query-and-fragment-dropped"],
)
def test_parse_couch_url(url: str, server: str, db: str) -> None:
    target = parse_couch_url(url)
    assert str(target.server) == server
    assert target.db == db
    assert target.vault_db == f"{db}-vault"
    assert (target.user, target.password) == ("admin", "pass")
    assert "pass" not in target.redacted
    assert target.redacted.endswith("/" + db)


def test_couch_url_is_required() -> None:
    (problem,) = problems({})
    assert problem.startswith("COUCH_URL: required")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("localhost:5984", "is not an http(s) URL"),
        ("ftp://admin:pass@host/medic", "is not an http(s) URL"),
        ("http://admin:pass@host:5984", "has no database name"),
        ("http://admin:pass@host:5984/", "has no database name"),
        ("http://host:5984/medic", "has no credentials"),
        ("http://admin@host:5984/medic", "has no credentials"),
        ("", "is not an http(s) URL"),
    ],
    ids=["no-scheme", "ftp", "no-db", "root-only", "no-credentials", "no-password", "empty"],
)
def test_bad_couch_url(url: str, fragment: str) -> None:
    (problem,) = problems({"COUCH_URL": url})
    assert problem.startswith("COUCH_URL: ")
    assert fragment in problem


def test_password_never_appears_in_errors_or_repr() -> None:
    (problem,) = problems({"COUCH_URL": "ftp://admin:s3cret@host/medic"})
    assert "s3cret" not in problem
    settings = Settings.from_env(BASE)
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.redacted())
    assert settings.redacted()["couch"] == "http://127.0.0.1:5984/medic"


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("PORT", "5989.5"),
        ("HOST", "   "),
        ("SERVICE", ""),
        ("NO_CHT_API", "maybe"),
        ("POLL_INTERVAL", "0"),
        ("POLL_INTERVAL", "-1"),
        ("POLL_INTERVAL", "nan"),
        ("POLL_INTERVAL", "inf"),
        ("POLL_INTERVAL", "1m"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("SEND_CONCURRENCY", "0"),
        ("SEND_CONCURRENCY", "1.5"),
        ("BROADCASTS_PER_HOUR", "-1"),
        ("MESSAGES_PER_HOUR", "lots"),
        ("CLOCK_SKEW", "-0.1"),
        ("FEED_BATCH", "0"),
        ("WEBHOOK_MAX_BYTES", "64k"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.isupper() else repr(value),
)
def test_invalid_value_is_reported_with_its_variable(var: str, raw: str) -> None:
    (problem,) = problems({**BASE, PREFIX + var: raw})
    assert problem.startswith(f"{PREFIX}{var}: ")


def test_all_problems_are_reported_at_once() -> None:
    env = {
        "CHT_RAPIDPRO_PORT": "abc",
        "CHT_RAPIDPRO_LOG_LEVEL": "verbose",
        "CHT_RAPIDPRO_POLL_INTERVAL": "0",
    }
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    found = raised.value.problems
    assert len(found) == 4
    assert [p.split(":", 1)[0] for p in found] == [
        "COUCH_URL",
        "CHT_RAPIDPRO_PORT",
        "CHT_RAPIDPRO_POLL_INTERVAL",
        "CHT_RAPIDPRO_LOG_LEVEL",
    ]
    message = str(raised.value)
    assert message.startswith("configuration error (4 problems):\n")
    assert all(f"\n  {p}" in message for p in found)


def test_single_problem_message_is_singular() -> None:
    with pytest.raises(ConfigError, match=r"^configuration error \(1 problem\):\n  COUCH_URL"):
        Settings.from_env({})


# --------------------------------------------------------------------------- two senders

CHT_SERVICES = ["rapidpro", "africas-talking", "nepal-doit-sms", "medic-gateway"]


@pytest.mark.parametrize("service", CHT_SERVICES)
def test_a_service_of_chts_own_is_refused(service: str) -> None:
    """CHT's API sends every pending message itself while sms.outgoing_service names one of
    its services: the daemon beside it would send them all a second time (issue 12)."""
    (problem,) = problems({**BASE, "CHT_RAPIDPRO_SERVICE": service})
    assert problem.startswith(f"CHT_RAPIDPRO_SERVICE: {service!r} is one of CHT's own ")
    assert "CHT_RAPIDPRO_NO_CHT_API=true" in problem and "'cht-rapidpro'" in problem


@pytest.mark.parametrize("service", CHT_SERVICES)
def test_a_service_of_chts_own_is_allowed_where_no_cht_api_runs(service: str) -> None:
    env = {**BASE, "CHT_RAPIDPRO_SERVICE": service, "CHT_RAPIDPRO_NO_CHT_API": "true"}
    settings = Settings.from_env(env)
    assert (settings.service, settings.no_cht_api, settings.second_sender) == (service, True, None)


def test_the_diagnosis_may_load_a_second_sender_to_report_it() -> None:
    env = {**BASE, "CHT_RAPIDPRO_SERVICE": "rapidpro"}
    settings = Settings.from_env(env, allow_second_sender=True)
    assert settings.second_sender is not None
    assert settings.second_sender == problems(env)[0]


# --------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("COUCH_URL", "http://admin:CHANGE_ME@127.0.0.1:5984/medic"),
        ("COUCH_URL", "http://admin:change_me@127.0.0.1:5984/medic"),
        ("CHT_RAPIDPRO_INSTANCE", "CHANGE_ME"),
        ("CHT_RAPIDPRO_SERVICE", "Change_Me"),
    ],
    ids=["change-me", "lower-case", "instance", "mixed-case"],
)
def test_placeholders_are_rejected(var: str, raw: str) -> None:
    env = {**BASE, var: raw}
    (problem,) = problems(env)
    assert problem == f"{var}: still holds the placeholder from the example file"
    assert raw not in problem  # the value itself (possibly a secret) is not echoed


# --------------------------------------------------------------------------- _FILE variants


def test_file_variant_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "couch_url"
    secret.write_text(COUCH + "\n", encoding="utf-8")
    settings = Settings.from_env({"COUCH_URL_FILE": str(secret)})
    assert settings.couch.password == "s3cret"
    assert settings.couch.db == "medic"


def test_file_variant_for_a_prefixed_option(tmp_path: Path) -> None:
    path = tmp_path / "instance"
    path.write_text("replica-b\n", encoding="utf-8")
    settings = Settings.from_env({**BASE, "CHT_RAPIDPRO_INSTANCE_FILE": str(path)})
    assert settings.instance == "replica-b"


def test_missing_file_is_a_problem_naming_the_file_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    (problem,) = problems({"COUCH_URL_FILE": str(missing)})
    assert problem.startswith(f"COUCH_URL_FILE: {missing}: ")
    assert "No such file" in problem


def test_file_content_is_validated_under_the_file_variable(tmp_path: Path) -> None:
    path = tmp_path / "couch_url"
    path.write_text("localhost:5984", encoding="utf-8")
    (problem,) = problems({"COUCH_URL_FILE": str(path)})
    assert problem.startswith("COUCH_URL_FILE: ")
    assert "is not an http(s) URL" in problem


def test_real_values_with_angle_brackets_are_accepted() -> None:
    settings = Settings.from_env({**BASE, "COUCH_URL": "http://admin:p<a>ss@127.0.0.1:5984/medic"})
    assert settings.couch.password == "p<a>ss"


def test_placeholder_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "couch_url"
    path.write_text("http://admin:CHANGE_ME@127.0.0.1:5984/medic\n", encoding="utf-8")
    (problem,) = problems({"COUCH_URL_FILE": str(path)})
    assert problem == "COUCH_URL_FILE: still holds the placeholder from the example file"


# --------------------------------------------------------------------------- TOML file


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cht-rapidpro.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toml_file_fills_settings(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        f'couch_url = "{COUCH}"\nport = 6002\npoll_interval = 30.5\nlog_format = "logfmt"\n',
    )
    settings = Settings.load(config, env={})
    assert settings.couch.db == "medic"
    assert settings.listen_port == 6002
    assert settings.poll_interval_s == 30.5
    assert settings.log_format == "logfmt"


def test_env_wins_over_toml_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'couch_url = "http://a:b@file-host:5984/filedb"\nport = 6002\n')
    settings = Settings.load(config, env={**BASE, "CHT_RAPIDPRO_PORT": "7000"})
    assert settings.couch.db == "medic"
    assert settings.couch.server.host == "127.0.0.1"
    assert settings.listen_port == 7000


def test_file_variable_wins_over_toml_file(tmp_path: Path) -> None:
    secret = tmp_path / "couch_url"
    secret.write_text(COUCH, encoding="utf-8")
    config = write_toml(tmp_path, 'couch_url = "http://a:b@file-host:5984/filedb"\n')
    settings = Settings.load(config, env={"COUCH_URL_FILE": str(secret)})
    assert settings.couch.db == "medic"


def test_toml_problems_name_the_file_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'port = "abc"\npoll_interval = 0\nsurprise = 1\n')
    found = problems_from_load(config, BASE)
    assert [p.split(":", 1)[0] for p in found] == [
        "port (config file)",
        "poll_interval (config file)",
        "surprise (config file)",
    ]
    assert found[-1] == "surprise (config file): unknown setting"


def test_toml_placeholder_rejected(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'couch_url = "http://admin:CHANGE_ME@host:5984/medic"\n')
    (problem,) = problems_from_load(config, {})
    assert problem == "couch_url (config file): still holds the placeholder from the example file"


def test_toml_missing_couch_url_and_env_missing_is_required(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "port = 6002\n")
    (problem,) = problems_from_load(config, {})
    assert problem.startswith("COUCH_URL: required")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    (problem,) = problems_from_load(str(missing), BASE)
    assert problem.startswith(f"--config {missing}: ")


def test_invalid_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "port = = 6002\n")
    (problem,) = problems_from_load(config, BASE)
    assert problem.startswith(f"--config {config}: not valid TOML")


def test_load_without_config_file_reads_the_given_env() -> None:
    assert Settings.load(None, env=BASE) == Settings.from_env(BASE)


def problems_from_load(config: str, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        Settings.load(config, env=env)
    return raised.value.problems


def test_settings_are_frozen() -> None:
    settings = Settings.from_env(BASE)
    with pytest.raises(AttributeError):
        settings.listen_port = 1  # type: ignore[misc]


def test_claim_ttl_must_outlive_a_send() -> None:
    env = {**BASE, "CHT_RAPIDPRO_CLAIM_TTL": "30", "CHT_RAPIDPRO_SEND_TIMEOUT": "20"}
    (problem,) = problems(env)
    assert problem.startswith("CHT_RAPIDPRO_CLAIM_TTL (30) must be at least twice")


# --------------------------------------------------------------------------- bounds (item 3)


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        # Accepted by check-config, then crashed `run` (exit 1 or 70, a systemd restart loop).
        ("CLOCK_SKEW", "nan"),
        ("CLOCK_SKEW", "inf"),
        ("CLOCK_SKEW", "1e300"),
        ("CLAIM_TTL", "1e300"),
        ("MAX_TRACKING", "1e300"),
        ("SENT_GRACE", "1e300"),
        ("POLL_INTERVAL", "1e308"),
        ("PORT", "0"),
        # Python's int() and float() take these; no operator means them.
        ("PORT", "\u0665\u0669\u0668\u0669"),  # Arabic-Indic 5989
        ("SEND_CONCURRENCY", "\u0661\u0666"),
        ("POLL_INTERVAL", "1_0"),
        ("FEED_BATCH", "1_000"),
        ("POLL_INTERVAL", "0x10"),
        ("CLOCK_SKEW", "-nan"),
        ("PORT", "9" * 5000),  # beyond int()'s digit limit
        # The remaining upper bounds.
        ("SEND_CONCURRENCY", "100000"),
        ("SEND_TIMEOUT", "301"),
        ("BROADCASTS_PER_HOUR", "1e9"),
        ("MESSAGES_PER_HOUR", "10000000"),
        ("CREDENTIALS_REFRESH", "1e10"),
        ("CHECKPOINT_INTERVAL", "0"),
        ("FEED_HEARTBEAT", "60"),  # a quiet long poll (6 heartbeats) would starve the watchdog
        ("COUCH_TIMEOUT", "1e6"),
        ("RETRY_MAX", "1e300"),
        ("SHUTDOWN_GRACE", "30"),  # beyond the unit's TimeoutStopSec=20
        ("WEBHOOK_MAX_BYTES", "10"),
        ("WEBHOOK_TIMEOUT", "15"),  # RapidPro has given up by then
        ("WEBHOOK_TIMEOUT", "0"),
        ("INSTANCE", "replica\na"),
        ("INSTANCE", "x" * 201),
        ("SERVICE", "cht\trapidpro"),
    ],
    ids=lambda value: value[:20] if isinstance(value, str) else None,
)
def test_values_run_cannot_use_are_refused(var: str, raw: str) -> None:
    (problem,) = problems({**BASE, PREFIX + var: raw})
    assert problem.startswith(f"{PREFIX}{var}: ")
    assert len(problem) < 300  # a huge value is not echoed in full


def test_a_number_out_of_range_says_the_range() -> None:
    (problem,) = problems({**BASE, "CHT_RAPIDPRO_CLOCK_SKEW": "1e300"})
    assert problem == (
        "CHT_RAPIDPRO_CLOCK_SKEW: '1e300' is out of range: must be from 0 to 86400 seconds"
    )
    (problem,) = problems({**BASE, "CHT_RAPIDPRO_PORT": "\u0665\u0669\u0668\u0669"})
    assert problem.endswith("is not a whole number (digits 0-9)")


NOT_NUMBERS = {
    "couch",
    "couch_ca_file",
    "listen_host",
    "service",
    "no_cht_api",
    "instance",
    "log_level",
    "log_format",
    "mirror_outgoing",
    "incoming_flows",
    "incoming_id",
}


def test_every_number_setting_has_bounds() -> None:
    for option in OPTIONS:
        if option.name in NOT_NUMBERS:
            continue
        assert isinstance(option.parse, Bounded), option.env
        # Both ends are valid settings.
        for end in (option.parse.low, option.parse.high):
            text = str(int(end)) if option.parse.whole else repr(float(end))
            env = {**BASE, option.env: text}
            if option.name == "claim_ttl_s":
                env[PREFIX + "SEND_TIMEOUT"] = "0.5"
            if option.name == "send_timeout_s":
                env[PREFIX + "CLAIM_TTL"] = "600"
            assert getattr(Settings.from_env(env), option.name) == end


def test_toml_numbers_get_the_same_bounds(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "clock_skew = nan\nsent_grace = 1e300\nport = 0\n")
    found = problems_from_load(config, BASE)
    assert [p.split(":", 1)[0] for p in found] == [
        "port (config file)",
        "sent_grace (config file)",
        "clock_skew (config file)",
    ]


# ------------------------------------------------------------------------ listen address (item 6)


@pytest.mark.parametrize(
    "host",
    ["999.1.1.1", "1.2.3", "256.256.256.256", "bad host", "-leading.example", "a..b", "[::1]"],
)
def test_a_host_that_is_neither_an_address_nor_a_name_is_refused(host: str) -> None:
    (problem,) = problems({**BASE, "CHT_RAPIDPRO_HOST": host})
    assert problem.startswith("CHT_RAPIDPRO_HOST: ")
    assert "neither an IP address nor a host name" in problem


def test_listen_address_check() -> None:
    assert check_listen_address("127.0.0.1", 5989) == []
    assert check_listen_address("0.0.0.0", 5989) == []  # noqa: S104
    assert check_listen_address("localhost", 5989) == []
    (problem,) = check_listen_address("no-such-host.invalid", 5989)  # RFC 6761: never resolves
    assert problem.startswith("CHT_RAPIDPRO_HOST: 'no-such-host.invalid' does not resolve")
    (problem,) = check_listen_address("192.0.2.1", 5989)  # TEST-NET-1: not this machine's
    assert "cannot be listened on" in problem and "Cannot assign requested address" in problem


def test_listen_address_check_ignores_a_daemon_on_the_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert check_listen_address("127.0.0.1", busy.getsockname()[1]) == []


# ------------------------------------------------------------------------ encodings (item 4)


def test_a_settings_file_that_is_not_utf8_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "couch_url"
    path.write_bytes(b"http://admin:s\xe9cret@127.0.0.1:5984/medic\n")  # latin-1 e-acute
    (problem,) = problems({"COUCH_URL_FILE": str(path)})
    assert problem == (
        f"COUCH_URL_FILE: {path} is not UTF-8 text (byte 0xe9 at offset 14): save it as UTF-8"
    )
    assert "cret" not in problem  # never the content: it holds a password


def test_a_utf16_settings_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "couch_url"
    path.write_bytes(COUCH.encode("utf-16"))  # with its byte-order mark
    (problem,) = problems({"COUCH_URL_FILE": str(path)})
    assert problem == (
        f"COUCH_URL_FILE: {path} is UTF-16 text (it starts with a UTF-16 byte-order mark): "
        "save it as UTF-8"
    )


def test_a_utf8_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "couch_url"
    path.write_bytes(b"\xef\xbb\xbf" + COUCH.encode())
    assert Settings.from_env({"COUCH_URL_FILE": str(path)}).couch.password == "s3cret"
    config = tmp_path / "f.toml"
    config.write_bytes(b"\xef\xbb\xbfport = 6002\n")
    assert Settings.load(str(config), env=BASE).listen_port == 6002


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'poll_interval = 30\ninstance = "caf\xe9"\n', "is not UTF-8 text (byte 0xe9 at offset"),
        ("port = 6002\n".encode("utf-16"), "is UTF-16 text"),
    ],
    ids=["latin-1", "utf-16"],
)
def test_a_toml_file_that_is_not_utf8(tmp_path: Path, content: bytes, expected: str) -> None:
    config = tmp_path / "f.toml"
    config.write_bytes(content)
    (problem,) = problems_from_load(str(config), BASE)
    assert problem.startswith(f"--config {config} {expected}")


def test_an_environment_value_that_is_not_utf8(tmp_path: Path) -> None:
    # os.environ keeps undecodable bytes as lone surrogates (PEP 383).
    raw = b"http://admin:s\xe9cret@127.0.0.1:5984/medic".decode("utf-8", "surrogateescape")
    (problem,) = problems({"COUCH_URL": raw})
    assert problem == "COUCH_URL: is not valid UTF-8 text (an undecodable byte at character 14)"


# ------------------------------------------------------------------------ COUCH_URL (item 10)


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:x/Secret@127.0.0.1:5984/medic",
        "http://admin:x#Secret@127.0.0.1:5984/medic",
        "http://admin:x?Secret@127.0.0.1:5984/medic",
        "http://admin:12/9876@127.0.0.1:5984/medic",  # parses, as host 'admin' and port 12
    ],
    ids=["slash", "hash", "question-mark", "digits-then-slash"],
)
def test_an_unencoded_character_in_the_password_says_percent_encode(url: str) -> None:
    (problem,) = problems({"COUCH_URL": url})
    assert problem.startswith("COUCH_URL: ")
    assert "must be percent-encoded ('/' as %2F, '?' as %3F, '#' as %23, '@' as %40)" in problem
    assert "Secret" not in problem and "9876" not in problem  # nothing of the password
    assert "port can't" not in problem


def test_a_percent_encoded_password_is_decoded() -> None:
    target = parse_couch_url("http://admin:pa%2Fs%23s%3F%40@127.0.0.1:5984/medic")
    assert target.password == "pa/s#s?@"
    assert target.db == "medic"
