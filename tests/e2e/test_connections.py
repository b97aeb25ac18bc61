"""`qrexec-trio connections` and `qrexec-trio kill` against a running local world.

Every program is a real process: the world, its daemons and agents, the
clients (`qrexec-trio call` is qrexec-client-vm inside a VM, `qrexec-trio run`
is qrexec-client in dom0) and the services. A call is listed once per program
it passes through, under one id; killing that id tears its whole pipeline
down (service processes, DispVM) and leaves every other call alone.

Waits are on observable state (the listing, processes, directories), each
bounded. Set-up is held still deterministically by an :class:`AdminGate` in
front of the world's admin socket: it plays a qubesd that is slow to answer
one method (as a real one is, making a DispVM), so a call is in set-up for as
long as the test wants, and nothing depends on winning a race.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from harness import STAND_IN, Host, marked_processes, wait_for
from qrexec_trio.domains import QubesdDomains
from qrexec_trio.nursery import CONNECTIONS, parse_connections

from .worlds import RunningWorld

#: How long a call may take to show a change (generous: CI machines are busy).
WAIT = 30.0
DAEMON_WORK = "qrexec-daemon:work"
AGENT_WORK = "qrexec-agent:work"
DAEMON_VAULT = "qrexec-daemon:vault"
AGENT_VAULT = "qrexec-agent:vault"
#: What a client whose call was cut reports (no exit status came back).
CUT = 255
#: A call killed in set-up: cut, or refused if the daemon's refusal reaches the
#: caller's agent before that agent's own cancel does (both are cancelled at once).
KILLED_IN_SETUP = (CUT, 126)


# -- helpers ---------------------------------------------------------------------------


def state(world: RunningWorld) -> dict[str, Any]:
    return json.loads((world.dir / "world.json").read_text())


def connections(world: RunningWorld) -> list[dict[str, Any]]:
    """`qrexec-trio connections --json`."""
    result = world.run("connections", "--json", timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _admin(world: RunningWorld) -> QubesdDomains:
    return QubesdDomains(str(state(world)["qubesd_socket"]), call_timeout=WAIT)


def live(world: RunningWorld) -> list[dict[str, Any]]:
    """The same listing, asked in-process (what the command asks): for polling."""
    return parse_connections(trio.run(_admin(world).call, CONNECTIONS, "dom0"))


def domain_names(world: RunningWorld) -> list[str]:
    """The world's domains as its admin socket lists them (what `vms` shows)."""
    return [domain.name for domain in trio.run(_admin(world).list)]


def by_owner(listing: list[dict[str, Any]], call_id: str) -> dict[str, dict[str, Any]]:
    """The entries of one id, keyed by the program that holds it."""
    entries = [e for e in listing if e["id"] == call_id]
    owners = {e["owner"]: e for e in entries}
    assert len(owners) == len(entries), f"one program lists {call_id} twice: {entries}"
    return owners


def ids_of(listing: list[dict[str, Any]], owner: str) -> set[str]:
    return {e["id"] for e in listing if e["owner"] == owner}


def kill(world: RunningWorld, call_id: str) -> subprocess.CompletedProcess[bytes]:
    return world.run("kill", call_id, timeout=WAIT)


def start_call(world: RunningWorld, target: str, service: str) -> subprocess.Popen[bytes]:
    """`qrexec-trio call work TARGET SERVICE` with stdin and stdout pipes of ours."""
    return world.start("call", "work", target, service, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)


