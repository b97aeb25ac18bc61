"""Child processes that die with their connection.

Every child runs in its own process group, so that a service's own children
can be found again. :func:`child_process` ties the group to a scope: if the
scope is left by an exception or cancellation, the whole group gets SIGTERM,
then SIGKILL after a grace period, and the child is reaped; all of it shielded
and bounded, so that cleanup can neither be skipped nor hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from .._config import Timeouts
from .._logging import get_logger

log = get_logger(__name__)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class GroupLedger:
    """The process groups a long-lived program started, written down on disk.

    A program killed outright (SIGKILL) cannot clean up: the groups of its
    services live on. Its successor reads the ledger and ends them. A group
    is killed only if it is provably the one recorded: its leader still has
    the recorded start time, or the leader is gone (then no new process can
    hold that id while members of the old group remain).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, pid: int) -> str:
        return os.path.join(self.directory, str(pid))

    def record(self, pid: int) -> None:
        with open(self._path(pid), "w") as entry:
            entry.write(_start_time(pid) or "")

    def forget(self, pid: int) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self._path(pid))

    def remove_if_empty(self) -> None:
        """At a clean exit: nothing is left running, so the ledger goes too."""
        with suppress(OSError):
            os.rmdir(self.directory)

    def reap_leftovers(self) -> list[int]:
        """Kill the groups a predecessor left behind; returns their ids."""
        killed = []
        for name in os.listdir(self.directory):
            if not name.isdigit():
                continue
            pgid = int(name)
            with open(self._path(pgid)) as entry:
                recorded = entry.read().strip()
            now = _start_time(pgid)
            if now is None or now == recorded:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                    killed.append(pgid)
                except (ProcessLookupError, PermissionError):
                    pass
            self.forget(pgid)
        return killed


def exit_status(returncode: int) -> int:
    """A returncode as qrexec reports it: the exit status, or 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: trio.Process, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        # The group may hold a setuid child we cannot signal; the leader is ours.
        if proc.returncode is None:
            proc.send_signal(sig)


async def terminate_group(proc: trio.Process, timeouts: Timeouts) -> None:
    """SIGTERM the group, wait, SIGKILL it, reap the leader. Shielded and bounded."""
    with trio.CancelScope(shield=True):
        _signal_group(proc, signal.SIGTERM)
        with trio.move_on_after(timeouts.kill_grace):
            await proc.wait()
        # Even if the leader is gone, members of its group may not be.
        _signal_group(proc, signal.SIGKILL)
        with trio.move_on_after(timeouts.cleanup):
            await proc.wait()
        if proc.returncode is None:
            log.error("child did not die after SIGKILL", pid=proc.pid)


async def _close_pipes(proc: trio.Process) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            await trio.aclose_forcefully(stream)


def identity_changes(user: int | None, group: int | None,
                     extra_groups: Sequence[int] | None) -> dict[str, Any]:
    """subprocess's ``user``/``group``/``extra_groups`` options, or none if the
    switch would leave this process's identity as it is.

    Asking subprocess for any of them makes it fork the whole program rather
    than vfork it (set*id calls in a vfork child are unsafe): the kernel then
    copies the page tables of a 30 MiB interpreter and both sides take
    copy-on-write faults until the exec, most of what starting a service costs
    the agent. A switch to the ids this process already has (real, effective
    and saved) with the same groups changes nothing the service could be
    allowed or refused, so it is left out. "The same groups": supplementary
    groups compared with the primary group counted in, as the kernel checks
    them (root's ``getgrouplist`` gives ``[0]``, a root daemon's own list is
    usually empty; both mean group 0 only).
    """
    options: dict[str, Any] = {}
    if user is not None:
        options["user"] = user
    if group is not None:
        options["group"] = group
    if extra_groups is not None:
        options["extra_groups"] = list(extra_groups)
    uids, gids = os.getresuid(), os.getresgid()
    same_user = user is None or uids == (user, user, user)
    same_group = group is None or gids == (group, group, group)
    primary = gids[1]
    same_groups = extra_groups is None or (
        set(extra_groups) | {primary}) == (set(os.getgroups()) | {primary})
    return {} if same_user and same_group and same_groups else options


@asynccontextmanager
async def child_process(
    argv: Sequence[str | bytes],
    *,
    timeouts: Timeouts,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: int | None = subprocess.PIPE,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    executable: str | None = None,
    user: int | None = None,
    group: int | None = None,
    extra_groups: Sequence[int] | None = None,
    ledger: GroupLedger | None = None,
    pass_fds: Sequence[int] = (),
) -> AsyncIterator[trio.Process]:
    """Start ``argv`` in a new process group; kill the group if the scope fails.

    Raises :class:`OSError` if the program cannot be started (``FileNotFoundError``
    when it does not exist). On a normal exit from the scope, a child that is
    still running is terminated too: a connection never leaves one behind.
    """
    proc = await trio.lowlevel.open_process(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        executable=executable,
        process_group=0,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        **identity_changes(user, group, extra_groups),
    )
    if ledger is not None:
        ledger.record(proc.pid)
    try:
        yield proc
    except BaseException:
        # Failed or cancelled: the whole group goes, even if the leader already exited.
        with trio.CancelScope(shield=True):
            await _close_pipes(proc)
            await terminate_group(proc, timeouts)
        raise
    else:
        with trio.CancelScope(shield=True):
            await _close_pipes(proc)
            if proc.returncode is None:
                await terminate_group(proc, timeouts)
    finally:
        if ledger is not None:
            ledger.forget(proc.pid)
