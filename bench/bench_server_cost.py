"""Server-side cost of one trivial call: where the long-lived programs spend it.

Runs a local world (VMs `client` and `server`, a trivial service
``bench.Noop`` in `server`, a policy allowing `client` to call it) and makes
N sequential trivial calls of two kinds:
- dom0 -> VM: ``qrexec-client -d server 'DEFAULT:QUBESRPC bench.Noop dom0'``
  (an RPC service, not a plain command: a plain command runs the user's login
  shell, whose profile is this machine's, not ours);
- VM -> VM: ``qrexec-client-vm server bench.Noop`` from `client`: `client`'s
  agent, `client`'s daemon (policy evaluated in-process, both legs glued),
  the world's admin socket (qubesd: system info for the policy), `server`'s
  daemon and agent.

It reports, per call:
1. the CPU time (user + system, from /proc/PID/stat) each long-lived program
   spent itself, and what its reaped children (the service, the
   QREXEC_AGENT_PID stand-in) spent;
2. with ``--strace``: the system calls each program made itself (no children);
3. with ``--profile``: where each program's busy time goes, by stage (see
   STAGES), from cProfile enabled in every program of the world by a
   ``sitecustomize`` this benchmark puts on PYTHONPATH; a world that made no
   call is profiled too and subtracted, so start-up does not count. The
   clock is the wall clock (a CPU clock costs a system call per function
   event and distorts far more), with the wait in epoll left out; so a stage
   also holds the time its process was preempted after waking another, and
   cProfile slows Python code down: read the stage figures as shares.
   cProfile sees the main thread only: starting a child (fork or vfork and
   exec, in trio's worker thread) shows in the CPU figures of 1., not here.

Baselines from the same run: the wall time and CPU of spawning
``sh -c true``, and of a bare ``python -c pass``.

Run: .venv/bin/python bench/bench_server_cost.py [--calls 100] [--strace] [--profile]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _world import BIN, program_env, running_world
from bench_daemon_memory import world_programs

WORLD = """
[vm.server.services]
"bench.Noop" = "exit 0"

[vm.client]

[policy]
rules = "bench.Noop * client server allow"
"""

#: Enabled in every program of the world by PYTHONPATH: profile this process's
#: own CPU time from its start, written out at its (clean) exit.
SITECUSTOMIZE = r"""
import atexit, cProfile, os, sys
_out = os.environ.get("BENCH_SERVER_COST_PROFILE_DIR")
if _out:
    _name = os.path.basename(sys.argv[0]) if sys.argv else "python"
    _profile = cProfile.Profile()
    _profile.enable()

    def _dump():
        _profile.disable()
        _profile.dump_stats(os.path.join(_out, f"{_name}-{os.getpid()}.prof"))

    atexit.register(_dump)
