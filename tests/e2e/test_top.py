"""`qrexec-trio top` against a running local world, as a separate process.

A call held open (its service echoes and waits) must show as one row with
its source, target, service and the bytes its daemon counted; once the call
ends, the row goes. On a terminal, top redraws until Ctrl-C and then exits 0,
leaving the terminal's cursor shown and nothing running.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import termios
import threading
from pathlib import Path
from typing import Any

from harness import Host, program, wait_for
from qrexec_trio.roles.top import format_size

from .test_connections import (
    DAEMON_WORK,
    WAIT,
    end,
    finish,
    ids_of,
    live,
    read_exactly,
    start_call,
    wait_until_empty,
)
from .worlds import RunningWorld

#: What rich writes to show the cursor again when a live view stops.
SHOW_CURSOR = b"\x1b[?25h"


def top_once(world: RunningWorld) -> str:
    result = world.run("top", "--once", timeout=WAIT)
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    return result.stdout.decode()


def row(text: str, call_id: str) -> str | None:
    """The line of the table whose first cell is ``call_id``."""
    lines = [line for line in text.splitlines() if line.split()[:1] == [call_id]]
    assert len(lines) <= 1, text
    return lines[0] if lines else None


def test_top_once_shows_a_held_call_with_its_bytes_and_drops_it_when_it_ends(
    world: RunningWorld,
) -> None:
    call = start_call(world, "vault", "demo.Echo")
    try:
        assert read_exactly(call, 6) == b"vault\n"  # the service runs: the call is glued
        payload = bytes(range(256)) * 40
        assert call.stdin is not None
        call.stdin.write(payload)
        assert read_exactly(call, len(payload)) == payload
        (call_id,) = ids_of(live(world), DAEMON_WORK)

        def counted() -> dict[str, Any] | None:
            entry = next((e for e in live(world) if e["owner"] == DAEMON_WORK), None)
            if entry and entry["bytes_to_service"] >= len(payload) \
                    and entry["bytes_to_caller"] >= len(payload) + 6:
                return entry
            return None

        # The call is idle from here on: the daemon's counts stay as they are.
        entry = wait_for(counted, timeout=WAIT, what="the daemon's counters to reach the payload")
        line = row(top_once(world), call_id)
        assert line is not None, call_id
        assert line.split()[:5] == [call_id, "work", "vault", "demo.Echo", "running"], line
        after_state = line.split(maxsplit=6)[6]  # AGE IN OUT VIA
        assert f" {format_size(entry['bytes_to_service'])} " in after_state, line
        assert f" {format_size(entry['bytes_to_caller'])} " in after_state, line
        assert line.split()[-2:] == ["daemon:work", "agent:work"], line

        status, rest, err = finish(call)
        assert (status, rest) == (0, b""), err
    finally:
        end(call)
    wait_for(lambda: row(top_once(world), call_id) is None, timeout=WAIT,
             what="the ended call to leave top's table")
    wait_until_empty(world)
    assert "no live connections" in top_once(world).splitlines()[0]


def test_top_with_no_world_fails_like_connections(host: Host) -> None:
    def run(command: str, world_dir: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([program("qrexec-trio"), command, "--world", str(world_dir)],
                              capture_output=True, timeout=WAIT, env=host.env(0))

    missing = host.root / "no-world"
    for command in ("top", "connections"):
        result = run(command, missing)
        assert result.returncode == 1, command
        assert result.stderr.decode().splitlines() == [
            f"qrexec-trio: no world is running in {missing} "
            "(start one with: qrexec-trio world CONFIG)"], command
    # A world directory whose world is gone: nothing answers on its admin socket.
    stale = host.root / "stale"
    stale.mkdir()
    (stale / "world.json").write_text(json.dumps({"qubesd_socket": str(stale / "qubesd.sock")}))
    for command in ("top", "connections"):
        result = run(command, stale)
        assert result.returncode == 1, command
        (message,) = result.stderr.decode().splitlines()
        assert message.startswith(f"qrexec-trio {command}: "), message
        assert "cannot connect" in message, message


class Terminal:
    """A pseudo-terminal for top's stdout, read all the time (a full one would block top)."""

    def __init__(self, rows: int = 40, columns: int = 160) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self._seen = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:  # every slave end is closed: top has gone
                    return
                raise
            if not chunk:
                return
            with self._lock:
                self._seen += chunk

    @property
    def seen(self) -> bytes:
        with self._lock:
            return self._seen

    def shows(self, text: str, after: int = 0) -> bool:
        return text.encode() in self.seen[after:]

    def drained(self) -> bytes:
        """Everything shown, once the program has gone (the reader ends at EIO)."""
        self._reader.join(WAIT)
        assert not self._reader.is_alive(), "the terminal is still open"
        return self.seen

    def close(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        self._reader.join(WAIT)
        os.close(self.master)


def test_top_on_a_terminal_redraws_until_ctrl_c_then_exits_0(world: RunningWorld) -> None:
    terminal = Terminal()
    top = world.start("top", "--interval", "0.2", stdin=subprocess.DEVNULL,
                      stdout=terminal.slave, stderr=subprocess.PIPE)
    os.close(terminal.slave)  # top holds the only slave end: EIO once it is gone
    terminal.slave = -1
    call = None
    try:
        wait_for(lambda: terminal.shows("no live connections"), timeout=WAIT,
                 what="top's first frame")
        # A call started after the first frame shows up: top redraws.
        call = start_call(world, "vault", "demo.Echo")
        assert read_exactly(call, 6) == b"vault\n"
        (call_id,) = ids_of(live(world), DAEMON_WORK)
        wait_for(lambda: terminal.shows(call_id), timeout=WAIT, what="the call in top's view")
        status, _, err = finish(call)
        assert status == 0, err
        mark = len(terminal.seen)
        wait_for(lambda: terminal.shows("no live connections", after=mark), timeout=WAIT,
                 what="top to redraw without the ended call")

        top.send_signal(signal.SIGINT)
        assert top.wait(WAIT) == 0
        assert top.stderr is not None and top.stderr.read() == b""
        # The last thing on the terminal: the cursor, shown again.
        assert terminal.drained().rstrip(b"\r\n").endswith(SHOW_CURSOR), terminal.seen[-200:]
    finally:
        if call is not None:
            end(call)
        if top.poll() is None:
            top.kill()
            top.wait(WAIT)
        if top.stderr is not None:
            top.stderr.close()
        terminal.close()
    wait_until_empty(world)
