"""Reading policy files and directories, and noticing when they change.

Only regular files are read: a FIFO would block the reader forever, a device
could be anything. Files are opened non-blocking and checked with ``fstat`` on
the open descriptor, so what is checked is what is read.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from ._errors import PolicySyntaxError

#: A policy file larger than this is a mistake, not a policy (1,000 rules are ~50 KiB).
MAX_POLICY_FILE_SIZE: Final = 16 * 1024 * 1024
POLICY_SUFFIX: Final = ".policy"


#: Identity and version of a file or directory: (device, inode, mtime, ctime,
#: size). When any part differs, the path was edited, replaced or re-created
#: since it was read; ctime catches an edit that kept mtime and size. A plain
#: tuple, because it is recomputed for every watched path before every call.
Signature = tuple[int, int, int, int, int]


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def current_signature(path: str) -> Signature | None:
    """The path's signature now, or None when it cannot be stat'ed (absent)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def any_changed(watched: dict[str, Signature | None]) -> bool:
    """Whether any path's signature differs from the one recorded."""
    # The per-call cost of the cache: one stat per watched path, kept tight.
    return any(current_signature(path) != recorded for path, recorded in watched.items())


def read_policy_file(path: str) -> tuple[str, Signature]:
    """Text and signature of a policy file; PolicySyntaxError(path, line, ...) if
    it is not a readable regular UTF-8 file of sane size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as exc:
        raise PolicySyntaxError(path, 0, f"cannot read: {_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PolicySyntaxError(path, 0, "is a directory, not a policy file")
        if not stat.S_ISREG(st.st_mode):
            raise PolicySyntaxError(path, 0, "not a regular file")
        if st.st_size > MAX_POLICY_FILE_SIZE:
            raise PolicySyntaxError(path, 0, f"larger than {MAX_POLICY_FILE_SIZE} bytes")
        data = _read_all(fd, path)
    finally:
        os.close(fd)
    return _decode(data, path), signature_of(st)


def list_policy_dir(path: str, *, suffix: str | None) -> tuple[list[str], Signature]:
    """Entry names of a directory in C-locale (byte) order, with its signature.

    With ``suffix``, only names ending in it; hidden names (leading ``.``) are
    always skipped: editors leave swap files there while a policy is edited.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise PolicySyntaxError(path, 0, "not a directory")
        names = os.listdir(path)
    except (OSError, ValueError) as exc:
        raise PolicySyntaxError(path, 0, f"cannot list directory: {_reason(exc)}") from None
    chosen = [
        name for name in names
        if not name.startswith(".") and (suffix is None or name.endswith(suffix))
    ]
    # C-locale order is byte order of the encoded names, whatever the locale says.
    chosen.sort(key=os.fsencode)
    return chosen, signature_of(st)


def _read_all(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            raise PolicySyntaxError(path, 0, f"cannot read: {_reason(exc)}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_POLICY_FILE_SIZE:
            raise PolicySyntaxError(path, 0, f"larger than {MAX_POLICY_FILE_SIZE} bytes")
        chunks.append(chunk)


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicySyntaxError(path, line, "not valid UTF-8") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return os.strerror(exc.errno)
    return str(exc)
