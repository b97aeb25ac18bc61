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

Before that, each long-lived program at rest (the world's two agents and two
daemons, and a ``qrexec-policy-daemon`` started beside it): resident memory
(RSS) and proportional set size (PSS, pages shared with the others counted
by share, from /proc/PID/smaps_rollup), beside idle baselines from the same
run: a bare ``python`` sleeping, ``python`` with ``import trio``, the same
inside ``trio.run``, and the program's own imports inside ``trio.run``. The
program at rest minus that last baseline is what serving one VM holds beyond
its code: an estimate of what each more VM would cost one process serving
many (docs/one-process-many-vms.md).

Run: .venv/bin/python bench/bench_daemon_memory.py [--calls 256] (--calls 0: at rest only)
"""

from __future__ import annotations

import argparse
import os
import signal
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


#: An idle process for the baselines: the imports given on its command line,
#: then sleep (inside trio.run with --trio-run); it says "ready" once there.
_IDLE = r"""
import importlib, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
if sys.argv[1] == "trio-run":
    import trio

    async def main():
        print("ready", flush=True)
        await trio.sleep_forever()

    trio.run(main)
else:
    print("ready", flush=True)
    sys.stdin.readline()
"""


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        fields = {line.split(":")[0]: line.split()[1] for line in rollup if ":" in line}
    return int(fields["Rss"]), int(fields["Pss"])


def world_programs(root: Path) -> dict[str, int]:
    """The long-lived programs of the world in ``root`` (other worlds may run
    beside it): ``agent:VM`` / ``daemon:VM`` -> pid, and the world itself."""
    found: dict[str, int] = {}
    mark = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if not any(mark in arg for arg in argv):
            continue
        words = [arg.decode(errors="replace") for arg in argv[:2]]
        if any(w.endswith("qrexec-daemon") for w in words):
            found[f"daemon:{argv[-2].decode()}"] = int(entry)  # argv ends DOMID NAME USER
        elif any(w.endswith("qrexec-agent") for w in words):
            run_dir = argv[argv.index(b"--runtime-dir") + 1].decode()
            found[f"agent:{Path(run_dir).parent.name}"] = int(entry)
        elif any(w.endswith("qrexec-trio") for w in words) and b"world" in argv:
            found["world (qubesd)"] = int(entry)
    return found


@contextmanager
def _idle_process(argv: list[str], ready_line: bool = True) -> Iterator[int]:
    """``argv`` running at rest; yields its pid once it is there."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if ready_line and proc.stdout.readline() != "ready\n":
            raise SystemExit(f"{argv} did not start (exit {proc.poll()})")
        time.sleep(1.0)  # at rest: start-up's garbage collected, nothing pending
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _baselines() -> list[tuple[str, tuple[int, int]]]:
    py = [sys.executable, "-c", _IDLE]
    cases = [
        ("python, sleeping", [*py, "plain"]),
        ("python + import trio", [*py, "plain", "trio"]),
        ("python + trio.run, sleeping", [*py, "trio-run", "trio"]),
        ("agent's imports + trio.run", [*py, "trio-run", "qrexec_trio.roles.agent"]),
        ("daemon's imports + trio.run", [*py, "trio-run", "qrexec_trio.roles.daemon"]),
        ("policy daemon's imports + trio.run",
         [*py, "trio-run", "qrexec_trio.roles.policy_daemon"]),
    ]
    measured = []
    for name, argv in cases:
        with _idle_process(argv) as pid:
            measured.append((name, _memory_kib(pid)))
    return measured


def _policy_daemon_at_rest(root: Path, policy_d: str) -> tuple[int, int]:
    """A qrexec-policy-daemon on sockets of its own, at rest (no qubesd: --system-info)."""
    info = root / "system-info.json"
    info.write_text('{"domains": {"dom0": {"type": "AdminVM", "tags": [], "icon": ""}}}')
    argv = [str(BIN / "qrexec-policy-daemon"), "--socket-path", str(root / "policy.sock"),
            "--eval-socket-path", "", "--gui-socket-path", "", "--policy-d", policy_d,
            "--system-info", str(info), "--log-level", "warning"]
    with _idle_process(argv, ready_line=False) as pid:
        deadline = time.monotonic() + 30
        while not (root / "policy.sock").exists():
            if time.monotonic() > deadline:
                raise SystemExit("qrexec-policy-daemon did not come up")
            time.sleep(0.05)
        time.sleep(1.0)
        return _memory_kib(pid)


#: Which baseline holds each program's own imports.
_FLOORS = {"agent": "agent's imports + trio.run", "daemon": "daemon's imports + trio.run",
           "policy-daemon": "policy daemon's imports + trio.run"}


def _print_at_rest(root: Path) -> None:
    programs = {name: _memory_kib(pid) for name, pid in world_programs(root).items()
                if not name.startswith("world")}
    programs["policy-daemon"] = _policy_daemon_at_rest(root, str(root / "world" / "policy.d"))
    baselines = dict(_baselines())
    print("at rest, RSS / PSS in MiB (goal: at most 16 per daemon or agent):")
    for name, (rss, pss) in sorted(programs.items()):
        floor_rss, floor_pss = baselines[_FLOORS[name.partition(":")[0]]]
        print(f"  {name:22s} {rss / 1024:5.1f} / {pss / 1024:5.1f}   beyond its imports "
              f"idle in trio.run: {(rss - floor_rss) / 1024:+5.1f} / "
              f"{(pss - floor_pss) / 1024:+5.1f}")
    for name, (rss, pss) in baselines.items():
        print(f"  baseline {name:36s} {rss / 1024:5.1f} / {pss / 1024:5.1f}")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


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
        root = Path(tmp)
        _print_at_rest(root)
        if count <= 0:
            return
        programs = world_programs(root)
        client = state["vms"]["client"]
        vm_call = [str(BIN / "qrexec-client-vm"), "--agent-socket",
                   os.path.join(client["runtime_dir"], "qrexec-agent"), "server", "demo.Echo"]
        dom0_call = [str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"],
                     "-d", "server", "DEFAULT:cat"]
        vm_kib = _per_call(programs["daemon:client"], vm_call,
                           program_env(state, client["domid"]), count)
        dom0_kib = _per_call(programs["daemon:server"], dom0_call, program_env(state, 0), count)
    base_kib = _baseline(count)
    print(f"qrexec-daemon memory per concurrent call ({count} held, vchan "
          f"{state['vchan']}): VM->VM glued {vm_kib:6.1f} KiB, dom0->VM {dom0_kib:6.1f} KiB "
          f"(goal < 64 KiB); baseline bare trio socket pair + task {base_kib:6.1f} KiB")


if __name__ == "__main__":
    main()
