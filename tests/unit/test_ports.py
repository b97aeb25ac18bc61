from __future__ import annotations

from pathlib import Path

import pytest

from qrexec_trio.protocol import FIRST_DATA_PORT, LAST_DATA_PORT, MAX_DATA_PORTS
from qrexec_trio.roles._ports import PortTable
from qrexec_trio.xen import SocketBackend


def test_data_ports_start_at_513_and_have_room_for_256_calls_each_way() -> None:
    assert FIRST_DATA_PORT == 513
    assert MAX_DATA_PORTS == 1024
    assert LAST_DATA_PORT == 513 + 1024 - 1


def test_dom0_connections_take_the_first_free_port() -> None:
    table = PortTable(own_domain=42)
    assert [table.allocate(0) for _ in range(3)] == [513, 514, 515]
    assert table.release(0, 514)
    assert table.allocate(0) == 514


def test_parity_split_between_the_two_daemons_of_a_vm_pair() -> None:
    lower, higher = PortTable(own_domain=42), PortTable(own_domain=43)
    assert [lower.allocate(43), lower.allocate(44)] == [514, 516]
    assert [higher.allocate(42), higher.allocate(42)] == [513, 515]


def test_release_needs_the_same_domain_and_a_data_port() -> None:
    table = PortTable(own_domain=42)
    port = table.allocate(0)
    assert port == 513
    assert not table.release(7, 513)
    assert not table.release(0, 512)
    assert not table.release(0, LAST_DATA_PORT + 1)
    assert table.release(0, 513)
    assert not table.release(0, 513)


def test_the_last_data_port_is_allocated_and_released() -> None:
    table = PortTable(own_domain=42)
    ports = [table.allocate(0) for _ in range(MAX_DATA_PORTS)]
    assert ports[-1] == LAST_DATA_PORT
    assert table.release(0, LAST_DATA_PORT)
    assert table.allocate(0) == LAST_DATA_PORT


def test_full_table_gives_none_and_clear_frees_everything() -> None:
    table = PortTable(own_domain=42)
    ports = [table.allocate(0) for _ in range(MAX_DATA_PORTS)]
    assert ports == list(range(513, 513 + 1024))
    assert table.allocate(0) is None
    assert table.exhausted(0) == "all 1024 data ports of domain 42 are in use"
    assert table.clear() == ports
    assert table.in_use() == []


@pytest.mark.parametrize("calls", [256, 512])
def test_256_concurrent_calls_fit_each_way_of_a_vm_pair(calls: int) -> None:
    lower, higher = PortTable(own_domain=42), PortTable(own_domain=43)
    to_higher = [lower.allocate(43) for _ in range(calls)]
    to_lower = [higher.allocate(42) for _ in range(calls)]
    assert None not in to_higher and None not in to_lower
    # The two daemons of the pair never hand out the same port.
    assert not set(to_higher) & set(to_lower)


def test_a_vm_peer_gets_half_the_ports_and_the_reason_says_which() -> None:
    lower, higher = PortTable(own_domain=42), PortTable(own_domain=43)
    for _ in range(MAX_DATA_PORTS // 2):
        assert lower.allocate(43) is not None
        assert higher.allocate(42) is not None
    assert lower.allocate(99) is None and higher.allocate(7) is None
    assert lower.exhausted(43) == ("all 512 data ports that domain 42 gives for peers above "
                                   "it are in use")
    assert higher.exhausted(42) == ("all 512 data ports that domain 43 gives for peers below "
                                    "it are in use")
    # The other half is still there for dom0's calls (and for peers on the other side).
    assert lower.allocate(0) == 513 and lower.allocate(7) == 515


def test_256_dom0_calls_and_256_vm_calls_share_one_table() -> None:
    table = PortTable(own_domain=42)
    dom0 = [table.allocate(0) for _ in range(256)]
    peers = [table.allocate(43) for _ in range(256)]
    assert None not in dom0 and None not in peers
    assert len(set(dom0) | set(peers)) == 512


def test_the_daemon_hears_of_every_port_handed_out_and_freed() -> None:
    changes: list[tuple[int, int]] = []
    table = PortTable(5, lambda domain, port: changes.append((domain, port)))
    first, second = table.allocate(0), table.allocate(9)
    assert first is not None and second is not None
    assert not table.release(3, first)  # not its domain: nothing freed, nothing said
    assert table.release(0, first)
    assert table.clear() == [second]
    assert changes == [(0, first), (9, second), (0, first), (9, second)]


def test_forgetting_a_ports_withdrawals_removes_both_directions_markers_only(
        short_tmp: Path) -> None:
    names = ["vchan.0.5.513.sock.withdrawn", "vchan.5.0.513.sock.withdrawn",
             "vchan.0.5.514.sock.withdrawn", "vchan.0.6.513.sock.withdrawn"]
    for name in names:
        (short_tmp / name).touch()
    (short_tmp / "vchan.0.5.513.sock").mkdir()  # not a marker: never touched
    SocketBackend(str(short_tmp), 0).forget_withdrawals(5, 0, 513)
    assert sorted(path.name for path in short_tmp.iterdir()) == [
        "vchan.0.5.513.sock", "vchan.0.5.514.sock.withdrawn", "vchan.0.6.513.sock.withdrawn"]
