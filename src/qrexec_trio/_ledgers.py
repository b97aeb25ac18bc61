"""Where the daemon and the agent write down what they started (one place for the paths).

A program killed outright cannot end what it started; whoever comes after it
(its successor, the world halting its VM, a fault-injection run checking for
leaks) finds the ledgers here.
"""

from __future__ import annotations

import os


def daemon_groups_ledger(socket_dir: str, domid: int) -> str:
    """The process groups of the dom0 services a VM's daemon started."""
    return os.path.join(socket_dir, f"qrexec-daemon.{domid}.groups")


def daemon_dispvm_ledger(socket_dir: str, domid: int) -> str:
    """The DispVMs a VM's daemon made for its calls and has not destroyed yet."""
    return os.path.join(socket_dir, f"qrexec-daemon.{domid}.dispvms")


def agent_groups_ledger(agent_socket: str) -> str:
    """The process groups of the services an agent started (beside its socket)."""
    return f"{agent_socket}-groups"
