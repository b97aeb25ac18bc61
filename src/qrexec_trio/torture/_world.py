"""The world a torture runs against: one it starts, or a running one (``--world``).

Either way the torture sees it only from outside, as a user does: its state
file (``world.json``), its admin socket (VM states, starts, the connection
registry), its directories, and its processes in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import trio

from .._config import Timeouts
from .._ledgers import agent_groups_ledger, daemon_dispvm_ledger, daemon_groups_ledger
from .._programs import program
from ..domains import DomainsError, QubesdDomains, decode_vm_list
from ..nursery import (
    CONNECTIONS,
    KILL,
    PORTS,
    UNKNOWN_CONNECTION,
    child_process,
    control_socket_path,
    parse_connections,
)
from ..world._layout import WorldLayout
from ._procfs import Proc, children, world_processes

SERVICE: Final = "torture.Echo"
#: The torture world's VMs (domids from 10) and its DispVM template.
VMS: Final = ("ta", "tb", "tc")
TEMPLATE: Final = "tdvm"
#: The admin server's answer to a method it does not have.
_NOT_IMPLEMENTED: Final = "QubesNotImplementedError"
#: A world starts several Python programs: on a loaded machine that takes a while.
_READY_TIMEOUT: Final = 120.0
_STOP_TIMEOUT: Final = 60.0


class WorldUnusable(Exception):
    """The world cannot be used for a torture (not running, missing the service, ...)."""


def service_script() -> str:
    """torture.Echo as a script run by this Python (see ``_service``)."""
    source = (resources.files(__package__) / "_service.py").read_text()
    return f"#!{sys.executable} -IS\n{source}"


def config_text() -> str:
    """The torture world's config: three VMs, a DispVM template, everything allowed."""
    script = service_script()
    if "'''" in script:  # it goes into a TOML literal string
        raise AssertionError("the service's source must not contain three single quotes")
    def service(name: str) -> str:
        return f"[vm.{name}.services]\n\"{SERVICE}\" = '''{script}'''\n"

    parts = ["# The qrexec-trio torture world: run it with 'qrexec-trio world FILE', then\n"
             "# 'qrexec-trio torture --world DIR'.\n"]
    for number, name in enumerate(VMS):
        parts.append(f"[vm.{name}]\ndomid = {10 + number}\ndefault_dispvm = \"{TEMPLATE}\"\n")
        parts.append(service(name))
    parts.append(f"[vm.{TEMPLATE}]\ndomid = 20\ntemplate_for_dispvms = true\n"
                 "autostart = false\n")
    parts.append(service(TEMPLATE))
    parts.append(f"[policy]\nrules = '''\n{SERVICE} * @anyvm @dispvm allow\n"
                 f"{SERVICE} * @anyvm @anyvm allow\n'''\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class VM:
    name: str
    domid: int
    runtime_dir: Path

    @property
    def agent_socket(self) -> Path:
        return self.runtime_dir / "qrexec-agent"


@dataclass
class World:
    """A running world, as the torture uses it."""

    root: Path
    pid: int
    vchan: str
    vchan_dir: Path
    socket_dir: Path
    #: The VMs calls are made between (running, with the torture service).
    vms: dict[str, VM]
    #: The DispVM template, if the world has one with the torture service.
    template: str | None
    admin: QubesdDomains
    #: Whether the torture started it (and so stops it).
    own: bool = False
    log: Path | None = None
    #: Set when an own world stopped: its exit status.
    exit_status: int | None = field(default=None)
    #: The domain ids of the DispVMs calls went to (their daemons' ledgers are checked too).
    dispvm_domids: set[int] = field(default_factory=set)

    # -- the admin socket ----------------------------------------------------------

    async def states(self) -> dict[str, str]:
        """Every domain's power state (``Running``, ``Halted``, ...), by name."""
        entries = decode_vm_list(await self.admin.call("admin.vm.List", "dom0"))
        return {entry.name: entry.state for entry in entries}

    async def dispvms(self) -> list[str]:
        entries = decode_vm_list(await self.admin.call("admin.vm.List", "dom0"))
        return sorted(entry.name for entry in entries if entry.klass == "DispVM")

    async def start(self, name: str) -> None:
        await self.admin.start(name)

    async def connections(self) -> list[dict[str, Any]]:
        return parse_connections(await self.admin.call(CONNECTIONS, "dom0"))

    async def kill_connection(self, call_id: str) -> bool:
        """Cancel ``call_id`` everywhere; False if no program held it."""
        try:
            await self.admin.call(KILL, "dom0", call_id)
        except DomainsError as exc:
            if exc.kind == UNKNOWN_CONNECTION:
                return False
            raise
        return True

    async def ports(self) -> dict[str, list[dict[str, Any]]] | None:
        """Each daemon's allocated data ports, or None if the daemons cannot list them."""
        found: dict[str, list[dict[str, Any]]] = {}
        for vm in self.vms.values():
            path = control_socket_path(str(self.socket_dir), vm.domid)
            daemon = QubesdDomains(path, call_timeout=self.admin.call_timeout)
            try:
                found[vm.name] = parse_connections(await daemon.call(PORTS, "dom0"))
            except DomainsError as exc:
                if exc.kind == _NOT_IMPLEMENTED:
                    return None
                raise
        return found

    # -- processes and files -------------------------------------------------------

    def processes(self) -> list[Proc]:
        return world_processes(str(self.vchan_dir), also_under=(self.pid,))

    def programs(self, domid: int, procs: list[Proc] | None = None
                 ) -> tuple[Proc | None, Proc | None]:
        """The agent and the daemon of domain ``domid``, where they run.

        They are the world's children: only those are looked at, unless ``procs`` says.
        """
        agent = daemon = None
        for proc in children(self.pid) if procs is None else procs:
            if proc.is_program("qrexec-agent") and proc.env.get("VCHAN_DOMAIN") == str(domid):
                agent = proc
            elif proc.is_program("qrexec-daemon") and proc.argv[-3:-2] == (str(domid),):
                daemon = proc
        return agent, daemon

    def ledger_dirs(self) -> list[Path]:
        """Where the world's agents and daemons write down what they started: the process
        groups of services, the DispVMs of calls. A DispVM's own agent keeps its ledger in
        the DispVM's directory (a DispVM left behind is a leak of its own)."""
        sockets = str(self.socket_dir)
        domids = sorted({vm.domid for vm in self.vms.values()} | self.dispvm_domids)
        return [
            *(Path(agent_groups_ledger(str(vm.agent_socket))) for vm in self.vms.values()),
            *(Path(ledger(sockets, domid)) for domid in domids
              for ledger in (daemon_groups_ledger, daemon_dispvm_ledger)),
        ]

    def dispvm_dirs(self) -> list[str]:
        vms = self.root / "vms"
        return sorted(path.name for path in vms.glob("disp*")) if vms.exists() else []

    def caller_env(self, domid: int) -> dict[str, str]:
        """A caller's environment: ours, but where the world's vchans are and who it is."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("QREXEC", "VCHAN"))}
        env.update(VCHAN_DOMAIN=str(domid), VCHAN_SOCKET_DIR=str(self.vchan_dir),
                   QREXEC_VCHAN=self.vchan)
        return env


async def attach(root: Path, timeouts: Timeouts, *, own: bool = False) -> World:
    """The running world in ``root``; raises :class:`WorldUnusable`."""
    layout = WorldLayout(root)
    if not layout.state_file.exists():
        raise WorldUnusable(f"no world is running in {root}")
    state = layout.read_state()
    admin = QubesdDomains(str(state["qubesd_socket"]), call_timeout=timeouts.admin_call)
    try:
        domains = {domain.name: domain for domain in await admin.list()}
    except DomainsError as exc:
        raise WorldUnusable(f"the world in {root} does not answer: {exc}") from exc
    vms: dict[str, VM] = {}
    template = None
    for name, entry in state["vms"].items():
        vm = VM(name, int(entry["domid"]), Path(entry["runtime_dir"]))
        domain = domains.get(name)
        if domain is None or not (vm.runtime_dir.parent / "rpc" / SERVICE).exists():
            continue
        if domain.template_for_dispvms:
            template = template or name
        elif domain.running:
            vms[name] = vm
    return World(root=root, pid=int(state["pid"]), vchan=str(state["vchan"]),
                 vchan_dir=Path(state["vchan_dir"]), socket_dir=Path(state["socket_dir"]),
                 vms=vms, template=template, admin=admin, own=own)


def _world_env() -> dict[str, str]:
    # The world's programs get their vchan settings from the world; a stray
    # VCHAN_SOCKET_DIR here would also mark the world process as one of them.
    return {key: value for key, value in os.environ.items() if not key.startswith("VCHAN")}


async def _ready(proc: trio.Process) -> None:
    """Wait for the world's summary (its last line starts with ``  stop:``)."""
    assert proc.stdout is not None
    seen = b""
    while b"\n  stop:" not in seen:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            raise WorldUnusable(f"the world exited while starting (status {await proc.wait()})")
        seen += chunk


@asynccontextmanager
async def own_world(workdir: Path, log_level: str, timeouts: Timeouts) -> AsyncIterator[World]:
    """Start the torture world in ``workdir``, yield it, stop it (SIGTERM) at the end.

    The world's log goes to ``workdir/world.log``; its exit status is left in
    :attr:`World.exit_status`.
    """
    config = workdir / "torture.toml"
    config.write_text(config_text())
    root = workdir / "world"
    log_path = workdir / "world.log"
    argv = [program("qrexec-trio"), "world", str(config), "--dir", str(root),
            "--log-level", log_level, "--log-format", "json"]
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        async with child_process(argv, timeouts=timeouts, env=_world_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log) as proc:
            try:
                with trio.fail_after(_READY_TIMEOUT):
                    await _ready(proc)
            except trio.TooSlowError:
                raise WorldUnusable(f"the world did not come up in {_READY_TIMEOUT:g} s "
                                    f"(log: {log_path})") from None
            world = await attach(root, timeouts, own=True)
            world.log = log_path
            try:
                yield world
            finally:
                with trio.CancelScope(shield=True):
                    world.exit_status = await _stop(proc)
    finally:
        os.close(log)


async def _stop(proc: trio.Process) -> int | None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(_STOP_TIMEOUT):
        return await proc.wait()
    return None
