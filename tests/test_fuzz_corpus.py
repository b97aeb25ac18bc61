"""Keep the fuzz harnesses in fuzz/ working: run them over their seed corpora and
over a few hundred generated inputs, and check that each one can still catch a bug.

atheris is not needed here: the harnesses only import it when run as scripts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qrexec_trio.protocol
from protocol.strategies import mutated
from qrexec_trio.protocol import (
    Cmdline,
    Data,
    Direction,
    Event,
    ExitCode,
    LocalProtocolError,
    Stream,
    TriggerService,
    _bounds,
    _framing,
    _structs,
)

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
HARNESSES = {"cmdline": "fuzz_cmdline", "data_stream": "fuzz_data_stream",
             "control": "fuzz_control"}


def _load(module_name: str) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, FUZZ_DIR / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


HARNESS = {target: _load(name) for target, name in HARNESSES.items()}
Finding: type[Exception] = sys.modules["stream_support"].Finding
make_corpus = _load("make_corpus")


def seeds(target: str) -> Iterator[tuple[str, bytes]]:
    for path in sorted((FUZZ_DIR / "corpus" / target).iterdir()):
        yield path.name, path.read_bytes()


@pytest.mark.parametrize("target", HARNESSES)
def test_corpus_is_what_make_corpus_writes(target: str) -> None:
    assert dict(seeds(target)) == make_corpus.SEEDS[target]


@pytest.mark.parametrize("target", HARNESSES)
def test_every_seed_runs_and_reaches_its_depth(target: str) -> None:
    corpus = list(seeds(target))
    assert len(corpus) >= 5
    for name, data in corpus:
        HARNESS[target].test_one_input(data)
        reached = HARNESS[target].exercise(data)
        # Valid seeds must get past the parser; "bad-" seeds must be refused.
        if name.startswith("bad-"):
            assert reached == 0, name
        else:
            assert reached > 0, name


def _mutated(target: str) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes overwritten, inserted or cut: reaches past the framing."""
    return mutated(st.sampled_from([data for _, data in seeds(target)]))


@pytest.mark.parametrize("target", HARNESSES)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_inputs(target: str, data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=300), _mutated(target)))
    HARNESS[target].test_one_input(raw)


# -- each harness can still fail --------------------------------------------------------------


def test_cmdline_harness_catches_a_lossy_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    real_parse = qrexec_trio.protocol.parse_cmdline

    def parse_forgetting_nogui(raw: bytes, *, with_user: bool = True) -> Cmdline:
        return dataclasses.replace(real_parse(raw, with_user=with_user), nogui=False)

    monkeypatch.setattr(qrexec_trio.protocol, "parse_cmdline", parse_forgetting_nogui)
    with pytest.raises(Finding, match="reassemble"):
        HARNESS["cmdline"].test_one_input(make_corpus.SEEDS["cmdline"]["vm-rpc-nogui-no-argument"])


def test_data_stream_harness_catches_an_oversized_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # The harness now believes in a 100-byte limit that the reader does not enforce.
    monkeypatch.setattr(qrexec_trio.protocol, "max_data_chunk", lambda version: 100)
    with pytest.raises(Finding, match="chunk"):
        HARNESS["data_stream"].test_one_input(
            make_corpus.SEEDS["data_stream"]["service-v2-full-chunk"]
        )


def _decode_then(
    rewrite: Callable[[Event], Event],
) -> Callable[[Direction, int, bytes], Event]:
    """A decode_event that hands ``rewrite(event)`` to the reader instead of the event."""
    real_decode = _framing.decode_event

    def decode(direction: Direction, msg_type: int, payload: bytes) -> Event:
        return rewrite(real_decode(direction, msg_type, payload))

    return decode


def test_control_harness_catches_a_sanitising_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def rename(event: Event) -> Event:
        if isinstance(event, TriggerService):
            return dataclasses.replace(event, service_name=b"qubes.Other")
        return event

    monkeypatch.setattr(_framing, "decode_event", _decode_then(rename))
    with pytest.raises(Finding, match="re-encode"):
        HARNESS["control"].test_one_input(make_corpus.SEEDS["control"]["v4-trigger4-dom0"])


def test_control_harness_catches_a_decoder_that_ignores_the_padding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lax_padded_text(field: str, raw: bytes) -> bytes:
        nul = raw.find(b"\0")
        if nul < 0:
            raise qrexec_trio.protocol.RemoteProtocolError(field, "not NUL-terminated")
        return raw[:nul]  # the bytes after the NUL are never looked at

    # A v3 trigger whose target field hides "x" after its NUL.
    trigger = TriggerService(3, b"", b"dom0", b"SOCKET1", b"test.Echo").encode()
    hidden = trigger[:8 + 5] + b"x" + trigger[8 + 6:]
    data = bytes([make_corpus.CONTROL_V3 | make_corpus.HELLO_DONE]) + hidden
    HARNESS["control"].test_one_input(data)  # refused as it is: no finding
    monkeypatch.setattr(_structs, "_padded_text", lax_padded_text)
    with pytest.raises(Finding, match="re-encode"):
        HARNESS["control"].test_one_input(data)


def test_control_harness_catches_a_trigger_version_let_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader forgets that a v4 link has no MSG_TRIGGER_SERVICE (v2).
    monkeypatch.setitem(_bounds._TRIGGER_BOUNDS, qrexec_trio.protocol.MsgType.TRIGGER_SERVICE,
                        (range(0, 1 << 32), (128, 128)))
    with pytest.raises(Finding, match="v2 trigger got through at version 4"):
        HARNESS["control"].test_one_input(make_corpus.SEEDS["control"]["bad-trigger2-on-v4"])


def test_data_stream_harness_catches_a_status_channel_without_its_grammar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = (bytes([make_corpus.DATA_V3 | make_corpus.HELLO_DONE])
            + ExitCode(0).encode() + Data(Stream.STDERR, b"late").encode())
    HARNESS["data_stream"].test_one_input(data)  # refused as it is: no finding
    monkeypatch.setitem(_framing._FINAL_TYPES, Direction.AGENT_TO_CLIENT_VM, frozenset())
    with pytest.raises(Finding, match="after the final status message"):
        HARNESS["data_stream"].test_one_input(data)


def test_data_stream_harness_catches_an_altered_exit_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def off_by_one(event: Event) -> Event:
        return ExitCode(event.status + 1) if isinstance(event, ExitCode) else event

    monkeypatch.setattr(_framing, "decode_event", _decode_then(off_by_one))
    with pytest.raises(Finding, match="re-encode"):
        HARNESS["data_stream"].test_one_input(make_corpus.SEEDS["data_stream"]["service-not-found"])


@pytest.mark.parametrize("error", [IndexError("decoder bug"),
                                   LocalProtocolError("x", "raised while reading")])
def test_harness_treats_only_remote_protocol_error_as_refusal(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def crash(*_args: object, **_kwargs: object) -> object:
        raise error

    monkeypatch.setattr(_framing, "decode_event", crash)
    with pytest.raises(type(error)):
        HARNESS["control"].test_one_input(make_corpus.SEEDS["control"]["v3-trigger3"])
