"""qrexec-trio top: folding a connection listing into rows, and drawing them.

Fixed listings, no world: what `qrexec.Connections` answers (one entry per
program a call passes through) is the input; the text rich draws is checked.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console
from trio.testing import MockClock

from qrexec_trio.domains import DomainsError
from qrexec_trio.nursery import CONNECTIONS
from qrexec_trio.roles import top
from qrexec_trio.roles.top import Row, fit, fold, format_age, format_size, render

from .test_light_imports import _import_chains

WORLD = Path("/tmp/some-world")


def entry(call: str, owner: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": call, "owner": owner, "kind": "call", "source": "",
                            "target": "", "service": "", "age": 1.0, "bytes_to_service": None,
                            "bytes_to_caller": None, "state": "running"}
    return base | fields


#: A VM-to-VM call as a world lists it: the caller's leg (work's daemon and
#: agent, under work's id) and the target's (vault's, under vault's id).
LISTING = [
    entry("10.7", "qrexec-agent:work", source="domain 10", target="vault",
          service="demo.Echo", age=3.5),
    entry("10.7", "qrexec-daemon:work", kind="vm-request", source="work", target="vault",
          service="demo.Echo", age=3.4, bytes_to_service=10301, bytes_to_caller=10407),
    entry("11.514", "qrexec-agent:vault", kind="service", source="work",
          service="demo.Echo+", age=3.2, bytes_to_service=10240, bytes_to_caller=10246),
    entry("11.514", "qrexec-daemon:vault", kind="client", source="domain 0", target="vault",
          service="", age=3.3, state="setup"),
]


def plain(renderable: object, *, width: int = 200, terminal: bool = False) -> str:
    """What ``renderable`` looks like on a console of ``width`` columns, without colour."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    console.print(renderable)
    return out.getvalue()


def row_fields(text: str, call: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.split()[:1] == [call]]
    return line.split()


# -- folding ---------------------------------------------------------------------------


def test_the_entries_of_one_call_fold_into_one_row_the_daemon_speaking_first() -> None:
    rows = {row.id: row for row in fold(LISTING)}
    assert set(rows) == {"10.7", "11.514"}
    assert rows["10.7"] == Row(
        id="10.7", source="work", target="vault", service="demo.Echo", state="running",
        age=3.5, to_service=10301, to_caller=10407, via=("daemon:work", "agent:work"))
    # The target's daemon knows its caller as "domain 0" and has not learnt
    # the service: the agent's names fill them in; the agent alone counted
    # bytes, so they are its.
    vault = rows["11.514"]
    assert (vault.source, vault.target, vault.service, vault.state) == (
        "work", "vault", "demo.Echo+", "setup")
    assert (vault.to_service, vault.to_caller) == (10240, 10246)
    assert vault.via == ("daemon:vault", "agent:vault")


def test_a_domain_known_by_id_alone_stays_so() -> None:
    (row,) = fold([entry("0.5", "qrexec-daemon:vault", source="domain 0", target="vault"),
                   entry("0.5", "qrexec-agent:vault", source="domain 0",
                         target="domain 11")])
    assert (row.source, row.target) == ("domain 0", "vault")


def test_rows_are_oldest_first_then_by_id() -> None:
    rows = fold([entry("b", "qrexec-agent:x", age=1.0), entry("c", "qrexec-agent:x", age=9.0),
                 entry("a", "qrexec-agent:x", age=1.0)])
    assert [row.id for row in rows] == ["c", "a", "b"]


def test_odd_values_in_a_listing_do_not_break_the_fold() -> None:
    rows = fold([{"owner": "qrexec-agent:x", "age": "soon", "bytes_to_service": True,
                  "bytes_to_caller": 5, "state": ""},
                 {"id": "z", "age": float("nan")}])
    by_id = {row.id: row for row in rows}
    assert by_id["?"].age == 0.0 and by_id["?"].state == "?"
    assert by_id["?"].to_service is None  # a bool is not a count
    assert by_id["z"].via == ("?",) and by_id["z"].age == 0.0


