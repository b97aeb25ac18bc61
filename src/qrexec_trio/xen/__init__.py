"""vchan backends behind one async stream interface.

Select with ``QREXEC_VCHAN=xen|shm|socket``. Only the ``socket`` backend
exists so far; the cffi backends (``xen``, ``shm``) register here when they
land. The default is the local backend.
"""

from ._interface import Vchan as Vchan
from ._interface import VchanBackend as VchanBackend
from ._interface import VchanConnectTimeout as VchanConnectTimeout
from ._interface import VchanError as VchanError
from ._interface import VchanListener as VchanListener
from ._interface import VchanWithdrawn as VchanWithdrawn
from ._local import socket_name as socket_name
from ._registry import available_backends as available_backends
from ._registry import get_backend as get_backend
from ._socket import SocketBackend as SocketBackend
