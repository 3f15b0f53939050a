"""logs: what a rendered line holds."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from cht_rapidpro import logs


@pytest.fixture
def rendered() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("debug", "logfmt", stream=stream, cache=False)
    yield stream
    logs.configure("debug", "logfmt")  # as the test session configures it (conftest)


def test_keys_without_a_value_are_left_out(rendered: io.StringIO) -> None:
    """Issue item 10: `credential_loaded key=rapidpro:incoming source=vault problem=`."""
    logs.get_logger(component="config").info(
        "credential_loaded", key="rapidpro:incoming", source="vault", problem=None
    )
    line = rendered.getvalue().strip()
    assert "event=credential_loaded component=config" in line
    assert line.endswith("key=rapidpro:incoming source=vault")
    assert "problem" not in line


def test_false_and_zero_are_values(rendered: io.StringIO) -> None:
    logs.get_logger().info("status_poll_completed", updated=0, resumed=False)
    assert "updated=0 resumed=false" in rendered.getvalue()
