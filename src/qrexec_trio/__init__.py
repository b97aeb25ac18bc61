"""qrexec-trio: the qrexec inter-VM RPC framework, rebuilt on trio.

The layers, from the bottom up (imports point downwards only):

- :mod:`qrexec_trio.protocol`: sans-IO wire protocol (bytes in, messages out).
- :mod:`qrexec_trio.xen`: vchan backends behind one async stream interface.
- :mod:`qrexec_trio.nursery`: structured-concurrency building blocks
  (framed links, the data pump, child processes).
- :mod:`qrexec_trio.roles`: the programs (daemon, client, agent, ...).
"""

__version__ = "0.1.0.dev0"