"""

#: The stages of a call, each the profiled time of the functions named
#: (``path-suffix:function``), their callees included. Stages can nest (the
#: catcher is a child process too): they are not meant to add up.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("agent: prepare (cmdline, rpc-config, plan)", ("roles/_launch.py:prepare",)),
    ("agent: QREXEC_AGENT_PID stand-in", ("nursery/_stdio_switch.py:stdio_switch",)),
    ("process-group ledger", ("nursery/_process.py:record", "nursery/_process.py:forget")),
    ("end a child's group (killpg, reap)", ("nursery/_process.py:terminate_group",)),
    ("data pump, service side", ("nursery/_pump.py:serve_data",)),
    ("data pump, caller side", ("nursery/_pump.py:call_data",)),
    ("daemon: VM->VM connect (both legs)", ("roles/_connect.py:connect",)),
    ("daemon: policy decision", ("roles/_decide.py:decide",)),
    ("  of which qubesd system info", ("roles/_decide.py:_fetch",)),
    ("vchan connect", ("xen/_socket.py:connect",)),
]
#: Time spent waiting for work, not working.
IDLE = "~:<method 'poll' of 'select.epoll' objects>"


def _cpu_ticks(pid: int) -> tuple[int, int]:
    """(own utime + stime, reaped children's) of ``pid`` in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _call_loop(argv: list[str], env: dict[str, str] | None, calls: int) -> float:
    """Seconds per call of ``argv``, each checked to succeed."""
    started = time.perf_counter()
    for _ in range(calls):
        subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
    return (time.perf_counter() - started) / calls


def _children_cpu_ms(run: Callable[[], float]) -> tuple[float, float]:
    """(wall ms per call, CPU seconds of all the reaped children) of ``run``."""
    before = os.times()
    per_call = run()
    after = os.times()
    return per_call * 1000, (after.children_user + after.children_system
                             - before.children_user - before.children_system)


@contextmanager
def _straced(pids: dict[str, int], out: Path) -> Iterator[dict[str, Path]]:
    """``strace -c`` attached to each program (its threads, not its children)."""
    procs, files = [], {}
    for name, pid in pids.items():
        path = out / f"strace-{pid}.txt"
        files[name] = path
        threads = os.listdir(f"/proc/{pid}/task")
        argv = ["strace", "-c", "-o", str(path)]
        for tid in threads:
            argv += ["-p", tid]
        procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # strace attaches asynchronously; no event tells us it has
    try:
        yield files
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(30)


def _strace_summary(path: Path, calls: int, top: int = 8) -> str:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            count, name = int(parts[3]), parts[-1]
            rows.append((count, name))
    rows.sort(reverse=True)
    total = sum(count for count, _ in rows)
    shown = ", ".join(f"{name} {count / calls:.1f}" for count, name in rows[:top])
    return f"{total / calls:6.1f} syscalls/call: {shown}"


def _stage_seconds(profile_dir: Path) -> dict[str, dict[str, float]]:
    """Per program (by pid file name): seconds per stage, and its busy total."""
    result: dict[str, dict[str, float]] = {}
    for path in profile_dir.glob("*.prof"):
        stats: Any = pstats.Stats(str(path)).stats  # func -> (cc, nc, tt, ct, callers)
        stages: dict[str, float] = defaultdict(float)
        for (file, _, function), (_, _, own, cumulative, _) in stats.items():
            where = f"{file}:{function}"
            stages["busy (all but waiting in epoll)"] += 0.0 if where == IDLE else own
            for label, names in STAGES:
                if any(where.endswith(name) for name in names):
                    stages[label] += cumulative
        result[path.stem] = dict(stages)
    return result


def _profiled_world(root: Path, config: Path, calls: int,
                    make_calls: Callable[[dict[str, Any], int], None]
                    ) -> dict[str, dict[str, float]]:
    """Stage seconds per program kind for a world that made ``calls`` calls."""
    profiles = root / "profiles"
    profiles.mkdir(parents=True)
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "BENCH_SERVER_COST_PROFILE_DIR")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), saved["PYTHONPATH"]]))
    os.environ["BENCH_SERVER_COST_PROFILE_DIR"] = str(profiles)
    try:
        with running_world(root / "world", config=config) as state:
            pid_names = {str(pid): name for name, pid in world_programs(root).items()}
            # The callers are profiled too: only the world's programs count.
            os.environ.pop("BENCH_SERVER_COST_PROFILE_DIR")
            make_calls(state, calls)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    by_program: dict[str, dict[str, float]] = {}
    for stem, stages in _stage_seconds(profiles).items():
        name = pid_names.get(stem.rpartition("-")[2])
        if name is not None:
            by_program[name] = stages
    return by_program


