"""One call's pipeline: the processes it consists of, and waiting until they are gone.

The service tells who it is in its hello line (its pid and process group, its
``QREXEC_AGENT_PID`` stand-in, its call id and domain id); the caller is the
torture's own child; agents and daemons are found in /proc by their domain
id. The teardown of a faulted call is over when the last of these is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from ._procfs import ProcId, alive, group_members, ident_of
from ._service import HELLO


@dataclass(frozen=True)
class Hello:
    """The service's hello line, parsed."""

    pid: int
    pgid: int
    stand_in: int | None
    call_id: str
    domid: int

    @classmethod
    def parse(cls, line: bytes) -> Hello | None:
        words = line.split()
        if not words or words[0] != HELLO:
            return None
        fields = dict(word.decode(errors="replace").partition("=")[::2] for word in words[1:])
        try:
            return cls(pid=int(fields["pid"]), pgid=int(fields["pgid"]),
                       stand_in=int(fields["stand_in"]) if fields.get("stand_in") else None,
                       call_id=fields["call"], domid=int(fields["domid"]))
        except (KeyError, ValueError):
            return None

    def service_processes(self) -> list[ProcId]:
        """The service's process group, and its stand-in, while they run."""
        found = group_members(self.pgid)
        if self.stand_in is not None and (stand_in := ident_of(self.stand_in)) is not None:
            found.append(stand_in)
        return found


@dataclass
class Teardown:
    """How one faulted pipeline went away."""

    #: Seconds from the fault to the last process gone; None if it did not go in time.
    latency: float | None
    #: What was still there at the bound.
    left: list[ProcId]


async def _exited(ident: ProcId) -> None:
    """Return once ``ident`` has exited (a zombie has): a pidfd turns readable then."""
    try:
        pidfd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return
    try:
        # Opened by pid: it is our process only if the start time still matches.
        if alive(ident):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def wait_gone(processes: Iterable[ProcId], since: float, bound: float) -> Teardown:
    """Wait until every one of ``processes`` is gone, at most until ``since + bound``.

    ``since`` is the fault's time (``trio.current_time()``); the latency is
    measured from it.
    """
    waiting = list(dict.fromkeys(processes))
    with trio.move_on_at(since + bound):
        async with trio.open_nursery() as nursery:
            for ident in waiting:
                nursery.start_soon(_exited, ident)
        return Teardown(trio.current_time() - since, [])
    return Teardown(None, [ident for ident in waiting if alive(ident)])
