"""The local implementation of :class:`~qrexec_trio.domains.Domains`.

Each VM is a ``qrexec-agent`` process with its own domain id, runtime dir and
service dir, and dom0 runs one ``qrexec-daemon`` per VM; both are children of
the world, in the VM's own cancel scope. Starting a VM starts both and
returns once the VM is callable by name; killing it cancels the scope (the
child-process scopes kill both process groups). However a VM halts, the
services its agent and daemon left running (one of them crashed, or was
stuck and killed) are ended once both are gone. A DispVM is a fresh VM with
a copy of its template's services, removed with its directories when killed.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .._config import Timeouts
from .._ledgers import agent_groups_ledger, daemon_dispvm_ledger, daemon_groups_ledger
from .._logging import get_logger
from .._programs import program
from .._sockets import has_kind
from ..domains import DispVMLedger, Domain, DomainsError
from ..nursery import GroupLedger, child_process, one_error
from ._layout import WorldLayout
from ._program_logs import ProgramLogs

log = get_logger(__name__)

#: DispVMs get domain ids from here up, away from configured VMs.
FIRST_DISPVM_ID = 1000


@dataclass
class LocalVM:
    #: What the registry says; ``domid`` there is set only while it runs.
    info: Domain
    #: The id it runs with (it names its vchans, so it is fixed).
    domid: int
    services_dir: Path
    runtime_dir: Path
    #: For a DispVM, the template it was made from.
    template: str | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def domain(self) -> Domain:
        return dataclasses.replace(self.info, domid=self.domid if self.scope else None)

    @property
    def agent_socket(self) -> Path:
        """The agent's trigger socket; its other runtime files go beside it."""
        return self.runtime_dir / "qrexec-agent"


