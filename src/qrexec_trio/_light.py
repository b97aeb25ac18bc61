"""Light stand-ins for ``enum``, ``dataclasses`` and ``typing.final``.

The short-lived clients import the protocol layer on every call, and those
stdlib modules (with what they pull in: ``inspect``, ``ast``, ``re``,
``functools``, ``types``...) cost more start-up time than the rest of a call.

Type checkers see the real thing: under ``TYPE_CHECKING`` the names exported
here are the stdlib's (``IntEnum``, ``Enum``, ``typing.final``, and
:func:`frozen_record` is a ``dataclass_transform`` for a frozen dataclass), so
mypy checks every use against real enums and dataclasses (:func:`replace`
is ``dataclasses.replace`` for the records). At run time they
are the small classes below, which implement the part of that behaviour the
code base uses; tests/protocol/test_light.py holds them to it.
"""

from __future__ import annotations

__all__ = ["Enum", "FrozenInstanceError", "IntEnum", "LightEnum", "LightIntEnum", "final",
           "frozen_record", "replace"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, TypeVar

    _C = TypeVar("_C", bound=type)
    _R = TypeVar("_R")


# -- enums ------------------------------------------------------------------------------


def _is_member(name: str, value: object) -> bool:
    # Like enum: every public class attribute that is not a descriptor
    # (function, property, classmethod) is a member.
    return not name.startswith("_") and not hasattr(value, "__get__")


class _ConstantsMeta(type):
    """Turns a class's public attributes into its members, in definition order."""

    _members_: list[Any]
    _by_value_: dict[Any, Any]
    _by_name_: dict[str, Any]

    def __new__(mcls, name: str, bases: tuple[type, ...],
                namespace: dict[str, Any]) -> _ConstantsMeta:
        values = {key: value for key, value in namespace.items() if _is_member(key, value)}
        for key in values:
            del namespace[key]
        cls: Any = super().__new__(mcls, name, bases, namespace)
        members: list[Any] = []
        by_value: dict[Any, Any] = {}
        for key, value in values.items():
            member = cls._new_member_(value)
            member._name_ = key
            member._value_ = member._plain_value_(value)
            # A second name for a value is an alias, as in enum.
            member = by_value.setdefault(member._value_, member)
            if member._name_ == key:
                members.append(member)
            type.__setattr__(cls, key, member)
        type.__setattr__(cls, "_members_", members)
        type.__setattr__(cls, "_by_value_", by_value)
        type.__setattr__(cls, "_by_name_", {key: getattr(cls, key) for key in values})
        created: _ConstantsMeta = cls
        return created

    def __call__(cls, value: object) -> Any:
        """The member with this value (like ``MsgType(0x300)``); ``ValueError`` if none."""
        try:
            return cls._by_value_[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__qualname__}") from None

    def __getitem__(cls, name: str) -> Any:
        return cls._by_name_[name]

    def __iter__(cls) -> Iterator[Any]:
        return iter(cls._members_)

    def __len__(cls) -> int:
        return len(cls._members_)

    def __setattr__(cls, name: str, value: object) -> None:
        if name in cls.__dict__.get("_by_name_", ()):
            raise AttributeError(f"cannot reassign member {name!r}")
        super().__setattr__(name, value)


class LightIntEnum(int, metaclass=_ConstantsMeta):
    """Members are ints with a ``name`` (what ``enum.IntEnum`` is used for here)."""

    _name_: str
    _value_: int

    @classmethod
    def _new_member_(cls, value: int) -> LightIntEnum:
        return int.__new__(cls, value)

    @staticmethod
    def _plain_value_(value: int) -> int:
        return int(value)

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self) -> int:
        return self._value_

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__}.{self._name_}: {self._value_}>"

    # As IntEnum's since Python 3.11: str() and format() give the number.
    __str__ = int.__repr__

    def __reduce_ex__(self, protocol: object) -> tuple[Any, tuple[int]]:
        return type(self), (self._value_,)


class LightEnum(metaclass=_ConstantsMeta):
    """Members are singletons with a ``name`` and a ``value`` (as ``enum.Enum``'s)."""

    _name_: str
    _value_: object

    @classmethod
    def _new_member_(cls, value: object) -> LightEnum:
        return object.__new__(cls)

    @staticmethod
    def _plain_value_(value: object) -> object:
        return value

    @property
    def name(self) -> str:
        return self._name_

    @property
    def value(self) -> object:
        return self._value_

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__}.{self._name_}: {self._value_!r}>"

    def __str__(self) -> str:
        return f"{type(self).__qualname__}.{self._name_}"

    def __reduce_ex__(self, protocol: object) -> tuple[Any, tuple[object]]:
        return type(self), (self._value_,)


# -- frozen records ----------------------------------------------------------------------


class FrozenInstanceError(AttributeError):
    """A field of a frozen record was assigned (as ``dataclasses.FrozenInstanceError``)."""


_set_field = object.__setattr__


