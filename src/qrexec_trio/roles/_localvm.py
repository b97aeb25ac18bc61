"""One VM on this machine, for the demo and the benchmarks.

A VM is a ``qrexec-agent`` process with its own domain id and service dir;
dom0's ``qrexec-daemon`` for it runs beside it. Both are real processes
speaking the real protocol over the local vchan backend. (The local world of
a later release generalises this to many VMs from one config file.)
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO


def program(name: str) -> str:
    """The path of one of our console scripts, next to this Python."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


class LocalVM:
    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "work",
        domid: int = 42,
        services: dict[str, str] | None = None,
        logs: int | IO[bytes] | None = subprocess.DEVNULL,
        log_options: tuple[str, ...] = ("--log-level", "info"),
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.domid = domid
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.services = services or {}
        self._logs = logs
        self._log_options = list(log_options)
        self._procs: list[subprocess.Popen[bytes]] = []
        base = {k: v for k, v in os.environ.items() if not k.startswith(("QREXEC", "VCHAN"))}
        base["VCHAN_SOCKET_DIR"] = str(workdir / "vchan")
        self.vm_env = dict(base, VCHAN_DOMAIN=str(domid),
                           QREXEC_SERVICE_PATH=str(workdir / "rpc"))
        self.dom0_env = dict(base, VCHAN_DOMAIN="0")

    @property
    def socket_dir(self) -> Path:
        return self.workdir / "sockets"

    def client_argv(self, cmdline: str, *options: str) -> list[str]:
        """``qrexec-client`` from dom0 to this VM (run it with :attr:`dom0_env`)."""
        return [program("qrexec-client"), "--socket-dir", str(self.socket_dir), *options,
                "-d", self.name, cmdline]

    def __enter__(self) -> LocalVM:
        for sub in ("vchan", "rpc", "run", "sockets"):
            (self.workdir / sub).mkdir(exist_ok=True)
        for service, script in self.services.items():
            path = self.workdir / "rpc" / service
            path.write_text(script)
            path.chmod(0o755)
        try:
            self._start([program("qrexec-agent"), "--runtime-dir", str(self.workdir / "run")],
                        self.vm_env)
            daemon = self._start(
                [program("qrexec-daemon"), "--direct", "--socket-dir", str(self.socket_dir),
                 str(self.domid), self.name, self.user], self.dom0_env)
            deadline = time.monotonic() + 30
            while not (self.socket_dir / f"qrexec.{self.domid}").exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qrexec-daemon for {self.name} did not come up")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*argv, *self._log_options], env=env, stdout=self._logs,
                                stderr=self._logs, stdin=subprocess.DEVNULL)
        self._procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM the daemon and the agent, SIGKILL what is left after 10 s."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
