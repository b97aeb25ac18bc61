"""The local world: dom0's daemons, VM agents, a policy and DispVM templates,
all on this machine, from one config file.

Every program runs as on a real system, as a separate process speaking the
real protocol over the local vchan backend. The world itself plays qubesd:
it serves the admin socket through which the daemons create, start and kill
DispVMs and their policy learns the domains' facts (``internal.GetSystemInfo``,
from the live domains), backed by :class:`LocalDomains`. Stopping the world
(cancellation) kills every VM and removes its directory: nothing is left behind.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Final

import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from .._programs import program
from .._sockets import has_kind
from ..domains import Domain, serve_admin
from ..nursery import gathering_methods
from ..xen._registry import LOCAL_DEFAULT
from . import ServiceSpec, WorldConfig
from ._calls import policy_file_citer
from ._layout import WorldLayout
from ._local import LocalDomains, LocalVM
from ._program_logs import ProgramLogs

log = get_logger(__name__)


class WorldError(QrexecError):
    """The world cannot be set up here (its directory is in use, ...)."""


def _write_services(directory: Path, services: tuple[ServiceSpec, ...]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for service in services:
        path = directory / service.name
        path.write_text(service.script)
        path.chmod(0o755)


#: The policy agent's services, as the reference names them.
POLICY_AGENT_SERVICES: Final = ("policy.Ask", "policy.Notify")


def policy_agent_services(declared: tuple[ServiceSpec, ...]) -> tuple[ServiceSpec, ...]:
    """``policy.Ask`` and ``policy.Notify`` running ``qrexec-trio policy-agent`` (on the
    world's terminal), for those of the two the config does not define itself."""
    own = {service.name for service in declared}
    command = shlex.quote(program("qrexec-trio"))
    return tuple(
        ServiceSpec(name, f"#!/bin/sh\nexec {command} policy-agent {name}\n",
                    "[policy] agent")
        for name in POLICY_AGENT_SERVICES if name not in own
    )


def _claim(layout: WorldLayout, group: str | None) -> None:
    """Make the world's directory ours: refuse a live world there, clear a dead
    one, and make it private (or ``group``'s)."""
    root = layout.root
    if layout.state_file.exists():
        try:
            pid = int(layout.read_state()["pid"])
            os.kill(pid, 0)
        except (ValueError, KeyError, ProcessLookupError, OSError):
            pass
        else:
            raise WorldError(f"a world is already running in {root} (pid {pid})")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        layout.make_dir(root)
    except PermissionError as exc:
        if not root.exists():
            raise  # not even made: reported as any other OSError
        shutil.rmtree(root, ignore_errors=True)
        raise WorldError(f"cannot give {root} to group {group!r}: {exc.strerror} (the "
                         "world's user must be a member of its [world] group)") from None


def _group_id(config: WorldConfig) -> int | None:
    if config.group is None:
        return None
    try:
        return grp.getgrnam(config.group).gr_gid
    except KeyError:
        raise WorldError(f"{config.path}: no such group {config.group!r}") from None


def _warn_if_users_are_shut_out(config: WorldConfig) -> None:
    """A world run by root runs services as their VMs' users; in a private
    directory, those cannot read their own service files."""
    if os.geteuid() != 0 or config.group is not None:
        return
    others = sorted({vm.default_user for vm in config.vms} - {"root"})
    if others:
        log.warning("services of these users cannot reach their files in the world's "
                    "private directory: name a group of theirs in [world] group",
                    users=others)


def _lay_out(config: WorldConfig, layout: WorldLayout) -> list[LocalVM]:
    # Members of the world's group make their data vchans' offers in the
    # vchan directory: they may write there.
    layout.make_dir(layout.vchan_dir, writable=True)
    layout.make_dir(layout.socket_dir)
    layout.make_dir(layout.policy_d)
    for name, text in config.policy_files:
        (layout.policy_d / name).write_text(text)
    agent = config.policy_agent
    dom0_services = config.dom0_services
    if agent == "dom0":
        dom0_services += policy_agent_services(dom0_services)
    _write_services(layout.dom0_services, dom0_services)
    layout.make_dir(layout.vms_dir)
    vms = []
    for spec in config.vms:
        root = layout.vm_dir(spec.name)
        layout.make_dir(root)
        layout.make_dir(root / "run")
        services = spec.services
        if spec.name == agent:
            services += policy_agent_services(services)
        _write_services(root / "rpc", services)
        info = Domain(name=spec.name, type=spec.type, tags=tuple(spec.tags),
                      default_user=spec.default_user, default_dispvm=spec.default_dispvm,
                      template_for_dispvms=spec.template_for_dispvms)
        vms.append(LocalVM(info, spec.domid, root / "rpc", root / "run"))
    return vms


class World:
    def __init__(self, config: WorldConfig, root: Path, *, timeouts: Timeouts,
                 log_options: tuple[str, ...] = (), relay_logs: bool = False) -> None:
        self.config = config
        self.layout = WorldLayout(root, group_id=_group_id(config))
        self.timeouts = timeouts
        self.log_options = log_options
        #: Whether the programs' logs (given JSON by ``log_options``) come to the
        #: world, which shows them as its own and says a line per call.
        self.relay_logs = relay_logs
        #: The vchan backend of the world: $QREXEC_VCHAN, else the local default.
        self.vchan = os.environ.get("QREXEC_VCHAN") or LOCAL_DEFAULT

    async def run(self, task_status: trio.TaskStatus[LocalDomains] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bring the world up, report ``started``, serve until cancelled, then tear down."""
        _claim(self.layout, self.config.group)
        _warn_if_users_are_shut_out(self.config)
        try:
            vms = _lay_out(self.config, self.layout)
            async with trio.open_nursery() as nursery:
                domains = LocalDomains(self.layout, vms, nursery, self.timeouts,
                                       user=self.config.user, vchan=self.vchan,
                                       log_options=self.log_options,
                                       policy_agent=self.config.policy_agent,
                                       program_logs=self._program_logs())
                try:
                    # The world's admin socket also lists and cuts connections:
                    # those of every daemon and agent of the world.
                    methods = gathering_methods(functools.partial(_control_sockets, domains),
                                                self.timeouts.client_request)
                    await nursery.start(functools.partial(
                        serve_admin, domains, str(self.layout.qubesd_socket), methods=methods,
                        request_timeout=self.timeouts.client_request))
                    for spec in self.config.vms:
                        if spec.autostart:
                            await domains.start(spec.name)
                    self._write_state(domains)
                    log.info("world ready", root=str(self.layout.root))
                    task_status.started(domains)
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        with trio.move_on_after(self.timeouts.cleanup * 4):
                            await domains.stop_all()
                        nursery.cancel_scope.cancel()
        finally:
            shutil.rmtree(self.layout.root, ignore_errors=True)
            log.info("world stopped", root=str(self.layout.root))

    def _program_logs(self) -> ProgramLogs | None:
        if not self.relay_logs:
            return None
        cite = policy_file_citer(str(self.layout.policy_d), self.config.policy_location)
        return ProgramLogs(cite)

    def _write_state(self, domains: LocalDomains) -> None:
        layout = self.layout
        state = {
            "pid": os.getpid(),
            "config": str(self.config.path),
            "vchan": self.vchan,
            "vchan_dir": str(layout.vchan_dir),
            "socket_dir": str(layout.socket_dir),
            "qubesd_socket": str(layout.qubesd_socket),
            "group": self.config.group,
            "vms": {
                vm.name: {"domid": vm.domid, "runtime_dir": str(vm.runtime_dir)}
                for vm in domains.local_vms()
            },
        }
        temporary = layout.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=1))
        temporary.chmod(layout.file_mode)
        temporary.rename(layout.state_file)  # readers never see half a file


def _control_sockets(domains: LocalDomains) -> dict[str, str]:
    """The control sockets of the world's programs, each with its owner's label.

    Found by their names (``qrexec-trio-control.DOMID`` of each daemon,
    ``...-control`` beside each agent's trigger socket), not by asking the
    programs, so that a program that is starting or stopping is just absent.
    """
    sockets: dict[str, str] = {}
    for vm in domains.local_vms():
        daemon = domains.layout.socket_dir / f"qrexec-trio-control.{vm.domid}"
        sockets[str(daemon)] = f"qrexec-daemon:{vm.name}"
        for path in vm.runtime_dir.glob("*-control"):
            sockets[str(path)] = f"qrexec-agent:{vm.name}"
    return {path: owner for path, owner in sockets.items() if has_kind(path)}
