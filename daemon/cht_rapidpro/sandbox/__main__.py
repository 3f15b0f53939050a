"""`python -m cht_rapidpro.sandbox` (and `cht-rapidpro sandbox`): serve the sandbox, or send one
simulated incoming SMS to a webhook and print what it answered."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from .. import logs
from .app import start_sandbox
from .incoming import cht_headers
from .state import DEFAULT_TOKEN, Sandbox, SandboxConfig, default_rates
from .wire import DIALECTS

EX_OK, EX_FAILURE, EX_UNAVAILABLE = 0, 1, 69
DEFAULT_PORT = 8800


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cht-rapidpro sandbox",
        description="A fake RapidPro/TextIt API v2 (with a /_sandbox/ control API), or, with "
        "--incoming-url, one simulated incoming SMS sent the way RapidPro's flow webhook does.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    parser.add_argument(
        "--token", action="append", help=f"a valid API token (repeatable; default {DEFAULT_TOKEN})"
    )
    parser.add_argument("--dialect", choices=DIALECTS, default="current", help="RapidPro flavour")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=SandboxConfig().step_seconds,
        help="time between message status changes",
    )
    parser.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="SCOPE=N",
        help="requests per hour for a throttle scope (e.g. v2.messages=100, or =none); "
        "the dialect's real rates apply otherwise",
    )
    parser.add_argument("--unthrottled", action="store_true", help="start with no rate limits")
    parser.add_argument(
        "--no-retry-after", action="store_true", help="send 429s without a Retry-After header"
    )
    parser.add_argument(
        "--default-country",
        default=SandboxConfig().default_country,
        help="the workspace's country for local numbers (ISO code, e.g. RW; default "
        "%(default)s), or 'none' for a workspace without one",
    )
    incoming = parser.add_argument_group("send one incoming SMS instead of serving")
    incoming.add_argument("--incoming-url", metavar="URL", help="the webhook (CHT's endpoint)")
    incoming.add_argument("--from", dest="from_", metavar="PHONE", help="sender, e.g. +2507...")
    incoming.add_argument("--text", default="", help="the message text")
    incoming.add_argument("--incoming-token", metavar="KEY", help="sent as `Token KEY`")
    return parser


def parse_rates(specs: list[str], base: dict[str, int | None]) -> dict[str, int | None]:
    """Apply `SCOPE=N` / `SCOPE=none` overrides to `base`."""
    rates = dict(base)
    for spec in specs:
        scope, sep, value = spec.partition("=")
        if not sep or not scope:
            raise ValueError(f"--rate {spec!r}: expected SCOPE=N")
        rates[scope] = None if value.lower() in ("none", "") else int(value)
    return rates


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    base = {} if args.unthrottled else default_rates(args.dialect)
    return SandboxConfig(
        tokens=frozenset(args.token or [DEFAULT_TOKEN]),
        dialect=args.dialect,
        rates=parse_rates(args.rate, base),
        retry_after_header=not args.no_retry_after,
        default_country=None if args.default_country.lower() == "none" else args.default_country,
        step_seconds=args.step_seconds,
    )


async def serve(config: SandboxConfig, host: str, port: int) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly (exit 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with start_sandbox(config, host, port) as running:
            print(f"RapidPro sandbox ({config.dialect}) listening at {running.url}", flush=True)
            print(f"API token: {running.token}", flush=True)
            print(f"Control API: {running.url}/_sandbox/state", flush=True)
            await stop.wait()
    except OSError as exc:
        print(f"sandbox: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    print("RapidPro sandbox stopped", flush=True)
    return EX_OK


async def send_incoming(config: SandboxConfig, args: argparse.Namespace) -> int:
    """Deliver one simulated incoming SMS; exit 0 if the flow would take its Success branch."""
    headers = cht_headers(args.incoming_token) if args.incoming_token else {}
    outcome = await Sandbox(config).deliver_incoming(
        args.incoming_url, from_=args.from_, text=args.text, headers=headers
    )
    print(json.dumps(outcome.as_json(), indent=2, ensure_ascii=False), flush=True)
    return EX_OK if outcome.category == "Success" else EX_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure("info", "auto")
    if args.incoming_url:
        if not args.from_:
            parser.error("--incoming-url needs --from")
        return asyncio.run(send_incoming(config, args))
    return asyncio.run(serve(config, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
