"""The operations commands (`check`, `send`, `parse`, `status`); `cli.py` is their argparse layer.

Each command is an async function that takes the daemon's `Settings` and output streams and
returns the process exit code (see `common` for the codes). Problems the operator must act on
are raised as `CommandError` with their exit code and printed by the CLI.
"""

from __future__ import annotations

from .check import run_check
from .common import (
    EX_CONFIG,
    EX_FAILED,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    CommandError,
)
from .parse import run_parse, run_parse_rapidpro
from .send import run_send
from .status import run_status

__all__ = [
    "EX_CONFIG",
    "EX_FAILED",
    "EX_OK",
    "EX_OSERR",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "CommandError",
    "run_check",
    "run_parse",
    "run_parse_rapidpro",
    "run_send",
    "run_status",
]