def _print_stages(loaded: dict[str, dict[str, float]], idle: dict[str, dict[str, float]],
                  calls: int) -> None:
    for name in sorted(loaded):
        stages = loaded[name]
        base = idle.get(name, {})
        delta = {stage: (secs - base.get(stage, 0.0)) * 1000 / calls
                 for stage, secs in stages.items()}
        busy = delta.pop("busy (all but waiting in epoll)", 0.0)
        if busy < 0.05:
            continue
        print(f"  {name}: busy {busy:.2f} ms/call profiled")
        for label, _ in STAGES:
            ms = delta.get(label, 0.0)
            if ms >= 0.02:
                print(f"    {label:44s} {ms:6.2f} ms  {100 * ms / busy:4.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--strace", action="store_true",
                        help="count each program's system calls per call (needs strace)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each program's CPU by stage (two more worlds)")
    args = parser.parse_args()
    calls = args.calls
    if args.strace and shutil.which("strace") is None:
        raise SystemExit("--strace: strace is not installed")

    def kinds(state: dict[str, Any]) -> dict[str, tuple[list[str], dict[str, str]]]:
        client = state["vms"]["client"]

        def caller_env(domid: int) -> dict[str, str]:
            # The callers' start-up is not what is measured here: let them
            # keep their compiled modules between calls.
            env = program_env(state, domid)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            return env

        return {
            "dom0->VM": ([str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"],
                          "-d", "server", "DEFAULT:QUBESRPC bench.Noop dom0"],
                         caller_env(0)),
            "VM->VM": ([str(BIN / "qrexec-client-vm"), "--agent-socket",
                        os.path.join(client["runtime_dir"], "qrexec-agent"), "server",
                        "bench.Noop"], caller_env(client["domid"])),
        }

    def make_calls(state: dict[str, Any], count: int) -> None:
        for argv, env in kinds(state).values() if count else ():
            _call_loop(argv, env, count)

    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        root = Path(tmp)
        config = root / "world.toml"
        config.write_text(WORLD)
        sh_ms, sh_cpu = _children_cpu_ms(
            lambda: _call_loop(["sh", "-c", "true"], None, calls))
        py_ms, py_cpu = _children_cpu_ms(
            lambda: _call_loop([sys.executable, "-c", "pass"], None, calls))
        print(f"baselines ({calls} runs): sh -c true {sh_ms:5.2f} ms wall, "
              f"{1000 * sh_cpu / calls:5.2f} ms CPU; python -c pass {py_ms:5.2f} ms wall, "
              f"{1000 * py_cpu / calls:5.2f} ms CPU")
        with running_world(root / "world", config=config) as state:
            programs = world_programs(root)
            tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
            for kind, (argv, env) in kinds(state).items():
                _call_loop(argv, env, 3)  # warm: first-call work is not per-call
                before = {name: _cpu_ticks(pid) for name, pid in programs.items()}
                wall_ms, caller_cpu = _children_cpu_ms(lambda a=argv, e=env:
                                                       _call_loop(a, e, calls))
                after = {name: _cpu_ticks(pid) for name, pid in programs.items()}
                print(f"{kind}: {wall_ms:6.2f} ms/call wall; caller process "
                      f"{1000 * caller_cpu / calls:5.2f} ms CPU/call; server side per call:")
                for name in sorted(programs):
                    own = (after[name][0] - before[name][0]) * tick_ms / calls
                    reaped = (after[name][1] - before[name][1]) * tick_ms / calls
                    if own or reaped:
                        print(f"  {name:18s} own {own:5.2f} ms CPU, "
                              f"reaped children {reaped:5.2f} ms CPU")
                if args.strace:
                    with _straced(programs, root) as files:
                        _call_loop(argv, env, calls)
                    for name, path in sorted(files.items()):
                        if path.exists():
                            print(f"  {name:18s} {_strace_summary(path, calls)}")
        if args.profile:
            idle = _profiled_world(root / "idle", config, 0, make_calls)
            loaded = _profiled_world(root / "loaded", config, calls, make_calls)
            print(f"profiled time per call by stage, both kinds of call together "
                  f"(world with {calls} of each minus a world with none):")
            _print_stages(loaded, idle, calls)


if __name__ == "__main__":
    main()
