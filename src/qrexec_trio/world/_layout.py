"""Where a running world keeps everything: one directory, removed when it stops.

The directory is private to the world's user (0700), or, if the config names
a group, that group's too: the directories on the way to its sockets are
0750 and the group's, the vchan directory (where a member's client offers its
data vchan) 0770. They are setgid, so what is made in them (the admin socket,
the vchan offers) belongs to the group as well.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final


def default_world_dir() -> Path:
    """One world per user by default, so ``call`` and ``run`` find it without options."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"qrexec-world-{os.geteuid()}"


#: Modes of the world's directories: private, or shared with the world's group.
_PRIVATE_DIR: Final = 0o700
_SHARED_DIR: Final = 0o2750
_SHARED_WRITABLE_DIR: Final = 0o2770


@dataclass(frozen=True)
class WorldLayout:
    root: Path
    #: The group that may use the world besides its user (None: nobody else).
    group_id: int | None = None

    @property
    def file_mode(self) -> int:
        """The mode of the files members of the group read (the state file)."""
        return 0o600 if self.group_id is None else 0o640

    def make_dir(self, path: Path, *, writable: bool = False) -> None:
        """Make ``path`` (its parent must exist): private, or open to the group to
        pass through, and to create files in if ``writable``.

        Made 0700 first, opened up only once it is the group's, so that it is
        never more open than meant. Raises :class:`OSError`.
        """
        path.mkdir(mode=_PRIVATE_DIR)
        if self.group_id is None:
            mode = _PRIVATE_DIR
        else:
            os.chown(path, -1, self.group_id)
            mode = _SHARED_WRITABLE_DIR if writable else _SHARED_DIR
        os.chmod(path, mode)  # mkdir's mode went through the umask

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

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def vm_dir(self, name: str) -> Path:
        return self.vms_dir / name

    def read_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        return state
