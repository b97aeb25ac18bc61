"""Turning a parsed cmdline into a plan for running it.

A plan is plain data: the argv, environment and identity of a program, or the
path and descriptor of a socket service. Making the plan decides everything
that can fail early (unknown user, service not found, not executable) so that
the caller can report the right exit code without starting anything.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..protocol import Cmdline, ExitStatus, RpcCall, ShellCommand
from ._lookup import LaunchError, ServiceKind, find_service

# Environment variables a service may inherit from the agent's QREXEC_* set.
_KEPT_QREXEC_VARS = frozenset({"QREXEC_SERVICE_PATH", "QREXEC_AGENT_PID"})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a command runs as. ``uid is None`` means "as this process"."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    home: str | None = None
    shell: str = "/bin/sh"


@dataclass(frozen=True, slots=True)
class ProgramPlan:
    argv: list[str]
    env: dict[str, str]
    identity: Identity
    executable: str | None = None
    cwd: str | None = None
    #: A label for logs: the service descriptor or "shell command".
    what: str = ""


@dataclass(frozen=True, slots=True)
class SocketPlan:
    path: str
    #: Sent to the socket first: the descriptor line and a NUL.
    descriptor: bytes
    what: str = ""


Plan = ProgramPlan | SocketPlan

#: The call's id in a service's environment (see ``nursery.call_id``), so that
#: a service's own logs can carry it too.
CALL_ID_ENV = "QREXEC_CALL_ID"


def with_call_id(plan: Plan, call: str) -> Plan:
    """``plan`` with the call id in its environment (a socket service has none)."""
    if isinstance(plan, ProgramPlan):
        return dataclasses.replace(plan, env={**plan.env, CALL_ID_ENV: call})
    return plan


@dataclass(frozen=True, slots=True)
class Runner:
    """How this process runs commands: its service path and its own identity."""

    directories: Sequence[str]
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    euid: int = field(default_factory=os.geteuid)
    #: Run non-executable handler files with /bin/sh, as R2's multiplexer did.
    allow_scripts: bool = False

    def identity_for(self, user: str | None) -> Identity:
        """As root: the requested user. Otherwise only ourselves (else 125)."""
        if self.euid == 0:
            if user is None:
                return Identity(name="root")
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise LaunchError(ExitStatus.PROBLEM, f"no such user {user!r}") from None
            return Identity(
                name=user,
                uid=entry.pw_uid,
                gid=entry.pw_gid,
                groups=tuple(os.getgrouplist(user, entry.pw_gid)),
                home=entry.pw_dir,
                shell=entry.pw_shell or "/bin/sh",
            )
        own = pwd.getpwuid(self.euid).pw_name
        if user is not None and user != own:
            raise LaunchError(
                ExitStatus.PROBLEM, f"cannot run as {user!r}: this agent runs as {own!r}"
            )
        return Identity(name=own)

    def environment(self, identity: Identity, extra: Mapping[str, str]) -> dict[str, str]:
        env = {
            key: value
            for key, value in self.base_env.items()
            if not key.startswith("QREXEC") or key in _KEPT_QREXEC_VARS
        }
        env.pop("NOTIFY_SOCKET", None)
        env.setdefault("QREXEC_AGENT_PID", str(os.getpid()))
        if identity.uid is not None:
            env.update(
                HOME=identity.home or "/",
                SHELL=identity.shell,
                USER=identity.name,
                LOGNAME=identity.name,
            )
        env.update(extra)
        return env

    def plan(self, cmdline: Cmdline) -> Plan:
        """Decide how to run ``cmdline``; raises :class:`LaunchError` (125 / 127)."""
        identity = self.identity_for(cmdline.user)
        if isinstance(cmdline.command, ShellCommand):
            return self._plan_shell(cmdline.command, identity)
        return self.plan_rpc(cmdline.command, identity)

    def _plan_shell(self, command: ShellCommand, identity: Identity) -> ProgramPlan:
        env = self.environment(identity, {})
        if identity.uid is None:
            return ProgramPlan(["/bin/sh", "-c", command.command], env, identity,
                               what="shell command")
        # A login shell, as su - does it: argv[0] starts with "-".
        shell = identity.shell
        return ProgramPlan(
            ["-" + os.path.basename(shell), "-c", command.command],
            env,
            identity,
            executable=shell,
            cwd=identity.home if identity.home and os.path.isdir(identity.home) else "/",
            what="shell command",
        )

    def plan_rpc(self, call: RpcCall, identity: Identity) -> Plan:
        found = find_service(call, self.directories, allow_scripts=self.allow_scripts)
        if found.kind is ServiceKind.SOCKET:
            return SocketPlan(
                found.path, call.text.encode("utf-8", "surrogateescape") + b"\0", call.descriptor
            )
        extra = {
            "QREXEC_SERVICE_FULL_NAME": call.descriptor,
            "QREXEC_REMOTE_DOMAIN": call.source,
            "QREXEC_REQUESTED_TARGET_TYPE": call.target_type or "",
        }
        if call.argument is not None:
            extra["QREXEC_SERVICE_ARGUMENT"] = call.argument
        if call.target_type == "name" and call.target is not None:
            extra["QREXEC_REQUESTED_TARGET"] = call.target
        elif call.target_type == "keyword" and call.target is not None:
            extra["QREXEC_REQUESTED_TARGET_KEYWORD"] = call.target
        if found.kind is ServiceKind.SCRIPT:
            argv = ["/bin/sh", found.path]  # R2: no arguments for such handlers
        else:
            argv = [found.path] + ([call.argument] if call.argument else [])
        cwd = None
        if identity.uid is not None:
            cwd = identity.home if identity.home and os.path.isdir(identity.home) else "/"
        return ProgramPlan(
            argv, self.environment(identity, extra), identity, cwd=cwd, what=call.descriptor
        )
