"""The torture's command line: parsed and checked before anything starts.

Anything out of range or contradictory is a usage error (argparse's: the
usage, a message, exit 2).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._help import finish_parser
from ._kinds import ALL_PATHS, FAULT_KINDS, CallPath, FaultKind

MAX_CALLS: Final = 10_000_000
MAX_CONCURRENCY: Final = 256
MAX_PAYLOAD: Final = 64 << 20
DEFAULT_FAULT_RATE: Final = 0.25


@dataclass(frozen=True)
class Options:
    calls: int
    concurrency: int
    faults: tuple[FaultKind, ...]
    fault_rate: float
    paths: tuple[CallPath, ...]
    seed: int
    duration: float | None
    json: Path | None
    world: Path | None
    call_timeout: float
    teardown_timeout: float
    max_payload: int
    log_level: str
    keep_logs: bool
    print_config: bool


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio torture",
        description="Fault-injection run against a local world: many calls with checksummed "
        "data both ways, some of them faulted (processes killed or stopped, peers closing, "
        "calls cancelled, stalled readers, slow writers); then a report of what completed, "
        "what failed, what hung, how fast faulted pipelines were torn down, and what leaked. "
        "Exit 0 only with no leak, no hang and no unexpected failure.",
        epilog="fault kinds: " + ", ".join(FAULT_KINDS) + ". paths: "
        + ", ".join(ALL_PATHS) + ".")
    add = parser.add_argument
    add("--calls", type=int, default=300, metavar="N", help="calls to make (default 300)")
    add("--concurrency", type=int, default=8, metavar="K",
        help=f"calls at once, 1 to {MAX_CONCURRENCY} (default 8)")
    add("--faults", default="all", metavar="LIST|all|none",
        help="comma-separated fault kinds to inject (default all)")
    add("--fault-rate", type=float, default=None, metavar="P",
        help=f"share of calls that get a fault, above 0 and at most 1 (default "
        f"{DEFAULT_FAULT_RATE})")
    add("--paths", default="all", metavar="LIST|all",
        help="comma-separated call paths to use (default all)")
    add("--seed", type=int, default=None, metavar="S",
        help="seed of every random choice (default: a random one, shown in the report)")
    add("--duration", type=float, default=None, metavar="SEC",
        help="start no call after SEC seconds (the calls in flight finish)")
    add("--json", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    add("--world", type=Path, default=None, metavar="DIR",
        help="use the running world in DIR (started from --print-config's config) "
        "instead of starting one")
    add("--call-timeout", type=float, default=60.0, metavar="SEC",
        help="a call still running after SEC seconds is hung (default 60)")
    add("--teardown-timeout", type=float, default=20.0, metavar="SEC",
        help="a faulted pipeline not gone SEC seconds after its fault is hung (default 20)")
    add("--max-payload", type=int, default=256 << 10, metavar="BYTES",
        help="the largest payload a call sends (default 262144; sizes are log-uniform)")
    add("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
        help="log level of the world the torture starts (default warning)")
    add("--keep-logs", action="store_true",
        help="keep the started world's log even when the run passes")
    add("--print-config", action="store_true",
        help="print the torture world's config (for 'qrexec-trio world') and exit")
    return finish_parser(parser, "qrexec-trio torture --calls 100 --seed 1",
                         "qrexec-trio torture --faults none --json report.json")


def _names(parser: argparse.ArgumentParser, option: str, text: str,
           known: Sequence[str]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        parser.error(f"{option}: empty list")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def _faults(parser: argparse.ArgumentParser, text: str) -> tuple[FaultKind, ...]:
    if text == "none":
        return ()
    if text == "all":
        return tuple(FAULT_KINDS.values())
    if any(word.strip() in ("all", "none") for word in text.split(",")):
        parser.error("--faults: 'all' and 'none' stand alone")
    return tuple(FAULT_KINDS[name] for name in _names(parser, "--faults", text,
                                                          list(FAULT_KINDS)))


def _positive(parser: argparse.ArgumentParser, option: str, value: float | None) -> None:
    # "not > 0" also refuses NaN.
    if value is not None and not value > 0:
        parser.error(f"{option} must be above 0 (got {value})")


def parse_options(argv: Sequence[str]) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= MAX_CALLS:
        parser.error(f"--calls must be 1 to {MAX_CALLS} (got {args.calls})")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be 1 to {MAX_CONCURRENCY} (got {args.concurrency})")
    if not 0 <= args.max_payload <= MAX_PAYLOAD:
        parser.error(f"--max-payload must be 0 to {MAX_PAYLOAD} (got {args.max_payload})")
    for option in ("duration", "call_timeout", "teardown_timeout"):
        _positive(parser, "--" + option.replace("_", "-"), getattr(args, option))
    if args.teardown_timeout > args.call_timeout:
        parser.error("--teardown-timeout cannot exceed --call-timeout: a faulted call is "
                     "cut at the call's bound")
    faults = _faults(parser, args.faults)
    paths = tuple(CallPath(name) for name in (
        list(ALL_PATHS) if args.paths == "all"
        else _names(parser, "--paths", args.paths, list(ALL_PATHS))))
    if args.fault_rate is not None:
        if not faults:
            parser.error("--fault-rate with --faults none: there is nothing to inject")
        if not 0 < args.fault_rate <= 1:
            parser.error(f"--fault-rate must be above 0 and at most 1 (got {args.fault_rate})")
    for kind in faults:
        if not kind.paths & set(paths):
            needed = ", ".join(sorted(kind.paths))
            parser.error(f"--faults {kind.name} needs a path of {needed}, and --paths "
                         f"selects {', '.join(paths)}")
    if args.json is not None and not os.path.isdir(args.json.parent or "."):
        parser.error(f"--json: no directory {str(args.json.parent)!r}")
    if args.print_config and args.world is not None:
        parser.error("--print-config prints a config for a new world; --world names a "
                     "running one")
    return Options(
        calls=args.calls, concurrency=args.concurrency, faults=faults,
        fault_rate=(args.fault_rate if args.fault_rate is not None else DEFAULT_FAULT_RATE)
        if faults else 0.0,
        paths=paths,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32),
        duration=args.duration, json=args.json, world=args.world,
        call_timeout=args.call_timeout, teardown_timeout=args.teardown_timeout,
        max_payload=args.max_payload, log_level=args.log_level, keep_logs=args.keep_logs,
        print_config=args.print_config)