# -- cells -----------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, "0.0s"), (4.25, "4.2s"), (59.9, "59.9s"), (60, "1m00s"), (185, "3m05s"),
    (7620, "2h07m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"),
])
def test_ages(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


@pytest.mark.parametrize(("count", "shown"), [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (10301, "10.1 KiB"),
    (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB"), (2**42, "4.0 TiB"),
])
def test_sizes(count: int | None, shown: str) -> None:
    assert format_size(count) == shown


# -- the table -------------------------------------------------------------------------


def test_the_table_shows_each_call_once_with_its_cells() -> None:
    text = plain(render(fold(LISTING), world=WORLD, clock="12:34:56"))
    title, *_ = text.splitlines()
    assert title.split() == [str(WORLD), "·", "2", "calls", "(1", "running,", "1", "setup)",
                             "·", "12:34:56"]
    (header,) = [line for line in text.splitlines() if line.split()[:1] == ["ID"]]
    assert header.split() == ["ID", "SOURCE", "TARGET", "SERVICE", "STATE", "AGE", "IN",
                              "OUT", "VIA"]
    assert row_fields(text, "10.7") == ["10.7", "work", "vault", "demo.Echo", "running",
                                        "3.5s", "10.1", "KiB", "10.2", "KiB", "daemon:work",
                                        "agent:work"]
    assert row_fields(text, "11.514")[:5] == ["11.514", "work", "vault", "demo.Echo+", "setup"]
    # The caller's leg is the older: it comes first.
    assert text.index("10.7") < text.index("11.514")


def test_an_empty_world_says_so() -> None:
    text = plain(render([], world=WORLD, clock="12:00:00"))
    assert "no live connections" in text.splitlines()[0]
    assert [line for line in text.splitlines() if line.split()[:1] == ["ID"]]


def test_texts_from_the_world_are_never_markup() -> None:
    text = plain(render(fold([entry("1.2", "qrexec-agent:x", service="a.B+[bold]x[/bold]",
                                    source="[red]v")]), world=Path("/w[x]"), clock="t"))
    assert "a.B+[bold]x[/bold]" in text and "[red]v" in text and "/w[x]" in text


def test_a_narrow_terminal_loses_via_and_a_pipe_loses_nothing() -> None:
    rows = fold(LISTING)
    narrow = Console(file=io.StringIO(), width=70, force_terminal=True, color_system=None)
    assert "VIA" not in plain(fit(narrow, rows, world=WORLD, clock="t"), width=70,
                              terminal=True)
    wide = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    assert "VIA" in plain(fit(wide, rows, world=WORLD, clock="t"), width=200, terminal=True)
    # Into a pipe the console widens to the table: no cell is cut at 80 columns.
    pipe = Console(file=io.StringIO(), width=80)
    table = fit(pipe, fold([*LISTING, entry("20.1", "qrexec-agent:disp7", service="x" * 120)]),
                world=WORLD, clock="t")
    pipe.print(table)
    assert pipe.file.getvalue().count("x" * 120) == 1  # type: ignore[attr-defined]
    assert "daemon:work agent:work" in pipe.file.getvalue()  # type: ignore[attr-defined]


# -- the command -----------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "soon", "0.01", "3601"])
def test_a_bad_interval_is_a_usage_error(interval: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        top.main(["--world", str(tmp_path), "--interval", interval])
    assert exited.value.code == 2
    assert "--interval" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["qrexec_trio.roles.umbrella", "qrexec_trio.roles.daemon",
                                    "qrexec_trio.roles.agent",
                                    "qrexec_trio.roles.policy_daemon"])
def test_no_module_of_ours_but_top_imports_rich(module: str) -> None:
    # The umbrella names top among its commands without importing it, and no
    # program of ours imports rich. (structlog imports rich itself when it is
    # installed, for its console tracebacks: that import is structlog's.)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         f"import sys, {module}; print('qrexec_trio.roles.top' in sys.modules)"],
        capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.split() == ["False"]
    importers = {chain[-2] for name, chain in _import_chains(result.stderr).items()
                 if (name == "rich" or name.startswith("rich.")) and len(chain) > 1}
    ours = {name for name in importers if name.startswith("qrexec_trio")}
    assert not ours, f"{module}: {sorted(ours)} import rich"


def test_the_rich_check_sees_top_import_rich() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                             "import qrexec_trio.roles.top"],
                            capture_output=True, text=True, check=True, timeout=60)
    chains = _import_chains(result.stderr)
    assert any(chain[-2:] == ["qrexec_trio.roles.top", name]
               for name, chain in chains.items() if name.startswith("rich")), chains.get("rich")


# -- the live view ---------------------------------------------------------------------


class ScriptedWorld:
    """The world's admin socket as top asks it: a listing or a failure per call,
    in order; after the last, the view is stopped (as Ctrl-C would)."""

    def __init__(self, *answers: list[dict[str, Any]] | DomainsError) -> None:
        self.answers = list(answers)
        self.stop = trio.CancelScope()

    async def call(self, method: str, dest: str, arg: str = "") -> bytes:
        await trio.lowlevel.checkpoint()
        assert (method, dest) == (CONNECTIONS, "dom0")
        answer = self.answers.pop(0)
        if not self.answers:
            self.stop.cancel()
        if isinstance(answer, DomainsError):
            raise answer
        return b"".join(json.dumps(e).encode() + b"\n" for e in answer)


def watch(world: ScriptedWorld) -> str:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)

    async def run() -> None:
        with world.stop:
            await top._watch(console, world, WORLD, 2.0)  # type: ignore[arg-type]

    trio.run(run, clock=MockClock(autojump_threshold=0))  # the sleeps pass at once
    return out.getvalue()


def test_the_view_redraws_and_a_failed_refresh_keeps_the_last_rows() -> None:
    later = [entry("12.9", "qrexec-agent:other", source="work", target="other",
                   service="demo.Later", age=0.5)]
    text = watch(ScriptedWorld(LISTING, DomainsError("QubesDaemonCommunicationError", "gone"),
                               later, later))
    # Each frame ends with its note.
    frames = text.split("every 2s · Ctrl-C to quit")[:-1]
    assert "10.7" in frames[0] and "12.9" not in frames[0]
    assert "not answering: QubesDaemonCommunicationError: gone" in frames[1]
    assert "10.7" in frames[1]  # the rows before the failure, still shown
    assert "12.9" in frames[-1] and "10.7" not in frames[-1]
    assert "not answering" not in frames[-1]


def test_a_world_that_does_not_answer_at_first_is_the_commands_error() -> None:
    with pytest.raises(DomainsError):
        watch(ScriptedWorld(DomainsError("QubesDaemonCommunicationError", "gone"), []))
