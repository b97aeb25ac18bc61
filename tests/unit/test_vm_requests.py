"""The VM-local request protocol: FIFO records, CIDs, the claim table, the status channel,
and qrexec-client-vm's command line."""

from __future__ import annotations

import struct

import pytest

from qrexec_trio.protocol import (
    Data,
    Direction,
    Event,
    ExitCode,
    Hello,
    LocalProtocolError,
    MessageReader,
    MsgType,
    RemoteProtocolError,
    ServiceRefused,
    Stream,
    encode_frame,
)
from qrexec_trio.roles import client_vm
from qrexec_trio.roles._vm_local import (
    decode_fifo_record,
    encode_fifo_record,
    fdpass_path,
    fifo_path,
    format_cid,
    parse_cid,
)
from qrexec_trio.roles._vm_requests import ClaimRefused, ClaimTable

ME = (100, 1000, 1000)


def test_files_sit_beside_todays_socket() -> None:
    assert fdpass_path("/run/qubes/qrexec-agent") == "/run/qubes/qrexec-agent-fdpass"
    assert fifo_path("/run/qubes/qrexec-agent") == "/run/qubes/qrexec-agent-fifo"


def test_fifo_record_round_trips_with_nul_padded_fields() -> None:
    record = encode_fifo_record(b"test.Echo+arg", b"dom0", b"7 8 9")
    assert record == struct.pack("64s32s32s", b"test.Echo+arg", b"dom0", b"7 8 9")
    assert decode_fifo_record(record) == (b"test.Echo+arg", b"dom0", b"7 8 9")


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        (bytes(127), "must be 128 bytes"),
        (b"x" * 64 + bytes(64), "fifo.service: not NUL-terminated"),
        (b"svc\0junk".ljust(64, b"\0") + bytes(64), "fifo.service: bytes after"),
        (bytes(64) + b"t" * 32 + bytes(32), "fifo.target: not NUL-terminated"),
    ],
)
def test_malformed_fifo_records_are_rejected(record: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError, match=rule):
        decode_fifo_record(record)


def test_fifo_fields_that_do_not_fit_are_refused_before_sending() -> None:
    with pytest.raises(LocalProtocolError, match=r"fifo\.service"):
        encode_fifo_record(b"s" * 64, b"dom0", b"1 2 3")
    with pytest.raises(LocalProtocolError, match=r"fifo\.target"):
        encode_fifo_record(b"svc", b"t" * 32, b"1 2 3")
    with pytest.raises(LocalProtocolError, match=r"fifo\.cid"):
        encode_fifo_record(b"svc", b"dom0", b"1 2\0 3")


@pytest.mark.parametrize("text", [b"1 2", b"1 2 3 4", b"01 2 3", b"1  2 3", b"-1 2 3",
                                  b"1 2 3 ", b"a b c", b"1 1 2", b"12345678901 1 2",
                                  b"1234567890 1234567891 1234567892"])
