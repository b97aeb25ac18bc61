"""Calls through a local world, each figure beside its baseline from the same run.

Runs the world of examples/minimal.toml (VMs `client` and `server`) and prints:

- the wall time of one trivial call through the CLI, per path (median of
  ``--calls``): dom0 -> VM (``qrexec-client -d server DEFAULT:QUBESRPC demo.Echo dom0``), VM -> VM
  with policy over R2 (our agent's default) and over the trigger socket
  (today's reference path), beside a bare interpreter start (``python -c
  pass``), ``sh -c true`` and the client's start-up alone (``--help``);
- the rate of sequential trivial VM -> VM calls through the in-process API
  (``qrexec_trio.call``) beside the CLI's rate for the same;
- 50 concurrent VM -> VM calls through the CLI: wall time, none hung;
- throughput, ``--mib`` MiB in and out: dom0 -> VM and VM -> VM (glued in
  dom0), beside a local ``cat`` pipe.

The programs run with byte-code caching on (an installed package has its .pyc
files; the test environment's PYTHONDONTWRITEBYTECODE would make every start
recompile our modules), after one warm-up call of each kind.

Run: .venv/bin/python bench/bench_calls.py [--mib 256] [--calls 30]
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _api_rate import api_rate
from _world import BIN, program_env, running_world

SRC = Path(__file__).resolve().parents[1] / "src"
#: A service call, not a shell command: `DEFAULT:true` would run the user's login
#: shell (on the development machine root's profile starts pyenv: ~100 processes).
DOM0_ECHO = "DEFAULT:QUBESRPC demo.Echo dom0"


def _cached(env: dict[str, str] | None) -> dict[str, str]:
    base = dict(os.environ if env is None else env)
    base.pop("PYTHONDONTWRITEBYTECODE", None)
    return base


def _pump(argv: list[str], env: dict[str, str] | None, source: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with open(source, "rb") as stdin:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, env=_cached(env),
                              check=True)
    return time.perf_counter() - started, hashlib.sha256(proc.stdout).hexdigest()


def _wall_ms(calls: int, argv: list[str], env: dict[str, str] | None) -> float:
    """Median wall time of one run of ``argv``, in ms (after a warm-up run)."""
    times = []
    for _ in range(calls + 1):
        started = time.perf_counter()
        subprocess.run(argv, env=_cached(env), check=True, stdout=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def _concurrent(count: int, argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time of ``count`` simultaneous runs, and how many failed or hung (30 s)."""
    started = time.perf_counter()
    procs = [subprocess.Popen(argv, env=_cached(env), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL) for _ in range(count)]
    failed = 0
    for proc in procs:
        try:
            failed += proc.wait(max(0.1, 30 - (time.perf_counter() - started))) != 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failed += 1
    return time.perf_counter() - started, failed


def _payload(path: Path, mib: int) -> str:
    with open(path, "wb") as f:
        block = bytes(range(256)) * 4096
        for _ in range(mib):
            f.write(block)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _measure(state: dict[str, Any], workdir: Path, args: argparse.Namespace) -> list[str]:
    dom0 = program_env(state, 0)
    client = state["vms"]["client"]
    in_client = program_env(state, client["domid"])
    agent = os.path.join(client["runtime_dir"], "qrexec-agent")
    dom0_call = [str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"],
                 "-d", "server"]
    vm_call = [str(BIN / "qrexec-client-vm"), "--agent-socket", agent]
    bare = _wall_ms(args.calls, [sys.executable, "-c", "pass"], None)
    shell = _wall_ms(args.calls, ["sh", "-c", "true"], None)
    rows = [
        f"bare interpreter start (python -c pass)   {bare:7.1f} ms",
        f"sh -c true                                {shell:7.1f} ms",
        f"client start-up alone (qrexec-client-vm --help) "
        f"{_wall_ms(args.calls, [vm_call[0], '--help'], None):7.1f} ms",
        f"trivial call, dom0 -> VM                  "
        f"{_wall_ms(args.calls, [*dom0_call, DOM0_ECHO], dom0):7.1f} ms",
    ]
    for path, flag in (("R2 fdpass", "--use-r2-fdpass"), ("trigger socket",
                                                         "--use-trigger-socket")):
        wall = _wall_ms(args.calls, [*vm_call, flag, "server", "demo.Echo"], in_client)
        rows.append(f"trivial call, VM -> VM, {path:<16}  {wall:7.1f} ms")
    cli_rate = 1000 / _wall_ms(args.calls, [*vm_call, "server", "demo.Echo"], in_client)
    rows.append(f"sequential VM -> VM calls: API {api_rate(state, args.api_calls):6.1f}/s, "
                f"CLI {cli_rate:6.1f}/s")
    wall, failed = _concurrent(50, [*vm_call, "server", "demo.Echo"], in_client)
    rows.append(f"50 concurrent VM -> VM calls (CLI)        {wall * 1000:7.1f} ms, "
                f"{failed} failed or hung")
    source = workdir / "payload"
    want = _payload(source, args.mib)
    baseline_s, base_hash = _pump(["cat"], None, source)
    dom0_s, dom0_hash = _pump([*dom0_call, DOM0_ECHO], dom0, source)
    vm_s, vm_hash = _pump([*vm_call, "server", "demo.Echo"], in_client, source)
    assert base_hash == dom0_hash == vm_hash == want, "payload corrupted"
    mib = args.mib
    rows.append(f"throughput, {mib} MiB in and out: dom0 -> VM {mib / dom0_s:7.1f} MiB/s, "
                f"VM -> VM (glued in dom0) {mib / vm_s:7.1f} MiB/s; "
                f"baseline local cat pipe {mib / baseline_s:7.1f} MiB/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--api-calls", type=int, default=300)
    args = parser.parse_args()
    compileall.compile_dir(SRC, quiet=1)  # what an installed package has
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        workdir = Path(tmp)
        with running_world(workdir / "world") as state:
            rows = _measure(state, workdir, args)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
