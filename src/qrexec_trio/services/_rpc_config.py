"""The per-service configuration files (``rpc-config``), as the reference reads them.

A service ``SVC`` called with argument ``ARG`` may have a file named ``SVC+ARG``
(``SVC+`` for an empty argument) or ``SVC`` in one of the directories of
``$QUBES_RPC_CONFIG_PATH``. The file is a tiny subset of TOML, one ``key = value``
per line. This module is pure: :func:`parse_rpc_config` turns bytes into a
:class:`ServiceConfig`, :func:`find_rpc_config` and :func:`read_rpc_config` do the
(blocking, small) file-system work, :func:`load_service_config` chains them.

The grammar and the lookup follow the reference's behaviour (libqrexec), which
works on bytes, not text: see the comments at each rule. Where the reference is
silent or relies on undefined behaviour, the choice made here is commented.
"""

from __future__ import annotations

import errno
import os
import stat

from .._errors import QrexecError

# A light record: the multiplexer imports this module (through the package) on
# every call (issue 14).
from .._light import frozen_record, replace
from ._service_config import DEFAULT_CONFIG, ServiceConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

#: Where the files live when ``QUBES_RPC_CONFIG_PATH`` is not set.
DEFAULT_RPC_CONFIG_PATH = "/etc/qubes/rpc-config"
RPC_CONFIG_PATH_ENV = "QUBES_RPC_CONFIG_PATH"

#: A name longer than a file-name component cannot exist: the reference skips it.
MAX_NAME_BYTES = 255
#: The reference builds the full path in a 1024-byte buffer; a longer one is an error.
MAX_PATH_BYTES = 1024
#: The reference reads files of any size. We stop at 64 KiB (real files are a few
#: lines) so that a huge or endless file cannot exhaust memory; beyond it is an error.
MAX_FILE_BYTES = 64 * 1024

_SPACE = b" \t"  # the reference's whitespace: space and tab only, never \r, \v, \f
_KEY_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-_")
_KEY_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_WAIT_FOR_SESSION = "wait-for-session"
_FORCE_USER = "force-user"
#: The newer keys: booleans only (``true``/``false``); they matter for socket and
#: TCP services and are accepted, and ignored, for executables.
_STRICT_BOOL_KEYS: dict[str, Callable[[ServiceConfig, bool], ServiceConfig]] = {
    "skip-service-descriptor": lambda c, v: replace(c, skip_service_descriptor=v),
    "exit-on-service-eof": lambda c, v: replace(c, exit_on_service_eof=v),
    "exit-on-client-eof": lambda c, v: replace(c, exit_on_client_eof=v),
}
_KNOWN_KEYS = frozenset({_WAIT_FOR_SESSION, _FORCE_USER, *_STRICT_BOOL_KEYS})


