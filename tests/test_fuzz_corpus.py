"""Keep the fuzz harnesses in fuzz/ working: run them over their seed corpora and
over a few hundred generated inputs, and check that each one can still catch a bug.

atheris is not needed here: the harnesses only import it when run as scripts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qrexec_trio.protocol
from qrexec_trio.protocol import Cmdline, TriggerRequest

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
    corpus = [data for _, data in seeds(target)]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(corpus)))
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.integers(0, len(data)))
            action = draw(st.sampled_from(["set", "insert", "cut"]))
            byte = draw(st.sampled_from([0, 1, 0x2B, 0x2F, 0x20, 0x3A, 0x80, 0xFF]))
            if action == "set" and where < len(data):
                data[where] = byte
            elif action == "insert":
                data.insert(where, byte)
            else:
                del data[where : where + draw(st.integers(1, 9))]
        return bytes(data)

    return mutate()


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


def test_control_harness_catches_a_sanitising_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = qrexec_trio.protocol.decode_trigger

    def decode_and_rewrite(msg_type: int, payload: bytes) -> TriggerRequest:
        return dataclasses.replace(real_decode(msg_type, payload), service_name=b"qubes.Other")

    monkeypatch.setattr(qrexec_trio.protocol, "decode_trigger", decode_and_rewrite)
    with pytest.raises(Finding, match="re-encode"):
        HARNESS["control"].test_one_input(make_corpus.SEEDS["control"]["v4-trigger4-dom0"])


def test_harness_treats_only_protocol_error_as_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: object, **_kwargs: object) -> object:
        raise IndexError("decoder bug")

    monkeypatch.setattr(qrexec_trio.protocol, "decode_trigger", crash)
    with pytest.raises(IndexError):
        HARNESS["control"].test_one_input(make_corpus.SEEDS["control"]["v3-trigger3"])
