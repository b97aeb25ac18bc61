"""Hypothesis strategies for valid protocol values and events, shared by the protocol tests.

The alphabets, sizes and the table of which event travels on which link are
written out here from the wire specification rather than taken from the
implementation, so that a wrong character set or a wrong table in the code
shows up as a failing test instead of being mirrored by the test.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import settings
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    ConnectionTerminated,
    Data,
    Direction,
    Event,
    ExecCmdline,
    ExitCode,
    Hello,
    JustExec,
    MsgType,
    PortAssigned,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerService,
)

#: For every property test here: the suite asserts nothing about time, and a
#: loaded CI machine must not turn a slow example into a failure.
relaxed = settings(deadline=None)

U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
I32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)

IDENT_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_.- "
DOMAIN_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-@:"
SERVICE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+"


def bytes_from(alphabet: bytes, *, min_size: int = 0, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


idents = bytes_from(IDENT_ALPHABET, max_size=31)


def domain_names(max_size: int = 63) -> st.SearchStrategy[bytes]:
    return bytes_from(DOMAIN_ALPHABET, max_size=max_size)


def service_names(max_size: int = 200) -> st.SearchStrategy[bytes]:
    # A service name may contain "+" (the argument separator) but not start with it.
    return st.tuples(
        bytes_from(SERVICE_ALPHABET.replace(b"+", b""), min_size=1, max_size=1),
        bytes_from(SERVICE_ALPHABET, max_size=max_size - 1),
    ).map(b"".join)


# Command lines: bytes without NUL, as EXEC_CMDLINE carries them.
cmdline_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"x"))

# -- events ---------------------------------------------------------------------------

hellos = st.builds(Hello, U32)
exec_cmdlines = st.builds(ExecCmdline, U32, U32, cmdline_bytes)
just_execs = st.builds(JustExec, U32, U32, cmdline_bytes)
port_replies = st.builds(
    PortAssigned,
    st.sampled_from([MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC, MsgType.SERVICE_CONNECT]),
    U32,
    U32,
)
service_connects = st.builds(ServiceConnect, U32, U32, idents)
refusals = st.builds(ServiceRefused, idents)
terminations = st.builds(ConnectionTerminated, U32, U32)
exit_codes = st.builds(ExitCode, I32)


def data(stream: Stream, *, min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[Data]:
    return st.builds(Data, st.just(stream), st.binary(min_size=min_size, max_size=max_size))


@st.composite
def triggers(draw: st.DrawFn, version: int | None = None) -> TriggerService:
    """A trigger as a VM's agent sends it to the daemon (any version)."""
    if version is None:
        version = draw(st.sampled_from([2, 3, 4]))
    return TriggerService(
        version=version,
        source=draw(domain_names()) if version == 4 else b"",
        target=draw(domain_names(31 if version == 2 else 63)),
        request_id=draw(idents),
        service_name=draw(service_names(63 if version == 2 else 300)),
    )


# What qrexec-client-vm sends the agent: always v4, and the request-id field is
# not the client's to choose (the agent assigns its own), so it decodes as b"".
client_vm_triggers = triggers(4).map(
    lambda t: TriggerService(4, t.source, t.target, b"", t.service_name)
)

#: The link -> the trigger versions allowed there, by negotiated control version.
TRIGGER_VERSIONS_AT = {2: (2,), 3: (3,), 4: (3, 4)}


def events_on(direction: Direction, version: int = 4) -> st.SearchStrategy[Event]:
    """Any event other than HELLO that may be sent on ``direction`` at ``version``.

    The status channel's grammar (non-empty stderr, one final message) is left
    to :func:`status_streams`; here its events are only individually valid.
    """
    return {
        Direction.DAEMON_TO_AGENT: st.one_of(exec_cmdlines, just_execs, service_connects,
                                             refusals),
        Direction.AGENT_TO_DAEMON: st.one_of(
            terminations, *(triggers(v) for v in TRIGGER_VERSIONS_AT[version])
        ),
        Direction.CLIENT_TO_DAEMON: st.one_of(exec_cmdlines, just_execs, service_connects),
        Direction.DAEMON_TO_CLIENT: port_replies,
        Direction.CALLER_TO_SERVICE: data(Stream.STDIN),
        Direction.SERVICE_TO_CALLER: st.one_of(data(Stream.STDOUT), data(Stream.STDERR),
                                               exit_codes),
        Direction.CLIENT_VM_TO_AGENT: client_vm_triggers,
        Direction.AGENT_TO_CLIENT_VM: st.one_of(data(Stream.STDERR, min_size=1), exit_codes,
                                                refusals),
    }[direction]


def decodable_events(direction: Direction) -> st.SearchStrategy[Event]:
    """Every event :func:`decode_event` gives back unchanged on ``direction``.

    This includes HELLO on the links that have one, and every trigger version
    on agent->daemon (which one is allowed is the reader's business, not the
    decoder's).
    """
    choices = [events_on(direction, 4)]
    if direction is Direction.AGENT_TO_DAEMON:
        choices.append(triggers(2))
    if direction.has_hello:
        choices.append(hellos)
    return st.one_of(*choices)


@st.composite
def status_streams(draw: st.DrawFn) -> list[Event]:
    """A valid status channel: non-empty stderr chunks, then at most one final message."""
    stream: list[Event] = draw(st.lists(data(Stream.STDERR, min_size=1), max_size=4))
    final = draw(st.none() | exit_codes | refusals)
    return stream if final is None else [*stream, final]


@st.composite
def event_streams(draw: st.DrawFn, direction: Direction) -> tuple[int, list[Event]]:
    """(negotiated version, events) of a valid stream on ``direction``.

    On links with a HELLO the stream starts with the peer's HELLO; the reader's
    driver (the tests' ``drive``) negotiates against our version 4, which
    gives the peer's version back.
    """
    if direction is Direction.AGENT_TO_CLIENT_VM:
        return 4, draw(status_streams())
    version = draw(st.sampled_from([2, 3, 4]))
    body = draw(st.lists(events_on(direction, version), max_size=5))
    return version, [Hello(version), *body] if direction.has_hello else body


def canonical_payload(direction: Direction, msg_type: int, payload: bytes) -> bytes:
    """What an accepted payload must re-encode to: itself, but for two documented rules."""
    if msg_type == MsgType.DATA_EXIT_CODE:
        # The reference reads four bytes and takes a shorter payload for 255.
        return payload[:4] if len(payload) >= 4 else struct.pack("<i", 255)
    if direction is Direction.CLIENT_VM_TO_AGENT:
        # The agent assigns the id: the client's request-id field is not kept.
        return payload[:128] + bytes(32) + payload[160:]
    return payload


def split_points(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into consecutive pieces at random places (some possibly empty)."""
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: _cut(data, sorted(cuts))
    )


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


#: Bytes that make good mutations: NULs, small numbers, separators, high bytes.
MUTATION_BYTES = b"\0\x01\x02\x03\x10a+/:@ \x80\xff"


def mutated(seeds: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A drawn seed with one to four bytes overwritten, inserted or cut."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(seeds))
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.integers(0, len(data)))
            byte = draw(st.sampled_from(MUTATION_BYTES))
            action = draw(st.sampled_from(["set", "insert", "cut"]))
            if action == "set" and where < len(data):
                data[where] = byte
            elif action == "insert":
                data.insert(where, byte)
            else:
                del data[where : where + draw(st.integers(1, 9))]
        return bytes(data)

    return mutate()
