"""The real CLI in a subprocess, with its own cache dir and a fixed terminal width."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-c", "from collapse_probe.cli.app import main; main()"]


def run_cli(args: list[str], cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `collapse-probe ARGS` in `cwd`; returns the finished process and its wall time in seconds."""
    env = {**os.environ, "COLLAPSE_PROBE_CACHE": str(cwd / ".cache"), "COLUMNS": "120"}
    env.pop("COLLAPSE_PROBE_DEBUG", None)
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - t0
