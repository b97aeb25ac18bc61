"""What a world holds at rest, before and after the torture: anything more is a leak.

A snapshot is taken with no call in flight: after the warm-up calls (so that
programs have opened what they keep open), and again at the end. At rest the
world is its own process plus an agent and a daemon per running VM; the fds
of each of those long-lived programs may not grow (no slack: a program that
served one call of each kind holds what it keeps, and any more is a leak);
the vchan directory has the files it had; no daemon holds a data port, no
registry a connection, no DispVM exists and no ledger lists a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ..domains import DomainsError
from ._procfs import Proc, fd_count, read_proc, world_processes
from ._waiting import until
from ._world import World

#: How often a settling world is looked at again.
_SETTLE_POLL: Final = 0.2


@dataclass
class Snapshot:
    processes: list[Proc]
    #: Open fds of each long-lived program, by label (``qrexec-agent:ta``, ...).
    fds: dict[str, int]
    vchan_files: list[str]
    #: Entries of each ledger directory that has some.
    ledgers: dict[str, list[str]]
    dispvms: list[str]
    connections: list[dict[str, Any]]
    #: Each daemon's allocated ports; None when the daemons cannot list them.
    ports: dict[str, list[dict[str, Any]]] | None


@dataclass
class Leak:
    """One row of the leak table."""

    what: str
    count: int
    details: list[str] = field(default_factory=list)
    #: False when the world gives no way to look (then it is no pass either).
    measured: bool = True


def long_lived(world: World, procs: list[Proc]) -> dict[str, Proc]:
    """The world's own process and each declared VM's agent and daemon, by label."""
    found: dict[str, Proc] = {}
    for proc in procs:
        if proc.pid == world.pid:
            found["qrexec-trio world"] = proc
    for vm in world.vms.values():
        agent, daemon = world.programs(vm.domid, procs)
        for label, program in ((f"qrexec-agent:{vm.name}", agent),
                               (f"qrexec-daemon:{vm.name}", daemon)):
            if program is not None:
                found[label] = program
    return found


def _world_process(world: World) -> list[Proc]:
    proc = read_proc(world.pid)
    return [proc] if proc is not None else []


async def snapshot(world: World) -> Snapshot:
    procs = world.processes()
    programs = long_lived(world, procs + _world_process(world))
    fds = {label: count for label, proc in programs.items()
           if (count := fd_count(proc.pid)) is not None}
    try:
        connections = await world.connections()
        dispvms = sorted(set(await world.dispvms()) | set(world.dispvm_dirs()))
        ports = await world.ports()
    except DomainsError as exc:
        connections = [{"id": "?", "owner": f"the admin socket failed: {exc}"}]
        dispvms, ports = world.dispvm_dirs(), {}
    ledgers = {str(directory): sorted(os.listdir(directory))
               for directory in world.ledger_dirs() if directory.is_dir()}
    return Snapshot(
        processes=procs, fds=fds,
        vchan_files=sorted(os.listdir(world.vchan_dir)) if world.vchan_dir.is_dir() else [],
        ledgers={path: entries for path, entries in ledgers.items() if entries},
        dispvms=dispvms, connections=connections, ports=ports)


def _rows(world: World, base: Snapshot, now: Snapshot) -> list[Leak]:
    expected = {proc.pid for proc in long_lived(world, now.processes).values()}
    extra = [proc for proc in now.processes if proc.pid not in expected]
    fds = [f"{label}: {base.fds[label]} -> {count}" for label, count in sorted(now.fds.items())
           if count > base.fds.get(label, count)]
    vchans = sorted(set(now.vchan_files) - set(base.vchan_files))
    ledger = [f"{path}/{entry}" for path, entries in now.ledgers.items() for entry in entries]
    rows = [
        Leak("processes left in the world", len(extra), [proc.describe() for proc in extra]),
        Leak("fds of the world's programs (grown)", len(fds), fds),
        Leak("vchan files", len(vchans), vchans),
    ]
    if now.ports is None:
        rows.append(Leak("data ports held by daemons", 0,
                         ["not measurable: the daemons do not answer qrexec.Ports"],
                         measured=False))
    else:
        held = [f"{vm}: {entry}" for vm, entries in now.ports.items() for entry in entries]
        rows.append(Leak("data ports held by daemons", len(held), held))
    rows += [
        Leak("connections still listed", len(now.connections),
             [f"{entry.get('id')} in {entry.get('owner')} ({entry.get('state')})"
              for entry in now.connections]),
        Leak("DispVMs left", len(now.dispvms), now.dispvms),
        Leak("ledger entries", len(ledger), ledger),
    ]
    return rows


async def leaks_at_rest(world: World, base: Snapshot, bound: float) -> tuple[Snapshot, list[Leak]]:
    """The leak rows once the world settled, or as they are at the bound.

    Teardown finishes a little after the last caller exits (a DispVM is
    removed after its call): the world gets ``bound`` seconds to get there.
    """
    async def settled() -> bool:
        return all(row.count == 0 for row in _rows(world, base, await snapshot(world)))

    with trio.move_on_after(bound):
        await until(settled, _SETTLE_POLL)
    now = await snapshot(world)
    return now, _rows(world, base, now)


async def left_after_stop(vchan_dir: str, world_pid: int, bound: float) -> list[Proc]:
    """Processes of a stopped world still running after ``bound`` seconds."""
    async def gone() -> bool:
        await trio.lowlevel.checkpoint()
        return not world_processes(vchan_dir, also_under=(world_pid,))

    with trio.move_on_after(bound):
        await until(gone, _SETTLE_POLL)
    return world_processes(vchan_dir, also_under=(world_pid,))
