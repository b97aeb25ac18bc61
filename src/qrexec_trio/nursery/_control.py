"""A program's control socket: its live connections, listed and cancelled from outside.

The daemon and the agent each serve one, speaking the qubesd admin protocol
(the codec and server the world's domain manager uses too) with two calls of
our own, always addressed to ``dom0``:

* ``qrexec.Connections``: one JSON object a line, each a
  :class:`ConnectionInfo` plus ``owner`` (which program holds it);
* ``qrexec.Kill+ID``: cancel that connection; an error reply
  ``UnknownConnectionError`` if the program has no live connection ``ID``.

The world serves the same two calls on its admin socket, gathered from every
control socket of the world (:func:`gather_connections`, :func:`kill_everywhere`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import trio

from .._logging import get_logger
from ..domains import AdminCallRefused, AdminMethod, AdminRequest, DomainsError, QubesdDomains
from ._connection import ConnectionRegistry

log = get_logger(__name__)

CONNECTIONS: Final = "qrexec.Connections"
KILL: Final = "qrexec.Kill"
#: A daemon's allocated data ports, one JSON object a line (``port``, ``domain``).
PORTS: Final = "qrexec.Ports"
#: The error kind of a kill for an id nobody holds.
UNKNOWN_CONNECTION: Final = "UnknownConnectionError"


def control_socket_path(socket_dir: str, domid: int) -> str:
    """Where the daemon for ``domid`` serves its control socket."""
    return os.path.join(socket_dir, f"qrexec-trio-control.{domid}")


def _no_argument(request: AdminRequest) -> None:
    if request.arg or request.payload:
        raise AdminCallRefused("ProtocolError", f"{request.method} takes no argument")


def _lines(entries: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(entry, sort_keys=True).encode() + b"\n" for entry in entries)


def registry_methods(registry: ConnectionRegistry, owner: str) -> dict[str, AdminMethod]:
    """The two calls, answered from one program's registry."""

    async def connections(request: AdminRequest) -> bytes:
        _no_argument(request)
        await trio.lowlevel.checkpoint()
        return _lines(dict(info.as_dict(), owner=owner) for info in registry.list())

    async def kill(request: AdminRequest) -> bytes:
        await trio.lowlevel.checkpoint()
        if not registry.cancel(request.arg):
            raise AdminCallRefused(UNKNOWN_CONNECTION, f"no live connection {request.arg!r}")
        return b""

    return {CONNECTIONS: connections, KILL: kill}


def ports_method(in_use: Callable[[], Iterable[tuple[int, int]]]) -> dict[str, AdminMethod]:
    """``qrexec.Ports``: the data ports ``in_use`` names, as (port, connect domain) pairs.

    What a fault-injection run checks after the fact: a port held with no
    call behind it is a leak.
    """

    async def ports(request: AdminRequest) -> bytes:
        _no_argument(request)
        await trio.lowlevel.checkpoint()
        return _lines({"port": port, "domain": domain} for port, domain in in_use())

    return {PORTS: ports}


def parse_connections(value: bytes) -> list[dict[str, Any]]:
    """The entries of a ``qrexec.Connections`` reply (lines that are not objects are dropped)."""
    entries = []
    for line in value.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


async def gather_connections(sockets: Mapping[str, str],
                             timeout: float) -> list[dict[str, Any]]:
    """Every live connection of the programs behind ``sockets`` (path -> owner label).

    A socket that does not answer (its program is stopping) is skipped.
    """
    found: list[dict[str, Any]] = []

    async def ask(path: str, owner: str) -> None:
        try:
            reply = await QubesdDomains(path, call_timeout=timeout).call(CONNECTIONS, "dom0")
        except DomainsError as exc:
            log.debug("control socket did not answer", socket=path, error=exc.message)
            return
        found.extend(dict(entry, owner=owner) for entry in parse_connections(reply))

    async with trio.open_nursery() as nursery:
        for path, owner in sockets.items():
            nursery.start_soon(ask, path, owner)
    return sorted(found, key=lambda entry: (str(entry.get("id")), str(entry.get("owner"))))


async def kill_everywhere(sockets: Iterable[str], call_id: str, timeout: float) -> int:
    """Cancel ``call_id`` in every program that holds it; how many did."""
    killed = 0

    async def kill(path: str) -> None:
        nonlocal killed
        try:
            await QubesdDomains(path, call_timeout=timeout).call(KILL, "dom0", call_id)
        except DomainsError:
            return
        killed += 1

    async with trio.open_nursery() as nursery:
        for path in sockets:
            nursery.start_soon(kill, path)
    return killed


def gathering_methods(find_sockets: Callable[[], Mapping[str, str]],
                      timeout: float) -> dict[str, AdminMethod]:
    """The two calls, answered for every program whose control socket ``find_sockets`` names.

    ``qrexec.Kill`` cancels the id wherever it is held: a call's id is the
    same in the daemon and the agent it passes through, so the whole
    pipeline goes.
    """

    async def connections(request: AdminRequest) -> bytes:
        _no_argument(request)
        return _lines(await gather_connections(find_sockets(), timeout))

    async def kill(request: AdminRequest) -> bytes:
        if not await kill_everywhere(find_sockets(), request.arg, timeout):
            raise AdminCallRefused(UNKNOWN_CONNECTION, f"no live connection {request.arg!r}")
        return b""

    return {CONNECTIONS: connections, KILL: kill}
