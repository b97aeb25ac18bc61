"""The world's programs' logs, read by the world and shown as its own.

Each daemon and agent of a world writes JSON lines to a pipe the world reads
(:meth:`ProgramLogs.relay`). Every record is logged again through the world's
logging (:func:`qrexec_trio._logging.relay`), so it is filtered by the world's
level and rendered in the world's format (colour on a terminal, the journal's
priorities); and from them the world says one line per call
(:class:`~._calls.CallLines`). A policy decision names the line of the
world's config that made it rather than the generated policy file's.
Anything that is not a JSON record (a program's traceback) is shown as a
warning of that program.
"""

from __future__ import annotations

import json
from typing import Any, Final

import trio

from .._logging import announce, relay
from ._calls import HOLD, CallLines, CiteRule

#: A longer line is cut there: a program cannot make the world hold unbounded text.
MAX_LINE: Final = 64 * 1024
_CHUNK: Final = 16 * 1024


class ProgramLogs:
    def __init__(self, cite_rule: CiteRule) -> None:
        self.calls = CallLines(cite_rule)

    async def relay(self, stream: trio.abc.ReceiveStream, vm: str, program: str) -> None:
        """Show what ``program`` of ``vm`` writes to ``stream``, until its end."""
        pending = b""
        while True:
            chunk = b""
            with trio.move_on_after(HOLD):
                chunk = bytes(await stream.receive_some(_CHUNK))
                if not chunk:
                    break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending[:MAX_LINE])
                pending = b""
            for line in lines:
                self.show(line, vm, program)
            self._say_due()
        if pending:
            self.show(pending, vm, program)

    def show(self, line: bytes, vm: str, program: str) -> None:
        """One line a program of ``vm`` wrote: logged, and its call's line said if due."""
        text = line.decode(errors="replace").rstrip("\r")
        if not text.strip():
            return
        record = _record(text)
        if record is None:
            relay({"event": text, "level": "warning", "program": program, "vm": vm})
            return
        if record.get("event") == "policy decision" and isinstance(record.get("rule"), str):
            cited = self.calls.cite(record["rule"])
            if cited != record["rule"]:
                record["policy_file"], record["rule"] = record["rule"], cited
        said = self.calls.feed(vm, record, trio.current_time())
        relay(record)
        for call in said:
            announce(call.text, **call.fields)

    def _say_due(self) -> None:
        for call in self.calls.due(trio.current_time()):
            announce(call.text, **call.fields)


def _record(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "event" in record else None
