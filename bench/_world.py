"""A local world for the benchmarks: start it, find its programs' environment, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
MINIMAL = Path(__file__).resolve().parents[1] / "examples" / "minimal.toml"


@contextmanager
def running_world(root: Path, vchan: str | None = None,
                  config: Path = MINIMAL) -> Iterator[dict[str, Any]]:
    """Run a world in ``root``; yields its state (world.json) while it runs."""
    env = dict(os.environ)
    if vchan is not None:
        env["QREXEC_VCHAN"] = vchan
    world = subprocess.Popen([str(BIN / "qrexec-trio"), "world", str(config), "--dir",
                              str(root), "--log-level", "warning"],
                             stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (root / "world.json").exists():
            if world.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the world did not come up")
            time.sleep(0.05)
        yield json.loads((root / "world.json").read_text())
    finally:
        world.send_signal(signal.SIGTERM)
        world.wait(60)


def program_env(state: dict[str, Any], domid: int) -> dict[str, str]:
    """The environment of a program running in domain ``domid`` of the world."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QREXEC", "VCHAN"))}
    return dict(base, VCHAN_DOMAIN=str(domid), VCHAN_SOCKET_DIR=state["vchan_dir"],
                QREXEC_VCHAN=state["vchan"])
