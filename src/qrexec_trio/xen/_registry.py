"""Choosing a vchan backend by name (``QREXEC_VCHAN``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from ._interface import VchanBackend, VchanError
from ._socket import SocketBackend

#: Backends by name. The cffi backends add themselves here when built.
_FACTORIES: Final[dict[str, Callable[[float], VchanBackend]]] = {
    "socket": lambda send_finish: SocketBackend(send_finish=send_finish),
}
#: Used when QREXEC_VCHAN is unset and there is no Xen.
LOCAL_DEFAULT: Final = "socket"


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def get_backend(name: str | None = None, *, send_finish: float = 2.0) -> VchanBackend:
    """The backend named ``name``, else ``$QREXEC_VCHAN``, else the default."""
    chosen = name or os.environ.get("QREXEC_VCHAN") or LOCAL_DEFAULT
    factory = _FACTORIES.get(chosen)
    if factory is None:
        raise VchanError(
            f"vchan backend {chosen!r} is not available here "
            f"(available: {', '.join(available_backends())})"
        )
    return factory(send_finish)
