from __future__ import annotations

from qrexec_trio.roles._ports import PortTable


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
    assert not table.release(0, 769)
    assert table.release(0, 513)
    assert not table.release(0, 513)


def test_full_table_gives_none_and_clear_frees_everything() -> None:
    table = PortTable(own_domain=42)
    ports = [table.allocate(0) for _ in range(256)]
    assert ports == list(range(513, 769))
    assert table.allocate(0) is None
    assert table.clear() == ports
    assert table.in_use() == []
