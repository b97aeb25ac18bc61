"""qrexec-trio demo: a scripted dom0 -> VM session in a temp dir.

It starts a VM (a qrexec-agent with domain id 42 and its own service dir) and
dom0's qrexec-daemon for it, as separate processes over the local vchan
backend, then runs qrexec-client calls against it and checks every answer.
It exits 0 only if every step behaved as shown, and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._localvm import LocalVM

_SERVICES = {
    "demo.Echo": '#!/bin/sh\necho "echo service in $(hostname), argument=${1:-none}, '
    'called by $QREXEC_REMOTE_DOMAIN"\nexec cat\n',
    "demo.Date": "#!/bin/sh\ndate -u +%Y-%m-%d\n",
}


@dataclass
class Step:
    title: str
    command: str
    options: tuple[str, ...] = ()
    stdin: bytes = b""
    expect_status: int = 0
    expect_stdout: bytes | None = None
    expect_stderr: bytes | None = None


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(workdir: Path, *, verbose: bool) -> int:
    logs = None if verbose else subprocess.DEVNULL
    _say(f"== qrexec-trio demo in {workdir}")
    _say("   VM 'work' (domid 42): qrexec-agent, services " + ", ".join(_SERVICES))
    vm = LocalVM(workdir, services=_SERVICES, logs=logs,
                 log_options=("--log-format", "console", "--log-level", "info"))
    try:
        vm.__enter__()
    except RuntimeError as exc:
        _say(f"!! {exc}")
        return 1
    user = vm.user
    try:
        _say("   dom0: qrexec-daemon connected to the agent; socket qrexec.42 (+ qrexec.work)")
        steps = [
            Step("a shell command with stdin, stdout, stderr and an exit code",
                 f"{user}:sort; echo 'note on stderr' >&2; exit 3",
                 stdin=b"pear\napple\nfig\n", expect_status=3,
                 expect_stdout=b"apple\nfig\npear\n", expect_stderr=b"note on stderr\n"),
            Step("an RPC service with an argument (DEFAULT: user substituted by the daemon)",
                 "DEFAULT:QUBESRPC demo.Echo+hello dom0", stdin=b"ping\n"),
            Step("a service that does not exist", f"{user}:QUBESRPC demo.Missing dom0",
                 expect_status=127, expect_stdout=b""),
            Step("a command killed by a signal", f"{user}:kill -TERM $$", expect_status=143),
            Step("1 MiB of binary data through cat", f"{user}:cat",
                 stdin=bytes(range(256)) * 4096, expect_stdout=bytes(range(256)) * 4096),
            Step("JUST_EXEC: start a command without a data phase",
                 f"{user}:touch {workdir}/just-exec-ran", options=("-e",)),
        ]
        failures = 0
        for number, step in enumerate(steps, 1):
            _say(f"\n-- step {number}: {step.title}")
            _say(f"   $ qrexec-client {' '.join(step.options)} -d work '{step.command}'")
            result = subprocess.run(
                vm.client_argv(step.command, *step.options), input=step.stdin,
                capture_output=True, env=vm.dom0_env, timeout=60, check=False,
            )
            if len(result.stdout) < 200:
                for line in result.stdout.decode(errors="replace").splitlines():
                    _say(f"   stdout| {line}")
            else:
                digest = hashlib.sha256(result.stdout).hexdigest()[:16]
                _say(f"   stdout| ({len(result.stdout)} bytes, sha256 {digest}...)")
            for line in result.stderr.decode(errors="replace").splitlines():
                _say(f"   stderr| {line}")
            problems = []
            if result.returncode != step.expect_status:
                problems.append(f"exit {result.returncode}, expected {step.expect_status}")
            if step.expect_stdout is not None and result.stdout != step.expect_stdout:
                problems.append("stdout differs from what was expected")
            if step.expect_stderr is not None and result.stderr != step.expect_stderr:
                problems.append("stderr differs from what was expected")
            _say(f"   exit code {result.returncode}: " + ("; ".join(problems) or "as expected"))
            failures += bool(problems)
        # JUST_EXEC only reports the start: check that the command really ran.
        ran = workdir / "just-exec-ran"
        deadline = time.monotonic() + 10
        while not ran.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        just_exec_ran = ran.exists()
        if not just_exec_ran:
            _say("!! the JUST_EXEC command did not run")
        _say(f"\n== {len(steps) - failures} of {len(steps)} steps behaved as shown")
        return 0 if failures == 0 and just_exec_ran else 1
    finally:
        vm.stop()
        _say("== VM and daemon stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-trio demo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the agent's and the daemon's logs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="qrexec-demo-"))
    try:
        return run_demo(workdir, verbose=args.verbose)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
