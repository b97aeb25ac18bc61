"""Processes as /proc shows them: who they are, whether they are gone, their fds.

A pid alone names a process only until it is reused, so a process is held as
a :class:`ProcId`, its pid with the kernel's start time. A zombie counts as
gone: it runs nothing and holds nothing but its exit status.

The processes of one world are found by a marker every one of them carries:
``VCHAN_SOCKET_DIR`` set to the world's vchan directory (the world sets it for
its agents and daemons, services inherit it, and the torture sets it for its
callers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

#: Process states of a process that is over (zombie, dead).
_OVER: Final = frozenset("ZX")


@dataclass(frozen=True, slots=True)
class ProcId:
    """One process, by pid and start time (so that a reused pid is not it)."""

    pid: int
    start: str


@dataclass(frozen=True, slots=True)
class Proc:
    """What /proc says about one process."""

    pid: int
    ppid: int
    pgid: int
    state: str
    start: str
    argv: tuple[str, ...]
    #: The few environment variables the torture reads (see :func:`world_processes`).
    env: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def ident(self) -> ProcId:
        return ProcId(self.pid, self.start)

    @property
    def running(self) -> bool:
        return self.state not in _OVER

    def is_program(self, name: str) -> bool:
        """Whether this runs our console script ``name`` (directly or as ``python SCRIPT``)."""
        return any(os.path.basename(word) == name for word in self.argv[:2])

    def describe(self) -> str:
        return f"pid {self.pid} ({' '.join(self.argv)[:120] or '?'})"


def _stat(pid: int) -> tuple[int, int, str, str] | None:
    """ppid, pgid, state and start time of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[1]), int(fields[2]), fields[0], fields[19]
    except (IndexError, ValueError):
        return None


def _argv(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except OSError:
        return ()
    return tuple(word.decode(errors="replace") for word in raw.split(b"\0") if word)


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return environ.read()
    except OSError:
        return b""


def read_proc(pid: int, env: dict[str, str] | None = None) -> Proc | None:
    stat = _stat(pid)
    if stat is None:
        return None
    ppid, pgid, state, start = stat
    return Proc(pid, ppid, pgid, state, start, _argv(pid), env or {})


def alive(ident: ProcId) -> bool:
    """Whether that very process still runs (not gone, not reused, not a zombie)."""
    stat = _stat(ident.pid)
    return stat is not None and stat[3] == ident.start and stat[2] not in _OVER


def ident_of(pid: int) -> ProcId | None:
    stat = _stat(pid)
    return None if stat is None or stat[2] in _OVER else ProcId(pid, stat[3])


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


#: The environment variables a world process is found and placed by.
_KEPT_ENV: Final = (b"VCHAN_SOCKET_DIR", b"VCHAN_DOMAIN")


def _env_subset(raw: bytes) -> dict[str, str]:
    found = {}
    for entry in raw.split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name in _KEPT_ENV:
            found[name.decode()] = value.decode(errors="replace")
    return found


def world_processes(vchan_dir: str, *, also_under: Iterable[int] = ()) -> list[Proc]:
    """Every process of the world whose vchan directory is ``vchan_dir``.

    Marked processes, plus every process whose parent is one of them or one
    of ``also_under`` (the world's own pid): a zombie has no environment left,
    but its parent still tells whose it is.
    """
    marker = f"VCHAN_SOCKET_DIR={vchan_dir}".encode()
    procs: dict[int, Proc] = {}
    others: list[Proc] = []
    for pid in _pids():
        raw = _environ(pid)
        proc = read_proc(pid, _env_subset(raw))
        if proc is None:
            continue
        if marker in raw.split(b"\0"):
            procs[pid] = proc
        else:
            others.append(proc)
    parents = set(procs) | set(also_under)
    for proc in others:
        if proc.ppid in parents:
            procs[proc.pid] = proc
    return sorted(procs.values(), key=lambda proc: proc.pid)


def children(ppid: int) -> list[Proc]:
    """The running children of ``ppid``, with the environment variables the torture reads."""
    found = []
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[0] == ppid and stat[2] not in _OVER:
            proc = read_proc(pid, _env_subset(_environ(pid)))
            if proc is not None:
                found.append(proc)
    return found


def group_members(pgid: int) -> list[ProcId]:
    """The running members of process group ``pgid``."""
    members = []
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[1] == pgid and stat[2] not in _OVER:
            members.append(ProcId(pid, stat[3]))
    return members


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
