"""Being told that policy files changed, instead of asking before every call.

The cache used to stat every watched path before each evaluation: with 50
files that was most of a cached call's cost. The kernel can tell us instead
(inotify, as the reference's policy daemon learns of changes): we watch the
directories that hold every path the policy was built from, and a cached call
only reads a non-blocking file descriptor that is empty unless something
changed. When it is not empty, the cache does what it always did (compare
signatures, re-parse what changed).

inotify is reached through ctypes (libc's two functions; no compiler).
Not cffi's ABI mode: its ``cdef`` parses C with pycparser, which stayed
loaded for the daemon's whole life (1.4 MiB of a daemon at rest,
bench/bench_daemon_memory.py), where ctypes is already loaded by trio. Where
inotify cannot be used (none, a watch limit reached), :func:`open_watcher`
returns ``None`` and the cache stats as before.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import weakref
from collections.abc import Iterable
from typing import Final

import structlog

log = structlog.get_logger(__name__)

_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
# Anything that can change what a directory's entries are or contain.
_MASK: Final = (
    0x002  # IN_MODIFY
    | 0x004  # IN_ATTRIB
    | 0x008  # IN_CLOSE_WRITE
    | 0x040  # IN_MOVED_FROM
    | 0x080  # IN_MOVED_TO
    | 0x100  # IN_CREATE
    | 0x200  # IN_DELETE
    | 0x400  # IN_DELETE_SELF
    | 0x800  # IN_MOVE_SELF
)


@functools.cache
def _load_libc() -> ctypes.CDLL:
    """libc with the two inotify calls typed, loaded on first use.

    Raises ``AttributeError`` if this libc has no inotify."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


class Watcher:
    """An inotify descriptor watching directories; :meth:`changed` drains it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._watched: set[str] = set()
        # A user has few inotify instances (128 by default): one whose cache
        # was dropped must not hold its descriptor until the process ends.
        self._finalizer = weakref.finalize(self, os.close, fd)

    def watch_paths(self, paths: Iterable[str]) -> bool:
        """Watch whatever could change ``paths`` (files, directories, missing paths).

        For each path: the directory that holds it (its entry appearing,
        going or changing) and, for a directory, the directory itself (its
        entries); for a symbolic link, the same for where it leads. Returns
        False if a watch could not be added (the caller then stats instead).
        """
        wanted: set[str] = set()
        for path in paths:
            for place in {path, os.path.realpath(path)}:
                wanted.add(_existing_ancestor(os.path.dirname(place) or "/"))
                if os.path.isdir(place):
                    wanted.add(place)
        libc = _load_libc()
        for directory in sorted(wanted - self._watched):
            if libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) < 0:
                error = ctypes.get_errno()
                if error in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone meanwhile: its parent's watch reports that
                log.warning("cannot watch policy directory; checking files on each call",
                            directory=directory, error=os.strerror(error))
                return False
            self._watched.add(directory)
        return True

    def changed(self) -> bool:
        """Whether anything happened since the last call (drains the events)."""
        seen = False
        while True:
            try:
                if not os.read(self._fd, 65536):
                    return seen
            except BlockingIOError:
                return seen
            seen = True

    def close(self) -> None:
        self._finalizer()  # closes the descriptor once, however often it is called


def _existing_ancestor(path: str) -> str:
    while path != "/" and not os.path.isdir(path):
        path = os.path.dirname(path) or "/"
    return path


def open_watcher() -> Watcher | None:
    """A new watcher, or ``None`` where inotify is not available."""
    try:
        libc = _load_libc()
    except (OSError, AttributeError) as exc:
        log.info("inotify not available; checking policy files on each call", error=str(exc))
        return None
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        log.info("inotify not available; checking policy files on each call",
                 error=os.strerror(ctypes.get_errno()))
        return None
    return Watcher(int(fd))
