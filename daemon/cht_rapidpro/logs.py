"""Logging set-up: structlog, one line per event, readable under journald. Configured once here.

Health data: nothing here adds message text, tokens or phone numbers; callers pass masked
values (`cht.phone.mask`) and never the `Authorization` header.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: syslog priorities, so `journalctl -p warning` filters our lines.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _drop_none(_: Any, __: str, event: EventDict) -> EventDict:
    """Leave out keys whose value is None: logfmt would show `problem=` (nothing to say)."""
    for key in [key for key, value in event.items() if value is None]:
        del event[key]
    return event


def _journald_priority(_: Any, method: str, event: EventDict) -> EventDict:
    level = str(event.get("level", method))
    event["_priority"] = _PRIORITY.get(level, 6)
    return event


class _PriorityPrefix:
    """Wraps a renderer and prefixes `<N>` (sd-daemon(3) priority) to each line."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:
        priority = event.pop("_priority", 6)
        line = self._renderer(logger, method, event)
        if isinstance(line, bytes):
            line = line.decode()
        return f"<{priority}>{line}"


def _renderer(fmt: str, stream: TextIO) -> Processor:
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "logfmt"
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=stream.isatty())
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    return structlog.processors.LogfmtRenderer(
        key_order=["timestamp", "level", "event", "component"], drop_missing=True
    )


def configure(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None, cache: bool = True
) -> None:
    """Configure structlog and the stdlib root logger (aiohttp's logs) the same way."""
    stream = stream or sys.stdout
    journald = bool(os.environ.get("JOURNAL_STREAM")) and fmt != "console"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _drop_none,
    ]
    if not journald:  # journald stamps each line itself
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    shared += [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.dict_tracebacks
        if fmt == "json"
        else structlog.processors.format_exc_info,
    ]
    renderer = _renderer(fmt, stream)
    final: Processor = renderer
    if journald:
        shared.append(_journald_priority)
        final = _PriorityPrefix(renderer)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, final],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # aiohttp's access log would print every webhook line with its client address; our
    # middleware writes one canonical line per request instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(**initial: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(**initial)
    return logger
