"""The blocking driver of the short-lived clients (h11's shape: sans-IO protocol,
thin I/O driver).

``qrexec-client-vm`` and ``qrexec-client`` run one call and exit, so their
start-up is most of a trivial call's cost. This driver runs a call with
``select.poll`` over plain fds and the C socket module, on the same sans-IO
layer as the trio programs (:mod:`qrexec_trio.protocol`: the message reader,
the events, the caller's rules in :class:`~qrexec_trio.protocol.CallerSession`),
so it loads neither trio nor structlog nor ``socket``; what it cannot drive
(see each client's ``fast_path_problem``) goes to the trio implementation.
"""

from .._lazy import lazy_attributes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._client import fast_path_problem as client_problem
    from ._client import run as run_client_call
    from ._client_vm import fast_path_problem as client_vm_problem
    from ._client_vm import run as run_client_vm_call
    from ._signals import Stopped as Stopped
    from ._signals import stop_on_signals as stop_on_signals

__all__ = ["Stopped", "client_problem", "client_vm_problem", "run_client_call",
           "run_client_vm_call", "stop_on_signals"]

# Loaded on first use: each client loads only its own driver.
__getattr__ = lazy_attributes(__name__, {
    "client_problem": "_client:fast_path_problem", "run_client_call": "_client:run",
    "client_vm_problem": "_client_vm:fast_path_problem", "run_client_vm_call": "_client_vm:run",
    "Stopped": "_signals", "stop_on_signals": "_signals",
})
