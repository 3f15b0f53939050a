"""Wiring: the aiohttp application, its resources (cleanup_ctx), routes, and `serve()`.

This is the only module that constructs and connects components.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import systemd
from .claims import Identity
from .config import Settings
from .couch.client import CouchClient
from .gateway import Gateway
from .incoming import ROUTES as INCOMING_ROUTES
from .incoming import IncomingWebhook
from .logs import get_logger
from .metrics import Metrics
from .rapidpro.client import RUNS, RapidProClient
from .rapidpro.throttle import BROADCASTS, MESSAGES, Budget


@dataclass(slots=True)
class Components:
    """What `_resources` builds at start-up (the app itself is frozen by then)."""

    gateway: Gateway | None = None
    webhook: IncomingWebhook | None = None


SETTINGS = web.AppKey("settings", Settings)
COMPONENTS = web.AppKey("components", Components)
METRICS = web.AppKey("metrics", Metrics)
ON_FATAL = web.AppKey[Callable[[int], None]]("on_fatal")
IDENTITY = web.AppKey("identity", Identity)

log = get_logger(component="app")

EX_OSERR = 71  # the listener's port is taken: systemd retries
EX_CONFIG = 78  # configuration: the unit's RestartPreventExitStatus=78 stops the retries


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Sessions and clients first, workers last; unwound in reverse on shutdown."""
    settings = app[SETTINGS]
    couch = CouchClient.connect(
        settings.couch, timeout_s=settings.couch_timeout_s, ca_file=settings.couch_ca_file
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(8, settings.send_concurrency * 2)),
        timeout=aiohttp.ClientTimeout(total=settings.send_timeout_s),
    )
    try:
        # Runs (the log follower's recovery) have a bucket of their own at RapidPro, as large
        # as the messages one: the same client-side limit applies.
        budget = Budget(
            {
                BROADCASTS: settings.broadcasts_per_hour,
                MESSAGES: settings.messages_per_hour,
                RUNS: settings.messages_per_hour,
            },
            window_s=settings.throttle_window_s,
        )
        for scope in (BROADCASTS, MESSAGES, RUNS):
            app[METRICS].budget_remaining.labels(scope).set_function(
                functools.partial(_remaining, budget, scope)
            )
        rapidpro = RapidProClient(
            session, budget, timeout_s=settings.send_timeout_s, metrics=app[METRICS]
        )
        gateway = Gateway(
            settings=settings,
            couch=couch,
            rapidpro=rapidpro,
            metrics=app[METRICS],
            on_fatal=app[ON_FATAL],
            identity=app.get(IDENTITY),
        )
        _export_state(app[METRICS], gateway)
        components = app[COMPONENTS]
        components.gateway = gateway
        components.webhook = IncomingWebhook(
            gateway.incoming, gateway.cht, app[METRICS], timeout_s=settings.webhook_timeout_s
        )
        gateway.start()
        yield
        await gateway.stop()
    finally:
        await session.close()
        await couch.close()


def gateway_of(app: web.Application) -> Gateway:
    gateway = app[COMPONENTS].gateway
    assert gateway is not None, "used before start-up"
    return gateway


def _export_state(metrics: Metrics, gateway: Gateway) -> None:
    """Gauges read at scrape time from the gateway's own state (as /healthz is)."""
    metrics.healthy.set_function(lambda: float(gateway.health()[0]))
    metrics.sending_paused.set_function(lambda: float(gateway.sender.refused))
    metrics.unsent_messages.set_function(lambda: float(gateway.backlog.messages))
    metrics.oldest_unsent_age.set_function(gateway.backlog.oldest_age_s)


def _remaining(budget: Budget, scope: str) -> float:
    left = budget.remaining(scope)
    return math.inf if left is None else float(left)


async def healthz(request: web.Request) -> web.Response:
    healthy, problems = gateway_of(request.app).health()
    return web.json_response(
        {"status": "ok" if healthy else "degraded", "problems": problems},
        status=200 if healthy else 503,
    )


