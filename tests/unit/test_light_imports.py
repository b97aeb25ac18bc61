"""The modules a short-lived client loads on every call import no heavy module.

A client must start like a small tool (issue 14): enum, typing, dataclasses,
re, argparse, socket, structlog and trio each cost milliseconds to hundreds
of milliseconds of start-up. Each entry of :data:`LIGHT_MODULES` is imported
in a fresh interpreter, which then says which heavy modules that import
added, and which of our modules pulled each one in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec_trio._logging import configure_logging

#: What a client imports on its way to a call. Extend it with each new client entry module.
LIGHT_MODULES = [
    "qrexec_trio.protocol",
    "qrexec_trio._config",
    "qrexec_trio._logging",
    "qrexec_trio._errors",
    "qrexec_trio.protocol._vm_local",
    # The blocking driver's data vchan, and what it loads for the ring backends.
    "qrexec_trio.blocking._vchan",
    "qrexec_trio.blocking._call",
    "qrexec_trio.xen._shm_driver",
    "qrexec_trio.xen._xen_driver",
    # The client programs themselves: a trivial call runs on these alone.
    "qrexec_trio.roles.client_vm",
    "qrexec_trio.roles.client",
    "qrexec_trio.roles.multiplexer",
]

#: Modules too slow to import for a client's start-up (or that pull such modules in).
HEAVY_MODULES = frozenset({
    "argparse", "ast", "collections", "contextlib", "dataclasses", "enum", "functools",
    "inspect", "json", "logging", "re", "selectors", "socket", "structlog", "trio", "types",
    "typing",
})

_CHILD = """
import sys
before = set(sys.modules)
import {module}
print(" ".join(sorted(set(sys.modules) - before)))
"""


def _import_chains(importtime: str) -> dict[str, list[str]]:
    """Each imported module's chain of importers, outermost first, from ``-X importtime``.

    Python prints a module after the modules it imported, one indent level
    deeper than its importer.
    """
    entries = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        name_field = line.rsplit("|", 1)[1]
        name = name_field.strip()
        if name == "imported package":
            continue
        entries.append((len(name_field) - len(name_field.lstrip()), name))
    chains: dict[str, list[str]] = {}
    for index, (depth, name) in enumerate(entries):
        chain = [name]
        for later_depth, later_name in entries[index + 1:]:
            if later_depth < depth:
                chain.insert(0, later_name)
                depth = later_depth
        chains.setdefault(name, chain)
    return chains


def heavy_imports(module: str) -> list[str]:
    """The heavy modules importing ``module`` adds, each with the chain that imported it."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _CHILD.format(module=module)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    added = set(result.stdout.split())
    chains = _import_chains(result.stderr)
    return [" <- ".join(reversed(chains.get(name, [name])))
            for name in sorted(added & HEAVY_MODULES)]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_a_client_module_imports_no_heavy_module(module: str) -> None:
    offenders = heavy_imports(module)
    assert not offenders, (f"importing {module} loads heavy modules:\n  "
                           + "\n  ".join(offenders))


def test_the_check_sees_a_heavy_import() -> None:
    # The same check on a module known to import dataclasses (and with it
    # inspect, re, ...): it must name them, or the tests above prove nothing.
    offenders = heavy_imports("qrexec_trio.policy._parsed")
    assert any(line.startswith("dataclasses <- ") for line in offenders), offenders


def test_import_chains_follow_the_indentation() -> None:
    importtime = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:        10 |         10 |     enum",
        "import time:        10 |         20 |   pkg._constants",
        "import time:        10 |         10 |   pkg._other",
        "import time:        10 |         40 | pkg",
    ])
    chains = _import_chains(importtime)
    assert chains["enum"] == ["pkg", "pkg._constants", "enum"]
    assert chains["pkg._other"] == ["pkg", "pkg._other"]
    assert chains["pkg"] == ["pkg"]


# -- the light logger ---------------------------------------------------------------------

#: How every program configured structlog before its loggers became light: the
#: reference the light logger's output is compared with.
_STRUCTLOG_AS_BEFORE = '''
import logging, sys
import structlog

def configure_logging(level, *, stream=None, json=None, program=None):
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=False))
    processors = [structlog.contextvars.merge_contextvars,
                  structlog.processors.add_log_level,
                  structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if json:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False)
    if program is not None:
        structlog.contextvars.bind_contextvars(program=program)

get_logger = structlog.get_logger
bind_context = structlog.contextvars.bind_contextvars
'''