def test_only_canonical_cids_of_three_distinct_numbers_parse(text: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        parse_cid(text)
    assert error.value.field == "cid"


def test_a_cid_parses_to_its_fd_numbers() -> None:
    assert parse_cid(b"0 17 4") == (0, 17, 4)
    assert parse_cid(format_cid((0, 17, 4))) == (0, 17, 4)


def test_the_longest_cid_is_a_request_id() -> None:
    # The agent refuses a request by its CID on the status channel (a SERVICE_REFUSED).
    cid = format_cid((999999999, 1000000000, 1000000001))
    assert len(cid) == 31
    assert parse_cid(cid) == (999999999, 1000000000, 1000000001)
    with pytest.raises(RemoteProtocolError, match="longer than 31"):
        parse_cid(format_cid((1000000002, 1000000000, 1000000001)))
    assert ServiceRefused(cid).encode() == encode_frame(MsgType.SERVICE_REFUSED,
                                                       cid.ljust(32, b"\0"))


def _table() -> ClaimTable[str]:
    table: ClaimTable[str] = ClaimTable(limit=4)
    for fd in (5, 6, 7):
        table.add(fd, f"sock{fd}", ME)
    return table


async def test_a_cid_claims_its_three_sockets_once() -> None:
    table = _table()
    event = table.add(8, "sock8", ME)
    assert event is not None
    assert table.claim(b"6 5 7") == ("sock6", "sock5", "sock7")
    assert len(table) == 1
    with pytest.raises(ClaimRefused, match="fd 6 is not an unclaimed"):
        table.claim(b"6 5 7")
    assert not table.discard(5, "sock5"), "a claimed socket belongs to its request"


@pytest.mark.parametrize(
    ("cid", "reason"),
    [(b"5 6 9", "fd 9"), (b"5 5 6", "malformed"), (b"x", "malformed")],
)
async def test_a_refused_cid_touches_no_socket(cid: bytes, reason: str) -> None:
    table = _table()
    with pytest.raises(ClaimRefused, match=reason):
        table.claim(cid)
    assert len(table) == 3
    assert table.claim(b"5 6 7") == ("sock5", "sock6", "sock7")


async def test_sockets_of_different_processes_never_form_one_cid() -> None:
    table = _table()
    table.add(9, "other", (200, 1000, 1000))
    with pytest.raises(ClaimRefused, match="different processes"):
        table.claim(b"5 6 9")
    assert len(table) == 4


async def test_the_table_is_bounded_and_expiry_frees_a_slot() -> None:
    table = _table()
    assert table.add(8, "sock8", ME) is not None
    assert table.add(9, "sock9", ME) is None
    assert table.discard(8, "sock8")
    assert not table.discard(8, "sock8")
    assert not table.discard(5, "not the socket at fd 5")
    assert table.add(9, "sock9", ME) is not None


# -- the status channel (agent -> qrexec-client-vm) ---------------------------------------
# Its grammar lives in MessageReader(Direction.AGENT_TO_CLIENT_VM); the full
# set of rules is in tests/protocol/test_framing.py. Here, what the two
# programs send each other.


def _read(data: bytes) -> list[Event]:
    reader = MessageReader(Direction.AGENT_TO_CLIENT_VM)
    got = []
    # Byte by byte: the reader must reassemble frames from any split.
    for byte in data:
        reader.feed(bytes([byte]))
        while (event := reader.next_event()) is not None:
            got.append(event)
    reader.feed_eof()
    assert reader.next_event() is None
    assert reader.at_clean_eof, "the channel ended inside a message"
    return got


def test_status_channel_carries_stderr_then_one_outcome() -> None:
    data = Data(Stream.STDERR, b"oops\n").encode() + ExitCode(-1).encode()
    assert data == (encode_frame(MsgType.DATA_STDERR, b"oops\n")
                    + encode_frame(MsgType.DATA_EXIT_CODE, struct.pack("<i", -1)))
    assert _read(data) == [Data(Stream.STDERR, b"oops\n"), ExitCode(-1)]
    refusal = ServiceRefused(b"1 2 3").encode()
    assert refusal == encode_frame(MsgType.SERVICE_REFUSED, b"1 2 3".ljust(32, b"\0"))
    assert _read(refusal) == [ServiceRefused(b"1 2 3")]


def test_status_channel_may_end_without_an_outcome() -> None:
    # The request was never answered: the client reports that, not a protocol error.
    assert _read(Data(Stream.STDERR, b"partial").encode()) == [Data(Stream.STDERR, b"partial")]
    assert _read(b"") == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(ExitCode(0).encode() + Data(Stream.STDERR, b"late").encode(), "header",
                     id="stderr-after-exit"),
        pytest.param(ServiceRefused(b"1 2 3").encode() + ExitCode(0).encode(), "header",
                     id="exit-after-refusal"),
        pytest.param(ExitCode(0).encode() * 2, "header", id="two-exits"),
        pytest.param(encode_frame(MsgType.DATA_STDOUT, b"x"), "header.type", id="stdout"),
        pytest.param(Hello(4).encode(), "header.type", id="hello"),
        pytest.param(Data(Stream.STDERR, b"").encode(), "header.len", id="empty-stderr"),
        pytest.param(encode_frame(MsgType.DATA_EXIT_CODE, b"\0\0\0\0\0"), "header.len",
                     id="long-exit-code"),
        pytest.param(encode_frame(MsgType.DATA_EXIT_CODE, b"\0\0"), "header.len",
                     id="short-exit-code"),
        pytest.param(encode_frame(MsgType.SERVICE_REFUSED, b"1 2 3"), "header.len",
                     id="unpadded-refusal"),
        pytest.param(encode_frame(MsgType.SERVICE_REFUSED, b"1/2".ljust(32, b"\0")),
                     "request_id", id="refusal-with-a-bad-cid"),
        pytest.param(ExitCode(0).encode()[:-1], "payload", id="cut-short"),
    ],
)
def test_status_channel_rejects_anything_else(data: bytes, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        _read(data)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("argv", "target", "service", "prog"),
    [
        (["-t", "vm", "svc", "prog", "-t", "--x"], "vm", "svc", ["prog", "-t", "--x"]),
        (["-a", "/s", "vm", "-t", "svc"], "vm", "-t", ["svc"]),
        (["--prefix-data", "-x", "vm", "svc"], "vm", "svc", []),
        # Usage errors: no operands; -p twice (the reference refuses it too).
        (["-t"], None, None, None),
        (["--prefix-data", "-x", "-p", "-y", "vm", "svc"], None, None, None),
        (["--", "vm", "svc", "-p"], "vm", "svc", ["-p"]),
    ],
)
def test_options_stop_at_the_first_operand(
    argv: list[str], target: str | None, service: str | None, prog: list[str] | None
) -> None:
    parser = client_vm.build_parser()
    if target is None:
        with pytest.raises(SystemExit):  # a usage error
            parser.parse_args(client_vm._options_end(parser, argv))
        return
    args = parser.parse_args(client_vm._options_end(parser, argv))
    assert (args.target, args.service, args.prog) == (target, service, prog)
    assert args.prefix_data == ("-x" if "--prefix-data" in argv else None)


@pytest.mark.parametrize(("raw", "target"), [("", b"@default"), ("$dispvm:dvm", b"@dispvm:dvm"),
                                             ("work", b"work")])
def test_target_spelling(raw: str, target: bytes) -> None:
    assert client_vm._target(raw) == target