async def incoming_messages(request: web.Request) -> web.Response:
    webhook = request.app[COMPONENTS].webhook
    assert webhook is not None, "used before start-up"
    return await webhook.handle(request)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    settings: Settings,
    *,
    on_fatal: Callable[[int], None],
    identity: Identity | None = None,
) -> web.Application:
    app = web.Application(client_max_size=settings.webhook_max_bytes)
    app[SETTINGS] = settings
    app[COMPONENTS] = Components()
    app[METRICS] = Metrics()
    app[ON_FATAL] = on_fatal
    if identity is not None:
        app[IDENTITY] = identity
    app.cleanup_ctx.append(_resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    for path in INCOMING_ROUTES:
        app.router.add_post(path, incoming_messages)
    return app


def _start_watchdog(gateway: Gateway) -> asyncio.Task[None] | None:
    """Feed systemd's watchdog (WatchdogSec=) while the changes feed loop makes progress."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return None
    limit_s = int(usec) / 1_000_000

    async def feed() -> None:
        while True:
            stalled = gateway.follower.stalled_s()
            if stalled < limit_s:
                systemd.notify("WATCHDOG=1")
            else:
                log.error("watchdog_starved", feed_request_s=round(stalled, 1))
            await asyncio.sleep(limit_s / 3)

    return asyncio.get_running_loop().create_task(feed(), name="watchdog")


def listen_failure(exc: OSError) -> tuple[int, str]:
    """The exit code for a listener that cannot be bound, and what to do about it.

    Only a port in use may free itself (the previous process still closing it): 71, which
    systemd retries. A host name that does not resolve, an address that is not this
    machine's, or a port this user may not bind are configuration errors: 78, which it does
    not retry.
    """
    if isinstance(exc, socket.gaierror):
        return EX_CONFIG, "CHT_RAPIDPRO_HOST does not resolve: use an address of this machine"
    if exc.errno == errno.EADDRINUSE:
        return EX_OSERR, "another process holds the port: stop it or change CHT_RAPIDPRO_PORT"
    if exc.errno == errno.EADDRNOTAVAIL:
        return EX_CONFIG, (
            "CHT_RAPIDPRO_HOST is not an address of this machine: use one of its addresses "
            "(127.0.0.1, or 0.0.0.0 for all)"
        )
    if exc.errno == errno.EACCES:
        return EX_CONFIG, "this user may not listen on CHT_RAPIDPRO_PORT: use a port >= 1024"
    return EX_OSERR, "see the error"


async def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT or a fatal error; returns the exit code."""
    stop = asyncio.Event()
    exit_code = 0

    def request_stop(code: int = 0) -> None:
        nonlocal exit_code
        if code and not exit_code:
            exit_code = code
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    runner = web.AppRunner(
        build_app(settings, on_fatal=request_stop),
        access_log=None,
        shutdown_timeout=2.0,
    )
    try:
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.listen_host, settings.listen_port).start()
        except OSError as exc:
            code, hint = listen_failure(exc)
            log.critical(
                "listen_failed",
                listen=f"{settings.listen_host}:{settings.listen_port}",
                error=exc.strerror or str(exc),
                hint=hint,
                exit_code=code,
            )
            return code
        systemd.notify("READY=1")
        log.info("gateway_started", listen=f"{settings.listen_host}:{settings.listen_port}")
        watchdog = _start_watchdog(gateway_of(runner.app))
        await stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        systemd.notify("STOPPING=1")
        log.info("gateway_stopping", exit_code=exit_code)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Keep this below systemd's TimeoutStopSec: sends get shutdown_grace_s, the rest
        # (handlers, checkpoint, sessions) a little more.
        try:
            async with asyncio.timeout(settings.shutdown_grace_s + 3.0):
                await runner.cleanup()
        except TimeoutError:
            log.error("shutdown_deadline_exceeded", deadline_s=settings.shutdown_grace_s + 3.0)
    return exit_code
