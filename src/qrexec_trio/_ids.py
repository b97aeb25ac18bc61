"""Call ids: one name for a call in every program's logs and control sockets.

Light (no imports): the short-lived clients bind it into their log context.
"""

from __future__ import annotations


def call_id(domain: int | str, key: int | bytes | str) -> str:
    """The id of a call as every program it touches can name it: ``DOMID.KEY``.

    ``DOMID`` is the VM at the end of the data vchan, ``KEY`` the data port
    its daemon gave the call (dom0 -> VM), or the request id of the VM's
    trigger (VM -> anything): values that the daemon, the agent and the
    client each learn from the protocol, so no id needs to travel. Spaces (an
    R2 connection id is ``"N0 N1 N2"``) become ``-``.
    """
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
    return f"{domain}.{text.replace(' ', '-')}"
