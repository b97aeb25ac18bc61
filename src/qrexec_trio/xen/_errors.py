"""The errors of vchan set-up, importable without trio (the blocking driver raises them)."""

from __future__ import annotations

from .._errors import QrexecError


class VchanError(QrexecError):
    """A vchan could not be set up (bad name, port in use, backend missing)."""


class VchanConnectTimeout(VchanError, TimeoutError):
    """The other side did not show up in time."""


class VchanWithdrawn(VchanError):
    """The server withdrew its offer, or died, before the client connected.

    Raised at once, not at the end of the connect timeout: the vchan will not
    be served. The local backends tell it; libxenvchan cannot.
    """
