"""Package attributes loaded on first use (PEP 562), for the packages the short-lived
clients import: a name costs its module's import only when someone asks for it.

Light: ``__import__`` rather than importlib (which imports warnings).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: each name of ``where`` is loaded from
    the submodule it names (``"_call"``, or ``"_call:other_name"`` for a name the
    submodule spells otherwise), once, and kept in the package."""

    def __getattr__(name: str) -> object:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = source.partition(":")
        value = getattr(__import__(f"{package}.{module}", fromlist=[name]), attribute or name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
