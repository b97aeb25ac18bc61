"""The libxenvchan binding without trio: the driver, the offer, the client's open.

:mod:`._xen` (the trio backend) and the short-lived clients' blocking driver
(:mod:`qrexec_trio.blocking._vchan`) share it, so it imports no more than the
compiled extension and C modules. See :mod:`._xen` for the xenstore layout.

The extension is optional: it is built only where libxenvchan.h existed at
install time. Importing this module never fails; :func:`xen_available` says
whether the binding is there and, if not, why.
"""

from __future__ import annotations

import errno
import importlib
import os

from .._light import final
from ._errors import VchanError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

#: Present in every Xen domain whose kernel has the Xen drivers.
XEN_DEVICE_DIR: Final = "/dev/xen"
#: libxenvchan's largest ring (MAX_RING_SHIFT 20).
MAX_RING_SIZE: Final = 1 << 20
#: Domain ids at and above DOMID_FIRST_RESERVED are not domains.
_DOMID_FIRST_RESERVED: Final = 0x7FF0
_MAX_PORT: Final = (1 << 31) - 1
_EXTENSION: Final = "qrexec_trio.xen._xen_cffi"
_NOT_BUILT: Final = "the xen backend was not built (libxenvchan.h missing at install time)"


def _load() -> tuple[Any, Any, str]:
    try:
        module = importlib.import_module(_EXTENSION)
    except ModuleNotFoundError as exc:
        if exc.name != _EXTENSION:
            return None, None, f"the xen backend cannot be loaded: {exc}"
        return None, None, _NOT_BUILT
    except ImportError as exc:  # built, but e.g. libxenvchan.so.4.17 is gone
        return None, None, f"the xen backend cannot be loaded: {exc}"
    return module.ffi, module.lib, ""


_ffi, _lib, _unavailable = _load()


def xen_available() -> tuple[bool, str]:
    """Whether the libxenvchan binding is built and loads, and why (not).

    This says nothing about whether this machine runs on Xen: see
    :func:`running_on_xen`.
    """
    if _lib is None:
        return False, _unavailable
    return True, "the libxenvchan binding is built and loaded"


def running_on_xen() -> bool:
    """Whether this is a Xen domain (the Xen device directory exists)."""
    return os.path.isdir(XEN_DEVICE_DIR)


def _require_binding() -> None:
    if _lib is None:
        raise VchanError(_unavailable)


def _why(err: int) -> str:
    """``strerror`` plus the likely reason, for the errnos that have one."""
    text = os.strerror(err)
    if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO) and not running_on_xen():
        return f"{text} (is this a Xen domain? {XEN_DEVICE_DIR} is missing)"
    if err in (errno.EACCES, errno.EPERM):
        return f"{text} (the Xen devices and xenstore need root, or the right group)"
    if err == errno.ENOSPC:
        return f"{text} (xenstore's per-domain quota is exhausted: too many vchans at once)"
    return text


def _check_domain(what: str, domain: int) -> None:
    if not 0 <= domain < _DOMID_FIRST_RESERVED:
        raise VchanError(
            f"{what} {domain} is not a Xen domain id (0..{_DOMID_FIRST_RESERVED - 1})"
        )


def _check_port(port: int) -> None:
    if not 0 <= port <= _MAX_PORT:
        raise VchanError(f"vchan port {port} is out of range (0..{_MAX_PORT})")


def _check_ring(what: str, size: int) -> None:
    if not 0 < size <= MAX_RING_SIZE or size & (size - 1):
        raise VchanError(
            f"vchan {what} {size} is not a power of two between 1 and {MAX_RING_SIZE} "
            "(libxenvchan's largest ring is 1 MiB)"
        )


def offer_path(server_domain: int, client_domain: int, port: int) -> str:
    """The xenstore node of the offer of ``port`` by ``server_domain`` to ``client_domain``."""
    _require_binding()
    return _format_path(server_domain, client_domain, port, absolute=True)


def _format_path(server_domain: int, client_domain: int, port: int, *, absolute: bool) -> str:
    buf = _ffi.new("char[]", _lib.QT_PATH_MAX)
    err = _lib.qt_format_path(buf, _lib.QT_PATH_MAX, server_domain, client_domain, port,
                              int(absolute))
    if err:
        raise VchanError(f"vchan xenstore path does not fit: {os.strerror(err)}")
    return str(_ffi.string(buf).decode())


def xenstore_has(path: str) -> bool:
    """Whether the xenstore node ``path`` exists (diagnostics and tests)."""
    _require_binding()
    exists = _ffi.new("int *")
    err = _lib.qt_xs_exists(path.encode(), exists)
    if err:
        raise VchanError(f"cannot read xenstore node {path}: {_why(err)}")
    return bool(exists[0])


