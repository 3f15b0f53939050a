"""The `cht-rapidpro` command line: argparse only; the operations commands live in `commands`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, logs
from .commands import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
    run_check,
    run_parse,
    run_parse_rapidpro,
    run_send,
    run_status,
)
from .config import DEFAULTS, OPTIONS, Bounded, Settings, check_listen_address
from .errors import ConfigError

EXIT_CODES = f"""exit codes:
  {EX_OK}   all well
  {EX_FAILED}   a check failed, or the message failed
  {EX_USAGE}  wrong arguments
  {EX_UNAVAILABLE}  a dependency (CouchDB) cannot be reached
  {EX_SOFTWARE}  run: a bug (please report the log); systemd restarts the daemon
  {EX_OSERR}  run: the listener's port is taken; systemd retries
  {EX_TEMPFAIL}  send: no final state within --timeout
  {EX_CONFIG}  configuration error (settings, COUCH_URL credentials or database name,
      a listen address that is not this machine's); systemd does not restart on it"""


CONFIG_HELP = "TOML file with settings (environment variables win)"


def _wrap(text: str) -> str:
    """A description paragraph for RawDescriptionHelpFormatter (which keeps line breaks)."""
    return textwrap.fill(text, width=79)


class _Parser(argparse.ArgumentParser):
    """argparse with sysexits' EX_USAGE (64) for usage errors instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(args.config)
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _command_settings(args: argparse.Namespace, *, diagnose: bool = False) -> Settings:
    """Settings for an operations command: the same as `run`, logs (if any) on stderr.

    `diagnose` (check) also loads a configuration that would make a second sender beside
    CHT's own, which `run` refuses: the diagnosis shows it as a failing row with its fix.
    """
    settings = Settings.load(args.config, allow_second_sender=diagnose)
    level = settings.log_level
    if logs.LEVELS[level] < logs.LEVELS["warning"]:
        level = "warning"  # stdout is the command's output; only problems go to stderr
    logs.configure(level, settings.log_format, stream=sys.stderr)
    return settings


def _listenable(settings: Settings) -> None:
    """A listen address that cannot work is a configuration error (78), not a busy port."""
    problems = check_listen_address(settings.listen_host, settings.listen_port)
    if problems:
        raise ConfigError(problems)


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve

    settings = _settings(args)
    _listenable(settings)
    return asyncio.run(serve(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    _listenable(settings)
    print(json.dumps(settings.redacted(), indent=2, default=str))
    return EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    settings = _command_settings(args, diagnose=True)
    return asyncio.run(run_check(settings, out=sys.stdout, as_json=args.json))


def cmd_send(args: argparse.Namespace) -> int:
    settings = _command_settings(args)
    return asyncio.run(
        run_send(
            settings,
            to=args.to,
            text=args.text,
            timeout_s=args.timeout,
            sent_by=args.sent_by,
            sender_phone=args.sender,
            out=sys.stdout,
            err=sys.stderr,
        )
    )


def cmd_parse(args: argparse.Namespace) -> int:
    if args.rapidpro_message is not None:
        return asyncio.run(
            run_parse_rapidpro(
                _command_settings(args),
                message_id=args.rapidpro_message,
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    if args.message is None:
        raise CommandError("give the SMS text (MESSAGE) or --rapidpro-message ID", EX_USAGE)
    # With --app-settings the database is not needed, nor COUCH_URL.
    settings = None if args.app_settings else _command_settings(args)
    return asyncio.run(
        run_parse(
            settings,
            message=args.message,
            sender=args.sender,
            message_id=args.id,
            locale=args.locale,
            app_settings_file=args.app_settings,
            out=sys.stdout,
            err=sys.stderr,
        )
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = _command_settings(args)
    return asyncio.run(run_status(settings, out=sys.stdout, as_json=args.json))


def _epilog() -> str:
    lines = ["settings (environment variables; also keys of a --config TOML file):"]
    for option in OPTIONS:
        default = DEFAULTS.get(option.name)
        notes = [option.parse.describe()] if isinstance(option.parse, Bounded) else []
        if default not in (None, ""):
            notes.append(f"default: {default}")
        shown = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {option.env}\n      {option.help}{shown}")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds greater than 0")
    return value


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_commands(commands: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    check = commands.add_parser(
        "check",
        help="diagnose the set-up: CouchDB, CHT settings and credentials, RapidPro, the daemon",
        description=_wrap(
            "Check everything the daemon needs, one row per check (ok, FAIL, warn, or skip "
            "when an earlier check failed), with the fix for every problem: CouchDB reachable "
            "and an admin, the medic db, CHT's app settings (sms.outgoing_service, "
            "sms.rapidpro.url, default_country_code, phone_validation), the credentials "
            "rapidpro:outgoing and rapidpro:incoming (CHT 4.x vault or 3.x config), RapidPro "
            "and its token (one GET), and a running daemon's /healthz (warn only if none "
            "runs). Nothing is written; no secret is printed."
        ),
        epilog=(
            f"exit codes:\n  {EX_OK}   every check passed (warnings allowed)\n"
            f"  {EX_FAILED}   at least one check failed\n  {EX_USAGE}  wrong arguments\n"
            f"  {EX_CONFIG}  the daemon's own settings are invalid"
        ),
        formatter_class=raw,
    )
    check.add_argument("--json", action="store_true", help="print the checks as JSON")
    check.set_defaults(func=cmd_check)

    send = commands.add_parser(
        "send",
        help="write an outgoing SMS as CHT's web app does and follow its states",
        description=_wrap(
            "Create an outgoing message the way CHT's web app does (a data_record with one "
            "pending task; the number normalised with the app settings), then print each "
            "state it goes through (pending → forwarded-to-gateway → received-by-gateway → "
            "… → delivered) until a final one or the timeout. This command does not send: "
            "a running daemon (or CHT) does."
        ),
        epilog=(
            f"exit codes:\n  {EX_OK}   delivered\n"
            f"  {EX_FAILED}   failed (or denied, duplicate, cleared, muted: never sent)\n"
            f"  {EX_USAGE}  wrong arguments\n"
            f"  {EX_UNAVAILABLE}  CouchDB cannot be reached\n"
            f"  {EX_TEMPFAIL}  no final state within --timeout: the message may still go out\n"
            f"  {EX_CONFIG}  configuration error (settings, COUCH_URL credentials or db name)"
        ),
        formatter_class=raw,
    )
    send.add_argument("--to", required=True, type=_non_empty, metavar="PHONE", help="recipient")
    send.add_argument("--text", required=True, type=_non_empty, help="the message text")
    send.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="seconds to wait for delivered/failed (default: 60)",
    )
    send.add_argument(
        "--sent-by",
        default="cht-rapidpro",
        metavar="NAME",
        help="the sender's name, as CHT's sent_by (default: cht-rapidpro)",
    )
    send.add_argument(
        "--from",
        dest="sender",
        metavar="PHONE",
        help="the sender's own phone, as CHT's from (default: none)",
    )
    send.set_defaults(func=cmd_send)

    parse = commands.add_parser(
        "parse",
        help="print the report an incoming SMS would become (nothing is written)",
        description=_wrap(
            "Print, as indented JSON, the report document an incoming SMS becomes with the "
            "current SMS forms of the app settings, exactly as the webhook builds it. "
            "Nothing is written."
        ),
        epilog=(
            f"exit codes:\n  {EX_OK}   printed\n"
            f"  {EX_FAILED}   CHT's parser fails on the message (the free-text report the "
            "daemon would store is printed)\n"
            f"  {EX_USAGE}  wrong arguments\n  {EX_UNAVAILABLE}  CouchDB cannot be reached\n"
            f"  {EX_CONFIG}  configuration error, or no app settings in the database"
        ),
        formatter_class=raw,
    )
    parse.add_argument(
        "message", metavar="MESSAGE", nargs="?", help="the SMS text, e.g. 'P 12 John'"
    )
    parse.add_argument(
        "--rapidpro-message",
        type=int,
        metavar="ID",
        help="instead: ask RapidPro for its message ID and print what the daemon writes (or "
        "wrote) for it: the mirror of an outgoing message, the report of a recovered SMS, "
        "and whether it is in CouchDB",
    )
    parse.add_argument(
        "--from",
        dest="sender",
        default="unknown",
        metavar="PHONE",
        help="the sender's number (normalised as CHT does; default: unknown)",
    )
    parse.add_argument(
        "--id", metavar="ID", help="RapidPro's message id (run uuid): sets _id and gateway_ref"
    )
    parse.add_argument("--locale", help="the locale CHT would be given (?locale=)")
    parse.add_argument(
        "--app-settings",
        metavar="FILE",
        help="read the app settings from this JSON file (cht-conf's app_settings.json) "
        "instead of the database; COUCH_URL is then not needed",
    )
    parse.set_defaults(func=cmd_parse)

    status = commands.add_parser(
        "status",
        help="messages by state, oldest unsent, feed checkpoints, the running daemon",
        description=_wrap(
            "Count messages by state (CHT's medic/messages_by_state view when present, else "
            "a scan), show the oldest unsent message's age, each daemon's feed checkpoint "
            "(_local/cht-rapidpro.<instance>) and how many changed documents it is behind, "
            "and what a running daemon's /healthz and /metrics say. Only numbers are shown."
        ),
        epilog=(
            f"exit codes:\n  {EX_OK}   printed\n  {EX_USAGE}  wrong arguments\n"
            f"  {EX_UNAVAILABLE}  CouchDB cannot be reached\n"
            f"  {EX_CONFIG}  configuration error (settings, COUCH_URL credentials or db name)"
        ),
        formatter_class=raw,
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cht-rapidpro",
        description="SMS gateway between the Community Health Toolkit and RapidPro/TextIt.",
        epilog=_epilog() + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon (what the systemd unit starts)")
    run.set_defaults(func=cmd_run)
    check = commands.add_parser(
        "check-config", help="validate the settings and print them (without secrets)"
    )
    check.set_defaults(func=cmd_check_config)
    _add_commands(commands)
    sandbox = commands.add_parser(
        "sandbox",
        help="run the RapidPro sandbox (a fake RapidPro API for trying things out)",
        add_help=False,
    )
    sandbox.add_argument("sandbox_args", nargs=argparse.REMAINDER, help="see `sandbox --help`")
    for name, command in commands.choices.items():
        if name != "sandbox":
            # Also after the command (`check-config --config f.toml`); SUPPRESS keeps one
            # given before it.
            command.add_argument(
                "--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        # argparse's REMAINDER would swallow the sandbox's own `--options`: hand them over.
        from .sandbox.__main__ import main as sandbox_main

        return sandbox_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EX_CONFIG
    except CommandError as exc:
        print(f"cht-rapidpro {args.command}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
