"""qrexec-trio top: the running world's live connections, as a table that refreshes.

The source is the one ``qrexec-trio connections`` reads: the world's admin
socket, which gathers every daemon's and every agent's connection registry.
That listing has one entry per program a call passes through, all under the
call's id; top folds them into one row per call and names the programs in
VIA, so a view of the world shows each call once per leg.

On a terminal the table is redrawn every ``--interval`` seconds until Ctrl-C;
into a pipe, or with ``--once``, it is printed once. rich is imported here
only: the umbrella loads this module when ``top`` runs, and no other module
of ours imports it (structlog does, for its own tracebacks, when it is installed).
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._help import finish_parser
from ..domains import DomainsError, QubesdDomains
from ..nursery import CONNECTIONS, one_error, parse_connections
from .world import _against_world

#: What ends the live view, quietly (status 0): the user is done watching.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: After the options in ``--help``, before the examples.
ABOUT_ROWS: Final = (
    "One row per call: a call is listed by every program it passes through (its daemon, "
    "its agent) under one id; VIA names them. A VM-to-VM call has two legs, the caller's "
    "(under its VM's id) and the target's. IN and OUT are the bytes the call has carried "
    "to the service and back, as its daemon counts them (framing included), or as the "
    "agent does when no daemon carries the data.")

#: A colour for each connection state (``nursery.State``); none for the rest.
_STATE_STYLES: Final = {"setup": "yellow", "running": "green", "closing": "red"}
#: How a program names a domain it knows only by id (``domain 10``).
_DOMAIN_ID: Final = re.compile(r"domain \d+")
#: A width no table reaches: what a snapshot into a pipe is measured against.
_NO_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class Row:
    """One call as top shows it: the entries of one id, folded."""

    id: str
    source: str
    target: str
    service: str
    state: str
    age: float
    to_service: int | None
    to_caller: int | None
    #: The programs that hold the call (``daemon:work``, ``agent:work``), daemons first.
    via: tuple[str, ...]


def fold(entries: Iterable[Mapping[str, Any]]) -> list[Row]:
    """One row per call id, the oldest first (so rows stay put as the view refreshes)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(str(entry.get("id") or "?"), []).append(entry)
    rows = [_row(call, group) for call, group in groups.items()]
    return sorted(rows, key=lambda row: (-row.age, row.id))


def _row(call: str, group: list[Mapping[str, Any]]) -> Row:
    # The daemon speaks first: it is in dom0, it learns the real target (a
    # DispVM's name) and it counts what it relays. An agent fills what the
    # daemon left blank, or is the only holder (a leg that has no daemon entry yet).
    ordered = sorted(group, key=lambda entry: (
        not str(entry.get("owner", "")).startswith("qrexec-daemon"),
        not isinstance(entry.get("bytes_to_service"), int)))

    def text(field: str) -> str:
        # A program that knows a peer only by its domain id says "domain N";
        # another holder may know the name (the target's agent knows who called).
        values = [str(e[field]) for e in ordered if e.get(field)]
        named = [value for value in values if not _DOMAIN_ID.fullmatch(value)]
        return (named or values or [""])[0]

    counted = next((e for e in ordered if isinstance(e.get("bytes_to_service"), int)), {})
    return Row(
        id=call, source=text("source"), target=text("target"), service=text("service"),
        state=text("state") or "?", age=max(_seconds(e.get("age")) for e in ordered),
        to_service=_count(counted.get("bytes_to_service")),
        to_caller=_count(counted.get("bytes_to_caller")),
        via=tuple(str(e.get("owner") or "?").removeprefix("qrexec-") for e in ordered),
    )


