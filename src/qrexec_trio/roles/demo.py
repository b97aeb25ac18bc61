"""qrexec-trio demo: the local world, narrated, checked step by step.

It starts the demo world packaged with qrexec-trio (``qrexec_trio/world/demo/``:
dom0's daemons, VMs work, vault and personal, a DispVM template) as a separate
process in a temp dir, then shows: a dom0 -> VM command, a VM -> VM call
allowed by policy, a denied call, a DispVM call (its creation and destruction
visible), a cancelled call whose whole pipeline is torn down, and a call
watched with ``qrexec-trio connections`` and cut with ``qrexec-trio kill``. Every step
is checked; the demo exits 0 only if every step behaved as shown, and the
world leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TypeVar

from .._help import finish_parser
from .._programs import program

T = TypeVar("T")


@contextlib.contextmanager
def packaged_world() -> Iterator[Path]:
    """The packaged demo world's ``demo.toml``, as a real file with its services beside it.

    It is package data (``qrexec_trio/world/demo/``), so the demo works from an
    installed wheel as from the source tree.
    """
    with resources.as_file(resources.files("qrexec_trio.world") / "demo") as directory:
        yield directory / "demo.toml"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _show(label: str, data: bytes, *, limit: int = 300) -> None:
    if len(data) > limit:
        digest = hashlib.sha256(data).hexdigest()[:16]
        _say(f"   {label}| ({len(data)} bytes, sha256 {digest}...)")
        return
    for line in data.decode(errors="replace").splitlines():
        _say(f"   {label}| {line}")


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _wait_for_value(probe: Callable[[], T | None], timeout: float) -> T | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.1)
    return probe()


class Demo:
    def __init__(self, world_dir: Path) -> None:
        self.world_dir = world_dir
        self.failures: list[str] = []
        self.checks = 0

    def qrexec_trio(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        argv = [program("qrexec-trio"), *args[:1], "--world", str(self.world_dir), *args[1:]]
        _say(f"   $ qrexec-trio {' '.join(args)}")
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=120, check=False)

    def check(self, what: str, ok: bool) -> None:
        self.checks += 1
        _say(f"   {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failures.append(what)

    def dispvms(self) -> list[str]:
        vms = self.world_dir / "vms"
        return sorted(p.name for p in vms.iterdir() if p.name.startswith("disp")) \
            if vms.exists() else []

    def step(self, number: int, title: str) -> None:
        _say(f"\n-- step {number}: {title}")

    def run_steps(self) -> None:
        self.step(1, "dom0 runs a command in a VM (qrexec-client)")
        result = self.qrexec_trio("run", "work", "sort", stdin=b"pear\napple\nfig\n")
        _show("stdout", result.stdout)
        self.check("sorted lines came back, exit 0",
                   result.returncode == 0 and result.stdout == b"apple\nfig\npear\n")

        self.step(2, "VM -> VM call allowed by policy: work asks vault to sign, "
                  "the secret never leaves vault")
        result = self.qrexec_trio("call", "work", "vault", "demo.Sign", stdin=b"invoice 42\n")
        _show("stdout", result.stdout)
        signature = result.stdout.strip()
        self.check("a 64-hex-digit signature, exit 0", result.returncode == 0
                   and len(signature) == 64 and all(c in b"0123456789abcdef" for c in signature))

        self.step(3, "a denied call: personal may not use vault's signing service")
        result = self.qrexec_trio("call", "personal", "vault", "demo.Sign", stdin=b"x")
        _show("stderr", result.stderr)
        self.check("refused with exit 126", result.returncode == 126
                   and b"call refused" in result.stderr)

        self.step(4, "a DispVM call: work -> @dispvm demo.Reverse, a fresh VM for one call")
        before = self.dispvms()
        call = subprocess.Popen(
            [program("qrexec-trio"), "call", "--world", str(self.world_dir), "work", "@dispvm",
             "demo.Reverse"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _say("   $ qrexec-trio call work @dispvm demo.Reverse")
        created = _wait(lambda: len(self.dispvms()) > len(before), 30)
        _say(f"   DispVM created: {', '.join(self.dispvms()) or 'none'}")
        out, _ = call.communicate(b"stressed\n", timeout=60)
        _show("stdout", out)
        gone = _wait(lambda: self.dispvms() == before, 30)
        _say(f"   after the call, DispVMs: {', '.join(self.dispvms()) or 'none'}")
        self.check("reversed text from a DispVM that was created and then destroyed",
                   created and gone and call.returncode == 0 and out == b"desserts\n")

        self.step(5, "a cancelled call: the caller is killed mid-call")
        call = subprocess.Popen(
            [program("qrexec-trio"), "call", "--world", str(self.world_dir), "work", "@dispvm",
             "demo.Reverse"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        _say("   $ qrexec-trio call work @dispvm demo.Reverse   (stdin left open)")
        created = _wait(lambda: len(self.dispvms()) > len(before), 30)
        _say(f"   DispVM running: {', '.join(self.dispvms()) or 'none'}; killing the caller")
        call.send_signal(signal.SIGKILL)
        call.wait()
        gone = _wait(lambda: self.dispvms() == before, 30)
        _say(f"   after the kill, DispVMs: {', '.join(self.dispvms()) or 'none'}")
        self.check("the whole pipeline, DispVM included, was torn down", created and gone)

        self.step(6, "watch and cut: list the live connections, kill one from outside")
        call = subprocess.Popen(
            [program("qrexec-trio"), "call", "--world", str(self.world_dir), "work", "vault",
             "demo.Echo"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        _say("   $ qrexec-trio call work vault demo.Echo   (stdin left open)")
        call_id = _wait_for_value(lambda: self._running_call("work", "vault"), 30)
        listing = self.qrexec_trio("connections")
        _show("stdout", listing.stdout, limit=4096)
        killed = self.qrexec_trio("kill", call_id or "?")
        try:
            status: int | None = call.wait(30)
        except subprocess.TimeoutExpired:
            call.kill()
            status = call.wait()
        gone = _wait(lambda: self._running_call("work", "vault") is None, 30)
        _say(f"   the caller exited with {status}; connections of the call left: "
             f"{'none' if gone else 'some'}")
        self.check("one id in the daemon's and the agent's registry, cut everywhere",
                   call_id is not None and killed.returncode == 0 and status != 0 and gone)
        assert call.stdin is not None
        call.stdin.close()

    def _running_call(self, source: str, target: str) -> str | None:
        """The id of the running call from ``source`` to ``target``, once both ends list it."""
        listing = subprocess.run(
            [program("qrexec-trio"), "connections", "--world", str(self.world_dir), "--json"],
            capture_output=True, timeout=30, check=False)
        owners: dict[str, set[str]] = {}
        for line in listing.stdout.splitlines():
            entry = json.loads(line)
            if entry.get("state") == "running" and entry.get("target") == target:
                owners.setdefault(str(entry["id"]), set()).add(str(entry["owner"]))
        for call_id, holders in owners.items():
            if {f"qrexec-daemon:{source}", f"qrexec-agent:{source}"} <= holders:
                return call_id
        return None


def run_demo(config: Path, workdir: Path, *, verbose: bool) -> int:
    world_dir = workdir / "world"
    _say(f"== qrexec-trio demo: the world of {config}, in {world_dir}")
    logs = None if verbose else subprocess.DEVNULL
    world = subprocess.Popen(
        [program("qrexec-trio"), "world", str(config), "--dir", str(world_dir),
         "--log-format", "console", *(["-v"] if verbose else [])],
        stdout=subprocess.PIPE, stderr=logs, stdin=subprocess.DEVNULL)
    demo = Demo(world_dir)
    try:
        assert world.stdout is not None
        summary = []
        for line in world.stdout:
            summary.append(line.decode(errors="replace").rstrip())
            if line.startswith(b"  stop:"):
                break
        if not (world_dir / "world.json").exists():
            _say("!! the world did not come up")
            return 1
        for text in summary:
            _say(f"   {text}")
        demo.run_steps()
    finally:
        world.send_signal(signal.SIGTERM)
        try:
            world.wait(60)
        except subprocess.TimeoutExpired:
            world.kill()
            world.wait()
    _say("\n-- the world stopped (SIGTERM)")
    demo.check("the world's directory is gone", not world_dir.exists())
    demo.check("the world exited cleanly", world.returncode == 0)
    _say(f"\n== {demo.checks - len(demo.failures)} of {demo.checks} checks behaved as shown")
    return 0 if not demo.failures else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-trio demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path,
                        help="the world to run (default: the packaged demo world, "
                        "qrexec_trio/world/demo/demo.toml)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the world's logs (every connection)")
    finish_parser(parser, "qrexec-trio demo", "qrexec-trio demo -v my-world.toml")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        config: Path = args.config or stack.enter_context(packaged_world())
        if not config.exists():
            print(f"qrexec-trio demo: no world config at {config}", file=sys.stderr)
            return 1
        workdir = Path(tempfile.mkdtemp(prefix="qrexec-demo-"))
        try:
            return run_demo(config.resolve(), workdir, verbose=args.verbose)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
