"""The clients' blocking driver, one layer: CallerLoop between local pipes and a vchan
played by a thread over a unix socket pair (the socket backend's wire)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from _socket import socket as raw_socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from qrexec_trio.blocking._io import CallerLoop, exchange_hello
from qrexec_trio.blocking._vchan import BlockingVchan
from qrexec_trio.protocol import (
    CallerSession,
    Data,
    Direction,
    ExitCode,
    Hello,
    MessageReader,
    Stream,
)

TIMEOUT = 30


class Service:
    """The service side of the data vchan, in a thread: reads STDIN, answers per ``play``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader(Direction.CALLER_TO_SERVICE)
        self.stdin = bytearray()
        self.stdin_ended = threading.Event()

    def handshake(self) -> None:
        self.sock.sendall(Hello(3).encode())
        assert isinstance(self.next(), Hello)
        self.reader.version = 3

    def next(self) -> object:
        while (event := self.reader.next_event()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.reader.feed(data)
        return event

    def read_stdin(self) -> None:
        while (event := self.next()) is not None:
            assert isinstance(event, Data) and event.stream == Stream.STDIN
            if not event.data:
                self.stdin_ended.set()
                return
            self.stdin += event.data

    def send(self, *events: Data | ExitCode) -> None:
        self.sock.sendall(b"".join(event.encode() for event in events))


@contextmanager
def call(play: Callable[[Service], None], *, stdin: bytes | None,
         keep_stdin_open: bool = False) -> Iterator[dict[str, object]]:
    ours, theirs = socket.socketpair()
    service = Service(theirs)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result: dict[str, object] = {"closed": 0}
    collected: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            collected[fd] += data

    def feed() -> None:
        # The call may end without reading all of it: then the pipe breaks (below).
        with suppress(BrokenPipeError):
            if stdin:
                os.write(in_w, stdin)
        if not keep_stdin_open:
            os.close(in_w)

    def serve() -> None:
        service.handshake()
        play(service)

    threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in (
        (drain, (out_r,)), (drain, (err_r,)), (feed, ()), (serve, ()))]
    for thread in threads:
        thread.start()
    vchan = BlockingVchan(raw_socket(fileno=ours.detach()), 1, 513)

    def close_output() -> None:
        result["closed"] = int(result["closed"]) + 1  # type: ignore[call-overload]
        os.close(out_w)

    try:
        reader = exchange_hello(vchan, timeout=TIMEOUT)
        session = CallerSession(reader.version or 2)
        loop = CallerLoop(vchan, reader, session, input_fd=in_r, output_fd=out_w,
                          errors_fd=err_w, close_output=close_output)
        result["status"] = loop.run()
        loop.finish_input(1)
        vchan.close()
        if not result["closed"]:
            os.close(out_w)
        os.close(err_w)
        os.close(in_r)
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        result["stdout"] = bytes(collected[out_r])
        result["stderr"] = bytes(collected[err_r])
        result["stdin"] = bytes(service.stdin)
        yield result
    finally:
        theirs.close()
        for fd in (out_r, err_r) + ((in_w,) if keep_stdin_open else ()):
            os.close(fd)


def _echo(service: Service) -> None:
    service.read_stdin()
    data = bytes(service.stdin)
    service.send(*(Data(Stream.STDOUT, data[start:start + 65536])
                   for start in range(0, len(data), 65536)))
    service.send(Data(Stream.STDERR, b"note"), Data(Stream.STDOUT, b""),
                 Data(Stream.STDERR, b""), ExitCode(5))


def test_a_call_copies_both_ways_and_returns_the_remote_status() -> None:
    with call(_echo, stdin=b"hello") as result:
        assert result["status"] == 5
        assert (result["stdout"], result["stderr"], result["closed"]) == (b"hello", b"note", 1)


def test_megabytes_both_ways_arrive_whole_through_backpressure() -> None:
    payload = os.urandom(4 << 20)
    with call(_echo, stdin=payload) as result:
        assert hashlib.sha256(result["stdout"]).digest() == hashlib.sha256(payload).digest()


def test_the_exit_status_ends_the_call_while_our_input_is_still_open() -> None:
    def answer_at_once(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b""), ExitCode(0))
        service.read_stdin()  # our input's end comes after the status, best effort

    with call(answer_at_once, stdin=b"partial", keep_stdin_open=True) as result:
        assert result["status"] == 0


def test_a_vchan_that_ends_before_the_status_gives_none() -> None:
    def vanish(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b"half"))
        service.sock.close()

    with call(vanish, stdin=b"") as result:
        assert (result["status"], result["stdout"]) == (None, b"half")


def test_a_service_side_that_never_reads_our_input_still_reports_its_status() -> None:
    def refuse_input(service: Service) -> None:
        service.send(Data(Stream.STDOUT, b""), Data(Stream.STDERR, b"no such service"),
                     ExitCode(127))
        service.sock.shutdown(socket.SHUT_RDWR)

    with call(refuse_input, stdin=os.urandom(1 << 20)) as result:
        assert (result["status"], result["stderr"]) == (127, b"no such service")