def _seconds(value: object) -> float:
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return 0.0


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def format_age(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h07m``, ``3d04h``: short enough for a column."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_size(count: int | None) -> str:
    """A byte count for people (``512 B``, ``10.0 KiB``); ``-`` where nobody counts."""
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _summary(rows: Sequence[Row]) -> str:
    if not rows:
        return "no live connections"
    states: dict[str, int] = {}
    for row in rows:
        states[row.state] = states.get(row.state, 0) + 1
    counts = ", ".join(f"{number} {state}" for state, number in sorted(states.items()))
    return f"{len(rows)} call{'s' if len(rows) != 1 else ''} ({counts})"


def render(rows: Sequence[Row], *, world: Path, clock: str, note: Text | None = None,
           via: bool = True) -> Table:
    """The table of ``rows``, titled with the world and the time it was read at.

    ``note`` goes under the table: how to quit, or why the last refresh failed.
    ``via=False`` leaves out the VIA column (for a narrow terminal). Every
    text from the world is a :class:`Text`, never markup: a service argument
    may hold ``[...]``.
    """
    table = Table(box=box.SIMPLE_HEAD, title=Text(f"{world} · {_summary(rows)} · {clock}"),
                  title_justify="left", caption=note, caption_justify="left",
                  header_style="bold", collapse_padding=True, pad_edge=False)
    # Short of room, SERVICE wraps; the short columns stay whole.
    for name in ("ID", "SOURCE", "TARGET"):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    table.add_column("SERVICE", overflow="fold", min_width=12)
    table.add_column("STATE", no_wrap=True)
    for name in ("AGE", "IN", "OUT"):
        table.add_column(name, justify="right", no_wrap=True)
    if via:
        table.add_column("VIA", no_wrap=True)
    for row in rows:
        cells: list[Text | str] = [
            Text(row.id), Text(row.source or "?"), Text(row.target or "?"), Text(row.service),
            Text(row.state, style=_STATE_STYLES.get(row.state, "")), format_age(row.age),
            format_size(row.to_service), format_size(row.to_caller)]
        if via:
            cells.append(Text(" ".join(row.via)))
        table.add_row(*cells)
    return table


def _natural_width(console: Console, table: Table) -> int:
    return console.measure(table, options=console.options.update_width(_NO_LIMIT)).maximum


def fit(console: Console, rows: Sequence[Row], *, world: Path, clock: str,
        note: Text | None = None) -> Table:
    """:func:`render` for ``console``: on a terminal too narrow for every
    column, VIA (the least needed) goes first; into a pipe nothing is cut."""
    table = render(rows, world=world, clock=clock, note=note)
    width = _natural_width(console, table)
    if not console.is_terminal:
        console.width = max(console.width, width)
    elif width > console.width:
        table = render(rows, world=world, clock=clock, note=note, via=False)
    return table


async def _read(domains: QubesdDomains) -> list[Row]:
    return fold(parse_connections(await domains.call(CONNECTIONS, "dom0")))


def _clock() -> str:
    return time.strftime("%H:%M:%S")


async def _watch(console: Console, domains: QubesdDomains, world: Path,
                 interval: float) -> None:
    """Redraw until cancelled. A refresh that fails keeps the last rows and says why."""
    quit_note = Text(f"every {interval:g}s · Ctrl-C to quit", style="dim")
    rows = await _read(domains)  # a world that does not answer at all: the caller's error
    with Live(fit(console, rows, world=world, clock=_clock(), note=quit_note),
              console=console, auto_refresh=False) as live:
        while True:
            await trio.sleep(interval)
            note = quit_note
            try:
                rows = await _read(domains)
            except DomainsError as exc:
                note = Text.assemble((f"not answering: {exc}", "red"),
                                     " (showing the last rows) · ", quit_note)
            live.update(fit(console, rows, world=world, clock=_clock(), note=note),
                        refresh=True)


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0.1 <= value <= 3600):
        raise argparse.ArgumentTypeError(f"{text} is not between 0.1 and 3600 seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio top",
        description="Show the running world's live connections: per call its source, "
        "target, service, state, age and bytes each way. Refreshes on a terminal until "
        "Ctrl-C; prints one snapshot into a pipe or with --once.",
        epilog=ABOUT_ROWS)
    parser.add_argument("-i", "--interval", type=_interval, default=1.0, metavar="S",
                        help="seconds between refreshes, 0.1 to 3600 (default 1); "
                        "e.g. --interval 0.5")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot and exit (what a pipe gets anyway)")
    finish_parser(parser, "qrexec-trio top", "qrexec-trio top --world /tmp/my-world -i 2",
                  "qrexec-trio top --once | grep demo.Echo")

    async def show(args: argparse.Namespace, domains: QubesdDomains) -> int:
        console = Console()
        # The receiver is open before the first read: Ctrl-C at any point
        # after start-up is a quiet exit, with the terminal restored by Live.
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals, one_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
                if args.once or not console.is_terminal:
                    rows = await _read(domains)
                    console.print(fit(console, rows, world=args.world, clock=_clock()))
                else:
                    await _watch(console, domains, args.world, args.interval)
                nursery.cancel_scope.cancel()
        return 0

    try:
        return _against_world(parser, argv, show)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was open
        return 0
