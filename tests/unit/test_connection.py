"""The Connection and its registry: ownership, cancellation, bounded shielded release;
and the control socket that lists and cancels connections from outside."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from qrexec_trio.domains import DomainsError, QubesdDomains, serve_admin
from qrexec_trio.nursery import (
    CONNECTIONS,
    KILL,
    PORTS,
    Connection,
    ConnectionRegistry,
    State,
    call_id,
    gather_connections,
    gathering_methods,
    kill_everywhere,
    parse_connections,
    ports_method,
    registry_methods,
)
from qrexec_trio.roles._ports import PortTable


class Ledger:
    """Records what resources were opened and released, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @asynccontextmanager
    async def resource(self, name: str, *, release_takes: float = 0.0) -> AsyncIterator[str]:
        self.events.append(f"open {name}")
        try:
            yield name
        finally:
            if release_takes:
                await trio.sleep(release_takes)
            self.events.append(f"close {name}")


def test_call_id_names_a_call_as_every_program_learns_it() -> None:
    assert call_id(12, 513) == "12.513"
    assert call_id(10, b"SOCKET7") == "10.SOCKET7"
    # An R2 connection id has spaces; ids travel as admin-call arguments.
    assert call_id(10, b"13 15 16") == "10.13-15-16"
    assert call_id("work", "3 4 5") == "work.3-4-5"


async def test_a_connection_is_listed_while_open_and_gone_after() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    async with registry.open("5.513", kind="service", source="dom0", target="vm",
                             service="demo.Echo") as conn:
        [info] = registry.list()
        assert (info.id, info.kind, info.source, info.target, info.service) == (
            "5.513", "service", "dom0", "vm", "demo.Echo")
        assert info.state == "setup"
        assert info.bytes_to_service is None and info.bytes_to_caller is None
        meter = conn.metered()
        conn.running()
        meter.to_service += 3
        meter.to_caller += 7
        conn.describe(target="disp1")
        [info] = registry.list()
        assert (info.state, info.bytes_to_service, info.bytes_to_caller, info.target) == (
            "running", 3, 7, "disp1")
    assert registry.list() == []
    assert not conn.cancelled


async def test_resources_are_released_in_reverse_order_when_the_connection_ends() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    ledger = Ledger()
    async with registry.open("1.a", kind="t") as conn:
        assert await conn.enter(ledger.resource("port")) == "port"
        await conn.enter(ledger.resource("dispvm"))
        conn.callback(lambda: ledger.events.append("close callback"))
        await conn.enter(ledger.resource("vchan"))
        assert ledger.events == ["open port", "open dispvm", "open vchan"]
    assert ledger.events == ["open port", "open dispvm", "open vchan", "close vchan",
                             "close callback", "close dispvm", "close port"]


async def test_cancel_one_of_several_tears_down_exactly_that_one() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    ledgers = {name: Ledger() for name in ("a", "b", "c")}
    finished: dict[str, str] = {}
    proceed = trio.Event()

    async def call(name: str, task_status: trio.TaskStatus[None]) -> None:
        async with registry.open(f"1.{name}", kind="t") as conn:
            await conn.enter(ledgers[name].resource("vchan"))
            conn.running()
            task_status.started()
            await proceed.wait()
            finished[name] = "completed"
        if conn.cancelled:
            finished[name] = "cancelled"

    async with trio.open_nursery() as nursery:
        for name in ledgers:
            await nursery.start(call, name)
        assert sorted(info.id for info in registry.list()) == ["1.a", "1.b", "1.c"]
        assert registry.cancel("1.b")
        with trio.fail_after(5):
            while "b" not in finished:  # noqa: ASYNC110 (the call's own outcome)
                await trio.sleep(0.001)
        # b is gone, with its resources; a and c are untouched.
        assert ledgers["b"].events == ["open vchan", "close vchan"]
        assert ledgers["a"].events == ["open vchan"] == ledgers["c"].events
        assert sorted(info.id for info in registry.list()) == ["1.a", "1.c"]
        proceed.set()
    assert finished == {"a": "completed", "b": "cancelled", "c": "completed"}
    assert not registry.cancel("1.b")  # finished: nothing to cancel


