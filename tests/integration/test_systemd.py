"""The systemd unit, its environment file, and the sd_notify protocol the daemon speaks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cht_rapidpro.config import OPTIONS, Settings
from cht_rapidpro.errors import ConfigError
from support import CouchAdmin

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "cht-rapidpro.service"
ENV_EXAMPLE = ROOT / "systemd" / "cht-rapidpro.env.example"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # The unit as shipped, with the paths of this machine (verify checks they exist).
    env = tmp_path / "env"
    env.write_text("")
    text = UNIT.read_text()
    text = text.replace(
        "ExecStart=/opt/cht-rapidpro/.venv/bin/cht-rapidpro run",
        f"ExecStart={sys.executable} -m cht_rapidpro run",
    ).replace("EnvironmentFile=/etc/cht-rapidpro/env", f"EnvironmentFile={env}")
    unit = tmp_path / "cht-rapidpro.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "cht-rapidpro.service" not in result.stderr, result.stderr


def test_unit_has_what_operators_rely_on() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "EnvironmentFile=/etc/cht-rapidpro/env",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "User=cht-rapidpro",
    ):
        assert line in text.splitlines(), line


def test_env_example_documents_every_setting_and_only_lacks_the_password() -> None:
    text = ENV_EXAMPLE.read_text()
    for option in OPTIONS:
        assert f"{option.env}=" in text, option.env
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    commented = {}
    for line in text.splitlines():
        if line.startswith("#CHT_RAPIDPRO_") and "=" in line:
            key, _, value = line[1:].partition("=")
            if value:
                commented[key] = value
    # The shown defaults are valid values; the only problem is the placeholder password.
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**values, **commented})
    assert caught.value.problems == ["COUCH_URL: still holds the placeholder from the example file"]


async def test_notifies_ready_watchdog_and_stopping(couch: CouchAdmin, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.setblocking(False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "COUCH_URL": couch.couch_url,
        "CHT_RAPIDPRO_PORT": str(port),
        "CHT_RAPIDPRO_LOG_FORMAT": "logfmt",
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "600000",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cht_rapidpro", "run", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def receive_until(message: str) -> None:
        while message not in seen:
            data = await asyncio.wait_for(loop.sock_recv(listener, 4096), 20)
            seen.append(data.decode())

    try:
        await receive_until("READY=1")
        await receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        await receive_until("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.close()
    assert seen.index("READY=1") < seen.index("STOPPING=1")
