"""scripts/install: the tree it makes, staged (--destdir) and in place (--prefix).

The install runs offline with ``--from-env`` (the venv borrows this test's own
environment instead of downloading the dependencies); everything after the
package step (the relocation of a staged venv, the links, units, tmpfiles) is
the same for every way of getting the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install"

#: Where today's Qubes has each program (dom0 and VM packages together).
PROGRAMS = {
    "bin": ["qrexec-client", "qrexec-client-vm", "qrexec-policy", "qrexec-policy-exec",
            "qrexec-policy-daemon", "qubes-policy-lint", "qrexec-legacy-convert",
            "qrexec-trio"],
    "sbin": ["qrexec-daemon"],
    "lib/qubes": ["qrexec-daemon", "qrexec-agent", "qrexec-client", "qrexec-client-vm",
                  "qubes-rpc-multiplexer", "qrexec-policy", "qfile-daemon-dvm"],
}
UNITS = ["qrexec-agent.service", "qrexec-policy-daemon.service", "qrexec-daemon@.service"]
VENV = "lib/qrexec-trio/venv"


def install(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run scripts/install offline (from this environment) with ``args``."""
    return subprocess.run(
        [str(INSTALL), "--from-env", sys.executable, *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def installed(*args: str | os.PathLike[str]) -> None:
    result = install(*args)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree staged for /usr: the destdir."""
    destdir = tmp_path_factory.mktemp("stage")
    installed("--destdir", destdir)
    return destdir


def test_staged_programs_are_executable_links_into_the_venv(staged: Path) -> None:
    venv_bin = staged / "usr" / VENV / "bin"
    for directory, names in PROGRAMS.items():
        for name in names:
            path = staged / "usr" / directory / name
            assert path.is_symlink(), path
            # Relative, so that the staged tree and the installed one both resolve.
            assert not os.readlink(path).startswith("/"), path
            assert path.resolve() == (venv_bin / name).resolve(), path
            assert os.access(path, os.X_OK), path


def test_staged_tree_names_the_final_paths_only(staged: Path) -> None:
    venv = staged / "usr" / VENV
    shebang = (venv / "bin" / "qrexec-client-vm").read_text().splitlines()[0]
    assert shebang == f"#!/usr/{VENV}/bin/python"
    files = [*(venv / "bin").iterdir(), venv / "pyvenv.cfg",
             staged / "usr/lib/qrexec-trio/qrexec-daemon-instance",
             staged / "usr/lib/tmpfiles.d/qrexec-trio.conf",
             *(staged / "usr/lib/systemd/system" / unit for unit in UNITS)]
    for path in files:
        if path.is_symlink() or not path.is_file():
            continue  # the venv's python links are the interpreter's
        text = path.read_bytes()
        assert str(staged).encode() not in text, path
        assert b"@prefix@" not in text, path


def test_staged_units_and_tmpfiles(staged: Path) -> None:
    for unit in UNITS:
        text = (staged / "usr/lib/systemd/system" / unit).read_text()
        assert "ExecStart=/usr/lib/" in text or "ExecStart=/usr/bin/" in text, unit
    assert (staged / "usr/lib/tmpfiles.d/qrexec-trio.conf").is_file()
    assert os.access(staged / "usr/lib/qrexec-trio/qrexec-daemon-instance", os.X_OK)
    assert (staged / "usr/share/doc/qrexec-trio/install.md").is_file()


def test_staged_client_runs_with_the_staged_venv(staged: Path) -> None:
    # Its shebang names /usr/..., which is not there yet: run it with the
    # staged interpreter, which finds the staged venv beside it.
    python = staged / "usr" / VENV / "bin" / "python"
    result = subprocess.run(
        [str(python), str(staged / "usr/bin/qrexec-client-vm"), "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qrexec-client-vm")


def test_prefix_install_runs_its_programs(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    installed("--prefix", prefix)
    for program, usage in [("bin/qrexec-client-vm", "usage: qrexec-client-vm"),
                           ("lib/qubes/qrexec-agent", "usage: qrexec-agent"),
                           ("sbin/qrexec-daemon", "usage: qrexec-daemon")]:
        result = subprocess.run([str(prefix / program), "--help"], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, (program, result.stderr)
        assert result.stdout.startswith(usage), program
    unit = (prefix / "lib/systemd/system/qrexec-agent.service").read_text()
    assert f"ExecStart={prefix}/lib/qubes/qrexec-agent\n" in unit


def test_reinstall_over_an_existing_tree(tmp_path: Path) -> None:
    installed("--prefix", tmp_path)
    installed("--prefix", tmp_path)
    assert os.access(tmp_path / "bin/qrexec-client-vm", os.X_OK)


@pytest.mark.parametrize("args", [["--prefix", "usr"], ["--prefix", "/usr/a b"],
                                  ["--bogus"], ["--prefix"]])
def test_bad_arguments(args: list[str]) -> None:
    result = install(*args)
    assert result.returncode == 2
    assert "scripts/install:" in result.stderr
