"""The layers import downwards only (README, Layout), and the sans-IO protocol
layer imports no I/O framework at all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import qrexec_trio

PACKAGE = Path(qrexec_trio.__file__).parent
#: Lowest first: a layer may import the ones before it, never after.
ORDER = ["protocol", "xen", "domains", "policy", "services", "nursery", "blocking", "world",
         "roles"]
_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:qrexec_trio\.|\.\.)(\w+)", re.M)


def test_layers_import_downwards_only() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in ORDER:
            continue
        for imported in _IMPORT.findall(path.read_text()):
            if imported in ORDER and ORDER.index(imported) > ORDER.index(layer):
                upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert upward == []


def test_the_protocol_layer_imports_neither_trio_nor_structlog() -> None:
    code = ("import sys, qrexec_trio.protocol; "
            "print(sorted(m for m in ('trio', 'structlog', 'cffi') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
