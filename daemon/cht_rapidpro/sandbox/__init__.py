"""The RapidPro sandbox: a faithful fake of RapidPro/TextIt API v2 plus an incoming-SMS simulator.

Used in-process by tests (`Sandbox`, `build_app`, `start_sandbox`), out of process through the
`/_sandbox/` control API, and by users as `cht-rapidpro sandbox` / `python -m cht_rapidpro.sandbox`.
What it reproduces and what it simplifies is said in each module's docstring; the reference is
spec rapidpro-api.md.
"""

from __future__ import annotations

from .app import RunningSandbox, build_app, start_sandbox
from .incoming import IncomingOutcome, call_webhook, cht_headers
from .state import (
    DEFAULT_TOKEN,
    BroadcastRecord,
    Contact,
    Fault,
    MessageRecord,
    PostedBroadcast,
    RequestRecord,
    Sandbox,
    SandboxConfig,
    default_rates,
    throttle_scope,
)
from .wire import Dialect

__all__ = [
    "DEFAULT_TOKEN",
    "BroadcastRecord",
    "Contact",
    "Dialect",
    "Fault",
    "IncomingOutcome",
    "MessageRecord",
    "PostedBroadcast",
    "RequestRecord",
    "RunningSandbox",
    "Sandbox",
    "SandboxConfig",
    "build_app",
    "call_webhook",
    "cht_headers",
    "default_rates",
    "start_sandbox",
    "throttle_scope",
]
