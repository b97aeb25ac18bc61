"""Turning a parsed cmdline into a plan for running it.

A plan is plain data: the argv, environment and identity of a program, or
where a socket or TCP service listens and what it is sent first. Making the plan decides everything
that can fail early (unknown user, service not found, not executable) so that
the caller can report the right exit code without starting anything.
"""

from __future__ import annotations

import os
import pwd

# Light records, typing only for type checkers: the multiplexer imports this
# module on every call (issue 14).
from .._light import frozen_record, replace
from ..protocol import ExitStatus, ShellCommand
from ._lookup import LaunchError, ServiceKind, find_service, tcp_address
from ._service_config import DEFAULT_CONFIG, ServiceConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Final

    from ..protocol import Cmdline, RpcCall

# Environment variables a service may inherit from the agent's QREXEC_* set.
_KEPT_QREXEC_VARS = frozenset({"QREXEC_SERVICE_PATH", "QREXEC_AGENT_PID"})


@frozen_record
class Identity:
    """Who a command runs as. ``uid is None`` means "as this process"."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    home: str | None = None
    shell: str = "/bin/sh"


@frozen_record
class ProgramPlan:
    argv: list[str]
    env: dict[str, str]
    identity: Identity
    executable: str | None = None
    cwd: str | None = None
    #: A label for logs: the service descriptor or "shell command".
    what: str = ""


@frozen_record
class SocketPlan:
    """A unix-socket service: connect to ``path``."""

    path: str
    #: Sent to the socket first: the cmdline after ``QUBESRPC `` and a NUL;
    #: empty with ``skip-service-descriptor``.
    descriptor: bytes
    what: str = ""
    #: ``exit-on-service-eof``: the call ends once the service's output ends.
    exit_on_service_eof: bool = False
    #: ``exit-on-client-eof``: the call ends once the caller's input ends.
    exit_on_client_eof: bool = False


@frozen_record
class TcpPlan:
    """A TCP service (a symlink to ``/dev/tcp/...``): connect to ``host``:``port``."""

    #: A numeric IPv4 or IPv6 address (no brackets).
    host: str
    port: int
    #: As for :class:`SocketPlan`.
    descriptor: bytes
    what: str = ""
    exit_on_service_eof: bool = False
    exit_on_client_eof: bool = False
    #: The service file (the symlink), for logs.
    path: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: What the agent runs: a program, or a connection to a socket or TCP service.
Plan = ProgramPlan | SocketPlan | TcpPlan

#: The call's id in a service's environment (see ``nursery.call_id``), so that
#: a service's own logs can carry it too.
CALL_ID_ENV = "QREXEC_CALL_ID"


def with_call_id(plan: Plan, call: str) -> Plan:
    """``plan`` with the call id in its environment (a socket service has none)."""
    if isinstance(plan, ProgramPlan):
        return replace(plan, env={**plan.env, CALL_ID_ENV: call})
    return plan


class Runner:
    """How this process runs commands: its service path and its own identity.

    A plain class, not a record: two defaults are this process's, read when a
    runner is made (a light record has constant defaults only).
    """

    __slots__ = ("allow_scripts", "base_env", "directories", "euid", "shell")

    def __init__(
        self,
        directories: Sequence[str],
        base_env: Mapping[str, str] | None = None,
        euid: int | None = None,
        allow_scripts: bool = False,
        shell: str = "/bin/sh",
    ) -> None:
        self.directories: Final = directories
        #: The environment commands start from; by default a copy of this process's.
        self.base_env: Final[Mapping[str, str]] = (
            dict(os.environ) if base_env is None else base_env)
        #: Who this process is; by default its effective uid.
        self.euid: Final[int] = os.geteuid() if euid is None else euid
        #: Run non-executable handler files with /bin/sh, as R2's multiplexer did.
        self.allow_scripts: Final = allow_scripts
        #: The shell for plain commands when no user switch is needed (dom0's
        #: reference client runs them with bash; a VM's agent with /bin/sh).
        self.shell: Final = shell

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in (
            "directories", "base_env", "euid", "allow_scripts", "shell"))
        return f"Runner({fields})"

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

    def plan(self, cmdline: Cmdline, config: ServiceConfig = DEFAULT_CONFIG) -> Plan:
        """Decide how to run ``cmdline``; raises :class:`LaunchError` (125 / 127).

        ``config`` is the service's rpc-config; only socket and TCP services
        use its ``skip-service-descriptor`` and ``exit-on-*`` keys.
        """
        identity = self.identity_for(cmdline.user)
        if isinstance(cmdline.command, ShellCommand):
            return self._plan_shell(cmdline.command, identity)
        return self.plan_rpc(cmdline.command, identity, config)

    def _plan_shell(self, command: ShellCommand, identity: Identity) -> ProgramPlan:
        env = self.environment(identity, {})
        if identity.uid is None:
            return ProgramPlan([self.shell, "-c", command.command], env, identity,
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

    def plan_rpc(
        self, call: RpcCall, identity: Identity, config: ServiceConfig = DEFAULT_CONFIG
    ) -> Plan:
        found = find_service(call, self.directories, allow_scripts=self.allow_scripts)
        # The reference sends the cmdline after "QUBESRPC " unchanged: no "+"
        # added when there is no argument, and the argument kept even when it
        # is a TCP service's port.
        descriptor = (
            b"" if config.skip_service_descriptor
            else call.text.encode("utf-8", "surrogateescape") + b"\0"
        )
        if found.kind is ServiceKind.SOCKET:
            return SocketPlan(
                found.path, descriptor, call.descriptor,
                exit_on_service_eof=config.exit_on_service_eof,
                exit_on_client_eof=config.exit_on_client_eof,
            )
        if found.kind is ServiceKind.TCP:
            assert found.link is not None
            host, port = tcp_address(found.link, call.argument)
            return TcpPlan(
                host, port, descriptor, call.descriptor,
                exit_on_service_eof=config.exit_on_service_eof,
                exit_on_client_eof=config.exit_on_client_eof,
                path=found.path,
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