def _is_class_var(annotation: object) -> bool:
    # Annotations are strings here (``from __future__ import annotations``).
    text = str(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _record_values(record: Any) -> tuple[Any, ...]:
    return tuple([getattr(record, name) for name in record.__match_args__])


def _record_init(self: Any, *args: Any, **kwargs: Any) -> None:
    fields: tuple[str, ...] = self.__match_args__
    if not kwargs and len(args) == len(fields):  # the common case: every field, in order
        for name, value in zip(fields, args, strict=True):
            _set_field(self, name, value)
        return
    kind = type(self).__name__
    if len(args) > len(fields):
        raise TypeError(f"{kind}() takes {len(fields)} positional arguments "
                        f"but {len(args)} were given")
    values = dict(zip(fields, args, strict=False))
    for name, value in kwargs.items():
        if name not in fields:
            raise TypeError(f"{kind}() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"{kind}() got multiple values for argument {name!r}")
        values[name] = value
    defaults: dict[str, Any] = self._record_defaults_
    for name in fields:
        if name in values:
            _set_field(self, name, values[name])
        elif name in defaults:
            _set_field(self, name, defaults[name])
        else:
            raise TypeError(f"{kind}() missing required argument: {name!r}")


def _record_repr(self: Any) -> str:
    fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
    return f"{type(self).__qualname__}({fields})"


def _record_eq(self: Any, other: object) -> object:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _record_values(self) == _record_values(other)


def _record_hash(self: Any) -> int:
    return hash(_record_values(self))


def _record_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _record_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _record_reduce(self: Any) -> tuple[Any, tuple[Any, ...]]:
    return type(self), _record_values(self)


class _DataclassFields:
    """A record's ``__dataclass_fields__``, made (with ``dataclasses``) when first asked for.

    So that code that already uses ``dataclasses`` (``dataclasses.replace`` in
    the daemon and the agent, ``fields``, ``asdict``, pytest's diffs) may
    treat a record as the dataclass type checkers see, while importing the
    protocol imports no ``dataclasses``.
    """

    def __get__(self, instance: object, owner: Any) -> dict[str, Any]:
        import dataclasses  # noqa: PLC0415 (only for code that uses dataclasses itself)

        defaults: dict[str, Any] = owner._record_defaults_
        twin = dataclasses.make_dataclass(owner.__name__, [
            (name, owner.__annotations__[name], dataclasses.field(default=defaults[name]))
            if name in defaults else (name, owner.__annotations__[name])
            for name in owner.__match_args__
        ], frozen=True)
        fields = {field.name: field for field in dataclasses.fields(twin)}
        type.__setattr__(owner, "__dataclass_fields__", fields)  # made once per record class
        return fields


_RECORD_METHODS: dict[str, Any] = {
    "__init__": _record_init,
    "__repr__": _record_repr,
    "__eq__": _record_eq,
    "__hash__": _record_hash,
    "__setattr__": _record_setattr,
    "__delattr__": _record_delattr,
    "__reduce__": _record_reduce,
}


def _light_record(cls: _C) -> _C:
    """What ``@dataclass(frozen=True, slots=True)`` makes of ``cls``, without ``dataclasses``.

    Fields are the annotated class attributes that are not ``ClassVar``, in
    order; a field's class attribute is its default. The class is made anew
    with those fields as its ``__slots__`` and ``__match_args__``, and gets an
    ``__init__`` (positional or keyword), ``__repr__``, ``__eq__`` and
    ``__hash__`` over the fields, and refuses assignment. ``dataclasses``
    functions work on it too (see :class:`_DataclassFields`).
    """
    if cls.__bases__ != (object,):
        raise TypeError(f"a record cannot derive from {cls.__bases__}")
    namespace = dict(cls.__dict__)
    annotations: dict[str, object] = namespace.get("__annotations__", {})
    fields = tuple(name for name, note in annotations.items() if not _is_class_var(note))
    defaults: dict[str, Any] = {}
    for name in fields:
        if name in namespace:
            defaults[name] = namespace.pop(name)
        elif defaults:
            raise TypeError(f"non-default field {name!r} follows a default one")
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    namespace["__slots__"] = fields
    namespace["__match_args__"] = fields
    namespace["_record_defaults_"] = defaults
    namespace["__dataclass_fields__"] = _DataclassFields()
    for name, method in _RECORD_METHODS.items():
        namespace.setdefault(name, method)
    record: _C = type(cls)(cls.__name__, cls.__bases__, namespace)
    return record


def _light_replace(record: _R, /, **changes: Any) -> _R:
    """A copy of ``record`` with some fields changed (as ``dataclasses.replace``)."""
    kind: Any = type(record)
    values = {name: getattr(record, name) for name in kind.__match_args__}
    values.update(changes)
    copy: _R = kind(**values)
    return copy


if TYPE_CHECKING:
    from dataclasses import replace
    from enum import Enum, IntEnum
    from typing import dataclass_transform, final

    @dataclass_transform(frozen_default=True)
    def frozen_record(cls: _C) -> _C:
        """Type checkers see a frozen dataclass."""
        return cls
else:
    Enum = LightEnum
    IntEnum = LightIntEnum
    frozen_record = _light_record
    replace = _light_replace

    def final(cls):
        return cls
