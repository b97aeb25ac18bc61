"""The torture's vocabulary: the paths a call takes and the faults it can suffer."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class CallPath(enum.StrEnum):
    """Who calls whom, and through which programs."""

    #: dom0 -> VM: ``qrexec-client`` to the VM's daemon and agent (``qrexec-trio run``).
    DOM0_VM = "dom0-vm"
    #: VM -> VM: ``qrexec-client-vm`` in the source, glued by its daemon (``qrexec-trio call``).
    VM_VM = "vm-vm"
    #: VM -> @dispvm: the same, to a DispVM made for the call and destroyed after it.
    VM_DISPVM = "vm-dispvm"


ALL_PATHS: Final = tuple(CallPath)
#: How often each path is picked, relative to the others selected.
PATH_WEIGHTS: Final = {CallPath.DOM0_VM: 4, CallPath.VM_VM: 4, CallPath.VM_DISPVM: 2}


class Action(enum.StrEnum):
    KILL = "kill"
    STOP = "stop"
    PEER_CLOSE = "peer-close"
    CANCEL = "cancel"
    STALLED_READER = "stalled-reader"
    SLOW_WRITER = "slow-writer"


class Role(enum.StrEnum):
    """Which process of a call's pipeline a signal goes to."""

    CALLER = "caller"
    SERVICE = "service"
    SOURCE_AGENT = "source-agent"
    TARGET_AGENT = "target-agent"
    DAEMON = "daemon"
    DISPVM_AGENT = "dispvm-agent"


_VM_SOURCE: Final = frozenset({CallPath.VM_VM, CallPath.VM_DISPVM})
#: The paths on which a role exists. A target agent is that of a declared VM
#: (which the torture restarts); a DispVM's agent is its own role.
ROLE_PATHS: Final = {
    Role.CALLER: frozenset(ALL_PATHS),
    Role.SERVICE: frozenset(ALL_PATHS),
    Role.SOURCE_AGENT: _VM_SOURCE,
    Role.TARGET_AGENT: frozenset({CallPath.DOM0_VM, CallPath.VM_VM}),
    Role.DAEMON: frozenset(ALL_PATHS),
    Role.DISPVM_AGENT: frozenset({CallPath.VM_DISPVM}),
}


@dataclass(frozen=True)
class FaultKind:
    name: str
    action: Action
    role: Role | None
    paths: frozenset[CallPath]
    about: str

    @property
    def signals(self) -> bool:
        return self.action in (Action.KILL, Action.STOP)


def _signal_kinds() -> list[FaultKind]:
    kinds = []
    for action, what in ((Action.KILL, "SIGKILL"), (Action.STOP, "SIGSTOP, then SIGCONT or "
                                                    "SIGKILL")):
        for role in Role:
            kinds.append(FaultKind(f"{action}-{role}", action, role, ROLE_PATHS[role],
                                   f"{what} of the call's {role.replace('-', ' ')}"))
    return kinds


FAULT_KINDS: Final = {kind.name: kind for kind in (
    *_signal_kinds(),
    FaultKind("peer-close", Action.PEER_CLOSE, None, frozenset(ALL_PATHS),
              "one end closes mid-call: the caller's local peer, or the service"),
    FaultKind("cancel", Action.CANCEL, None, frozenset(ALL_PATHS),
              "qrexec.Kill of the call's id through the world's connection registry"),
    FaultKind("stalled-reader", Action.STALLED_READER, None, frozenset(ALL_PATHS),
              "the caller's reader or the service stops reading for a while"),
    FaultKind("slow-writer", Action.SLOW_WRITER, None, frozenset(ALL_PATHS),
              "the caller or the service writes in small pieces, slowly"),
)}
