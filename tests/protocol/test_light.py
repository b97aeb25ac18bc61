"""The light stand-ins for enum and dataclasses behave as the stdlib's, where we use them.

Type checkers check the protocol's enums and records as real ``enum`` and
``dataclasses`` classes (src/qrexec_trio/_light.py); at run time they are the light
classes. Each test here builds the same class both ways and compares what
the code base relies on.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import pickle
from typing import Any, ClassVar

import pytest

from qrexec_trio._light import (
    Enum,
    FrozenInstanceError,
    IntEnum,
    LightEnum,
    LightIntEnum,
    frozen_record,
    replace,
)
from qrexec_trio.protocol import (
    Data,
    Direction,
    ExitStatus,
    Hello,
    MsgType,
    RpcCall,
    ServiceConnect,
    Stream,
)

# -- enums --------------------------------------------------------------------------


class RealNumbers(enum.IntEnum):
    ONE = 1
    TWO = 2
    ALSO_TWO = 2
    ZERO = 0


class LightNumbers(IntEnum):  # what the protocol modules write
    ONE = 1
    TWO = 2
    ALSO_TWO = 2
    ZERO = 0


class RealLinks(enum.Enum):
    UP = "up (one way)"
    DOWN = "down (the other)"

    @property
    def is_up(self) -> bool:
        return self is RealLinks.UP


class LightLinks(Enum):
    UP = "up (one way)"
    DOWN = "down (the other)"

    @property
    def is_up(self) -> bool:
        return self is LightLinks.UP


def test_the_protocol_modules_get_the_light_classes() -> None:
    assert issubclass(LightNumbers, LightIntEnum) and issubclass(LightLinks, LightEnum)
    assert not isinstance(LightNumbers.ONE, enum.Enum)


def _same_text(real: str, light: str) -> None:
    assert light == real.replace("Real", "Light")


@pytest.mark.parametrize("name", ["ONE", "TWO", "ZERO"])
def test_int_members_read_and_print_as_intenum_members(name: str) -> None:
    real, light = RealNumbers[name], LightNumbers[name]
    assert (light.name, light.value, int(light)) == (real.name, real.value, int(real))
    _same_text(repr(real), repr(light))
    assert (str(light), f"{light}", f"{light:>4}") == (str(real), f"{real}", f"{real:>4}")
    assert light == real.value and hash(light) == hash(real.value)
    assert light + 1 == real + 1
    assert bool(light) == bool(real)
    assert isinstance(light, int) and isinstance(light, LightNumbers)


def test_int_enum_lookup_iteration_and_aliases_match() -> None:
    assert [m.name for m in LightNumbers] == [m.name for m in RealNumbers]
    assert len(LightNumbers) == len(RealNumbers)
    assert LightNumbers.ALSO_TWO is LightNumbers.TWO
    assert LightNumbers(2) is LightNumbers.TWO
    assert LightNumbers(LightNumbers.ONE) is LightNumbers.ONE
    assert LightNumbers["ALSO_TWO"] is LightNumbers.TWO
    for bad in (3, "1", None, [1]):
        with pytest.raises(ValueError, match="is not a valid"):
            LightNumbers(bad)
    with pytest.raises(KeyError):
        LightNumbers["THREE"]


def test_members_cannot_be_reassigned() -> None:
    with pytest.raises(AttributeError):
        LightNumbers.ONE = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        LightNumbers.ONE.name = "TWO"  # type: ignore[misc]
    assert LightNumbers.ONE.name == "ONE"


def test_value_enum_members_match_enum_members() -> None:
    for real, light in zip(RealLinks, LightLinks, strict=True):
        assert (light.name, light.value) == (real.name, real.value)
        _same_text(repr(real), repr(light))
        _same_text(str(real), str(light))
        _same_text(f"{real}", f"{light}")
        assert light.is_up == real.is_up
        assert LightLinks(real.value) is light
        assert light != real.value
    assert {LightLinks.UP: 1}[LightLinks.UP] == 1


@pytest.mark.parametrize("member", [MsgType.HELLO, ExitStatus.OK, Stream.STDERR,
                                    Direction.CLIENT_TO_DAEMON, LightNumbers.TWO])
def test_members_survive_copy_and_pickle(member: object) -> None:
    assert copy.copy(member) is member
    assert copy.deepcopy(member) is member
    assert pickle.loads(pickle.dumps(member)) is member


def test_the_protocol_enums_keep_their_members() -> None:
    assert MsgType(0x300) is MsgType.HELLO and MsgType.HELLO.name == "HELLO"
    assert Stream(MsgType.DATA_STDOUT) is Stream.STDOUT
    assert Stream.STDOUT == MsgType.DATA_STDOUT
    assert int(ExitStatus.CONNECTION_LOST) == 255
    assert [d.name for d in Direction][:2] == ["DAEMON_TO_AGENT", "AGENT_TO_DAEMON"]
    assert Direction.DAEMON_TO_AGENT.value == "daemon->agent (control vchan)"


# -- records ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RealPair:
    first: int
    second: bytes
    label: str | None = None
    KIND: ClassVar[str] = "pair"

    @property
    def both(self) -> tuple[int, bytes]:
        return self.first, self.second


@frozen_record
class LightPair:
    first: int
    second: bytes
    label: str | None = None
    KIND: ClassVar[str] = "pair"

    @property
    def both(self) -> tuple[int, bytes]:
        return self.first, self.second


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1, b"x"), {}),
    ((1, b"x", "l"), {}),
    ((1,), {"second": b"x"}),
    ((), {"second": b"x", "first": 1, "label": None}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_records_construct_print_and_compare_as_frozen_dataclasses(
        args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    real, light = RealPair(*args, **kwargs), LightPair(*args, **kwargs)
    _same_text(repr(real), repr(light))
    assert light.both == real.both and light.KIND == real.KIND == "pair"
    assert light == LightPair(*args, **kwargs)
    assert hash(light) == hash(LightPair(*args, **kwargs)) == hash(real)
    assert light != real
    assert light != LightPair(2, b"x")
    assert LightPair.__match_args__ == RealPair.__match_args__
    assert LightPair.__slots__ == RealPair.__slots__  # type: ignore[attr-defined]
    assert not hasattr(light, "__dict__")
    assert copy.copy(light) == light
    assert pickle.loads(pickle.dumps(light)) == light


@pytest.mark.parametrize(("args", "kwargs"), [
    ((), {}),
    ((1,), {}),
    ((1, b"x", "l", "extra"), {}),
    ((1, b"x"), {"first": 2}),
    ((1, b"x"), {"third": 3}),
])
def test_records_refuse_the_calls_dataclasses_refuse(
        args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        RealPair(*args, **kwargs)
    with pytest.raises(TypeError):
        LightPair(*args, **kwargs)


def test_records_are_frozen() -> None:
    light = LightPair(1, b"x")
    with pytest.raises(FrozenInstanceError):
        light.first = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del light.first
    with pytest.raises(AttributeError):
        light.other = 1  # type: ignore[attr-defined]
    assert light.first == 1


def test_records_match_positionally_and_by_keyword() -> None:
    match LightPair(1, b"x"):
        case LightPair(1, second, label=None):
            assert second == b"x"
        case _:
            pytest.fail("no match")
    match Data(Stream.STDOUT, b"out"):
        case Data(Stream.STDERR, _):
            pytest.fail("matched the wrong stream")
        case Data(Stream.STDOUT, data):
            assert data == b"out"
        case _:
            pytest.fail("no match")


def test_replace_copies_a_record_with_changes_as_dataclasses_replace() -> None:
    real, light = RealPair(1, b"x", "l"), LightPair(1, b"x", "l")
    _same_text(repr(dataclasses.replace(real, second=b"y")), repr(replace(light, second=b"y")))
    assert replace(light) == light and replace(light) is not light
    with pytest.raises(TypeError):
        replace(light, third=3)


def test_dataclasses_functions_work_on_records() -> None:
    # The daemon and the agent use dataclasses.replace on protocol events.
    real, light = RealPair(1, b"x"), LightPair(1, b"x")
    assert dataclasses.is_dataclass(light)
    assert ([(f.name, f.default) for f in dataclasses.fields(light)]
            == [(f.name, f.default) for f in dataclasses.fields(real)])
    assert dataclasses.asdict(light) == dataclasses.asdict(real)
    _same_text(repr(dataclasses.replace(real, label="l")),
               repr(dataclasses.replace(light, label="l")))
    with pytest.raises(TypeError):
        dataclasses.replace(light, third=3)
    event = ServiceConnect(1, 2, b"id")
    assert dataclasses.replace(event, connect_port=0) == ServiceConnect(1, 0, b"id")


def test_a_record_with_a_default_before_a_required_field_is_refused() -> None:
    class Bad:
        first: int = 1
        second: int

    with pytest.raises(TypeError, match="non-default field 'second'"):
        frozen_record(Bad)


def test_protocol_records_keep_their_constructors() -> None:
    assert Hello(4) == Hello(version=4) and Hello.msg_type is MsgType.HELLO
    assert ServiceConnect(1, 2, b"id") == ServiceConnect(1, 2, b"id", None)
    assert repr(Hello(4)) == "Hello(version=4)"
    call = RpcCall(descriptor="a+b", service_name="a", argument="b", source="dom0")
    assert (call.target_type, call.target) == (None, None)
    assert {Hello(4), Hello(4), Hello(3)} == {Hello(4), Hello(3)}
