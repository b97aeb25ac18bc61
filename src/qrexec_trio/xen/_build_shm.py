"""cffi build script for the shm vchan ring (API mode, compiled at install time).

setup.py names ``ffi`` here in ``cffi_modules``; the result is the extension
module ``qrexec_trio.xen._shm_cffi``. For quick iteration run this file from
``src/`` (``python qrexec_trio/xen/_build_shm.py``): it builds in place.
"""

from __future__ import annotations

import os
import re

from cffi import FFI  # type: ignore[import-untyped, unused-ignore]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(name: str) -> str:
    # setuptools wants source paths relative to the directory it runs in.
    return os.path.relpath(os.path.join(_HERE, name))


ffi = FFI()

def _declarations() -> str:
    """shm_ring.h as cffi declarations: the header is the one source of both.

    Comments and preprocessor lines go; each constant becomes ``#define NAME
    ...`` so that its value comes from the compiler, not from a second copy.
    """
    with open(os.path.join(_HERE, "shm_ring.h")) as header:
        text = re.sub(r"/\*.*?\*/", "", header.read(), flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#define "):
            name = stripped.split()[1]
            if not name.endswith("_H"):  # not the include guard
                lines.append(f"#define {name} ...")
        elif not stripped.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


ffi.cdef(_declarations())

ffi.set_source(
    "qrexec_trio.xen._shm_cffi",
    '#include "shm_ring.h"',
    sources=[_rel("shm_ring.c")],
    depends=[_rel("shm_ring.h")],  # also puts the header into the sdist
    include_dirs=[_rel(".")],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    built = ffi.compile(verbose=True)
    # Leave only the extension module in the tree, not cffi's intermediates.
    for leftover in ("_shm_cffi.c", "_shm_cffi.o", "shm_ring.o"):
        path = os.path.join(os.path.dirname(built), leftover)
        if os.path.exists(path):
            os.unlink(path)
