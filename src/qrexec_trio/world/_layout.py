"""Where a running world keeps everything: one directory, removed when it stops."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_world_dir() -> Path:
    """One world per user by default, so ``call`` and ``run`` find it without options."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"qrexec-world-{os.geteuid()}"


@dataclass(frozen=True)
class WorldLayout:
    root: Path

    @property
    def vchan_dir(self) -> Path:
        return self.root / "vchan"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sockets"

    @property
    def policy_d(self) -> Path:
        return self.root / "policy.d"

    @property
    def r2_policy_dir(self) -> Path:
        # Never created: the world's policy is policy.d only.
        return self.root / "policy-r2"

    @property
    def dom0_services(self) -> Path:
        return self.root / "dom0" / "rpc"

    @property
    def qubesd_socket(self) -> Path:
        return self.root / "qubesd.sock"

    @property
    def state_file(self) -> Path:
        """Written once the world is up: what ``call`` and ``run`` need to know."""
        return self.root / "world.json"

    def vm_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def read_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        return state
