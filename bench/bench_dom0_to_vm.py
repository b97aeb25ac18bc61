"""dom0 -> VM throughput and call rate, beside baselines measured in the same run.

Throughput: N MiB through ``qrexec-client -d work user:cat`` (in and back out),
beside the same bytes through a local ``cat`` pipe. Call rate: sequential
calls of an RPC service that does nothing, beside spawning ``sh -c true``
locally and beside ``qrexec-client --help`` (the client's own start-up cost).

Run: .venv/bin/python bench/bench_dom0_to_vm.py [--mib 256] [--calls 50]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

from qrexec_trio.roles._localvm import LocalVM


def _pump(argv: list[str], env: dict[str, str] | None, source: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with open(source, "rb") as stdin:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, env=env, check=True)
    elapsed = time.perf_counter() - started
    return elapsed, hashlib.sha256(proc.stdout).hexdigest()


def _rate(calls: int, argv: list[str], env: dict[str, str] | None) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL)
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        workdir = Path(tmp)
        source = workdir / "payload"
        with open(source, "wb") as f:
            block = bytes(range(256)) * 4096
            for _ in range(args.mib):
                f.write(block)
        want = hashlib.sha256(source.read_bytes()).hexdigest()
        with LocalVM(workdir, services={"bench.Nothing": "#!/bin/sh\n"}) as vm:
            cmd = vm.client_argv(f"{vm.user}:cat")
            baseline_s, base_hash = _pump(["cat"], None, source)
            qrexec_s, got_hash = _pump(cmd, vm.dom0_env, source)
            assert base_hash == want and got_hash == want, "payload corrupted"
            nothing = vm.client_argv(f"{vm.user}:QUBESRPC bench.Nothing dom0")
            qrexec_calls = _rate(args.calls, nothing, vm.dom0_env)
            startup = _rate(args.calls, [vm.client_argv("x")[0], "--help"], vm.dom0_env)
            local_calls = _rate(args.calls, ["sh", "-c", "true"], None)
    print(f"dom0->VM cat, {args.mib} MiB each way: {args.mib / qrexec_s:8.1f} MiB/s "
          f"(baseline local cat pipe: {args.mib / baseline_s:8.1f} MiB/s)")
    print(f"dom0->VM calls of an empty service: {qrexec_calls:8.1f} calls/s "
          f"(baselines: local sh -c true {local_calls:8.1f}/s, "
          f"qrexec-client --help alone {startup:6.1f}/s)")


if __name__ == "__main__":
    main()
