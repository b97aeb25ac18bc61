"""The cmdline grammar (wire-protocol.md §10).

To a VM::

    USER:[nogui:]QUBESRPC SVC[+ARG] SOURCE
    USER:[nogui:]<legacy shell command>

To dom0 (built by the daemon for dom0 services; no user part)::

    [nogui:]QUBESRPC SVC[+ARG] SOURCE name|keyword TARGET

Command lines are bytes on the wire; we decode them with ``surrogateescape``
so that any byte a legacy shell command carries survives the round trip to
``execve`` unchanged.
"""

from __future__ import annotations

from .._light import frozen_record
from ._constants import MAX_SERVICE_BASENAME_LEN, MAX_SERVICE_NAME_LEN
from ._errors import RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

RPC_PREFIX: Final = "QUBESRPC"
NOGUI_PREFIX: Final = "nogui:"
DEFAULT_USER_PREFIX: Final = b"DEFAULT:"
_TARGET_TYPES: Final = ("name", "keyword")


@frozen_record
class RpcCall:
    """A ``QUBESRPC`` request for a named service."""

    #: ``SVC+ARG`` exactly as sent (what socket services receive).
    descriptor: str
    #: The part before the first ``+``.
    service_name: str
    #: The part after the first ``+``; ``None`` when there was no ``+``.
    argument: str | None
    #: The calling domain.
    source: str
    #: ``"name"`` or ``"keyword"`` for dom0 services, else ``None``.
    target_type: str | None = None
    target: str | None = None

    @property
    def lookup_names(self) -> tuple[str, str]:
        """The names to look up, most specific first: ``SVC+ARG``, then ``SVC``.

        A descriptor without ``+`` is looked up as ``SVC+`` (empty argument).
        """
        return (f"{self.service_name}+{self.argument or ''}", self.service_name)

    @property
    def text(self) -> str:
        """The part after ``QUBESRPC ``: the service descriptor line."""
        parts = [self.descriptor, self.source]
        if self.target_type is not None and self.target is not None:
            parts += [self.target_type, self.target]
        return " ".join(parts)


@frozen_record
class ShellCommand:
    """A legacy command line, run by the user's shell."""

    command: str


@frozen_record
class Cmdline:
    user: str | None
    nogui: bool
    command: RpcCall | ShellCommand


def parse_cmdline(cmdline: bytes, *, with_user: bool = True) -> Cmdline:
    """Parse a cmdline as the agent (``with_user``) or dom0 (without) sees it."""
    text = cmdline.decode("utf-8", "surrogateescape")
    user: str | None = None
    if with_user:
        user, colon, text = text.partition(":")
        if not colon:
            raise RemoteProtocolError("cmdline.user", "no 'user:' prefix")
        if not user:
            raise RemoteProtocolError("cmdline.user", "empty user name")
    nogui = text.startswith(NOGUI_PREFIX)
    if nogui:
        text = text[len(NOGUI_PREFIX) :]
    if not text.startswith(RPC_PREFIX):
        if not text:
            raise RemoteProtocolError("cmdline.command", "empty command")
        return Cmdline(user, nogui, ShellCommand(text))
    rest = text[len(RPC_PREFIX) :]
    if not rest.startswith(" "):
        # "QUBESRPCfoo" is neither an RPC call nor something we should run.
        raise RemoteProtocolError("cmdline.rpc", "QUBESRPC must be followed by a space")
    return Cmdline(user, nogui, _parse_rpc(rest[1:]))


def _parse_rpc(text: str) -> RpcCall:
    # Two tokens (SVC SOURCE) or four (dom0 services: + TYPE TARGET), with or
    # without a user part: qrexec-client -l takes the short form too.
    tokens = text.split(" ")
    if len(tokens) not in (2, 4):
        raise RemoteProtocolError(
            "cmdline.rpc", f"expected 'SVC[+ARG] SOURCE [TYPE TARGET]', got {len(tokens)} tokens"
        )
    descriptor, source = tokens[0], tokens[1]
    if not descriptor:
        raise RemoteProtocolError("cmdline.rpc.descriptor", "empty")
    if len(descriptor.encode("utf-8", "surrogateescape")) > MAX_SERVICE_NAME_LEN:
        raise RemoteProtocolError("cmdline.rpc.descriptor",
            f"longer than {MAX_SERVICE_NAME_LEN} bytes")
    name, plus, argument = descriptor.partition("+")
    if not name:
        raise RemoteProtocolError("cmdline.rpc.service", "empty service name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_SERVICE_BASENAME_LEN:
        raise RemoteProtocolError("cmdline.rpc.service",
            f"longer than {MAX_SERVICE_BASENAME_LEN} bytes")
    if not source:
        raise RemoteProtocolError("cmdline.rpc.source", "empty source domain")
    target_type = target = None
    if len(tokens) == 4:
        target_type, target = tokens[2], tokens[3]
        if target_type not in _TARGET_TYPES:
            raise RemoteProtocolError("cmdline.rpc.target_type", "must be 'name' or 'keyword'")
        if not target:
            raise RemoteProtocolError("cmdline.rpc.target", "empty")
    return RpcCall(
        descriptor=descriptor,
        service_name=name,
        argument=argument if plus else None,
        source=source,
        target_type=target_type,
        target=target,
    )


def substitute_default_user(cmdline: bytes, default_user: str) -> bytes:
    """Replace a leading ``DEFAULT:`` with the daemon's default user."""
    if cmdline.startswith(DEFAULT_USER_PREFIX):
        return default_user.encode() + b":" + cmdline[len(DEFAULT_USER_PREFIX) :]
    return cmdline


def build_rpc_cmdline(user: str, descriptor: str, source: str, *, nogui: bool = False) -> bytes:
    """``USER:[nogui:]QUBESRPC SVC+ARG SOURCE`` as bytes."""
    prefix = NOGUI_PREFIX if nogui else ""
    return f"{user}:{prefix}{RPC_PREFIX} {descriptor} {source}".encode("utf-8", "surrogateescape")
