"""The rpc-config parser and lookup, against the reference's rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrexec_trio._errors import QrexecError
from qrexec_trio.services._rpc_config import (
    DEFAULT_RPC_CONFIG_PATH,
    MAX_FILE_BYTES,
    RpcConfigError,
    find_rpc_config,
    load_service_config,
    parse_rpc_config,
    read_rpc_config,
    rpc_config_path,
    socket_option_conflict,
)
from qrexec_trio.services._service_config import DEFAULT_CONFIG, ServiceConfig

WFS = ServiceConfig(wait_for_session=True)

# (file bytes, expected configuration)
ACCEPTED: list[tuple[bytes, ServiceConfig]] = [
    (b"", DEFAULT_CONFIG),
    (b"\n\n", DEFAULT_CONFIG),
    (b"# comment\n", DEFAULT_CONFIG),
    (b"#no space needed\n", DEFAULT_CONFIG),
    (b"wait-for-session = 1\n", WFS),
    (b"wait-for-session = 0\n", DEFAULT_CONFIG),
    (b"wait-for-session = true\n", WFS),
    (b"wait-for-session = false\n", DEFAULT_CONFIG),
    (b"wait-for-session=1\n", WFS),
    (b"wait-for-session \t=\t 1\n", WFS),
    (b"wait-for-session = 1 # line comment\n", WFS),
    (b"wait-for-session = true#comment\n", WFS),
    (b"wait-for-session = 1   \t\n", WFS),
    (b"wait-for-session = 1\r\n", WFS),
    (b"wait-for-session = 1", WFS),  # no newline at the end is fine
    (b"force-user = 'user'\n", ServiceConfig(force_user="user")),
    (b"force-user = ''\n", ServiceConfig(force_user="")),
    (b"force-user = 'a b#c\"d'\n", ServiceConfig(force_user='a b#c"d')),
    (b"force-user = 'user' # who\n", ServiceConfig(force_user="user")),
    (b"force-user = '\\n'\n", ServiceConfig(force_user="\\n")),  # no escapes
    (b"force-user = '\xff'\n", ServiceConfig(force_user=os.fsdecode(b"\xff"))),
    (b"skip-service-descriptor = true\n", ServiceConfig(skip_service_descriptor=True)),
    (b"skip-service-descriptor = false\n", DEFAULT_CONFIG),
    (b"exit-on-service-eof = true\n", ServiceConfig(exit_on_service_eof=True)),
    (b"exit-on-client-eof = true\n", ServiceConfig(exit_on_client_eof=True)),
    (b"unknown-key = 5\n", DEFAULT_CONFIG),  # only a warning
    (b"Wait-For-Session = 1\n", DEFAULT_CONFIG),  # keys are case-sensitive: unknown
    (b"x = 1\nx = 2\n", DEFAULT_CONFIG),  # unknown keys may repeat
    (b"# \xff\x01 any bytes in a comment\n", DEFAULT_CONFIG),
    (b"wait-for-session = 1 # \xff\n", WFS),
    (
        b"\n# Test TOML file\nforce-user = 'u'\nwait-for-session = 1 # line comment\n",
        ServiceConfig(wait_for_session=True, force_user="u"),
    ),
    (
        b"skip-service-descriptor = true\nexit-on-client-eof = true\n",
        ServiceConfig(skip_service_descriptor=True, exit_on_client_eof=True),
    ),
]

DQ = "Double-quoted strings not implemented, use single quotes"
INT_JUNK = "Unexpected junk after integer"

# (file bytes, line, key, start of the message)
REJECTED: list[tuple[bytes, int, str | None, str]] = [
    (b'wait-for-session = "maybe"\n', 1, "wait-for-session", DQ),  # scenario m
    (b'wait-for-session = "a"\n', 1, "wait-for-session", DQ),
    (b'force-user = "user"\n', 1, "force-user", DQ),
    (b"wait-for-session = 00\n", 1, "wait-for-session", INT_JUNK),
    (b"wait-for-session = 01\n", 1, "wait-for-session", INT_JUNK),
    (b"wait-for-session = 1.0\n", 1, "wait-for-session", INT_JUNK),
    (b"wait-for-session = 0x1\n", 1, "wait-for-session", INT_JUNK),
    (b"wait-for-session = 2\n", 1, "wait-for-session", "Unsupported integer value 2"),
    (b"wait-for-session = 18446744073709551616\n", 1, "wait-for-session", "Integer out of"),
    (b"wait-for-session = \n", 1, "wait-for-session", "Missing value"),
    (b"wait-for-session =\n", 1, "wait-for-session", "Missing value"),
    (b"wait-for-session\n", 1, None, "Missing '=' after key"),
    (b"wait-for-session: 1\n", 1, None, "Missing '=' after key"),
    (b"wait for session = 1\n", 1, None, "Missing '=' after key"),
    (b"wait-for-session = -1\n", 1, "wait-for-session", "Unsupported start of value: '-'"),
    (b"wait-for-session = +1\n", 1, "wait-for-session", "Unsupported start of value: '+'"),
    (b"wait-for-session = yes\n", 1, "wait-for-session", "Unsupported start of value: 'y'"),
    (b"wait-for-session = True\n", 1, "wait-for-session", "Unsupported start of value: 'T'"),
    (b"wait-for-session = tru\n", 1, "wait-for-session", "Unexpected unquoted string"),
    (b"wait-for-session = fals\n", 1, "wait-for-session", "Unexpected unquoted string"),
    (b"wait-for-session = trueish\n", 1, "wait-for-session", "Unexpected junk after value"),
    (b"wait-for-session = true false\n", 1, "wait-for-session", "Unexpected junk after value"),
    (b"wait-for-session = 'true'\n", 1, "wait-for-session", "String not valid for"),
    (b"wait-for-session = 1\r", 1, "wait-for-session", INT_JUNK),  # \r without \n stays
    (b"wait-for-session = \xc3\xa9\n", 1, "wait-for-session", "Unsupported byte at start"),
    (b"force-user = 'abc\n", 1, "force-user", "Unterminated quoted string"),
    (b"force-user = '''abc'''\n", 1, "force-user", "Triple-quoted strings not implemented"),
    (b"force-user = 'a' 'b'\n", 1, "force-user", "Unexpected junk after value"),
    (b"force-user = 1000\n", 1, "force-user", "Integer not valid for user name or user ID"),
    (b"force-user = true\n", 1, "force-user", "Boolean not valid for user name or user ID"),
    (b"force-user = user\n", 1, "force-user", "Unsupported start of value: 'u'"),
    (b"skip-service-descriptor = 1\n", 1, "skip-service-descriptor", "Integer not valid"),
    (b"exit-on-service-eof = 0\n", 1, "exit-on-service-eof", "Integer not valid"),
    (b"exit-on-client-eof = 'yes'\n", 1, "exit-on-client-eof", "String not valid"),
    (b"[section]\n", 1, None, "TOML section headers not supported"),
    (b" wait-for-session = 1\n", 1, None, "Unexpected whitespace at start of line"),
    (b"\twait-for-session = 1\n", 1, None, "Unexpected whitespace at start of line"),
    (b"  \n", 1, None, "Unexpected whitespace at start of line"),  # blank-only line
    (b" # indented comment\n", 1, None, "Unexpected whitespace at start of line"),
    (b"1key = 1\n", 1, None, "Invalid character '1' at start of key"),
    (b"-key = 1\n", 1, None, "Invalid character '-' at start of key"),
    (b"\xc3\xa9 = 1\n", 1, None, "Invalid byte 0xc3 at start of key"),
    (b"\r\r\n", 1, None, "Invalid byte 0xd at start of key"),
    (b"wait-for-session = 1\0\n", 1, None, "NUL byte in line"),
    (b"# comment\0\n", 1, None, "NUL byte in line"),
    (b'unknown = "x"\n', 1, "unknown", DQ),  # the value is checked even for unknown keys
    (b"wait-for-session = 1\nwait-for-session = 1\n", 2, "wait-for-session", "Key "),
    (b"force-user = 'a'\n\nforce-user = 'b'\n", 3, "force-user", "Key force-user already"),
    (b"wait-for-session = 1\nwait-for-session = 'x'\n", 2, "wait-for-session", "Key "),
    (b"# ok\nwait-for-session = 1\nbad line\n", 3, None, "Missing '='"),
]


@pytest.mark.parametrize(("data", "expected"), ACCEPTED)
def test_accepted(data: bytes, expected: ServiceConfig) -> None:
    assert parse_rpc_config(data, "f").config == expected


@pytest.mark.parametrize(("data", "line", "key", "message"), REJECTED)
def test_rejected(data: bytes, line: int, key: str | None, message: str) -> None:
    with pytest.raises(RpcConfigError) as info:
        parse_rpc_config(data, "/cfg/svc")
    err = info.value
    assert (err.path, err.line, err.key) == ("/cfg/svc", line, key)
    assert err.message.startswith(message), err.message
    assert str(err).startswith(f"/cfg/svc:{line}: {message}")
    if key is not None:
        assert repr(key) in str(err)


def test_table_sizes() -> None:
    assert len(ACCEPTED) + len(REJECTED) >= 40


def test_scenario_m_message_is_the_reference_log_line() -> None:
    with pytest.raises(RpcConfigError) as info:
        parse_rpc_config(b'wait-for-session = "maybe"\n', "/d/rpc-config/test.Echo")
    assert str(info.value).startswith(
        "/d/rpc-config/test.Echo:1: Double-quoted strings not implemented, use single quotes"
    )
    assert isinstance(info.value, QrexecError)


def test_unknown_keys_are_warnings() -> None:
    parsed = parse_rpc_config(b"frobnicate = true\nwait-for-session = 1\n", "/f")
    assert parsed.config == WFS
    assert parsed.warnings == ("/f:1: Unsupported key frobnicate",)


def test_big_integer_and_error_stops_at_first_bad_line() -> None:
    # 2**64 - 1 is a valid integer, but not a valid boolean.
    with pytest.raises(RpcConfigError, match="Unsupported integer value 18446744073709551615"):
        parse_rpc_config(b"wait-for-session = 18446744073709551615\n")
    with pytest.raises(RpcConfigError) as info:
        parse_rpc_config(b"[a]\n[b]\n")
    assert info.value.line == 1


# --- the path ---------------------------------------------------------------------


def test_rpc_config_path() -> None:
    assert rpc_config_path({}) == [DEFAULT_RPC_CONFIG_PATH]
    assert rpc_config_path({"QUBES_RPC_CONFIG_PATH": "/a:/b"}) == ["/a", "/b"]
    assert rpc_config_path({"QUBES_RPC_CONFIG_PATH": "/a::/b:"}) == ["/a", "/b"]
    # Set but empty: no directory, as in the reference (getenv is not NULL).
    assert rpc_config_path({"QUBES_RPC_CONFIG_PATH": ""}) == []


# --- lookup -----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    return first, second


NAMES = ("svc+arg", "svc")


def test_no_file_is_default(dirs: tuple[Path, Path]) -> None:
    assert load_service_config(NAMES, [str(d) for d in dirs]) == DEFAULT_CONFIG
    assert load_service_config(NAMES, []) == DEFAULT_CONFIG


def test_specific_name_wins_over_earlier_directory(dirs: tuple[Path, Path]) -> None:
    first, second = dirs
    _write(first / "svc", b"force-user = 'general'\n")
    _write(second / "svc+arg", b"force-user = 'specific'\n")
    config = load_service_config(NAMES, [str(first), str(second)])
    assert config.force_user == "specific"


def test_general_name_is_the_fallback(dirs: tuple[Path, Path]) -> None:
    first, second = dirs
    _write(second / "svc", b"wait-for-session = 1\n")
    assert load_service_config(NAMES, [str(first), str(second)]) == WFS


def test_first_directory_wins_for_one_name(dirs: tuple[Path, Path]) -> None:
    first, second = dirs
    _write(first / "svc", b"force-user = 'one'\n")
    _write(second / "svc", b"force-user = 'two'\n")
    assert load_service_config(NAMES, [str(first), str(second)]).force_user == "one"


def test_empty_argument_is_looked_up_with_plus(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    _write(first / "svc+", b"wait-for-session = 1\n")
    _write(first / "svc", b"wait-for-session = 0\n")
    assert load_service_config(("svc+", "svc"), [str(first)]) == WFS


def test_bad_specific_file_does_not_fall_back(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    _write(first / "svc+arg", b"wait-for-session = 2\n")
    _write(first / "svc", b"wait-for-session = 1\n")
    with pytest.raises(RpcConfigError) as info:
        load_service_config(NAMES, [str(first)])
    assert info.value.path == str(first / "svc+arg")


def test_warnings_reach_the_callback(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    _write(first / "svc", b"nope = 1\n")
    seen: list[str] = []
    assert load_service_config(NAMES, [str(first)], warn=seen.append) == DEFAULT_CONFIG
    assert seen == [f"{first / 'svc'}:1: Unsupported key nope"]


def test_name_too_long_is_absent(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    _write(first / "svc", b"wait-for-session = 1\n")
    assert find_rpc_config(("svc+" + "a" * 252, "svc"), [str(first)]) == str(first / "svc")


# --- bad input --------------------------------------------------------------------


def test_dangling_symlink_is_absent(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    (first / "svc+arg").symlink_to(first / "missing")
    _write(first / "svc", b"wait-for-session = 1\n")
    assert load_service_config(NAMES, [str(first)]) == WFS


def test_symlink_through_a_file_is_an_error(dirs: tuple[Path, Path]) -> None:
    # The reference's own test: a link to /dev/null/doesnotexist fails the call.
    first, _ = dirs
    (first / "svc+arg").symlink_to("/dev/null/doesnotexist")
    with pytest.raises(RpcConfigError, match="cannot look up"):
        load_service_config(NAMES, [str(first)])


def test_config_directory_through_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "rpc-config").symlink_to("/dev/null/doesnotexist")
    with pytest.raises(RpcConfigError):
        load_service_config(NAMES, [str(tmp_path / "rpc-config")])


def test_missing_config_directory_is_no_config(tmp_path: Path) -> None:
    assert load_service_config(NAMES, [str(tmp_path / "absent")]) == DEFAULT_CONFIG


def test_directory_is_empty_config_and_hides_the_rest(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    (first / "svc+arg").mkdir()
    _write(first / "svc", b"wait-for-session = 1\n")
    assert load_service_config(NAMES, [str(first)]) == DEFAULT_CONFIG


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_an_error(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    path = _write(first / "svc", b"wait-for-session = 1\n")
    path.chmod(0)
    with pytest.raises(RpcConfigError, match="cannot open"):
        load_service_config(NAMES, [str(first)])


def test_huge_file_is_an_error(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    path = _write(first / "svc", b"#" * MAX_FILE_BYTES + b"\n")
    with pytest.raises(RpcConfigError, match="larger than"):
        read_rpc_config(str(path))
    ok = _write(first / "ok", b"#" * (MAX_FILE_BYTES - 1) + b"\n")
    assert read_rpc_config(str(ok)) == b"#" * (MAX_FILE_BYTES - 1) + b"\n"


def test_fifo_is_refused_without_blocking(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    os.mkfifo(first / "svc")
    with pytest.raises(RpcConfigError, match="not a regular file"):
        load_service_config(NAMES, [str(first)])


def test_dev_null_is_an_empty_config(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    (first / "svc").symlink_to("/dev/null")
    assert load_service_config(NAMES, [str(first)]) == DEFAULT_CONFIG


def test_non_utf8_file(dirs: tuple[Path, Path]) -> None:
    first, _ = dirs
    _write(first / "svc", b"# caf\xe9\nforce-user = 'caf\xe9'\n")
    user = load_service_config(NAMES, [str(first)]).force_user
    assert user is not None
    assert os.fsencode(user) == b"caf\xe9"  # the bytes survive unchanged


def test_path_too_long_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RpcConfigError, match="path too long"):
        find_rpc_config(("svc",), ["/" + "d" * 1100])


# --- socket services ----------------------------------------------------------------


def test_socket_option_conflict() -> None:
    assert socket_option_conflict(DEFAULT_CONFIG) is None
    assert socket_option_conflict(ServiceConfig(force_user="u")) is None
    assert socket_option_conflict(ServiceConfig(skip_service_descriptor=True)) is None
    for config in (
        ServiceConfig(force_user="u", skip_service_descriptor=True),
        ServiceConfig(force_user="u", exit_on_service_eof=True),
        ServiceConfig(force_user="u", exit_on_client_eof=True),
    ):
        assert socket_option_conflict(config) is not None


def test_open_error_is_an_error_even_as_root(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = dirs
    _write(first / "svc", b"wait-for-session = 1\n")

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(RpcConfigError, match="cannot open: Permission denied"):
        load_service_config(NAMES, [str(first)])
