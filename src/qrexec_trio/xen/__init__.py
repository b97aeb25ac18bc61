"""vchan backends behind one async stream interface.

Select with ``QREXEC_VCHAN=xen|shm|socket`` (:func:`get_backend`). The names
below are loaded on first use: the short-lived clients' blocking driver
imports light modules of this package (:mod:`._offer`) and must not pay for
trio, which every async backend needs.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._interface import Vchan as Vchan
    from ._interface import VchanBackend as VchanBackend
    from ._interface import VchanConnectTimeout as VchanConnectTimeout
    from ._interface import VchanError as VchanError
    from ._interface import VchanListener as VchanListener
    from ._interface import VchanWithdrawn as VchanWithdrawn
    from ._offer import socket_name as socket_name
    from ._registry import available_backends as available_backends
    from ._registry import get_backend as get_backend
    from ._socket import SocketBackend as SocketBackend

#: Each public name and the private module that defines it.
__getattr__ = lazy_attributes(__name__, {
    "Vchan": "_interface",
    "VchanBackend": "_interface",
    "VchanConnectTimeout": "_interface",
    "VchanError": "_interface",
    "VchanListener": "_interface",
    "VchanWithdrawn": "_interface",
    "socket_name": "_offer",
    "available_backends": "_registry",
    "get_backend": "_registry",
    "SocketBackend": "_socket",
})
