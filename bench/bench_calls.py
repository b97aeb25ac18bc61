"""Throughput and call rate through a local world, beside baselines from the same run.

Runs the world of examples/minimal.toml (VMs `client` and `server`) and measures:
- dom0 -> VM: N MiB through ``qrexec-client -d server user:cat`` (in and back out);
- VM -> VM: the same through ``qrexec-client-vm`` from client to server's demo.Echo,
  i.e. two vchan legs glued in dom0;
beside the same bytes through a local ``cat`` pipe; and the rate of sequential
calls (dom0 -> VM and VM -> VM) beside spawning ``sh -c true`` and beside the
client's own start-up (``qrexec-client --help``).

Run: .venv/bin/python bench/bench_calls.py [--mib 256] [--calls 30]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _world import BIN, program_env, running_world


def _pump(argv: list[str], env: dict[str, str] | None, source: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with open(source, "rb") as stdin:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, env=env, check=True)
    return time.perf_counter() - started, hashlib.sha256(proc.stdout).hexdigest()


def _rate(calls: int, argv: list[str], env: dict[str, str] | None) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL)
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        workdir = Path(tmp)
        source = workdir / "payload"
        with open(source, "wb") as f:
            block = bytes(range(256)) * 4096
            for _ in range(args.mib):
                f.write(block)
        want = hashlib.sha256(source.read_bytes()).hexdigest()
        with running_world(workdir / "world") as state:
            dom0 = program_env(state, 0)
            client = state["vms"]["client"]
            in_client = program_env(state, client["domid"])
            user = "DEFAULT"
            dom0_cat = [str(BIN / "qrexec-client"), "--socket-dir", state["socket_dir"],
                        "-d", "server", f"{user}:cat"]
            vm_echo = [str(BIN / "qrexec-client-vm"), "--agent-socket",
                       os.path.join(client["runtime_dir"], "qrexec-agent"), "server",
                       "demo.Echo"]
            baseline_s, base_hash = _pump(["cat"], None, source)
            dom0_s, dom0_hash = _pump(dom0_cat, dom0, source)
            vm_s, vm_hash = _pump(vm_echo, in_client, source)
            assert base_hash == dom0_hash == vm_hash == want, "payload corrupted"
            dom0_rate = _rate(args.calls, [*dom0_cat[:-1], f"{user}:true"], dom0)
            vm_rate = _rate(args.calls, vm_echo, in_client)
            startup = _rate(args.calls, [str(BIN / "qrexec-client"), "--help"], None)
            spawn = _rate(args.calls, ["sh", "-c", "true"], None)
    mib = args.mib
    print(f"throughput, {mib} MiB in and out: dom0->VM {mib / dom0_s:7.1f} MiB/s, "
          f"VM->VM (glued in dom0) {mib / vm_s:7.1f} MiB/s; "
          f"baseline local cat pipe {mib / baseline_s:7.1f} MiB/s")
    print(f"sequential calls: dom0->VM {dom0_rate:6.1f}/s, VM->VM {vm_rate:6.1f}/s; "
          f"baselines: qrexec-client --help alone {startup:6.1f}/s, sh -c true {spawn:7.1f}/s")


if __name__ == "__main__":
    main()
