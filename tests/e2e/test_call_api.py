"""The in-process call API (qrexec_trio.call / call_blocking) against real
agents and daemons over a real vchan backend: the API runs in this (pytest)
process, as a VM's program or as dom0's, by the environment it is given."""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import qrexec_trio
from harness import VM, Host

ECHO = '#!/bin/sh\necho "arg=$1 src=$QREXEC_REMOTE_DOMAIN"\nexec cat\n'


@pytest.fixture
def pair(host: Host) -> tuple[VM, VM]:
    """vm1 (42) may call vm2 (43), which has test.Echo, test.Exit and test.Hold."""
    vm1 = host.start_vm("vm1", 42)
    vm2 = host.start_vm("vm2", 43)
    vm2.add_service("test.Echo", ECHO)
    vm2.add_service("test.Exit", "#!/bin/sh\nread x; echo out $x; echo err $x >&2; exit 5\n")
    # Says it started, then holds the call open until it is killed.
    vm2.add_service("test.Hold", "#!/bin/sh\necho started\nexec sleep 600\n")
    host.set_policy("test.Echo * vm1 vm2 allow\ntest.Exit * vm1 vm2 allow\n"
                    "test.Hold * vm1 vm2 allow\ntest.Denied * vm1 vm2 deny\n")
    return vm1, vm2


def in_vm(vm: VM) -> dict[str, object]:
    """The keywords that make a call from inside ``vm``."""
    return {"agent_socket": str(vm.runtime_dir / "qrexec-agent"),
            "env": vm.host.env(vm.domid)}


def in_dom0(host: Host) -> dict[str, object]:
    return {"socket_dir": str(host.socket_dir), "env": host.env(0)}


