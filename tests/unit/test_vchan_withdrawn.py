"""A data vchan whose server gave up, or died, fails its client at once.

Both local backends (socket, shm): a server that withdraws its offer without
a client leaves a marker that the client consumes; a killed server's socket
refuses, and the client takes it (refused twice) for dead. Either way the
client fails with VchanWithdrawn long before its connect timeout, which is
what lets the agent report the call's end and free its port. Bounds are
hang guards far above what any of this needs, never timing assertions.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio.xen import VchanBackend, VchanConnectTimeout
from qrexec_trio.xen._interface import VchanWithdrawn
from qrexec_trio.xen._local import DEAD_AFTER, Rendezvous, remove_if_same

from .test_vchan_conformance import _make

#: A connect timeout no test may come near: failing "at once" means well before it.
PATIENT = 60.0
#: Bounds every wait; far below PATIENT, far above what failing at once takes.
HANG = 10.0
SOCKET_KIND = {"socket": socket.SOCK_STREAM, "shm": socket.SOCK_SEQPACKET}

Ends = tuple[str, VchanBackend, VchanBackend, Path]


@pytest.fixture(params=sorted(SOCKET_KIND))
def ends(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Ends]:
    """(backend name, dom0's backend, vm 42's backend, the shared vchan dir)."""
    name = request.param
    yield name, _make(name, short_tmp, 0), _make(name, short_tmp, 42), short_tmp


def _offer_path(directory: Path, port: int) -> Path:
    return directory / f"vchan.0.42.{port}.sock"


def _marker(directory: Path, port: int) -> Path:
    return directory / f"vchan.0.42.{port}.sock.withdrawn"


async def _connect_fails_at_once(vm: VchanBackend, port: int) -> VchanWithdrawn:
    with trio.fail_after(HANG), pytest.raises(VchanWithdrawn) as caught:
        await vm.connect(0, port, timeout=PATIENT)
    return caught.value


def _dead_server_socket(path: Path, kind: int) -> None:
    """What a server killed outright leaves: its socket file, bound by nobody."""
    raw = socket.socket(socket.AF_UNIX, kind)
    raw.bind(str(path))
    raw.listen(1)
    raw.close()


async def _round_trip(server_listener, vm: VchanBackend, port: int) -> None:
    async with trio.open_nursery() as nursery:
        accepted = []

        async def accept() -> None:
            accepted.append(await server_listener.accept(HANG))

        nursery.start_soon(accept)
        with trio.fail_after(HANG):
            client = await vm.connect(0, port, timeout=PATIENT)
    server = accepted[0]
    await client.send_all(b"ping")
    assert await server.receive_some(10) == b"ping"
    await client.aclose()
    await server.aclose()


# -- withdrawn offers -----------------------------------------------------------------


async def test_a_waiting_client_fails_at_once_when_the_server_withdraws(ends: Ends) -> None:
    _, dom0, vm, directory = ends
    failures: list[VchanWithdrawn] = []
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            failures.append(await _connect_fails_at_once(vm, 800))

        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()  # polling: nothing offered yet
        # Offered and withdrawn with no checkpoint between: the client never saw
        # the offer, as when its caller gave up while it was not looking.
        listener = dom0.listen(42, 800)
        await listener.aclose()
    assert "withdrew its offer" in str(failures[0])
    assert not _marker(directory, 800).exists()  # consumed: it served its one client


async def test_a_client_that_comes_after_an_accept_timeout_fails_at_once(ends: Ends) -> None:
    _, dom0, vm, directory = ends
    listener = dom0.listen(42, 801)
    with pytest.raises(VchanConnectTimeout):
        await listener.accept(0.01)
    assert not _offer_path(directory, 801).exists()
    assert _marker(directory, 801).is_file()
    await _connect_fails_at_once(vm, 801)
    assert not _marker(directory, 801).exists()


async def test_a_cancelled_accept_withdraws_too(ends: Ends) -> None:
    _, dom0, vm, _ = ends
    listener = dom0.listen(42, 802)
    with trio.CancelScope() as scope:
        scope.cancel()
        await listener.accept(PATIENT)
    await _connect_fails_at_once(vm, 802)


async def test_closing_the_listener_from_another_task_ends_its_accept(ends: Ends) -> None:
    _, dom0, vm, _ = ends
    listener = dom0.listen(42, 807)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await listener.accept(PATIENT)

            nursery.start_soon(accept)
            await trio.testing.wait_all_tasks_blocked()
            await listener.aclose()
    await _connect_fails_at_once(vm, 807)


async def test_a_served_offer_leaves_no_marker(ends: Ends) -> None:
    _, dom0, vm, directory = ends
    await _round_trip(dom0.listen(42, 803), vm, 803)
    assert not _marker(directory, 803).exists()
    assert not _offer_path(directory, 803).exists()


async def test_a_client_already_queued_when_the_server_withdraws_leaves_no_marker(
        ends: Ends) -> None:
    """It connected: its connection's end tells it, and a marker would wait for
    the next client of the name and fail it wrongly."""
    name, dom0, _, directory = ends
    listener = dom0.listen(42, 804)
    queued = socket.socket(socket.AF_UNIX, SOCKET_KIND[name])
    queued.connect(str(_offer_path(directory, 804)))  # in the listen queue, not accepted
    await listener.aclose()
    queued.close()
    assert not _marker(directory, 804).exists()
    assert not _offer_path(directory, 804).exists()


async def test_a_new_offer_after_a_withdrawal_is_served(ends: Ends) -> None:
    _, dom0, vm, directory = ends
    await dom0.listen(42, 805).aclose()
    assert _marker(directory, 805).is_file()
    listener = dom0.listen(42, 805)
    assert not _marker(directory, 805).exists()  # removed before the name appeared
    await _round_trip(listener, vm, 805)


async def test_the_marker_is_never_followed(ends: Ends, tmp_path: Path) -> None:
    """A symlink where the marker goes is neither written through nor taken for a marker."""
    _, dom0, vm, directory = ends
    target = tmp_path / "not-yours"
    _marker(directory, 806).symlink_to(target)
    await dom0.listen(42, 806).aclose()
    assert not target.exists()
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 806, timeout=0.2)
    assert _marker(directory, 806).is_symlink()


# -- dead servers -----------------------------------------------------------------------


async def test_a_killed_servers_socket_fails_the_client_at_once(ends: Ends) -> None:
    name, _, vm, directory = ends
    _dead_server_socket(_offer_path(directory, 810), SOCKET_KIND[name])
    failure = await _connect_fails_at_once(vm, 810)
    assert "is gone" in str(failure)
    assert not _offer_path(directory, 810).exists()  # the leftover went with it


async def test_a_client_waiting_when_the_server_is_killed_fails_at_once(ends: Ends) -> None:
    name, _, vm, directory = ends
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_connect_fails_at_once, vm, 811)
        await trio.testing.wait_all_tasks_blocked()
        _dead_server_socket(_offer_path(directory, 811), SOCKET_KIND[name])


async def test_a_new_offer_replaces_a_killed_servers_socket(ends: Ends) -> None:
    name, dom0, vm, directory = ends
    _dead_server_socket(_offer_path(directory, 812), SOCKET_KIND[name])
    await _round_trip(dom0.listen(42, 812), vm, 812)


# -- what the client's judgement rests on ------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
async def test_one_refusal_is_not_death(short_tmp: Path, kind: int) -> None:
    """A foreign server refuses between its bind and its listen: a second attempt decides."""
    path = _offer_path(short_tmp, 820)
    rendezvous = Rendezvous(str(path), 820)
    with socket.socket(socket.AF_UNIX, kind) as foreign:
        foreign.bind(str(path))
        with trio.socket.socket(socket.AF_UNIX, kind) as first:
            assert not await rendezvous.connect(first)  # refused: not offered yet
        foreign.listen(1)
        with trio.socket.socket(socket.AF_UNIX, kind) as second:
            assert await rendezvous.connect(second)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
async def test_refusals_by_the_same_socket_over_a_while_are_death(
        short_tmp: Path, kind: int, autojump_clock: trio.testing.MockClock) -> None:
    path = _offer_path(short_tmp, 821)
    _dead_server_socket(path, kind)
    rendezvous = Rendezvous(str(path), 821)
    with trio.socket.socket(socket.AF_UNIX, kind) as first:
        assert not await rendezvous.connect(first)
    await trio.sleep(DEAD_AFTER)
    with trio.socket.socket(socket.AF_UNIX, kind) as second, pytest.raises(VchanWithdrawn):
        await rendezvous.connect(second)
    assert not path.exists()


async def test_refusals_close_together_are_not_yet_death(short_tmp: Path) -> None:
    """The client's first retries come sub-millisecond apart: a foreign server about to
    replace a dead predecessor's socket must get its moment (issue 14's faster polls
    made a test agent lose that race under load)."""
    path = _offer_path(short_tmp, 823)
    _dead_server_socket(path, socket.SOCK_STREAM)
    rendezvous = Rendezvous(str(path), 823)
    for _ in range(3):
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            assert not await rendezvous.connect(sock)
    assert path.exists()


def _replace_keeping_the_old(path: Path, number: int) -> None:
    """Put a new dead socket at ``path``; the old one is moved aside, not deleted, so
    that the new one cannot get its inode number (as when a server renames its
    socket over a leftover)."""
    if path.exists():
        path.rename(path.with_name(f"old-{number}"))
    _dead_server_socket(path, socket.SOCK_STREAM)


async def test_refusals_by_different_sockets_are_not_death(short_tmp: Path) -> None:
    """Each refusal came from another socket: perhaps each a server just starting."""
    path = _offer_path(short_tmp, 822)
    rendezvous = Rendezvous(str(path), 822)
    for number in range(3):
        _replace_keeping_the_old(path, number)
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            assert not await rendezvous.connect(sock)
    assert path.exists()


def test_a_file_that_replaced_the_dead_one_is_never_removed(short_tmp: Path) -> None:
    path = _offer_path(short_tmp, 823)
    _dead_server_socket(path, socket.SOCK_STREAM)
    dead = os.lstat(path)
    path.rename(short_tmp / "dead")  # still there: its inode number stays taken
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        assert not remove_if_same(str(path), (dead.st_dev, dead.st_ino))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still there, still the live one
        this = os.lstat(path)
        assert remove_if_same(str(path), (this.st_dev, this.st_ino))
    assert not path.exists()
    assert os.listdir(short_tmp) == ["dead"]  # nothing left aside


# -- the control vchan waits for the next offer, as before ----------------------------------


async def test_the_control_vchan_is_exempt(ends: Ends) -> None:
    """Its client (the daemon) waits for the agent's next offer, whatever became of the last."""
    name, dom0, vm, directory = ends
    await dom0.listen(42, 512).aclose()
    assert not _marker(directory, 512).exists()
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 512, timeout=0.2)
    _dead_server_socket(_offer_path(directory, 512), SOCKET_KIND[name])
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 512, timeout=0.2)
    await _round_trip(dom0.listen(42, 512), vm, 512)
