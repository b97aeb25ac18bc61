"""Many calls at once through a real world (issue 13, deliverable 3).

The world's daemons and agents are the real programs, as separate processes,
over the world's vchan backend. The callers are this test's own trio tasks
speaking the callers' protocol (the trigger socket of a VM's agent, or a
dom0 daemon's socket, then serving the data vchan), because hundreds of
concurrent caller *processes* would measure process start-up on two cores,
not qrexec. Every call sends its own data and must get exactly it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from harness import Host
from qrexec_trio._config import Timeouts
from qrexec_trio._sockets import connect_unix
from qrexec_trio.blocking._vm_call import trigger_frame
from qrexec_trio.nursery import FramedLink, open_caller_link
from qrexec_trio.protocol import (
    Data,
    ExecCmdline,
    ExitCode,
    Stream,
    TriggerAnswer,
)
from qrexec_trio.roles._connect import ConnectError, request_port
from qrexec_trio.world import load_world_config
from qrexec_trio.xen import VchanBackend
from qrexec_trio.xen._socket import SocketBackend

from .worlds import RunningWorld

VMS = ("a", "b", "c", "d")

CONFIG = "\n".join(
    f'[vm.{name}]\ndomid = {10 + number}\n[vm.{name}.services]\n"demo.Echo" = "exec cat"\n'
    for number, name in enumerate(VMS)
) + "\n[policy]\nrules = 'demo.Echo * @anyvm @anyvm allow'\n"

#: No call may take longer than this (hung), however many run at once.
CALL_BOUND = 120.0
TIMEOUTS = Timeouts()


@dataclass
class Outcome:
    completed: int = 0
    refused: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


@pytest.fixture
def world4(host: Host) -> Iterator[RunningWorld]:
    # Each call holds a few fds here; the default soft limit (often 1024) is
    # a limit of this test process, not of qrexec.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    world = RunningWorld(host, CONFIG)
    try:
        yield world
    finally:
        assert world.stop() == 0
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _state(world: RunningWorld) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((world.dir / "world.json").read_text())
    return state


def _backend(state: dict[str, Any], domid: int) -> VchanBackend:
    if state["vchan"] == "socket":
        return SocketBackend(state["vchan_dir"], domid)
    from qrexec_trio.xen._shm import ShmBackend  # compiled: loaded only when used

    return ShmBackend(state["vchan_dir"], domid)


async def _exchange(link: FramedLink, payload: bytes) -> tuple[bytes, int]:
    """Send ``payload`` and its EOF as the caller; the echoed stdout and the exit status."""
    async with link.stream:
        await link.send(Data(Stream.STDIN, payload))
        await link.send(Data(Stream.STDIN, b""))
        received = bytearray()
        while True:
            event = await link.receive()
            match event:
                case Data(Stream.STDOUT, data):
                    received += data
                case ExitCode(status):
                    return bytes(received), status
                case None:
                    return bytes(received), -1
                case _:
                    pass


async def vm_call(state: dict[str, Any], source: str, target: str, payload: bytes) -> bytes:
    """One call from VM ``source`` to ``target``'s demo.Echo, as qrexec-client-vm makes it."""
    vm = state["vms"][source]
    stream = await connect_unix(os.path.join(vm["runtime_dir"], "qrexec-agent"),
                                timeout=TIMEOUTS.handshake)
    async with stream:
        await stream.send_all(trigger_frame(b"", target.encode(), b"demo.Echo", b"SOCKET"))
        reply = b""
        while len(reply) < TriggerAnswer.SIZE:
            chunk = await stream.receive_some(TriggerAnswer.SIZE - len(reply))
            if not chunk:
                raise ConnectError("refused")
            reply += chunk
        answer = TriggerAnswer.decode(reply)
        link = await open_caller_link(
            _backend(state, vm["domid"]), answer.connect_domain, answer.connect_port,
            accept_timeout=TIMEOUTS.data_vchan_connect, handshake_timeout=TIMEOUTS.handshake)
        output, status = await _exchange(link, payload)
    assert status == 0, f"{source}->{target} exited {status}"
    return output


async def dom0_call(state: dict[str, Any], target: str, payload: bytes) -> bytes:
    """One dom0 -> VM call of demo.Echo, as ``qrexec-client -d TARGET
    'DEFAULT:QUBESRPC demo.Echo dom0'`` makes it.

    A service rather than a plain command: a plain command runs in the user's
    login shell, and 256 login shells at once would measure the machine's
    shell profile (pyenv's, here), not qrexec.
    """
    request = ExecCmdline(0, 0, b"DEFAULT:QUBESRPC demo.Echo dom0")
    stream, domid, port = await request_port(state["socket_dir"], target, request, TIMEOUTS)
    async with stream:
        link = await open_caller_link(_backend(state, 0), domid, port,
                                      accept_timeout=TIMEOUTS.data_vchan_accept,
                                      handshake_timeout=TIMEOUTS.handshake)
        output, status = await _exchange(link, payload)
    assert status == 0, f"dom0->{target} exited {status}"
    return output


def _payload(number: int) -> bytes:
    return hashlib.sha256(str(number).encode()).digest() * (64 + number % 64)


async def _run_all(calls: list[tuple[int, Any]]) -> Outcome:
    """Run every ``(number, make_call(payload))`` at once; none may take over CALL_BOUND."""
    outcome = Outcome()

    async def one(number: int, call: Any) -> None:
        payload = _payload(number)
        try:
            output = await call(payload)
        except ConnectError as exc:
            outcome.refused.append(f"call {number}: {exc}")
            return
        if output != payload:
            outcome.wrong.append(f"call {number}: {len(output)} of {len(payload)} bytes")
        else:
            outcome.completed += 1

    with trio.fail_after(CALL_BOUND):  # a hang fails the test, never the suite
        async with trio.open_nursery() as nursery:
            for number, call in calls:
                nursery.start_soon(one, number, call)
    return outcome


def _vm_calls(state: dict[str, Any], pairs: list[tuple[str, str]]) -> list[tuple[int, Any]]:
    return [(number, lambda payload, s=source, t=target: vm_call(state, s, t, payload))
            for number, (source, target) in enumerate(pairs)]


def test_256_concurrent_vm_to_vm_calls_from_one_vm(world4: RunningWorld) -> None:
    state = _state(world4)
    calls = _vm_calls(state, [("a", "b")] * 256)
    outcome = trio.run(_run_all, calls)
    assert (outcome.completed, outcome.refused, outcome.wrong) == (256, [], [])


def test_256_concurrent_dom0_to_vm_calls(world4: RunningWorld) -> None:
    state = _state(world4)
    calls = [(number, lambda payload: dom0_call(state, "b", payload)) for number in range(256)]
    outcome = trio.run(_run_all, calls)
    assert (outcome.completed, outcome.refused, outcome.wrong) == (256, [], [])


@pytest.mark.slow
def test_1000_concurrent_calls_across_four_vms(world4: RunningWorld) -> None:
    state = _state(world4)
    pairs = [(source, target) for source in VMS for target in VMS if source != target]
    calls = _vm_calls(state, [pairs[number % len(pairs)] for number in range(1000)])
    outcome = trio.run(_run_all, calls)
    # 250 calls per VM fit the default per-VM limit, so none may be refused.
    assert (outcome.completed, outcome.refused, outcome.wrong) == (1000, [], [])


def test_world_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text(CONFIG)
    assert [vm.name for vm in load_world_config(path).vms] == list(VMS)
