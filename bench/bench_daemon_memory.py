"""qrexec-daemon's memory per concurrent connection, beside a bare trio baseline.

Runs the world of examples/minimal.toml (VMs `client` and `server`) and holds
K calls open at once, each one checked live by an echo through it:
- VM -> VM: K ``qrexec-client-vm server demo.Echo`` from `client`; the
  `client` VM's daemon glues both vchan legs of every call in dom0, so this
  is the daemon's heaviest kind of connection;
- dom0 -> VM: K ``qrexec-client -d server DEFAULT:cat``; `server`'s daemon
  keeps each caller's socket and data port until the call ends.
The figure is the daemon's resident memory with K calls minus at rest,
divided by K (goal: under 64 KiB). The baseline, measured in the same run, is
a bare trio process holding K socket pairs, each with one task reading it:
what any trio program pays per connection before doing anything.

Run: .venv/bin/python bench/bench_daemon_memory.py [--calls 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from _world import BIN, program_env, running_world

_BASELINE = r"""
import socket, sys, trio

async def main(count):
    pairs = [socket.socketpair() for _ in range(count)]
    async with trio.open_nursery() as nursery:
        for left, _ in pairs:
            nursery.start_soon(trio.lowlevel.wait_readable, left)
        await trio.sleep(0.3)
        print(_rss(), flush=True)
        sys.stdin.readline()
        nursery.cancel_scope.cancel()

def _rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

trio.run(main, int(sys.argv[1]))
"""


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def _daemon_pid(name: str) -> int:
    """The world's qrexec-daemon for VM ``name`` (its argv ends DOMID NAME USER)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if any(arg.endswith(b"qrexec-daemon") for arg in argv[:2]) and argv[-2:-1] == [
                name.encode()]:
            return int(entry)
    raise SystemExit(f"qrexec-daemon of {name} not found")


@contextmanager
def _held_calls(argv: list[str], env: dict[str, str], count: int) -> Iterator[None]:
    """``count`` calls of ``argv``, each proven live by one echoed line, held open."""
    with ExitStack() as stack:
        procs = []
        for _ in range(count):
            proc = stack.enter_context(subprocess.Popen(
                argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            procs.append(proc)
        for number, proc in enumerate(procs):
            assert proc.stdin is not None and proc.stdout is not None
            line = f"call {number}\n".encode()
            proc.stdin.write(line)
            proc.stdin.flush()
            if proc.stdout.readline() != line:
                raise SystemExit(f"call {number} did not echo (exit {proc.poll()})")
        time.sleep(0.5)  # let the daemon settle after the last connection
        try:
            yield
        finally:
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.close()
            for proc in procs:
                proc.wait(60)


def _per_call(pid: int, argv: list[str], env: dict[str, str], count: int) -> float:
    rest = _rss_kib(pid)
    with _held_calls(argv, env, count):
        loaded = _rss_kib(pid)
    return (loaded - rest) / count


def _baseline(count: int) -> float:
    def rss(pairs: int) -> int:
        proc = subprocess.Popen([sys.executable, "-c", _BASELINE, str(pairs)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        value = int(proc.stdout.readline())
        proc.communicate("\n", timeout=30)
        return value

    return (rss(count) - rss(0)) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=256)
    args = parser.parse_args()
    count = args.calls
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp, \
            running_world(Path(tmp) / "world") as state:
        client = state["vms"]["client"]
        vm_call = [str(BIN / "qrexec-client-vm"), "--agent-socket",
                   os.path.join(client["runtime_dir"], "qrexec-agent"), "server", "demo.Echo"]
        dom0_call = [str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"],
                     "-d", "server", "DEFAULT:cat"]
        vm_kib = _per_call(_daemon_pid("client"), vm_call,
                           program_env(state, client["domid"]), count)
        dom0_kib = _per_call(_daemon_pid("server"), dom0_call, program_env(state, 0), count)
    base_kib = _baseline(count)
    print(f"qrexec-daemon memory per concurrent call ({count} held, vchan "
          f"{state['vchan']}): VM->VM glued {vm_kib:6.1f} KiB, dom0->VM {dom0_kib:6.1f} KiB "
          f"(goal < 64 KiB); baseline bare trio socket pair + task {base_kib:6.1f} KiB")


if __name__ == "__main__":
    main()