def read_exactly(proc: subprocess.Popen[bytes], size: int, timeout: float = WAIT) -> bytes:
    """``size`` bytes of ``proc``'s stdout, or an AssertionError (EOF, too slow)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {data!r} of {size} bytes after {timeout}s"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, size - len(data))
            assert chunk, f"EOF after {data!r}, {size} bytes expected"
            data += chunk
    return data


def finish(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> tuple[int, bytes, bytes]:
    """Close stdin, read the rest, wait: (status, rest of stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def end(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a client of the test is gone (teardown of a failed test)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=WAIT)


def processes_of_call(host: Host, call_id: str) -> list[psutil.Process]:
    """Live processes started for ``call_id`` (services carry it in QREXEC_CALL_ID)."""
    found = []
    for proc in marked_processes(host.mark):
        try:
            if proc.environ().get("QREXEC_CALL_ID") == call_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def processes_of_vm(world: RunningWorld, host: Host, name: str) -> list[psutil.Process]:
    """Live processes of VM ``name``: its agent, its daemon, its services (and their
    QREXEC_AGENT_PID stand-ins)."""
    services = f"{world.dir / 'vms' / name}/"
    found = []
    for proc in marked_processes(host.mark):
        try:
            argv, env = proc.cmdline(), proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if name in argv or env.get("QREXEC_SERVICE_PATH", "").startswith(services):
            found.append(proc)
    return found


def vms_listed(world: RunningWorld) -> list[str]:
    result = world.run("vms", timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.decode().splitlines() if line.strip()]


def dispvm_gone(world: RunningWorld) -> bool:
    return not world.dispvms() and not any(n.startswith("disp") for n in domain_names(world))


def wait_until_empty(world: RunningWorld) -> None:
    wait_for(lambda: live(world) == [], timeout=WAIT, what="no live connection in the world")


class AdminGate:
    """A stand-in in front of the world's admin socket that holds back one method.

    The daemons reach the world's domain manager through ``qubesd.sock``; the
    gate takes that name (the world's socket is renamed beside it) and passes
    every request and reply on unchanged, but for ``method`` it holds, until
    :meth:`open`, either the request (``hold="request"``: qubesd has not got
    to it yet) or the reply (``hold="reply"``: qubesd has done it, its answer
    is not out yet). Either is a qubesd busy making or starting a DispVM, as
    a real one is for seconds. A reply whose client has gone is dropped.
    """

    def __init__(self, world: RunningWorld, method: str, hold: str) -> None:
        assert hold in ("request", "reply")
        self.method = method.encode()
        self.hold = hold
        self.path = Path(state(world)["qubesd_socket"])
        self.real = self.path.with_name("qubesd.real")
        #: Set once a call of ``method`` is being held.
        self.holding = threading.Event()
        #: Set once the world has answered a call of ``method``.
        self.answered = threading.Event()
        self._open = threading.Event()
        self._threads: list[threading.Thread] = []
        self.path.rename(self.real)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        """Let everything through, stop, and give the world its socket back."""
        self._open.set()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(WAIT)
        for thread in self._threads:
            thread.join(WAIT)
        self.path.unlink()
        self.real.rename(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _wait_if(self, held: bool) -> None:
        if held:
            self.holding.set()
            self._open.wait(WAIT * 2)

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT)
            request = _read_to_eof(conn)
            held = request.split(b" ", 1)[0].partition(b"+")[0] == self.method
            self._wait_if(held and self.hold == "request")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
                    upstream.settimeout(WAIT)
                    upstream.connect(str(self.real))
                    upstream.sendall(request)
                    upstream.shutdown(socket.SHUT_WR)
                    reply = _read_to_eof(upstream)
                if held:
                    self.answered.set()
                self._wait_if(held and self.hold == "reply")
                conn.sendall(reply)
            except OSError:
                pass  # the client went away (that is the point of some tests)


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def gate_factory(world: RunningWorld) -> Iterator[Any]:
    gates: list[AdminGate] = []

    def make(method: str, hold: str) -> AdminGate:
        gate = AdminGate(world, method, hold)
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.close()


def daemon_entry_in_setup(world: RunningWorld) -> dict[str, Any] | None:
    for entry in live(world):
        if entry["owner"] == DAEMON_WORK and entry["state"] == "setup":
            return entry
    return None


# -- the tests ---------------------------------------------------------------------------


def test_vm_to_vm_call_is_listed_by_every_program_it_passes_with_its_bytes(
    world: RunningWorld,
) -> None:
    call = start_call(world, "vault", "demo.Echo")
    try:
        assert read_exactly(call, 6) == b"vault\n"  # the service runs: the call is glued
        listing = connections(world)
        (source_id,) = ids_of(listing, DAEMON_WORK)
        assert source_id.startswith("10."), source_id
        owners = by_owner(listing, source_id)
        assert set(owners) == {DAEMON_WORK, AGENT_WORK}, listing
        for entry in owners.values():
            assert entry["state"] == "running", entry
            assert entry["target"] == "vault", entry
            assert entry["service"] == "demo.Echo", entry
        assert (owners[DAEMON_WORK]["source"], owners[DAEMON_WORK]["kind"]) == (
            "work", "vm-request")
        # The target's own leg: dom0 -> vault, under vault's id, in vault's daemon and agent.
        (target_id,) = ids_of(listing, DAEMON_VAULT)
        assert target_id.startswith("11."), target_id
        target_owners = by_owner(listing, target_id)
        assert set(target_owners) == {DAEMON_VAULT, AGENT_VAULT}, listing
        assert all(e["state"] == "running" for e in target_owners.values()), listing
        assert target_owners[AGENT_VAULT]["source"] == "work"
        assert target_owners[AGENT_VAULT]["service"].startswith("demo.Echo")
        assert len(listing) == 4, listing  # nothing else

        payload = bytes(range(256)) * 40  # 10240 bytes
        assert call.stdin is not None
        call.stdin.write(payload)
        assert read_exactly(call, len(payload)) == payload

        def counted() -> dict[str, Any] | None:
            entry = by_owner(live(world), source_id).get(DAEMON_WORK)
            if entry and entry["bytes_to_service"] >= len(payload) \
                    and entry["bytes_to_caller"] >= len(payload) + 6:
                return entry
            return None

        # The daemon counts what it relays, framing included.
        wait_for(counted, timeout=WAIT, what="the daemon's counters to reach the payload")
        status, rest, err = finish(call)
        assert (status, rest) == (0, b""), err
    finally:
        end(call)
    wait_until_empty(world)


def test_kill_one_of_three_calls_leaves_the_others_running(
    world: RunningWorld, host: Host
) -> None:
    calls: list[subprocess.Popen[bytes]] = []
    source_ids: list[str] = []
    target_ids: list[str] = []
    try:
        for _ in range(3):
            # One at a time, so that each call's ids are the new ones in the listing.
            call = start_call(world, "vault", "demo.Echo")
            calls.append(call)
            assert read_exactly(call, 6) == b"vault\n"
            listing = live(world)
            (source_id,) = ids_of(listing, DAEMON_WORK) - set(source_ids)
            (target_id,) = ids_of(listing, AGENT_VAULT) - set(target_ids)
            source_ids.append(source_id)
            target_ids.append(target_id)
        for target_id in target_ids:
            assert len(processes_of_call(host, target_id)) == 1, target_id

        result = kill(world, source_ids[1])
        assert (result.returncode, result.stderr) == (0, b"")

        status, rest, err = finish(calls[1])
        assert (status, rest) == (CUT, b""), err
        wait_for(lambda: not processes_of_call(host, target_ids[1]), timeout=WAIT,
                 what="the killed call's service process to end")
        gone = {source_ids[1], target_ids[1]}
        wait_for(lambda: not gone & {e["id"] for e in live(world)}, timeout=WAIT,
                 what="the killed call to leave the listing")

        listing = connections(world)
        assert len(listing) == 8, listing  # two calls, four entries each
        for number in (0, 2):
            assert by_owner(listing, source_ids[number]).keys() == {DAEMON_WORK, AGENT_WORK}
            assert by_owner(listing, target_ids[number]).keys() == {DAEMON_VAULT, AGENT_VAULT}
            assert len(processes_of_call(host, target_ids[number])) == 1

        for number in (0, 2):
            call = calls[number]
            assert call.stdin is not None
            line = f"still here {number}\n".encode()
            call.stdin.write(line)
            assert read_exactly(call, len(line)) == line
            status, rest, err = finish(call)
            assert (status, rest) == (0, b""), err
    finally:
        for call in calls:
            end(call)
    wait_until_empty(world)
    for target_id in target_ids:
        assert not processes_of_call(host, target_id)


def test_kill_during_the_data_phase_of_a_dispvm_call_destroys_the_dispvm(
    world: RunningWorld, host: Host
) -> None:
    call = start_call(world, "@dispvm", "demo.Hold")
    try:
        assert read_exactly(call, 5) == b"held\n"
        (dispvm,) = world.dispvms()
        listing = live(world)
        (entry,) = [e for e in listing if e["owner"] == DAEMON_WORK]
        # Once made, the DispVM is the call's target by name.
        assert (entry["target"], entry["state"], entry["service"]) == (
            dispvm, "running", "demo.Hold"), entry
        assert {e["owner"] for e in listing if e["owner"].endswith(f":{dispvm}")} == {
            f"qrexec-daemon:{dispvm}", f"qrexec-agent:{dispvm}"}, listing
        assert dispvm in domain_names(world)
        # Its agent, its daemon, the service, and the service's QREXEC_AGENT_PID stand-in.
        roles = sorted(STAND_IN if p.cmdline()[:1] == [STAND_IN] else p.name()
                       for p in processes_of_vm(world, host, dispvm))
        assert roles == sorted(["qrexec-agent", "qrexec-daemon", "cat", STAND_IN]), roles

        result = kill(world, entry["id"])
        assert (result.returncode, result.stderr) == (0, b"")
        status, rest, err = finish(call)
        assert (status, rest) == (CUT, b""), err
        wait_for(lambda: dispvm_gone(world), timeout=WAIT, what="the DispVM to be destroyed")
        assert dispvm not in vms_listed(world)
    finally:
        end(call)
    wait_for(lambda: not processes_of_vm(world, host, dispvm), timeout=WAIT,
             what="the DispVM's agent, daemon and service to end")
    wait_until_empty(world)


def test_kill_during_setup_while_the_dispvm_starts_leaves_nothing(
    world: RunningWorld, host: Host, gate_factory: Any
) -> None:
    # The DispVM runs, but the daemon has not heard so yet: the call stays in
    # set-up until the gate opens, which is after the kill has been delivered.
    gate = gate_factory("admin.vm.Start", hold="reply")
    call = start_call(world, "@dispvm", "demo.Hold")
    try:
        assert gate.holding.wait(WAIT), "the daemon never asked to start the DispVM"
        (dispvm,) = world.dispvms()
        entry = daemon_entry_in_setup(world)
        assert entry is not None, live(world)
        assert entry["target"].startswith("@dispvm"), entry  # not yet renamed to it
        # Its agent and daemon (the daemon of a VM is in dom0, named for it).
        assert len(processes_of_vm(world, host, dispvm)) == 2, "the DispVM is not running"

        result = kill(world, entry["id"])
        assert (result.returncode, result.stderr) == (0, b"")
        gate.open()  # the answer comes too late: the call is no more
        status, rest, err = finish(call)
        assert status in KILLED_IN_SETUP, err
        assert rest == b""
        wait_for(lambda: dispvm_gone(world), timeout=WAIT, what="the DispVM to be destroyed")
        wait_for(lambda: not processes_of_vm(world, host, dispvm), timeout=WAIT,
                 what="the DispVM's agent and daemon to end")
    finally:
        gate.open()
        end(call)
    wait_until_empty(world)


def test_kill_while_the_dispvm_is_being_created_leaves_no_dispvm(
    world: RunningWorld, gate_factory: Any
) -> None:
    """A call killed while its CreateDisposable is in flight must not leave a DispVM.

    The daemon learns the DispVM's name only from qubesd's reply; had the kill
    cancelled the admin call, the DispVM that qubesd goes on to make would
    belong to nobody (it did, once). On Qubes, making a DispVM takes seconds,
    so the window is wide.
    """
    gate = gate_factory("admin.vm.CreateDisposable", hold="request")
    call = start_call(world, "@dispvm", "demo.Hold")
    try:
        assert gate.holding.wait(WAIT), "the daemon never asked for a DispVM"
        entry = daemon_entry_in_setup(world)
        assert entry is not None, live(world)
        assert entry["target"].startswith("@dispvm"), entry
        assert world.dispvms() == []

        result = kill(world, entry["id"])
        assert (result.returncode, result.stderr) == (0, b"")
        gate.open()  # qubesd finishes making the DispVM the call asked for
        assert gate.answered.wait(WAIT), "the world did not answer CreateDisposable"
        status, _, err = finish(call)
        assert status in KILLED_IN_SETUP, err
        try:
            wait_for(lambda: dispvm_gone(world), timeout=10, what="no DispVM to remain")
        except AssertionError:
            pytest.fail(f"DispVM left behind by a killed call: directories {world.dispvms()}, "
                        f"domains {domain_names(world)}, connections {live(world)}")
        wait_until_empty(world)
    finally:
        gate.open()
        end(call)


def test_kill_of_an_unknown_a_finished_or_a_malformed_id_fails(world: RunningWorld) -> None:
    result = kill(world, "10.1-2-3")
    assert result.returncode == 1
    assert result.stderr.strip() == b"qrexec-trio kill: no live connection '10.1-2-3'"

    for bad in ("10.1 2", "a/b"):
        result = kill(world, bad)
        assert result.returncode == 1, bad
        assert result.stderr.strip() == \
            f"qrexec-trio kill: {bad!r} is not a connection id".encode()

    call = start_call(world, "vault", "demo.Echo")
    try:
        assert read_exactly(call, 6) == b"vault\n"
        (call_id,) = ids_of(live(world), DAEMON_WORK)
        status, _, err = finish(call)
        assert status == 0, err
    finally:
        end(call)
    wait_until_empty(world)
    result = kill(world, call_id)
    assert result.returncode == 1
    assert result.stderr.strip() == f"qrexec-trio kill: no live connection {call_id!r}".encode()


def test_dom0_to_vm_call_is_listed_under_the_vm_port_and_killed(
    world: RunningWorld, host: Host
) -> None:
    run = world.start("run", "vault", "cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, bufsize=0)
    try:
        assert run.stdin is not None
        run.stdin.write(b"ping\n")
        assert read_exactly(run, 5) == b"ping\n"
        listing = connections(world)
        (call_id,) = ids_of(listing, DAEMON_VAULT)
        number, _, port = call_id.partition(".")
        assert number == "11" and port.isdigit(), call_id
        owners = by_owner(listing, call_id)
        assert set(owners) == {DAEMON_VAULT, AGENT_VAULT}, listing
        assert len(listing) == 2, listing
        assert all(e["state"] == "running" for e in owners.values()), listing
        assert owners[DAEMON_VAULT]["service"] == "cat"
        assert processes_of_call(host, call_id), "no process of the agent for the command"
        table = world.run("connections", timeout=WAIT)
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.decode().splitlines()
        assert header.split()[:3] == ["ID", "OWNER", "STATE"]
        assert sorted(row.split()[:3] for row in rows) == [
            [call_id, AGENT_VAULT, "running"], [call_id, DAEMON_VAULT, "running"]]

        result = kill(world, call_id)
        assert (result.returncode, result.stderr) == (0, b"")
        status, rest, err = finish(run)
        assert (status, rest) == (CUT, b""), err
        wait_for(lambda: not processes_of_call(host, call_id), timeout=WAIT,
                 what="the agent's process for the command to end")
    finally:
        end(run)
    wait_until_empty(world)
