"""Data-port allocation of a qrexec-daemon (wire-protocol.md §8).

Bookkeeping; its one side effect is the ``on_change`` callback the daemon
gives it. A port is 513 + i for a slot i in [0, MAX_DATA_PORTS); each slot
remembers the domain it was given for, and is freed only by a
MSG_CONNECTION_TERMINATED naming that same (domain, port).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from ..protocol import FIRST_DATA_PORT, MAX_DATA_PORTS


@final
class PortTable:
    def __init__(self, own_domain: int,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        self.own_domain = own_domain
        self._owner: list[int | None] = [None] * MAX_DATA_PORTS
        #: Told (connect_domain, port) when a port is handed out and when it is freed.
        self._on_change = on_change

    def _changed(self, connect_domain: int, port: int) -> None:
        if self._on_change is not None:
            self._on_change(connect_domain, port)

    def _slots(self, connect_domain: int) -> range:
        """The slots a connection with ``connect_domain`` may take.

        dom0 connections take any slot. VM-to-VM connections use the parity
        split: the daemon of the lower domid takes odd slots for a higher
        peer, the higher one even slots for a lower peer, so the two daemons
        of one VM pair never hand out the same port.
        """
        if connect_domain == 0:
            return range(MAX_DATA_PORTS)
        return range(1 if connect_domain > self.own_domain else 0, MAX_DATA_PORTS, 2)

    def allocate(self, connect_domain: int) -> int | None:
        """The first free port for a connection with ``connect_domain`` (``None``: all taken)."""
        for slot in self._slots(connect_domain):
            if self._owner[slot] is None:
                self._owner[slot] = connect_domain
                self._changed(connect_domain, FIRST_DATA_PORT + slot)
                return FIRST_DATA_PORT + slot
        return None

    def exhausted(self, connect_domain: int) -> str:
        """Why :meth:`allocate` gave ``None`` for ``connect_domain``, for a log line."""
        if connect_domain == 0:
            return f"all {MAX_DATA_PORTS} data ports of domain {self.own_domain} are in use"
        side = "above" if connect_domain > self.own_domain else "below"
        return (f"all {len(self._slots(connect_domain))} data ports that domain "
                f"{self.own_domain} gives for peers {side} it are in use")

    def release(self, connect_domain: int, port: int) -> bool:
        """Free ``port`` if it was allocated for ``connect_domain``; False if nothing matched."""
        slot = port - FIRST_DATA_PORT
        if not 0 <= slot < MAX_DATA_PORTS or self._owner[slot] != connect_domain:
            return False
        self._owner[slot] = None
        self._changed(connect_domain, port)
        return True

    def allocated(self) -> list[tuple[int, int]]:
        """Every allocated port with the domain it was allocated for."""
        return [(FIRST_DATA_PORT + slot, owner) for slot, owner in enumerate(self._owner)
                if owner is not None]

    def in_use(self) -> list[int]:
        return [FIRST_DATA_PORT + i for i, owner in enumerate(self._owner) if owner is not None]

    def clear(self) -> list[int]:
        """Free every port (the agent restarted); returns the ports that were in use."""
        used = self.allocated()
        self._owner = [None] * MAX_DATA_PORTS
        for port, connect_domain in used:
            self._changed(connect_domain, port)
        return [port for port, _ in used]
