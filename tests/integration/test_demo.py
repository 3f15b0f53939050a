"""The README's demo command works (its `--once` mode: one batch, then exit)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def test_demo_shows_messages_delivered_and_an_sms_parsed() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "scripts" / "demo.py"), "--once", "--step", "0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 50)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "batch 1: all delivered" in text
    for number in (1, 2, 3):
        assert f"message  {number}: pending → forwarded-to-gateway → received-by-gateway" in text
    assert "webhook answered 200" in text
    assert "form=VISIT fields={'patient_id': '12345', 'symptom': 'fever'}" in text
    assert "daemon stopped (exit 0)" in text
