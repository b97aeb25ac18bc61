"""Choosing a vchan backend by name (``QREXEC_VCHAN``).

``xen`` is Xen's libxenvchan (built at install time where its header exists);
``shm`` is our own ring in shared memory with eventfds for event channels;
``socket`` is a plain unix socket. Without ``QREXEC_VCHAN``, ``xen`` is used
where ``/dev/xen`` exists, else the local default. The cffi backends are
imported only when chosen, so a machine without them still runs the others.
"""

from __future__ import annotations

import os

from .._config import Timeouts
from ._errors import VchanError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

    from ._interface import VchanBackend


def _socket(send_finish: float) -> VchanBackend:
    from ._socket import SocketBackend  # noqa: PLC0415 (trio: the blocking driver must not)

    return SocketBackend(send_finish=send_finish)


def _shm(send_finish: float) -> VchanBackend:
    try:
        from ._shm import ShmBackend  # noqa: PLC0415 (a compiled extension: load on demand)
    except ImportError as exc:
        raise VchanError(f"the shm vchan backend is not built ({exc})") from exc
    return ShmBackend(send_finish=send_finish)


def _xen(send_finish: float) -> VchanBackend:
    from ._xen import XenBackend, xen_available  # noqa: PLC0415 (as above)

    available, reason = xen_available()
    if not available:
        raise VchanError(f"the xen vchan backend is not available: {reason}")
    return XenBackend(send_finish=send_finish)


_FACTORIES: Final[dict[str, Callable[[float], VchanBackend]]] = {
    "socket": _socket,
    "shm": _shm,
    "xen": _xen,
}
#: Used when QREXEC_VCHAN is unset and there is no Xen: the faster local
#: backend, as bench/bench_vchan.py measures it (see README).
LOCAL_DEFAULT: Final = "socket"


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def default_backend_name() -> str:
    return "xen" if os.path.exists("/dev/xen") else LOCAL_DEFAULT


def chosen_backend_name(name: str | None = None) -> str:
    """``name``, else ``$QREXEC_VCHAN``, else the default (the blocking driver asks this
    too, without building a backend)."""
    return name or os.environ.get("QREXEC_VCHAN") or default_backend_name()


def get_backend(name: str | None = None, *, send_finish: float | None = None) -> VchanBackend:
    """The backend named ``name``, else ``$QREXEC_VCHAN``, else the default.

    ``send_finish`` bounds how long a cancelled send may finish its frame
    (default: ``Timeouts.send_finish``).
    """
    if send_finish is None:
        send_finish = Timeouts().send_finish
    chosen = chosen_backend_name(name)
    factory = _FACTORIES.get(chosen)
    if factory is None:
        raise VchanError(
            f"vchan backend {chosen!r} does not exist "
            f"(backends: {', '.join(available_backends())})"
        )
    return factory(send_finish)