async def test_cancel_during_set_up_releases_what_was_opened_so_far() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    ledger = Ledger()
    entered = trio.Event()

    async def call() -> None:
        async with registry.open("1.x", kind="t") as conn:
            await conn.enter(ledger.resource("dispvm"))
            entered.set()
            await trio.sleep_forever()  # e.g. waiting for the DispVM to start
            await conn.enter(ledger.resource("never"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await entered.wait()
        [info] = registry.list()
        assert info.state == "setup"
        registry.cancel("1.x")
    assert ledger.events == ["open dispvm", "close dispvm"]
    assert registry.list() == []


async def test_release_is_shielded_from_the_cancellation_that_ended_the_call() -> None:
    registry = ConnectionRegistry(cleanup_timeout=5)
    ledger = Ledger()
    with trio.move_on_after(0.05):
        async with registry.open("1.y", kind="t") as conn:
            # Closing takes a while (a DispVM being destroyed): it must still finish.
            await conn.enter(ledger.resource("dispvm", release_takes=0.2))
            await trio.sleep_forever()
    assert ledger.events == ["open dispvm", "close dispvm"]


async def test_release_is_bounded_by_the_cleanup_timeout() -> None:
    registry = ConnectionRegistry(cleanup_timeout=0.2)
    ledger = Ledger()
    with trio.fail_after(5):  # the test's own bound: release gives up after 0.2 s
        async with registry.open("1.z", kind="t") as conn:
            await conn.enter(ledger.resource("stuck", release_takes=1000))
    assert ledger.events == ["open stuck"]  # abandoned, not awaited forever
    assert registry.list() == []


async def test_a_failure_reaches_the_caller_as_itself_and_still_releases() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    ledger = Ledger()
    with pytest.raises(KeyError):  # not wrapped in an exception group
        async with registry.open("1.e", kind="t") as conn:
            await conn.enter(ledger.resource("vchan"))
            raise KeyError("boom")
    assert ledger.events == ["open vchan", "close vchan"]
    assert registry.list() == []


async def test_tasks_of_a_connection_end_with_it() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    stopped = []

    async def helper() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stopped.append(True)

    async with registry.open("1.t", kind="t") as conn:
        conn.nursery.start_soon(helper)
        await trio.lowlevel.checkpoint()
    assert stopped == [True]


async def test_two_live_calls_never_share_an_id() -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    async with registry.open("1.s", kind="t") as first, registry.open("1.s", kind="t") as second:
        assert first.id == "1.s"
        assert second.id != first.id
        assert {info.id for info in registry.list()} == {first.id, second.id}
        assert registry.cancel(second.id)
    assert not first.cancelled


def test_describe_refuses_fields_it_does_not_know() -> None:
    conn = Connection("1.d", kind="t", source="", target="", service="", cleanup_timeout=1)
    with pytest.raises(TypeError):
        conn.describe(state="running")
    assert conn.state is State.SETUP


# -- the control socket ------------------------------------------------------------


async def _serve(nursery: trio.Nursery, path: Path, methods: dict) -> None:  # type: ignore[type-arg]
    await nursery.start(functools.partial(serve_admin, None, str(path), methods=methods,
                                          request_timeout=5))


async def test_control_socket_lists_and_cancels_connections(short_tmp: Path) -> None:
    registry = ConnectionRegistry(cleanup_timeout=1)
    path = short_tmp / "control"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, registry_methods(registry, "qrexec-daemon:work"))
        client = QubesdDomains(str(path), call_timeout=5)
        assert parse_connections(await client.call(CONNECTIONS, "dom0")) == []
        async with registry.open("10.SOCKET7", kind="vm-request", source="work",
                                 target="vault", service="demo.Echo") as conn:
            [entry] = parse_connections(await client.call(CONNECTIONS, "dom0"))
            assert entry["id"] == "10.SOCKET7"
            assert entry["owner"] == "qrexec-daemon:work"
            assert (entry["source"], entry["target"], entry["state"]) == ("work", "vault",
                                                                          "setup")
            await client.call(KILL, "dom0", "10.SOCKET7")
            await trio.sleep_forever()
        assert conn.cancelled
        with pytest.raises(DomainsError) as refused:
            await client.call(KILL, "dom0", "10.SOCKET7")
        assert refused.value.kind == "UnknownConnectionError"
        assert "no live connection" in refused.value.message
        with pytest.raises(DomainsError) as bad:
            await client.call(CONNECTIONS, "dom0", "unexpected-argument")
        assert bad.value.kind == "ProtocolError"
        nursery.cancel_scope.cancel()


async def test_control_socket_lists_a_daemons_data_ports(short_tmp: Path) -> None:
    table = PortTable(42)
    path = short_tmp / "control"
    async with trio.open_nursery() as nursery:
        await _serve(nursery, path, ports_method(table.allocated))
        client = QubesdDomains(str(path), call_timeout=5)
        assert parse_connections(await client.call(PORTS, "dom0")) == []
        first, peer = table.allocate(0), table.allocate(43)
        assert parse_connections(await client.call(PORTS, "dom0")) == [
            {"port": first, "domain": 0}, {"port": peer, "domain": 43}]
        assert first is not None and table.release(0, first)
        assert parse_connections(await client.call(PORTS, "dom0")) == [
            {"port": peer, "domain": 43}]
        nursery.cancel_scope.cancel()


async def test_gathering_spans_programs_and_kill_reaches_every_holder(short_tmp: Path) -> None:
    daemon, agent = ConnectionRegistry(cleanup_timeout=1), ConnectionRegistry(cleanup_timeout=1)
    sockets = {str(short_tmp / "d"): "qrexec-daemon:work",
               str(short_tmp / "a"): "qrexec-agent:work",
               str(short_tmp / "gone"): "qrexec-agent:halted"}  # nobody serves this one
    cancelled: list[str] = []

    async def hold(registry: ConnectionRegistry, name: str,
                   task_status: trio.TaskStatus[None]) -> None:
        async with registry.open("10.1-2-3", kind="t") as conn:
            task_status.started()
            await trio.sleep_forever()
        if conn.cancelled:
            cancelled.append(name)

    async with trio.open_nursery() as nursery:
        await _serve(nursery, short_tmp / "d", registry_methods(daemon, "daemon"))
        await _serve(nursery, short_tmp / "a", registry_methods(agent, "agent"))
        await nursery.start(hold, daemon, "daemon")
        await nursery.start(hold, agent, "agent")
        entries = await gather_connections(sockets, timeout=5)
        assert sorted(entry["owner"] for entry in entries) == ["qrexec-agent:work",
                                                                "qrexec-daemon:work"]
        assert {entry["id"] for entry in entries} == {"10.1-2-3"}
        # Through the world's own methods, as `qrexec-trio kill` uses them.
        methods = gathering_methods(lambda: sockets, timeout=5)
        await _serve(nursery, short_tmp / "world", methods)
        world = QubesdDomains(str(short_tmp / "world"), call_timeout=5)
        await world.call(KILL, "dom0", "10.1-2-3")
        with trio.fail_after(5):
            while len(cancelled) < 2:  # noqa: ASYNC110 (two tasks, no event of theirs)
                await trio.sleep(0.001)
        assert sorted(cancelled) == ["agent", "daemon"]
        assert await kill_everywhere(sockets, "10.1-2-3", timeout=5) == 0
        with pytest.raises(DomainsError):
            await world.call(KILL, "dom0", "10.1-2-3")
        nursery.cancel_scope.cancel()