class RpcConfigError(QrexecError):
    """An rpc-config file that must not be used: the call fails (exit 125)."""

    def __init__(self, path: str, line: int | None, key: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        super().__init__(path, line, key, message)

    def __str__(self) -> str:
        # The prefix is the reference's "file:line: message" log line, so that a
        # grep for the reference's text still matches; the key follows it.
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        text = f"{where}: {self.message}"
        return text if self.key is None else f"{text} (key {self.key!r})"


@frozen_record
class ParsedConfig:
    """A valid file: its configuration and the lines the reference only warns about."""

    config: ServiceConfig
    warnings: tuple[str, ...] = ()


# --- values -------------------------------------------------------------------------

# A value is one of these three TOML types (the reference's own subset).
_Value = bool | int | bytes


def _type_name(value: _Value) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "Boolean"
    return "Integer" if isinstance(value, int) else "String"


def _printable(byte: int) -> bool:
    return 0x20 <= byte <= 0x7E


def _parse_value(raw: bytes, fail: Callable[[str], RpcConfigError]) -> _Value:
    """One value, up to the end of the line or a ``#`` comment after it."""
    if not raw:
        # The reference reports the NUL at the end of its buffer as a bad byte.
        raise fail("Missing value (unsupported byte at start of value: 0)")
    first = raw[0]
    value: _Value
    if first == ord("0"):
        # A lone 0: "00" and "01" fall through to the junk check (no leading zeros).
        value, end = 0, 1
    elif ord("1") <= first <= ord("9"):
        end = 1
        while end < len(raw) and raw[end] in b"0123456789":
            end += 1
        value = int(raw[:end])
        if value >= 1 << 64:  # strtoull() overflows: ERANGE is an error
            raise fail("Integer out of range (more than 64 bits)")
    elif first == ord("t") or first == ord("f"):
        # Only the exact words; "tru", "yes", "on" and friends are bare strings.
        word = b"true" if first == ord("t") else b"false"
        if not raw.startswith(word):
            raise fail("Unexpected unquoted string")
        value, end = first == ord("t"), len(word)
    elif first == ord('"'):
        # Checked on the quote alone, before looking at what is inside (scenario m).
        raise fail("Double-quoted strings not implemented, use single quotes")
    elif first == ord("'"):
        if raw.startswith(b"'''"):
            raise fail("Triple-quoted strings not implemented")
        close = raw.find(b"'", 1)
        if close < 0:
            raise fail("Unterminated quoted string")
        # Literal string: no escapes, any byte but the quote (and NUL, refused earlier).
        value, end = raw[1:close], close + 1
    elif _printable(first):
        raise fail(f"Unsupported start of value: {chr(first)!r}")
    else:
        raise fail(f"Unsupported byte at start of value: {first}")
    rest = raw[end:].lstrip(_SPACE)
    if rest and not rest.startswith(b"#"):
        if isinstance(value, int) and not isinstance(value, bool):
            raise fail(
                "Unexpected junk after integer; note that only decimal integers with "
                "no excess leading zeros are supported"
            )
        raise fail("Unexpected junk after value")
    return value


# --- lines --------------------------------------------------------------------------


def _split_lines(data: bytes) -> list[tuple[bytes, bool]]:
    """The file's lines as getline() returns them: (text, ended by a newline)."""
    lines = data.split(b"\n")
    last = lines.pop()  # after the final newline: empty, or a line with no newline
    result = [(line, True) for line in lines]
    if last:
        result.append((last, False))
    return result


def _clean_line(text: bytes, had_newline: bool) -> bytes:
    if had_newline and text.endswith(b"\r"):
        # CRLF is accepted, but a \r is only dropped together with its \n: a last
        # line "key = true\r" without a newline keeps the \r (junk after value).
        text = text[:-1]
    # Trailing blanks go, except the line's first byte: a line of blanks keeps one
    # and is then refused as "whitespace at start of line" (the reference's loop).
    stripped = text.rstrip(_SPACE)
    return stripped if stripped else text[:1]


def _split_key(line: bytes, fail: Callable[[str], RpcConfigError]) -> tuple[str, bytes]:
    """The key (ASCII by construction) and the raw bytes after ``=`` and its blanks."""
    end = 1
    while end < len(line) and line[end] in _KEY_BYTES:
        end += 1
    key = line[:end].decode("ascii")
    rest = line[end:].lstrip(_SPACE)
    if not rest.startswith(b"="):
        raise fail("Missing '=' after key")
    return key, rest[1:].lstrip(_SPACE)


def _check_line_start(line: bytes, fail: Callable[[str], RpcConfigError]) -> None:
    first = line[0]
    if first in _KEY_START:
        return
    if first == ord("["):
        raise fail("TOML section headers not supported")
    if first in _SPACE:
        raise fail("Unexpected whitespace at start of line")
    if _printable(first):
        raise fail(f"Invalid character {chr(first)!r} at start of key")
    raise fail(f"Invalid byte 0x{first:x} at start of key")


# --- keys ---------------------------------------------------------------------------


def _apply(
    config: ServiceConfig, key: str, value: _Value, fail: Callable[[str], RpcConfigError]
) -> ServiceConfig:
    """``config`` with one known key set, or the reference's type error."""
    if key == _WAIT_FOR_SESSION:
        # The only key that also takes 0 and 1 (it predates the booleans).
        if isinstance(value, bool):
            return replace(config, wait_for_session=value)
        if isinstance(value, int):
            if value > 1:
                raise fail(f"Unsupported integer value {value} for boolean")
            return replace(config, wait_for_session=value == 1)
        raise fail(f"{_type_name(value)} not valid for {key}")
    if key == _FORCE_USER:
        if not isinstance(value, bytes):
            raise fail(f"{_type_name(value)} not valid for user name or user ID")
        # The reference passes the bytes on unchanged; surrogateescape keeps them
        # exact (os.fsencode gives them back) instead of refusing non-UTF-8 names.
        return replace(config, force_user=os.fsdecode(value))
    if not isinstance(value, bool):
        raise fail(f"{_type_name(value)} not valid for {key}")
    return _STRICT_BOOL_KEYS[key](config, value)


class _Fail:
    """Makes the error for one line; the key is filled in once it is known."""

    def __init__(self, path: str, lineno: int) -> None:
        self.path = path
        self.lineno = lineno
        self.key: str | None = None

    def __call__(self, message: str) -> RpcConfigError:
        return RpcConfigError(self.path, self.lineno, self.key, message)


def _parse_line(text: bytes, had_newline: bool, fail: _Fail) -> tuple[str, _Value] | None:
    """One line: its key and value, or None for a blank line or a comment."""
    if b"\0" in text:
        raise fail("NUL byte in line")
    line = _clean_line(text, had_newline)
    if not line or line.startswith(b"#"):
        return None  # blank line or comment (a comment only at column 0)
    _check_line_start(line, fail)
    key, raw_value = _split_key(line, fail)
    fail.key = key
    # The value is checked before the key is looked at: a bad value is an error
    # even under an unknown key.
    return key, _parse_value(raw_value, fail)


def parse_rpc_config(data: bytes, path: str = "<rpc-config>") -> ParsedConfig:
    """Parse one file's bytes; raises :class:`RpcConfigError` at the first bad line.

    ``path`` only names the file in messages. Unknown keys are not errors (the
    reference logs them and goes on); they come back as ``warnings``.
    """
    config = DEFAULT_CONFIG
    seen: set[str] = set()
    warnings: list[str] = []
    for lineno, (text, had_newline) in enumerate(_split_lines(data), start=1):
        fail = _Fail(path, lineno)
        entry = _parse_line(text, had_newline, fail)
        if entry is None:
            continue
        key, value = entry
        if key not in _KNOWN_KEYS:
            warnings.append(f"{path}:{lineno}: Unsupported key {key}")
            continue  # unknown keys are not remembered: repeating one is fine too
        if key in seen:
            raise fail(f"Key {key} already seen")
        seen.add(key)
        config = _apply(config, key, value, fail)
    return ParsedConfig(config, tuple(warnings))


# --- files --------------------------------------------------------------------------


def rpc_config_path(environ: Mapping[str, str] | None = None) -> list[str]:
    """The directories to search, from ``QUBES_RPC_CONFIG_PATH`` or the default.

    Colon-separated, searched in order. As in the reference, a variable that is
    set but empty means no directory at all (not the default). Empty entries
    are skipped (the reference would turn a leading one into "/"; we do not
    search the root directory for a stray file).
    """
    env = os.environ if environ is None else environ
    raw = env.get(RPC_CONFIG_PATH_ENV)
    if raw is None:
        raw = DEFAULT_RPC_CONFIG_PATH
    return [d for d in raw.split(":") if d]


def _exists(path: str) -> bool:
    """Whether ``path`` names something; a broken lookup is an error, not absence."""
    try:
        os.stat(path)  # follows symlinks: a dangling one (ENOENT) is just absent
    except FileNotFoundError:
        return False
    except OSError as exc:
        # ENOTDIR, EACCES, ELOOP, ...: the reference refuses the call instead of
        # silently using another file (its tests: a symlink to /dev/null/x fails).
        raise RpcConfigError(path, None, None, f"cannot look up: {exc.strerror}") from exc
    return True


def find_rpc_config(names: Sequence[str], directories: Sequence[str]) -> str | None:
    """The first existing file: each name in every directory, before the next name.

    So ``SVC+ARG`` anywhere on the path wins over ``SVC`` in an earlier directory.
    Anything that exists counts as found (even a directory), so it hides the
    files after it, as in the reference.
    """
    for name in names:
        if not name or len(os.fsencode(name)) > MAX_NAME_BYTES:
            continue  # cannot exist as one file name: the reference skips it
        for directory in directories:
            path = os.path.join(directory, name)
            if len(os.fsencode(path)) >= MAX_PATH_BYTES:
                raise RpcConfigError(path, None, None, "path too long")
            if _exists(path):
                return path
    return None


def read_rpc_config(path: str) -> bytes | None:
    """The file's bytes (at most :data:`MAX_FILE_BYTES`), or None for a directory."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang the agent waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except IsADirectoryError:
        return None
    except OSError as exc:
        raise RpcConfigError(path, None, None, f"cannot open: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            # The reference opens a directory, its first read fails, and it takes
            # that as the end of an empty file: the defaults, and the search stops.
            return None
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            # A FIFO would block the reference forever and a socket cannot be opened;
            # refuse both. Character devices are read (/dev/null is an empty config).
            raise RpcConfigError(path, None, None, "not a regular file")
        data = _read_bounded(fd, path)
    finally:
        os.close(fd)
    return data


def _read_bounded(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise RpcConfigError(path, None, None, f"cannot read: {exc.strerror}") from exc
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise RpcConfigError(path, None, None, f"file larger than {MAX_FILE_BYTES} bytes")


def load_service_config(
    names: Sequence[str],
    directories: Sequence[str],
    *,
    warn: Callable[[str], None] | None = None,
) -> ServiceConfig:
    """The configuration for a call looked up as ``names`` (``SVC+ARG``, ``SVC``).

    No file: :data:`DEFAULT_CONFIG`. A bad file: :class:`RpcConfigError`, never the
    defaults. ``warn`` receives the lines the reference only warns about.
    """
    path = find_rpc_config(names, directories)
    if path is None:
        return DEFAULT_CONFIG
    data = read_rpc_config(path)
    if data is None:
        return DEFAULT_CONFIG
    parsed = parse_rpc_config(data, path)
    if warn is not None:
        for message in parsed.warnings:
            warn(message)
    return parsed.config


def socket_option_conflict(config: ServiceConfig) -> str | None:
    """Why a socket or TCP service must refuse ``config``, or None.

    The reference's tests refuse (exit 125) a socket service whose file sets
    ``force-user`` together with any socket option set to true: a socket is not
    started as a user, so the combination is a mistake. The agent calls this for
    socket and TCP services only; executables ignore the socket options.
    """
    if config.force_user is None:
        return None
    socket_options = {
        "skip-service-descriptor": config.skip_service_descriptor,
        "exit-on-service-eof": config.exit_on_service_eof,
        "exit-on-client-eof": config.exit_on_client_eof,
    }
    for key, enabled in socket_options.items():
        if enabled:
            return f"force-user cannot be combined with {key} for a socket service"
    return None
