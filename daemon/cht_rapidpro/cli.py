"""The `cht-rapidpro` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from . import __version__, logs
from .config import DEFAULTS, OPTIONS, Settings
from .errors import ConfigError

EX_OK, EX_USAGE, EX_CONFIG = 0, 64, 78


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(args.config)
    logs.configure(settings.log_level, settings.log_format)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve

    settings = _settings(args)
    return asyncio.run(serve(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    print(json.dumps(settings.redacted(), indent=2, default=str))
    return EX_OK


def _epilog() -> str:
    lines = ["settings (environment variables; also keys of a --config TOML file):"]
    for option in OPTIONS:
        default = DEFAULTS.get(option.name)
        shown = f" (default: {default})" if default not in (None, "") else ""
        lines.append(f"  {option.env}\n      {option.help}{shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cht-rapidpro",
        description="SMS gateway between the Community Health Toolkit and RapidPro/TextIt.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with settings (environment variables win)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon (what the systemd unit starts)")
    run.set_defaults(func=cmd_run)
    check = commands.add_parser(
        "check-config", help="validate the settings and print them (without secrets)"
    )
    check.set_defaults(func=cmd_check_config)
    sandbox = commands.add_parser(
        "sandbox",
        help="run the RapidPro sandbox (a fake RapidPro API for trying things out)",
        add_help=False,
    )
    sandbox.add_argument("sandbox_args", nargs=argparse.REMAINDER, help="see `sandbox --help`")
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
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
