"""qubes-rpc-multiplexer, run as a program: lookup, environment, exit statuses.

Each test starts the real program (``python -m qrexec_trio.roles.multiplexer``)
with ``QREXEC_SERVICE_PATH`` pointing at a temporary service directory, so
that what is pinned here is what a caller of the installed program sees.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

_MULTIPLEXER = [sys.executable, "-m", "qrexec_trio.roles.multiplexer"]

#: A service that reports its argv and the qrexec variables, then echoes stdin.
_REPORTER = """#!/bin/sh
echo "argv: $*"
for name in QREXEC_SERVICE_FULL_NAME QREXEC_REMOTE_DOMAIN QREXEC_SERVICE_ARGUMENT \\
            QREXEC_REQUESTED_TARGET_TYPE QREXEC_REQUESTED_TARGET \\
            QREXEC_REQUESTED_TARGET_KEYWORD; do
    eval "value=\\${$name-unset}"
    echo "$name=$value"
done
cat
exit 7
"""


def _run(services: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("QREXEC")}
    env["QREXEC_SERVICE_PATH"] = str(services)
    return subprocess.run([*_MULTIPLEXER, *args], input=stdin.decode(), env=env,
                          capture_output=True, text=True, check=False, timeout=60)


def _handler(path: Path, text: str = _REPORTER, mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_service_gets_its_argument_environment_and_stdin(tmp_path: Path) -> None:
    _handler(tmp_path / "test.Report")
    result = _run(tmp_path, "test.Report+arg1", "work", "name", "dom0", stdin=b"in\n")
    assert result.returncode == 7  # the service's own status: the multiplexer was replaced
    assert result.stdout.splitlines() == [
        "argv: arg1",
        "QREXEC_SERVICE_FULL_NAME=test.Report+arg1",
        "QREXEC_REMOTE_DOMAIN=work",
        "QREXEC_SERVICE_ARGUMENT=arg1",
        "QREXEC_REQUESTED_TARGET_TYPE=name",
        "QREXEC_REQUESTED_TARGET=dom0",
        "QREXEC_REQUESTED_TARGET_KEYWORD=unset",
        "in",
    ]
    assert result.stderr == ""


def test_a_keyword_target_and_no_argument(tmp_path: Path) -> None:
    _handler(tmp_path / "test.Report")
    result = _run(tmp_path, "test.Report", "work", "keyword", "default")
    assert result.returncode == 7
    lines = result.stdout.splitlines()
    assert lines[0] == "argv: "
    assert "QREXEC_SERVICE_ARGUMENT=unset" in lines
    assert "QREXEC_REQUESTED_TARGET_TYPE=keyword" in lines
    assert "QREXEC_REQUESTED_TARGET_KEYWORD=default" in lines


def test_a_call_without_target_has_an_empty_target_type(tmp_path: Path) -> None:
    _handler(tmp_path / "test.Report")
    result = _run(tmp_path, "test.Report", "work")
    assert result.returncode == 7
    assert "QREXEC_REQUESTED_TARGET_TYPE=" in result.stdout.splitlines()


def test_a_handler_without_the_x_bit_runs_with_sh_and_no_argument(tmp_path: Path) -> None:
    _handler(tmp_path / "test.Report", mode=0o644)
    result = _run(tmp_path, "test.Report+arg1", "work")
    assert result.returncode == 7
    assert result.stdout.splitlines()[0] == "argv: "


def test_a_missing_service_is_127(tmp_path: Path) -> None:
    result = _run(tmp_path, "test.Missing", "work")
    assert result.returncode == 127
    assert result.stderr.startswith("qubes-rpc-multiplexer: service 'test.Missing' not found")


def test_a_socket_service_is_refused_with_125(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "test.Socket"))
        result = _run(tmp_path, "test.Socket", "work")
    assert result.returncode == 125
    assert "test.Socket is a socket service" in result.stderr


def test_a_tcp_service_is_refused_with_125(tmp_path: Path) -> None:
    (tmp_path / "test.Tcp").symlink_to("/dev/tcp/127.0.0.1/22")
    result = _run(tmp_path, "test.Tcp", "work")
    assert result.returncode == 125
    assert "test.Tcp is a socket service" in result.stderr


def test_a_bad_tcp_link_is_125(tmp_path: Path) -> None:
    (tmp_path / "test.Tcp").symlink_to("/dev/tcp/not-an-address/22")
    result = _run(tmp_path, "test.Tcp", "work")
    assert result.returncode == 125
    assert "invalid host 'not-an-address'" in result.stderr


def test_a_handler_that_cannot_be_executed(tmp_path: Path) -> None:
    _handler(tmp_path / "test.Broken", "#!/nonexistent/interpreter\n")
    result = _run(tmp_path, "test.Broken", "work")
    assert result.returncode == 127  # ENOENT from execve, as for a missing service
    assert result.stderr.startswith(
        f"qubes-rpc-multiplexer: cannot run {tmp_path / 'test.Broken'}:")


def test_bad_usage_is_125(tmp_path: Path) -> None:
    for args in [(), ("test.Report",), ("test.Report", "work", "name"), ("a b", "work")]:
        result = _run(tmp_path, *args)
        assert result.returncode == 125, args
        assert result.stderr.startswith("usage: qubes-rpc-multiplexer"), args


def test_a_malformed_call_is_125(tmp_path: Path) -> None:
    result = _run(tmp_path, "test.Report", "work", "sideways", "dom0")
    assert result.returncode == 125
    assert result.stderr.startswith("qubes-rpc-multiplexer: ")
