"""The daemon's bound on VM-to-VM calls being connected at once (``Connector(max_connecting=)``).

Calls beyond the bound wait their turn before any of their steps starts, so
that none of those steps' short timeouts covers time spent queued; a call that
gets no turn by its deadline is refused with the reason.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from qrexec_trio._config import Timeouts
from qrexec_trio.roles._connect import Connector, NoTurnToConnect
from qrexec_trio.xen._socket import SocketBackend


def _connector(tmp_path, max_connecting: int | None) -> Connector:
    return Connector(SocketBackend(str(tmp_path), 0), Timeouts(), str(tmp_path),
                     max_connecting=max_connecting)


async def _hold_turn(connector: Connector, entered: trio.Event, leave: trio.Event,
                     turn_by: float = math.inf) -> None:
    async with connector._turn_to_connect(turn_by):
        entered.set()
        await leave.wait()


async def test_a_call_beyond_the_bound_waits_for_a_turn(tmp_path) -> None:
    connector = _connector(tmp_path, 1)
    first_in, first_out, second_in, second_out = (trio.Event() for _ in range(4))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_turn, connector, first_in, first_out)
        await first_in.wait()
        nursery.start_soon(_hold_turn, connector, second_in, second_out)
        await trio.testing.wait_all_tasks_blocked()
        assert not second_in.is_set()
        first_out.set()  # the first call is connected: its turn passes on
        await second_in.wait()
        second_out.set()


async def test_no_turn_by_the_deadline_is_a_refusal_with_the_reason(
        tmp_path, autojump_clock: trio.testing.MockClock) -> None:
    connector = _connector(tmp_path, 1)
    first_in, first_out = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_turn, connector, first_in, first_out)
        await first_in.wait()
        with pytest.raises(NoTurnToConnect, match="--max-connecting"):
            await _hold_turn(connector, trio.Event(), trio.Event(),
                             turn_by=trio.current_time() + 30)
        first_out.set()
    # The refused call took no turn with it: the next one gets in at once.
    third_in, third_out = trio.Event(), trio.Event()
    third_out.set()
    with trio.fail_after(1):
        await _hold_turn(connector, third_in, third_out)
    assert third_in.is_set()


async def test_without_a_bound_every_call_is_connected_at_once(tmp_path) -> None:
    connector = _connector(tmp_path, None)
    leave = trio.Event()
    entered = [trio.Event() for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for event in entered:
            nursery.start_soon(_hold_turn, connector, event, leave)
        await trio.testing.wait_all_tasks_blocked()
        assert all(event.is_set() for event in entered)
        leave.set()
