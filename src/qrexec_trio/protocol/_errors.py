"""The one error type of the protocol layer."""

from __future__ import annotations

from typing import final


@final
class ProtocolError(Exception):
    """A message, payload or command line broke a rule of the wire protocol.

    ``field`` names what was wrong (``"header.type"``, ``"cmdline.user"``, ...)
    and ``rule`` says which rule it broke, so that a log line can tell a hostile
    VM's garbage apart from our own bug without a traceback.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule
