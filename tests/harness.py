"""Runs the real programs as separate processes over a real vchan backend.

A :class:`Host` is one machine's worth of qrexec: a dom0 and VMs, each VM an
agent process with its own domain id and service dir, each with a
qrexec-daemon in dom0. Every process carries a marker in its environment, so
that a test can prove nothing it started (services included) is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARK_VAR = "QTRIO_TEST_MARK"
BIN = Path(sys.executable).parent


def program(name: str) -> str:
    return str(BIN / name)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


#: argv[0] of the agent's per-connection QREXEC_AGENT_PID stand-in (a sleep).
STAND_IN = "qrexec-agent-pid"


def is_program(proc: psutil.Process, name: str) -> bool:
    """``proc`` runs ``name`` (and is not a QREXEC_AGENT_PID stand-in that runs it)."""
    try:
        return proc.name() == name and proc.cmdline()[:1] != [STAND_IN]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def marked_processes(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``mark``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARK_VAR) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def read_log(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


@dataclass
class VM:
    host: Host
    name: str
    domid: int
    user: str
    service_dir: Path
    runtime_dir: Path
    agent: subprocess.Popen | None = None
    daemon: subprocess.Popen | None = None

    @property
    def agent_log(self) -> Path:
        return self.host.root / f"agent.{self.name}.log"

    @property
    def daemon_log(self) -> Path:
        return self.host.root / f"daemon.{self.name}.log"

    def add_service(self, name: str, script: str, mode: int = 0o755) -> Path:
        path = self.service_dir / name
        path.write_text(script)
        path.chmod(mode)
        return path

    @property
    def config_dir(self) -> Path:
        """The VM's rpc-config directory (QUBES_RPC_CONFIG_PATH of its agent)."""
        return self.host.root / f"rpc-config-{self.name}"

    def add_config(self, name: str, text: str) -> Path:
        self.config_dir.mkdir(exist_ok=True)
        path = self.config_dir / name
        path.write_text(text)
        return path

    def start_agent(self) -> None:
        env = self.host.env(self.domid, QREXEC_SERVICE_PATH=str(self.service_dir),
                            QUBES_RPC_CONFIG_PATH=str(self.config_dir))
        with open(self.agent_log, "ab") as log:
            self.agent = subprocess.Popen(
                [program("qrexec-agent"), "--runtime-dir", str(self.runtime_dir),
                 "--log-level", "debug"],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )

    def start_daemon(self, *extra: str, wait: bool = True) -> None:
        env = self.host.env(0, QREXEC_SERVICE_PATH=str(self.host.dom0_services))
        with open(self.daemon_log, "ab") as log:
            self.daemon = subprocess.Popen(
                [program("qrexec-daemon"), "--direct", "--socket-dir", str(self.host.socket_dir),
                 "--policy-d", str(self.host.policy_d), "--policy-dir",
                 str(self.host.root / "policy-r2"),
                 # No qubesd here: the policy knows the request's names only
                 # (a test that wants qubesd's facts passes its own socket).
                 "--qubesd-internal-socket", "",
                 "--log-level", "debug", *extra, str(self.domid), self.name, self.user],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )
        if not wait:
            return
        wait_for(lambda: (self.host.socket_dir / f"qrexec.{self.domid}").exists()
                 or self.daemon.poll() is not None, what=f"daemon of {self.name}")
        assert self.daemon.poll() is None, self.daemon_log.read_text()

    def kill_agent(self) -> None:
        assert self.agent is not None
        self.agent.kill()
        self.agent.wait()

    def client(self, cmdline: str, *options: str, input: bytes | None = b"",
               timeout: float = 60, stdin=None) -> subprocess.CompletedProcess[bytes]:
        """Run qrexec-client -d THIS_VM from dom0 and wait for it."""
        kwargs: dict = {"input": input} if stdin is None else {"stdin": stdin}
        return subprocess.run(
            [program("qrexec-client"), "--socket-dir", str(self.host.socket_dir),
             *options, "-d", self.name, cmdline],
            env=self.host.env(0), capture_output=True, timeout=timeout, **kwargs,
        )

    def client_vm_argv(self, target: str, service: str, *options: str) -> list[str]:
        return [program("qrexec-client-vm"), "--agent-socket",
                str(self.runtime_dir / "qrexec-agent"), *options, target, service]

    def client_vm(self, target: str, service: str, *options: str, prog: list[str] = (),
                  input: bytes | None = b"", timeout: float = 120,
                  stdin=None) -> subprocess.CompletedProcess[bytes]:
        """Run qrexec-client-vm inside this VM and wait for it."""
        kwargs: dict = {"input": input} if stdin is None else {"stdin": stdin}
        return subprocess.run(
            [*self.client_vm_argv(target, service, *options), *prog],
            env=self.host.env(self.domid), capture_output=True, timeout=timeout, **kwargs,
        )

    def start_client_vm(self, target: str, service: str, *options: str,
                        **popen) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.client_vm_argv(target, service, *options),
                                env=self.host.env(self.domid), **popen)

    def start_client(self, cmdline: str, *options: str, **popen) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [program("qrexec-client"), "--socket-dir", str(self.host.socket_dir),
             *options, "-d", self.name, cmdline],
            env=self.host.env(0), **popen,
        )

    def daemon_events(self, event: str | None = None) -> list[dict]:
        events = read_log(self.daemon_log)
        return [e for e in events if event is None or e.get("event") == event]

    def agent_events(self, event: str | None = None) -> list[dict]:
        events = read_log(self.agent_log)
        return [e for e in events if event is None or e.get("event") == event]


