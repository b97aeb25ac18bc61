"""A local world as the end-to-end tests run it: ``qrexec-trio world`` as a real
process, with helpers to run the world's commands against it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from harness import Host, program, wait_for

CONFIG = """
[vm.work]
domid = 10
default_dispvm = "dvm"
[vm.work.services]
"demo.Echo" = "exec cat"

[vm.vault]
domid = 11
[vm.vault.services]
"demo.Echo" = "echo vault; exec cat"

[vm.dvm]
domid = 20
template_for_dispvms = true
autostart = false
[vm.dvm.services]
"demo.Reverse" = "exec rev"
"demo.Hold" = "echo held; exec cat"

[policy]
rules = '''
demo.Echo * work vault allow
demo.Reverse * work @dispvm allow
demo.Hold * work @dispvm allow
'''
"""


class RunningWorld:
    def __init__(self, host: Host, config: str, *extra_env: tuple[str, str],
                 options: tuple[str, ...] = ("--log-level", "debug")) -> None:
        self.host = host
        self.config = host.root / "world.toml"
        self.config.write_text(config)
        self.dir = host.root / "w"
        env = host.env(0, **dict(extra_env))
        self.log = open(host.root / "world.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [program("qrexec-trio"), "world", str(self.config), "--dir", str(self.dir),
             *options],
            env=env, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        wait_for(lambda: (self.dir / "world.json").exists() or self.proc.poll() is not None,
                 timeout=60, what="the world to come up")
        assert self.proc.poll() is None, (host.root / "world.log").read_text()[-2000:]

    def trio_cmd(self, *args: str) -> list[str]:
        return [program("qrexec-trio"), args[0], "--world", str(self.dir), *args[1:]]

    def run(self, *args: str, input: bytes = b"", timeout: float = 60):
        return subprocess.run(self.trio_cmd(*args), input=input, capture_output=True,
                              timeout=timeout, env=self.host.env(0))

    def start(self, *args: str, **popen) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.trio_cmd(*args), env=self.host.env(0), **popen)

    def dispvms(self) -> list[str]:
        vms = self.dir / "vms"
        return sorted(p.name for p in vms.iterdir() if p.name.startswith("disp")) \
            if vms.exists() else []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(60)
        finally:
            self.log.close()
        return status


@contextmanager
def clean_world(host: Host, config: str) -> Iterator[RunningWorld]:
    """A world of ``config`` that must stop cleanly (status 0), leaving nothing."""
    running = RunningWorld(host, config)
    try:
        yield running
    finally:
        status = running.stop()
    assert status == 0, (host.root / "world.log").read_text()[-3000:]
    assert not running.dir.exists()