class LocalDomains:
    """Domains of a world on this machine; lives inside the world's nursery."""

    def __init__(
        self,
        layout: WorldLayout,
        vms: Sequence[LocalVM],
        nursery: trio.Nursery,
        timeouts: Timeouts,
        *,
        user: str,
        vchan: str,
        log_options: Sequence[str] = (),
        policy_agent: str | None = None,
        program_logs: ProgramLogs | None = None,
    ) -> None:
        self.layout = layout
        #: Reads the programs' logs (JSON lines on a pipe); None: they write to our stderr.
        self.program_logs = program_logs
        #: Where the daemons' policy asks and notifies (None: their default, dom0).
        self.policy_agent = policy_agent
        self.user = user
        #: The vchan backend every program of the world uses.
        self.vchan = vchan
        self._vms = {vm.name: vm for vm in vms}
        self._nursery = nursery
        self._timeouts = timeouts
        self._log_options = list(log_options)
        self._dispvm_numbers = itertools.count(1)
        # Starts and kills happen one at a time: a world is small, and this
        # keeps "is it running?" and "which ids are taken?" simple and true.
        self._lock = trio.Lock()

    # -- the Domains protocol ------------------------------------------------------

    async def list(self) -> list[Domain]:
        await trio.lowlevel.checkpoint()
        dom0 = Domain(name="dom0", type="AdminVM", domid=0)
        return [dom0, *(vm.domain for vm in self._vms.values())]

    async def start(self, name: str) -> None:
        async with self._lock:
            vm = self._get(name)
            if vm.scope is not None:
                return
            vm.stopped = trio.Event()
            with one_error(), trio.fail_after(self._timeouts.domain_start):
                await self._nursery.start(self._run, vm)

    async def create_disposable(self, template: str) -> str:
        async with self._lock:
            base = self._get(template)
            if not base.info.template_for_dispvms:
                raise DomainsError("QubesVMError", f"{template} is not a DispVM template")
            name = f"disp{next(self._dispvm_numbers)}"
            used = {vm.domid for vm in self._vms.values()}
            domid = next(i for i in itertools.count(FIRST_DISPVM_ID) if i not in used)
            root = self.layout.vm_dir(name)
            self.layout.make_dir(root)
            await trio.to_thread.run_sync(shutil.copytree, base.services_dir, root / "rpc")
            self.layout.make_dir(root / "run")
            info = Domain(name=name, type="DispVM", tags=base.info.tags,
                          default_user=base.info.default_user,
                          default_dispvm=base.info.default_dispvm)
            self._vms[name] = LocalVM(info, domid, root / "rpc", root / "run", template=template)
            return name

    async def kill(self, name: str) -> None:
        async with self._lock:
            await self._kill(self._get(name))

    # -- the world's own needs -------------------------------------------------------

    async def stop_all(self) -> None:
        """Kill every VM, DispVMs (which are removed) first; used at shutdown."""
        async with self._lock:
            for vm in sorted(self._vms.values(), key=lambda v: v.template is None):
                await self._kill(vm)

    def get(self, name: str) -> LocalVM:
        return self._get(name)

    def local_vms(self) -> builtins.list[LocalVM]:
        return list(self._vms.values())

    # -- internals ---------------------------------------------------------------------

    def _get(self, name: str) -> LocalVM:
        vm = self._vms.get(name)
        if vm is None:
            raise DomainsError("QubesVMNotFoundError", f"no such domain: {name}")
        return vm

    async def _kill(self, vm: LocalVM, stopped: Callable[[], object] = lambda: None) -> None:
        """Halt ``vm``; a DispVM is then removed, after ``stopped()`` is called."""
        if vm.scope is not None:
            vm.scope.cancel()
            await vm.stopped.wait()
        else:
            await trio.lowlevel.checkpoint()
        stopped()
        if vm.template is not None:
            del self._vms[vm.name]
            root = self.layout.vm_dir(vm.name)
            await trio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))
            log.info("dispvm removed", dispvm=vm.name)

    def _env(self, domid: int, **extra: str) -> dict[str, str]:
        # The world's own settings (timeouts) reach its programs; where they
        # live and which vchan they use is the world's to say.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("QREXEC", "VCHAN")) or k.startswith("QREXEC_TIMEOUT_")}
        env.update(VCHAN_DOMAIN=str(domid), VCHAN_SOCKET_DIR=str(self.layout.vchan_dir),
                   QREXEC_VCHAN=self.vchan, **extra)
        # A VM halting in the world is a power-off: its agent and daemon end
        # their calls at once (the world SIGKILLs a program that takes longer
        # than kill_grace, far below a graceful stop's default grace).
        env.setdefault("QREXEC_TIMEOUT_STOP_GRACE", "0")
        return env

    def _daemon_alias(self, vm: LocalVM) -> Path:
        """The link by which clients find ``vm``'s daemon (``qrexec.NAME``)."""
        return self.layout.socket_dir / f"qrexec.{vm.name}"

    def _ledgers(self, vm: LocalVM) -> tuple[Path, Path]:
        """Where ``vm``'s agent and daemon write down the process groups of their
        services: beside the agent socket (``PATH-groups``, as the agent's help
        says), and in the daemon's socket dir."""
        return (Path(agent_groups_ledger(str(vm.agent_socket))),
                Path(daemon_groups_ledger(str(self.layout.socket_dir), vm.domid)))

    async def _run(self, vm: LocalVM, task_status: trio.TaskStatus[None]) -> None:
        """One VM's life: its agent and its daemon, until its scope is cancelled."""
        layout = self.layout
        agent_argv = [program("qrexec-agent"), "--runtime-dir", str(vm.runtime_dir),
                      "--agent-socket", str(vm.agent_socket), *self._log_options]
        daemon_argv = [
            program("qrexec-daemon"), "--direct", "--socket-dir", str(layout.socket_dir),
            "--policy-d", str(layout.policy_d), "--policy-dir", str(layout.r2_policy_dir),
            # The world's admin socket plays both of qubesd's: DispVMs, and the
            # domains' facts for the policy (internal.GetSystemInfo).
            "--qubesd-socket", str(layout.qubesd_socket),
            "--qubesd-internal-socket", str(layout.qubesd_socket), *self._log_options,
            *(["--policy-agent", self.policy_agent] if self.policy_agent else []),
            str(vm.domid), vm.name, vm.info.default_user,
        ]
        try:
            # A daemon killed in an earlier run of this VM left its link: only
            # the link the new daemon makes may tell that the VM is up.
            _remove_link(self._daemon_alias(vm))
            with trio.CancelScope() as scope:
                vm.scope = scope
                agent_env = self._env(vm.domid, QREXEC_SERVICE_PATH=str(vm.services_dir))
                daemon_env = self._env(0, QREXEC_SERVICE_PATH=str(layout.dom0_services))
                logs = self.program_logs
                stderr = None if logs is None else subprocess.PIPE
                async with (
                    child_process(agent_argv, timeouts=self._timeouts, env=agent_env,
                                  stdin=subprocess.DEVNULL, stdout=None, stderr=stderr) as agent,
                    child_process(daemon_argv, timeouts=self._timeouts, env=daemon_env,
                                  stdin=subprocess.DEVNULL, stdout=None,
                                  stderr=stderr) as daemon,
                    trio.open_nursery() as watch,
                ):
                    if logs is not None:
                        for proc, name in ((agent, "qrexec-agent"), (daemon, "qrexec-daemon")):
                            assert proc.stderr is not None
                            watch.start_soon(logs.relay, proc.stderr, vm.name, name)
                    await self._until_callable(vm, agent, daemon)
                    log.info("vm started", vm=vm.name, domid=vm.domid)
                    task_status.started()
                    # A VM whose agent or daemon dies is halted, as a crashed VM would be.
                    for proc, what in ((agent, "agent"), (daemon, "daemon")):
                        watch.start_soon(_halt_when_gone, proc, what, vm.name, scope)
        finally:
            # Both are gone now (their scopes reaped them); what they could not
            # end themselves goes before anyone may start the VM again.
            self._end_leftovers(vm)
            vm.scope = None
            vm.stopped.set()
            log.info("vm stopped", vm=vm.name)

    async def _until_callable(self, vm: LocalVM, agent: trio.Process,
                              daemon: trio.Process) -> None:
        """Wait until clients can call ``vm`` by name.

        The daemon links ``qrexec.NAME`` to its socket once that listens, and
        only once its agent is connected: the link (a stale one was removed
        before the daemon started) naming a socket means the VM is callable.
        """
        alias = self._daemon_alias(vm)
        while not (alias.is_symlink() and has_kind(str(alias), follow_symlinks=True)):
            if agent.returncode is not None or daemon.returncode is not None:
                raise DomainsError("QubesVMError", f"{vm.name} failed to start")
            await trio.sleep(0.02)

    def _end_leftovers(self, vm: LocalVM) -> None:
        """End the services a dead agent or daemon of ``vm`` left running, and
        its daemon's link; called once both programs are gone."""
        _remove_link(self._daemon_alias(vm))
        for path in self._ledgers(vm):
            if not path.is_dir():
                continue  # it never started, or it ended its services itself
            try:
                ledger = GroupLedger(str(path))
                killed = ledger.reap_leftovers()
                ledger.remove_if_empty()
            except OSError as exc:
                log.error("cannot end the services left running", vm=vm.name,
                          ledger=str(path), error=str(exc))
                continue
            if killed:
                log.warning("killed services left running", vm=vm.name, groups=killed)
        # The DispVMs its daemon made for calls that died with it: destroyed
        # by the world's own task, since whoever halted this VM may be holding
        # the lock that destroying takes.
        dispvms = DispVMLedger(daemon_dispvm_ledger(str(self.layout.socket_dir), vm.domid))
        if dispvms.names():
            self._nursery.start_soon(self._destroy_leftover_dispvms, vm.name, dispvms)
        else:
            dispvms.remove_if_empty()

    async def _destroy_leftover_dispvms(self, owner: str, ledger: DispVMLedger) -> None:
        # Waits its turn at the lock however long a start holds it (an admin
        # call's bounded kill could time out behind a restart, and be lost).
        destroyed = []
        for name in ledger.names():
            async with self._lock:
                vm = self._vms.get(name)
                if vm is not None and vm.template is not None:
                    # Forgotten once nothing of it runs, before its directory
                    # goes: a DispVM that is gone is never still in the ledger.
                    await self._kill(vm, functools.partial(ledger.forget, name))
                    destroyed.append(name)
            ledger.forget(name)
        ledger.remove_if_empty()
        if destroyed:
            log.warning("destroyed dispvms a dead daemon left", vm=owner, dispvms=destroyed)


def _remove_link(path: Path) -> None:
    """Remove ``path`` if it is a symbolic link; never anything else."""
    try:
        if path.is_symlink():
            path.unlink()
    except OSError as exc:
        log.error("cannot remove a stale link", path=str(path), error=str(exc))


async def _halt_when_gone(proc: trio.Process, what: str, name: str,
                          scope: trio.CancelScope) -> None:
    status = await proc.wait()
    log.warning(f"{what} of {name} exited; the vm is halted", status=status)
    scope.cancel()