def own_domain_id() -> int:
    """This domain's id: xenstore's ``domid``, else ``$VCHAN_DOMAIN``."""
    _require_binding()
    out = _ffi.new("int *")
    err = _lib.qt_own_domid(out)
    if not err:
        return int(out[0])
    raw = os.environ.get("VCHAN_DOMAIN")
    if raw is None:
        raise VchanError(
            f"cannot tell this domain's id: reading 'domid' from xenstore failed "
            f"({_why(err)}) and $VCHAN_DOMAIN is not set"
        )
    try:
        domain = int(raw)
    except ValueError:
        raise VchanError(f"VCHAN_DOMAIN={raw!r} is not a domain id") from None
    _check_domain("VCHAN_DOMAIN", domain)
    return domain


@final
class XenDriver:
    """:class:`RingDriver` over one ``struct libxenvchan`` (non-blocking)."""

    def __init__(self, ctrl: Any) -> None:
        # ffi.gc: a driver dropped without close() still frees its channel.
        self._ctrl: Any = _ffi.gc(ctrl, _lib.libxenvchan_close)
        self._fd = int(_lib.libxenvchan_fd_for_select(self._ctrl))
        # The reader passes the same bytearray every time: wrap it once.
        self._read_target: bytearray | None = None
        self._read_cdata: Any = None

    def read_into(self, buffer: bytearray, size: int) -> int:
        if self._ctrl is None:
            return -1
        if buffer is not self._read_target:
            self._read_cdata = _ffi.from_buffer(buffer)
            self._read_target = buffer
        return int(_lib.libxenvchan_read(self._ctrl, self._read_cdata, min(size, len(buffer))))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._ctrl is None:
            return -1
        view = memoryview(data)
        return int(_lib.libxenvchan_write(self._ctrl, _ffi.from_buffer(view), view.nbytes))

    def data_ready(self) -> int:
        return 0 if self._ctrl is None else int(_lib.libxenvchan_data_ready(self._ctrl))

    def buffer_space(self) -> int:
        return 0 if self._ctrl is None else int(_lib.libxenvchan_buffer_space(self._ctrl))

    def wait(self) -> None:
        if self._ctrl is None:
            return
        err = _lib.qt_wait(self._ctrl)
        if err:
            # OSError, as the shm driver's: the trio wrapper makes it a broken stream.
            raise OSError(err, f"vchan event channel failed: {os.strerror(err)}")

    def fd_for_select(self) -> int:
        return self._fd

    def is_open(self) -> int:
        return 0 if self._ctrl is None else int(_lib.libxenvchan_is_open(self._ctrl))

    def withdraw_offer(self) -> int:
        """Server: remove the offer from xenstore (0 or an errno)."""
        return 0 if self._ctrl is None else int(_lib.qt_server_withdraw(self._ctrl))

    def close(self) -> None:
        ctrl, self._ctrl = self._ctrl, None
        self._read_target = self._read_cdata = None
        if ctrl is not None:
            _ffi.release(ctrl)  # runs libxenvchan_close now, exactly once


def check_server_request(peer_domain: int, port: int, read_min: int, write_min: int) -> None:
    """Refuse, before Xen is touched, what :func:`open_server` must never be given."""
    _check_domain("peer domain", peer_domain)
    _check_port(port)
    _check_ring("read_min", read_min)
    _check_ring("write_min", write_min)


def open_server(peer_domain: int, port: int, read_min: int, write_min: int) -> XenDriver:
    """Offer (peer_domain, port); the driver's ``is_open()`` is 2 until the client comes."""
    _require_binding()
    out = _ffi.new("struct libxenvchan **")
    err = _lib.qt_server_open(peer_domain, port, read_min, write_min, out)
    if err:
        raise VchanError(
            f"libxenvchan_server_init failed for vchan port {port} to domain {peer_domain}: "
            f"{_why(err)}"
        )
    return XenDriver(out[0])


def try_open_client(peer_domain: int, own_domain: int, port: int) -> XenDriver | None:
    """Connect to the offer, or None if it is not in xenstore (yet)."""
    _require_binding()
    out = _ffi.new("struct libxenvchan **")
    stage = _ffi.new("int *")
    err = _lib.qt_client_open(peer_domain, own_domain, port, out, stage)
    if not err:
        return XenDriver(out[0])
    if stage[0] == _lib.QT_STAGE_OFFER and err in (errno.ENOENT, errno.EACCES):
        # Not there, or not readable by us yet: the server has not offered it.
        return None
    if stage[0] == _lib.QT_STAGE_XENSTORE:
        raise VchanError(
            f"cannot open xenstore to connect vchan port {port} of domain {peer_domain}: "
            f"{_why(err)}"
        )
    if stage[0] == _lib.QT_STAGE_OFFER:
        raise VchanError(
            f"cannot read the offer {offer_path(peer_domain, own_domain, port)}: {_why(err)}"
        )
    raise VchanError(
        f"libxenvchan_client_init failed for vchan port {port} of domain {peer_domain}: "
        f"{_why(err)}"
    )