#: One program's logging, run against either implementation; it prints what it
#: logged, then whether structlog was loaded while only hidden records came.
_LOGGING_PROGRAM = '''
import io, sys
if sys.argv[1] == "before":
    import qrexec_trio  # as in every program: structlog without rich (see its __init__)
    sys.path.insert(0, sys.argv[3])
    from structlog_as_before import bind_context, configure_logging, get_logger
else:
    from qrexec_trio._logging import bind_context, configure_logging, get_logger
out = io.StringIO()
configure_logging("info", stream=out, json=sys.argv[2] == "json", program="qrexec-test")
log = get_logger("qrexec_trio.roles.test")
bind_context(call="0:513")
log.debug("hidden", detail=1)
quiet = "structlog" not in sys.modules
log.info("call %s started", "one", service="test.Echo", size=[1, 2])
bind_context(later="bound after the first record")
log.warning("stdout closed")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("call failed", call="overridden")
log.error("done", status=126)
sys.stdout.write(out.getvalue())
print("QUIET" if quiet else "LOUD")
'''


def _run_logging_program(implementation: str, output: str, tmp_path: Path) -> list[str]:
    (tmp_path / "structlog_as_before.py").write_text(_STRUCTLOG_AS_BEFORE)
    result = subprocess.run(
        [sys.executable, "-c", _LOGGING_PROGRAM, implementation, output, str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return result.stdout.splitlines()


def test_json_records_are_as_before(tmp_path: Path) -> None:
    before = _run_logging_program("before", "json", tmp_path)
    light = _run_logging_program("light", "json", tmp_path)
    assert light[-1] == "QUIET"  # a hidden record did not import structlog

    def without_timestamp(line: str) -> dict[str, object]:
        record: dict[str, object] = json.loads(line)
        stamp = record.pop("timestamp")
        assert isinstance(stamp, str) and stamp.endswith("Z")
        for error in record.get("exception", []):  # type: ignore[attr-defined]
            # The frames' locals hold object addresses, which differ between runs.
            for frame in error["frames"]:
                frame.pop("locals", None)
        return record

    records = [without_timestamp(line) for line in light[:-1]]
    assert records == [without_timestamp(line) for line in before[:-1]]
    assert [r["event"] for r in records] == [
        "call one started", "stdout closed", "call failed", "done"]
    assert all(r["program"] == "qrexec-test" for r in records)
    assert records[1]["later"] == "bound after the first record"
    assert records[2]["call"] == "overridden"


def test_console_records_are_as_before(tmp_path: Path) -> None:
    before = _run_logging_program("before", "console", tmp_path)
    light = _run_logging_program("light", "console", tmp_path)
    assert light[-1] == "QUIET"

    def without_timestamps(lines: list[str]) -> list[str]:
        return [line.split(" ", 1)[1] if line[:4].isdigit() else line for line in lines]

    assert without_timestamps(light[:-1]) == without_timestamps(before[:-1])
    assert "[info     ] call one started" in light[0]
    assert "program=qrexec-test" in light[0]


def _loads_structlog(statements: str) -> bool:
    code = ("import sys\nfrom qrexec_trio._logging import *\n"
            f"{statements}\nprint('structlog' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout.split()[-1] == "True"


@pytest.mark.parametrize(("statements", "loads"), [
    ("configure_logging('info', program='p'); get_logger('x').debug('hidden')", False),
    ("configure_logging('error'); get_logger('x').warning('hidden')", False),
    ("configure_logging('error', eager=True)", True),
    ("import structlog; configure_logging('error')", True),
    ("configure_logging('warning'); get_logger('x').warning('shown')", True),
    # Never configured: structlog's defaults, which show everything, as before.
    ("get_logger('x').debug('shown')", True),
])
def test_structlog_is_loaded_only_when_needed(statements: str, loads: bool) -> None:
    assert _loads_structlog(statements) == loads


def test_a_program_using_structlog_directly_gets_the_configuration() -> None:
    # Code that imported structlog itself (the daemon, the agent) logs through
    # the configuration at once: JSON with the program's name.
    code = ("import io, json, structlog\n"
            "from qrexec_trio._logging import configure_logging\n"
            "out = io.StringIO()\n"
            "configure_logging('info', stream=out, json=True, program='daemon')\n"
            "structlog.get_logger().info('direct')\n"
            "print(json.loads(out.getvalue())['program'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "daemon"


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_structlog_does_not_load_rich_but_top_can() -> None:
    # rich is installed (qrexec-trio top draws with it); structlog would import
    # it for its tracebacks in every program that logs, long-lived ones included.
    program = ("import sys, qrexec_trio, structlog\n"
               "print('rich' in sys.modules, structlog.dev.rich)\n"
               "import rich.table\n"
               "print(rich.table.Table.__name__)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.split() == ["False", "None", "Table"]
