"""An admin's basics (issue 15): every program answers ``--version`` and ends its
``--help`` with examples, every argument has a help text, ``python -m
qrexec_trio`` is the umbrella command, and LICENSE is the licence pyproject names."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qrexec_trio import __version__
from qrexec_trio._options import Parser
from qrexec_trio.roles import client_vm, multiplexer, umbrella

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Every installed program: name -> "module:function".
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

Main = Callable[[list[str]], object]


def _entry(spec: str) -> Main:
    module, _, function = spec.partition(":")
    main: Main = getattr(importlib.import_module(module), function)
    return main


def _subcommands() -> Iterator[tuple[str, Main]]:
    for name, (main, _) in umbrella._programs().items():
        yield f"qrexec-trio {name}", main
    yield "qrexec-trio policy lint", lambda argv: umbrella.main(["policy", "lint", *argv])


PROGRAMS = [*((name, _entry(spec)) for name, spec in SCRIPTS.items()), *_subcommands()]
IDS = [name for name, _ in PROGRAMS]


def _run(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().out


@pytest.fixture
def parsers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every parser a program parses its arguments with, argparse's or ours."""
    seen: list[object] = []
    for cls in (argparse.ArgumentParser, Parser):
        original = cls.parse_args

        def recording(self: object, *args: object, _original: object = original,
                      **kwargs: object) -> object:
            seen.append(self)
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "parse_args", recording)
    return seen


@pytest.mark.parametrize(("name", "main"), PROGRAMS, ids=IDS)
def test_version_prints_the_program_and_the_version(
        name: str, main: Main, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(main, ["--version"], capsys)
    assert status in (0, None)
    if name in SCRIPTS:
        assert out == f"{name} {__version__}\n"
    else:  # a subcommand prints its own program's name (qrexec-trio daemon: qrexec-daemon)
        assert out.endswith(f" {__version__}\n") and out.count("\n") == 1, out


@pytest.mark.parametrize(("name", "main"), PROGRAMS, ids=IDS)
def test_help_ends_with_examples_and_every_argument_has_a_help_text(
        name: str, main: Main, capsys: pytest.CaptureFixture[str], parsers: list[object],
) -> None:
    status, out = _run(main, ["--help"], capsys)
    assert status in (0, None)
    examples = out.rstrip("\n").rpartition("\nexamples:\n")[2]
    assert examples and all(line.startswith("  ") for line in examples.splitlines()), out
    undocumented = []
    for parser in parsers:
        if isinstance(parser, Parser):
            rows = [(row.name, row.help) for row in parser.options]
            rows += [(operand.metavar, operand.help) for operand in parser.operands]
        else:
            assert isinstance(parser, argparse.ArgumentParser)
            rows = [("/".join(action.option_strings) or action.dest, action.help)
                    for action in parser._actions]
        undocumented += [row for row, text in rows if not text or text == argparse.SUPPRESS]
    assert undocumented == []


def test_the_umbrella_help_ends_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = _run(umbrella.main, ["--help"], capsys)
    assert status == 0 and "\nexamples:\n  qrexec-trio " in out


def test_python_dash_m_runs_the_umbrella_command() -> None:
    result = subprocess.run([sys.executable, "-m", "qrexec_trio", "--version"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, f"qrexec-trio {__version__}\n")
    result = subprocess.run([sys.executable, "-m", "qrexec_trio", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "commands:" in result.stdout


def test_the_multiplexer_reads_version_only_as_its_sole_argument(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # Its arguments are positional, as the reference's: with a SOURCE, '--version'
    # is a service name like any other (none here: 127).
    monkeypatch.setenv("QREXEC_SERVICE_PATH", str(tmp_path))
    assert multiplexer.main(["--version", "work"]) == 127
    out, err = capsys.readouterr()
    assert out == "" and "'--version' not found" in err
    assert multiplexer.main(["--version"]) == 0
    assert capsys.readouterr().out == f"qubes-rpc-multiplexer {__version__}\n"


def test_a_programs_own_version_option_passes_through_qrexec_client_vm() -> None:
    args = client_vm.build_parser().parse_args(["vault", "demo.Echo", "prog", "--version"])
    assert args.prog == ["prog", "--version"]


def test_license_is_the_gpl_v2_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "GPL-2.0-or-later"
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE\n")
    assert "Version 2, June 1991" in text
    # The whole text: the terms and the appendix on applying them.
    for marker in ("TERMS AND CONDITIONS FOR COPYING, DISTRIBUTION AND MODIFICATION",
                   "NO WARRANTY", "END OF TERMS AND CONDITIONS",
                   "How to Apply These Terms to Your New Programs",
                   "Public License instead of this License."):
        assert marker in text
    assert len(text) > 17_000
