"""The shm vchan's driver and the server's half of its set-up, without trio.

:mod:`._shm` (the trio backend) and the short-lived clients' blocking driver
(:mod:`qrexec_trio.blocking._vchan`) share all of this, so it imports only C
modules (``socket`` would pull in ``enum`` and ``selectors``, trio hundreds of
milliseconds more). See :mod:`._shm` for the rendezvous and the hello.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from _socket import SCM_RIGHTS, SOL_SOCKET

from .._light import final
from ._errors import VchanError
from ._shm_cffi import ffi, lib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from ._shm_cffi import CData  # only the stub has it

#: The rendezvous message: magic, version, left (client->server) and right
#: (server->client) ring orders, region size in bytes. Little-endian.
HELLO: Final = struct.Struct("<8sIHHI")
HELLO_MAGIC: Final = b"qtshmvc\x00"
MIN_RING: Final = 1 << 10
MAX_RING: Final = 1 << 20
#: The server's hello carries these fds: [memfd, server's eventfd, client's eventfd].
FDS_SENT: Final = 3
#: What the seals of the region must include: no one can shrink it under the
#: other side's mapping (SIGBUS), nor grow it.
SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
#: How many clients may queue on an offer (all but the first are turned away).
BACKLOG: Final = 4


def ring_order(size: int) -> int:
    """log2 of a valid ring size; :class:`VchanError` for anything else."""
    if size < MIN_RING or size > MAX_RING or size & (size - 1):
        raise VchanError(
            f"vchan ring size {size} is not allowed: it must be a power of two "
            f"from {MIN_RING} to {MAX_RING} bytes"
        )
    return size.bit_length() - 1


def region_size(left_order: int, right_order: int) -> int:
    """Bytes of a region with these ring orders (header plus both rings)."""
    return lib.shm_region_size(left_order, right_order)


def _why(cell: CData, err: int) -> str:
    why = ffi.string(cell[0]).decode()
    return f"{why} ({os.strerror(err)})" if err else why


def close_all(fds: list[int]) -> None:
    """Close every fd of ``fds`` and empty the list."""
    for fd in fds:
        os.close(fd)
    fds.clear()


@final
class ShmDriver:
    """One end of a shm vchan: libxenvchan's synchronous, non-blocking API.

    Implements :class:`~._ring.RingDriver`. After :meth:`close` every call is
    harmless: reads and writes report a closed peer, waits return at once.
    """

    def __init__(self, handle: CData) -> None:
        self._v: CData | None = handle

    @classmethod
    def server(cls, memfd: int, own_efd: int, peer_efd: int,
               read_order: int, write_order: int) -> ShmDriver:
        """Initialise the region in ``memfd`` (already sized) as a server.

        Takes ownership of both eventfds on success only; ``memfd`` stays the caller's.
        """
        why = ffi.new("const char *[1]")
        ffi.errno = 0
        handle = lib.shm_server_new(memfd, own_efd, peer_efd, read_order, write_order, why)
        if handle == ffi.NULL:
            raise VchanError(f"cannot set up a shm vchan: {_why(why, ffi.errno)}")
        return cls(handle)

    @classmethod
    def client(cls, memfd: int, own_efd: int, peer_efd: int, sock: int) -> ShmDriver:
        """Map and check a server's region; take the eventfds and ``sock`` on success.

        Raises :class:`ValueError` (with the reason) if the region is not a valid one.
        """
        why = ffi.new("const char *[1]")
        ffi.errno = 0
        handle = lib.shm_client_new(memfd, own_efd, peer_efd, sock, why)
        if handle == ffi.NULL:
            raise ValueError(_why(why, ffi.errno))
        return cls(handle)

    def attach(self, sock: int) -> None:
        """Server side: watch the rendezvous connection (owned by the driver from now on)."""
        if self._v is None or lib.shm_server_attach(self._v, sock) < 0:
            raise VchanError("cannot watch the shm vchan's rendezvous connection")

    # -- RingDriver -------------------------------------------------------------------

    def read_into(self, buffer: bytearray, size: int) -> int:
        if self._v is None:
            return -1
        return lib.shm_read(self._v, ffi.from_buffer(buffer), min(size, len(buffer)))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._v is None:
            return -1
        return lib.shm_write(self._v, ffi.from_buffer(data), memoryview(data).nbytes)

    def data_ready(self) -> int:
        return 0 if self._v is None else lib.shm_data_ready(self._v)

    def buffer_space(self) -> int:
        return 0 if self._v is None else lib.shm_buffer_space(self._v)

    def wait(self) -> None:
        if self._v is not None and lib.shm_wait(self._v) < 0:
            code = ffi.errno
            raise OSError(code, f"shm vchan wait: {os.strerror(code)}")

    def fd_for_select(self) -> int:
        return -1 if self._v is None else lib.shm_fd_for_select(self._v)

    def is_open(self) -> int:
        return 0 if self._v is None else lib.shm_is_open(self._v)

    def client_arrived(self) -> bool:
        """Server side: the client claimed the ring (it may have left again since:
        then what it sent is still to be read)."""
        return self._v is not None and lib.shm_header_of(self._v).cli_live != 2

    def close(self) -> None:
        if self._v is not None:
            handle, self._v = self._v, None
            lib.shm_close(handle)

    # -- packets (libxenvchan's send/recv: all or nothing) -----------------------------

    def send(self, packet: bytes | bytearray | memoryview) -> int:
        """``len(packet)`` if it was written whole, 0 if it does not fit yet, -1
        if the peer closed; :class:`ValueError` if it could never fit the ring."""
        if self._v is None:
            return -1
        size = memoryview(packet).nbytes
        ffi.errno = 0  # -1 also means a closed peer: tell the two apart
        sent = lib.shm_send(self._v, ffi.from_buffer(packet), size)
        if sent < 0 and ffi.errno == errno.EMSGSIZE:
            raise ValueError(f"a {size}-byte packet can never fit this vchan's ring")
        return sent

    def recv(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes, or None if they are not all there yet;
        :class:`EOFError` if the peer closed before sending them all."""
        if self._v is None:
            raise EOFError("vchan is closed")
        buffer = bytearray(size)
        ffi.errno = 0
        got = lib.shm_recv(self._v, ffi.from_buffer(buffer), size)
        if got < 0:
            if ffi.errno == errno.EMSGSIZE:
                raise ValueError(f"a {size}-byte packet can never fit this vchan's ring")
            raise EOFError("vchan peer closed before the whole packet arrived")
        return bytes(buffer) if got else None

    # -- for tests ------------------------------------------------------------------------

    def header(self) -> CData:
        """The shared header (``struct shm_header``), for tests."""
        if self._v is None:
            raise ValueError("driver is closed")
        header: CData = lib.shm_header_of(self._v)
        return header

    def set_indexes_for_test(self, value: int) -> None:
        """Move every ring index to ``value``; only before any data moved (and,
        for the client to pick them up, before it connects)."""
        if self._v is not None:
            lib.shm_test_set_indexes(self._v, value)