def open_fds() -> dict[str, str]:
    """This process's open fds and what they name (to say what leaked)."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd, closed meanwhile
    return fds


@contextlib.contextmanager
def nothing_left_open() -> Iterator[None]:
    """No fd opened inside stays open, and nothing was left for the garbage
    collector to close (CPython closes a dropped socket itself, with a
    ResourceWarning: the fd count alone would not see a missing close).

    Garbage from before the block is collected first, outside the recording:
    an earlier test's dropped ``Popen`` warns "still running" whenever it is
    collected, and would be blamed on the call under test."""
    gc.collect()
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    leaked = {fd: name for fd, name in open_fds().items() if fd not in before}
    assert (leaked, unclosed) == ({}, [])


class FirstData(trio.abc.SendStream):
    """A stdout that sets :attr:`arrived` at its first data."""

    def __init__(self) -> None:
        self.arrived = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.arrived.set()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_vm_to_vm_call_sends_stdin_and_captures_stdout(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    out = qrexec_trio.Capture()
    status = await qrexec_trio.call("vm2", "test.Echo", "arg", stdin=b"to-vm2\n", stdout=out,
                                    **in_vm(vm1))
    assert (status, out.data) == (0, b"arg=arg src=vm1\nto-vm2\n")


async def test_stdin_from_a_stream_and_the_service_exit_status(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"hello\n")
    out, err = qrexec_trio.Capture(), qrexec_trio.Capture()
    # The stream never ends: the call is over at the service's exit status all the same.
    status = await qrexec_trio.call("vm2", "test.Exit", stdin=receive, stdout=out, stderr=err,
                                    **in_vm(vm1))
    assert (status, out.data, err.data) == (5, b"out hello\n", b"err hello\n")


async def test_refused_call_raises_call_refused(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    with pytest.raises(qrexec_trio.CallRefused):
        await qrexec_trio.call("vm2", "test.Denied", **in_vm(vm1))
    with pytest.raises(qrexec_trio.CallRefused):  # no rule at all: denied too
        await qrexec_trio.call("vm2", "test.Unlisted", **in_vm(vm1))


async def test_missing_service_is_its_exit_status_127(pair: tuple[VM, VM], host: Host) -> None:
    vm1, _ = pair
    host.set_policy("test.Missing * vm1 vm2 allow\n", name="60-missing.policy")
    assert await qrexec_trio.call("vm2", "test.Missing", **in_vm(vm1)) == 127


async def test_no_agent_raises_agent_not_running(host: Host, short_tmp: Path) -> None:
    with pytest.raises(qrexec_trio.AgentNotRunning):
        await qrexec_trio.call("vm2", "test.Echo", agent_socket=str(short_tmp / "no-agent"),
                               env=host.env(42))


async def test_dom0_to_vm_call(pair: tuple[VM, VM], host: Host) -> None:
    out = qrexec_trio.Capture()
    status = await qrexec_trio.call("vm2", "test.Echo", "a1", stdin=b"from dom0\n", stdout=out,
                                    **in_dom0(host))
    assert (status, out.data) == (0, b"arg=a1 src=dom0\nfrom dom0\n")
    # As in the reference, dom0 names the source the service sees.
    out = qrexec_trio.Capture()
    assert await qrexec_trio.call("vm2", "test.Echo", stdout=out, source="vm1",
                                  **in_dom0(host)) == 0
    assert out.data == b"arg= src=vm1\n"


async def test_dom0_call_to_a_vm_that_is_not_running(host: Host) -> None:
    with pytest.raises(qrexec_trio.TargetNotRunning):
        await qrexec_trio.call("nosuchvm", "test.Echo", **in_dom0(host))


async def test_cancelling_a_call_releases_everything(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    # One call first: what trio and the backend open once (and keep) is open by now.
    assert await qrexec_trio.call("vm2", "test.Echo", **in_vm(vm1)) == 0
    for where in (in_vm(vm1), in_dom0(vm1.host)):
        out = FirstData()
        with nothing_left_open():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(qrexec_trio.call, "vm2", "test.Hold",
                                                     stdout=out, **where))
                await out.arrived.wait()  # the call is up: the service wrote to us
                nursery.cancel_scope.cancel()
    # And the next call goes through as usual.
    assert await qrexec_trio.call("vm2", "test.Echo", stdin=b"x", **in_vm(vm1)) == 0


async def test_two_hundred_sequential_calls_leak_no_fd(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    assert await qrexec_trio.call("vm2", "test.Echo", **in_vm(vm1)) == 0
    with nothing_left_open():
        for i in range(200):
            out = qrexec_trio.Capture()
            status = await qrexec_trio.call("vm2", "test.Echo", f"n{i}", stdin=b"!",
                                            stdout=out, **in_vm(vm1))
            assert (status, out.data) == (0, f"arg=n{i} src=vm1\n!".encode())


def test_call_blocking_with_files(pair: tuple[VM, VM], short_tmp: Path) -> None:
    vm1, _ = pair
    out, err = io.BytesIO(), io.BytesIO()
    status = qrexec_trio.call_blocking("vm2", "test.Exit", stdin=io.BytesIO(b"file\n"),
                                       stdout=out, stderr=err, **in_vm(vm1))
    assert (status, out.getvalue(), err.getvalue()) == (5, b"out file\n", b"err file\n")
    # Real files go through a worker thread.
    source, sink = short_tmp / "in", short_tmp / "out"
    source.write_bytes(b"x" * 300_000)
    with open(source, "rb") as stdin, open(sink, "wb") as stdout:
        assert qrexec_trio.call_blocking("vm2", "test.Echo", "f", stdin=stdin, stdout=stdout,
                                         **in_vm(vm1)) == 0
    assert sink.read_bytes() == b"arg=f src=vm1\n" + b"x" * 300_000
    assert qrexec_trio.call_blocking("vm2", "test.Echo", stdin=b"b", stdout=out,
                                     **in_dom0(vm1.host)) == 0
    assert out.getvalue().endswith(b"arg= src=dom0\nb")


def test_call_blocking_raises_as_call_does(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    with pytest.raises(qrexec_trio.CallRefused):
        qrexec_trio.call_blocking("vm2", "test.Denied", **in_vm(vm1))


def test_call_blocking_timeout_ends_the_call(pair: tuple[VM, VM]) -> None:
    vm1, _ = pair
    with nothing_left_open(), pytest.raises(TimeoutError):
        qrexec_trio.call_blocking("vm2", "test.Hold", timeout=1, **in_vm(vm1))