@dataclass
class Host:
    root: Path
    backend: str = "socket"
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    vms: dict[str, VM] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vchan_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.policy_d.mkdir(parents=True, exist_ok=True)
        self.dom0_services.mkdir(parents=True, exist_ok=True)

    @property
    def policy_d(self) -> Path:
        """The policy.d of every daemon of this host (empty: everything is denied)."""
        return self.root / "policy.d"

    @property
    def dom0_services(self) -> Path:
        """dom0's service dir (QREXEC_SERVICE_PATH of the daemons)."""
        return self.root / "rpc-dom0"

    def set_policy(self, text: str, name: str = "50-test.policy") -> None:
        (self.policy_d / name).write_text(text)

    @property
    def vchan_dir(self) -> Path:
        return self.root / "v"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sd"

    def env(self, domid: int, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QREXEC", "VCHAN"))}
        env.update(
            VCHAN_DOMAIN=str(domid),
            VCHAN_SOCKET_DIR=str(self.vchan_dir),
            QREXEC_VCHAN=self.backend,
            **{MARK_VAR: self.mark},
        )
        # Keep waits short so that a broken test fails fast instead of hanging.
        env.setdefault("QREXEC_TIMEOUT_DATA_VCHAN_CONNECT", "20")
        # A stop (the harness's SIGTERM at a test's end) cancels live calls at
        # once, as before graceful stops: tests of the grace set their own.
        env.setdefault("QREXEC_TIMEOUT_STOP_GRACE", "0")
        env.update(extra)
        return env

    def add_vm(self, name: str, domid: int, user: str | None = None) -> VM:
        user = user or _current_user()
        service_dir = self.root / f"rpc-{name}"
        runtime_dir = self.root / f"run-{name}"
        service_dir.mkdir()
        runtime_dir.mkdir()
        vm = VM(self, name, domid, user, service_dir, runtime_dir)
        self.vms[name] = vm
        return vm

    def start_vm(self, name: str, domid: int, user: str | None = None) -> VM:
        vm = self.add_vm(name, domid, user)
        vm.start_agent()
        vm.start_daemon()
        return vm

    def start_daemon_for_fake_agent(
        self, name: str, domid: int, user: str | None = None, *extra: str
    ) -> tuple[VM, socket.socket]:
        """A daemon whose agent the test plays: returns the VM and the control vchan."""
        vm = self.add_vm(name, domid, user)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.vchan_dir / f"vchan.{domid}.0.512.sock"))
        listener.listen(1)
        listener.settimeout(20)
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
        thread.start()
        vm.start_daemon(*extra, wait=False)  # it makes its socket once the agent answered
        thread.join(20)
        listener.close()
        assert accepted, "the daemon did not connect to the control vchan"
        return vm, accepted[0]

    def stop(self) -> None:
        """Stop every daemon and agent (SIGTERM, then SIGKILL) and reap them."""
        procs = [p for vm in self.vms.values() for p in (vm.daemon, vm.agent) if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def leftovers(self) -> list[str]:
        """Processes this host started that are still alive."""
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in marked_processes(self.mark)]


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
