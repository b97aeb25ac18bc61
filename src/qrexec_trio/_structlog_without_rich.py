"""Keep rich out of structlog: only ``qrexec-trio top`` draws with rich.

When rich is installed, importing structlog imports it too (``structlog.dev``
probes for it, to draw console tracebacks): about 40 ms and 5 MiB in every
program that logs, the long-lived ones included, for tracebacks we render
plainly anyway. This finder hides rich from that one probe, while
``structlog.dev`` is being executed; rich stays importable for everyone else.
It is installed by the package's ``__init__`` (every module of ours is imported
after it) and costs a name comparison per later import.
"""

# Light: no typing or importlib import at run time (the clients import this
# package first); the annotations are strings.
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

_PROBING = "structlog.dev"


class _WithoutRich:
    """The loader of ``structlog.dev``, run with ``rich`` unimportable."""

    def __init__(self, loader: "Loader") -> None:
        self._loader = loader

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        hide = "rich" not in sys.modules  # a process that drew with rich already keeps it
        if hide:
            sys.modules["rich"] = None  # type: ignore[assignment]  # import raises ImportError
        try:
            self._loader.exec_module(module)
        finally:
            if hide and sys.modules.get("rich", ...) is None:
                del sys.modules["rich"]


class StructlogWithoutRich:
    """A meta path finder that wraps ``structlog.dev``'s loader (see the module)."""

    def find_spec(self, name: str, path: "Sequence[str] | None",
                  target: "ModuleType | None" = None) -> "ModuleSpec | None":
        if name != _PROBING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _WithoutRich(spec.loader)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    """Put the finder first, once (structlog not imported yet)."""
    if _PROBING not in sys.modules and not any(
            isinstance(finder, StructlogWithoutRich) for finder in sys.meta_path):
        sys.meta_path.insert(0, StructlogWithoutRich())