@final
class ShmServerSetup:
    """The server's end of a shm vchan until its client is in: the sealed
    region, both eventfds, the driver over them, and the hello to send.

    Raises :class:`VchanError` (bad ring size) or :class:`OSError` (out of
    memory or fds); it leaks nothing either way. :meth:`attach` hands the
    driver out; :meth:`close` releases whatever was not handed out.
    """

    def __init__(self, read_min: int, write_min: int) -> None:
        left, right = ring_order(read_min), ring_order(write_min)
        size = region_size(left, right)
        #: The rendezvous message for the client (see :data:`HELLO`).
        self.hello = HELLO.pack(HELLO_MAGIC, lib.SHM_VERSION, left, right, size)
        owned: list[int] = []
        try:
            memfd = os.memfd_create("qrexec-vchan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            owned.append(memfd)
            os.ftruncate(memfd, size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            owned.append(own)
            peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            owned.append(peer)
            driver = ShmDriver.server(memfd, own, peer, left, right)
        except BaseException:
            close_all(owned)
            raise
        # The eventfds are the driver's now (it closes them); we keep their
        # numbers for the hello until the client has its copies.
        self._memfd = memfd
        self._efds = (own, peer)
        self._driver: ShmDriver | None = driver

    def hello_fds(self) -> list[tuple[int, int, bytes]]:
        """The hello's ancillary data: ``SCM_RIGHTS`` [memfd, server's, client's eventfd]."""
        fds = (self._memfd, *self._efds)
        # C ints, in native order (struct, not array: array pulls in collections).
        return [(SOL_SOCKET, SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]

    def attach(self, conn: int) -> ShmDriver:
        """After the hello went out: the driver, watching the rendezvous connection
        ``conn`` (which it owns from now on, closed here on failure)."""
        driver, self._driver = self._driver, None
        try:
            if driver is None:
                raise VchanError("the shm vchan's set-up was closed")
            driver.attach(conn)
        except BaseException:
            os.close(conn)
            if driver is not None:
                driver.close()
            raise
        finally:
            # The client mapped the region (or never will): the mapping is all we need.
            self._release_memfd()
        return driver

    def _release_memfd(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def close(self) -> None:
        """Release what was not handed out (idempotent)."""
        if self._driver is not None:
            self._driver.close()
            self._driver = None
        self._release_memfd()


def left_while_connecting(peer_domain: int, port: int, detail: str = "") -> VchanError:
    """The error of a client that went away during the rendezvous."""
    return VchanError(f"domain {peer_domain} left vchan port {port} while connecting{detail}")
