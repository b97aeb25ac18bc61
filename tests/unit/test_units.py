"""The systemd units and tmpfiles rules in systemd/, as scripts/install installs them.

``systemd-analyze verify`` checks each unit's syntax and that its commands
exist and are executable; it does so on the host's paths, so the units are
installed with ``--prefix`` into a temporary directory (their ExecStart then
names the programs the install put there). It exits 0 on unknown keys and bad
values, printing a warning: any line it prints about our units fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qrexec_trio._config import Timeouts

from .test_install import UNITS, installed

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_TMPFILES = shutil.which("systemd-tmpfiles")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("prefix")
    installed("--prefix", prefix)
    return prefix


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> its values in order (a unit may repeat a key)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, (key, values)
    return values[0]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(prefix: Path, unit: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    # A template is verified as an instance of it (qrexec-daemon@i.service).
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(prefix / "lib/systemd/system" / unit)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "qrexec" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


@pytest.mark.parametrize("unit", UNITS)
def test_units_notify_reload_and_stop_in_time(prefix: Path, unit: str) -> None:
    settings = unit_settings(prefix / "lib/systemd/system" / unit)
    assert one(settings, "Service.Type") == "notify"
    assert one(settings, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert int(one(settings, "Service.WatchdogSec")) > 0
    # The graceful stop (live connections, then the bounded cleanup) ends
    # before systemd's SIGKILL.
    timeouts = Timeouts()
    assert int(one(settings, "Service.TimeoutStopSec")) > timeouts.stop_grace + timeouts.cleanup
    assert one(settings, "Service.ExecStart").startswith(f"{prefix}/")


def test_agent_unit_starts_at_boot_as_the_reference_name(prefix: Path) -> None:
    settings = unit_settings(prefix / "lib/systemd/system/qrexec-agent.service")
    assert one(settings, "Service.ExecStart") == f"{prefix}/lib/qubes/qrexec-agent"
    assert one(settings, "Service.Restart") == "on-failure"
    assert one(settings, "Install.WantedBy") == "multi-user.target"
    assert one(settings, "Install.Alias") == "qubes-qrexec-agent.service"


def test_policy_daemon_unit(prefix: Path) -> None:
    settings = unit_settings(prefix / "lib/systemd/system/qrexec-policy-daemon.service")
    assert one(settings, "Service.ExecStart") == f"{prefix}/bin/qrexec-policy-daemon"
    assert one(settings, "Install.Alias") == "qubes-qrexec-policy-daemon.service"


def test_daemon_template_passes_its_instance(prefix: Path) -> None:
    settings = unit_settings(prefix / "lib/systemd/system/qrexec-daemon@.service")
    assert one(settings, "Service.ExecStart") == \
        f"{prefix}/lib/qrexec-trio/qrexec-daemon-instance %I"


@pytest.fixture
def fake_daemon_wrapper(prefix: Path, tmp_path: Path) -> Path:
    """The installed wrapper, exec'ing a daemon that prints its arguments."""
    fake = tmp_path / "qrexec-daemon"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    wrapper = tmp_path / "qrexec-daemon-instance"
    text = (prefix / "lib/qrexec-trio/qrexec-daemon-instance").read_text()
    real = f"{prefix}/lib/qubes/qrexec-daemon"
    assert real in text
    wrapper.write_text(text.replace(real, str(fake)))
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize(("instance", "extra", "expected"), [
    ("work:3", [], ["3", "work"]),
    ("my-vm.x_1:12:alice", [], ["12", "my-vm.x_1", "alice"]),
    ("work:3", ["--max-calls", "8"], ["--max-calls", "8", "--", "3", "work"]),
])
def test_daemon_wrapper_splits_the_instance(fake_daemon_wrapper: Path, instance: str,
                                            extra: list[str], expected: list[str]) -> None:
    result = subprocess.run([str(fake_daemon_wrapper), instance, *extra],
                            capture_output=True, text=True, timeout=30, check=True)
    args = result.stdout.splitlines()
    assert args[:2] == ["--direct", "--quiet"]
    tail = expected if extra else ["--", *expected]
    assert args[2:] == tail


@pytest.mark.parametrize("args", [[], ["work"], ["work:"], [":3"], ["work:x3"],
                                  ["work:-3"], ["work:3:alice:more"]])
def test_daemon_wrapper_refuses_a_bad_instance(fake_daemon_wrapper: Path,
                                               args: list[str]) -> None:
    result = subprocess.run([str(fake_daemon_wrapper), *args], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stdout == ""  # the daemon was not started
    assert "NAME:DOMID" in result.stderr


def test_daemon_wrapper_execs_the_installed_daemon(prefix: Path) -> None:
    result = subprocess.run(
        [str(prefix / "lib/qrexec-trio/qrexec-daemon-instance"), "work:3", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qrexec-daemon")


@pytest.mark.skipif(SYSTEMD_TMPFILES is None, reason="systemd-tmpfiles is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="setting a directory's group needs root")
def test_tmpfiles_make_the_runtime_dirs(prefix: Path, tmp_path: Path) -> None:
    assert SYSTEMD_TMPFILES is not None
    # With --root, systemd-tmpfiles resolves the qubes group in root's /etc/group.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/group").write_text("root:x:0:\nqubes:x:98:\n")
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    subprocess.run([SYSTEMD_TMPFILES, "--create", f"--root={tmp_path}",
                    str(prefix / "lib/tmpfiles.d/qrexec-trio.conf")],
                   capture_output=True, text=True, timeout=60, check=True)
    # The programs' defaults: the daemons', agent's and policy sockets, and
    # the socket services.
    qubes, rpc = (tmp_path / "run/qubes").stat(), (tmp_path / "run/qubes-rpc").stat()
    assert (oct(qubes.st_mode & 0o7777), qubes.st_gid) == (oct(0o2770), 98)
    assert (oct(rpc.st_mode & 0o7777), rpc.st_gid) == (oct(0o755), 98)
