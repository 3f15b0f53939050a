"""The error classes every layer shares: retryable vs permanent, conflicts, configuration."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error this package raises on purpose."""


class RetryableError(GatewayError):
    """A failure that may go away by itself: transport errors, timeouts, 5xx, 429.

    Attributes:
        retry_after: seconds the upstream asked us to wait (429 `Retry-After`), if any.
        ambiguous: the request may have taken effect upstream (the body was sent and no
            answer came back, or a 5xx came after processing). A send that failed this way
            must be looked up before it is repeated.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, ambiguous: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.ambiguous = ambiguous


class PermanentError(GatewayError):
    """A failure that repeating the same request will not fix (e.g. RapidPro 400)."""


class AuthError(PermanentError):
    """Credentials were refused (401/403) or are missing: a human must fix the set-up."""


class UpstreamConfigError(PermanentError):
    """The upstream answered in a way that means our configuration is wrong (404, redirect)."""


class ConflictError(GatewayError):
    """CouchDB refused a write because the document changed (409)."""


class ConfigError(GatewayError):
    """The daemon's own configuration is invalid; `problems` lists every issue found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = len(problems)
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"configuration error ({count} problem{'s' if count != 1 else ''}):\n{lines}"
        )
