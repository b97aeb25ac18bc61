"""The parsed policy, kept between calls and reloaded only when a file changes.

Every file and directory that went into the policy (and every path that was
looked for and missing) is remembered with its signature (device, inode, mtime,
ctime, size). The kernel tells us when any of them may have changed (inotify,
see :mod:`._inotify`); only then are the paths stat'ed again, and if any
differs, the policy is rebuilt. (Without inotify, they are stat'ed before each
evaluation.) A rebuild re-parses only the files that changed: the
others' parse results are reused, so one edit costs one file's parse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import structlog

from ._engine import Decision, Policy, Request
from ._errors import PolicySyntaxError
from ._files import (
    Signature,
    any_changed,
    current_signature,
    list_policy_dir,
    read_policy_file,
)
from ._inotify import open_watcher
from ._multifile import load_multifile_dir, parse_multifile_lines, parse_service_file_lines
from ._parsed import FileMode, MultiFileMode, ParsedFile, R2FileMode
from ._r2 import load_r2_dir, parse_r2_lines
from ._rules import Rule
from ._system_info import SystemInfo

log = structlog.get_logger(__name__)

DEFAULT_R2_DIR: Final = "/etc/qubes-rpc/policy"
DEFAULT_POLICY_D: Final = "/etc/qubes/policy.d"


def parse_file_text(text: str, path: str, mode: FileMode) -> ParsedFile:
    """Parse one file's text according to how it was reached."""
    if isinstance(mode, R2FileMode):
        rules, errors = parse_r2_lines(text, service=mode.service, path=path)
        return ParsedFile(tuple(rules), tuple(errors))
    if isinstance(mode, MultiFileMode):
        return parse_multifile_lines(text, path=path)
    return parse_service_file_lines(
        text, path=path, service=mode.service, argument=mode.argument
    )


@dataclass
class _ParsedEntry:
    signature: Signature
    parsed: ParsedFile


@dataclass
class _Reader:
    """A PolicyReader that reuses unchanged files' parses and records every path
    it touched, with the signature it had (None: absent)."""

    previous: dict[tuple[str, FileMode], _ParsedEntry]
    used: dict[tuple[str, FileMode], _ParsedEntry] = field(default_factory=dict)
    watched: dict[str, Signature | None] = field(default_factory=dict)
    files_parsed: int = 0

    def parsed(self, path: str, mode: FileMode) -> ParsedFile:
        key = (path, mode)
        known = self.used.get(key) or self.previous.get(key)
        now = current_signature(path)
        if known is not None and known.signature == now:
            self.used[key] = known
            self.watched[path] = now
            return known.parsed
        try:
            text, signature = read_policy_file(path)
        except PolicySyntaxError:
            self.watched[path] = now
            raise
        parsed = parse_file_text(text, path, mode)
        self.files_parsed += 1
        self.used[key] = _ParsedEntry(signature, parsed)
        self.watched[path] = signature
        return parsed

    def listing(self, path: str, *, suffix: str | None) -> list[str]:
        try:
            names, signature = list_policy_dir(path, suffix=suffix)
        except PolicySyntaxError:
            self.watched[path] = current_signature(path)
            raise
        self.watched[path] = signature
        return names

    def exists(self, path: str) -> bool:
        signature = current_signature(path)
        self.watched[path] = signature
        return signature is not None


@dataclass(frozen=True)
class LoadResult:
    policy: Policy
    watched: dict[str, Signature | None]
    parsed_files: dict[tuple[str, FileMode], _ParsedEntry]
    files_parsed: int


def _load(
    r2_dir: str | None,
    policy_d: str | None,
    *,
    required: bool,
    previous: dict[tuple[str, FileMode], _ParsedEntry],
) -> LoadResult:
    reader = _Reader(previous)
    rules: list[Rule] = []
    errors: list[PolicySyntaxError] = []
    # A "!compat-4.0" in policy.d reads the legacy files at its own place, as
    # today's dom0 does (the stock 35-compat.policy holds one).
    multi = (
        None if policy_d is None
        else load_multifile_dir(policy_d, reader, required=required, legacy_dir=r2_dir)
    )
    # Without one, R2 per-service files come first: each is specific to one
    # service, and they stand where the R4.x compatibility include put them,
    # ahead of the defaults.
    if r2_dir is not None and (multi is None or not multi.compat_seen):
        r2_rules, r2_errors = load_r2_dir(r2_dir, reader, required=required)
        rules += r2_rules
        errors += r2_errors
    if multi is not None:
        rules += multi.rules
        errors += multi.errors
    return LoadResult(Policy(rules, errors), reader.watched, reader.used, reader.files_parsed)


def load_policy(
    r2_dir: str | None = DEFAULT_R2_DIR,
    policy_d: str | None = DEFAULT_POLICY_D,
    *,
    required: bool = False,
) -> Policy:
    """Parse everything once, without caching (lint; the benchmark's baseline).

    With ``required``, a directory that does not exist is an error.
    """
    return _load(r2_dir, policy_d, required=required, previous={}).policy


class PolicyCache:
    """The current policy of two directories, for many evaluations."""

    def __init__(
        self,
        r2_dir: str | None = DEFAULT_R2_DIR,
        policy_d: str | None = DEFAULT_POLICY_D,
        *,
        notify: bool = True,
    ) -> None:
        """``notify``: learn of changes from the kernel (inotify) where it can,
        rather than by checking every file before each evaluation."""
        self.r2_dir = r2_dir
        self.policy_d = policy_d
        #: How many files have been parsed in total (for tests and the benchmark).
        self.files_parsed = 0
        #: How many times the policy was (re)built.
        self.loads = 0
        #: How many times the files' signatures were checked (for tests and the benchmark).
        self.checks = 0
        self._current: LoadResult | None = None
        self._watcher = open_watcher() if notify else None
        # Whether the watcher covers every path of the current policy.
        self._watching = False

    def policy(self) -> Policy:
        current = self._current
        if current is not None and self._watching:
            assert self._watcher is not None
            if not self._watcher.changed():
                return current.policy
        while True:
            self.checks += 1
            if current is None or any_changed(current.watched):
                current = self._reload(current)
            if not self._watch(current):
                return current.policy
            # A change between reading the files and watching them sent no
            # event: check once more now that every watch is in place.
            self.checks += 1
            if not any_changed(current.watched):
                return current.policy

    def _watch(self, current: LoadResult) -> bool:
        """Watch the current policy's paths; False: check them on every call instead."""
        if self._watcher is None:
            return False
        self._watching = self._watcher.watch_paths(current.watched)
        if not self._watching:
            self._watcher.close()
            self._watcher = None
        return self._watching

    def close(self) -> None:
        """Release the inotify descriptor (the cache then checks files on each call)."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._watching = False

    def evaluate(self, request: Request, system_info: SystemInfo) -> Decision:
        return self.policy().evaluate(request, system_info)

    def _reload(self, previous: LoadResult | None) -> LoadResult:
        result = _load(
            self.r2_dir, self.policy_d, required=False,
            previous={} if previous is None else previous.parsed_files,
        )
        self._current = result
        self.files_parsed += result.files_parsed
        self.loads += 1
        policy = result.policy
        for error in policy.errors:
            log.error("policy syntax error", file=error.path, line=error.line,
                      error=error.message)
        log.info(
            "policy loaded", rules=len(policy.rules), errors=len(policy.errors),
            files_parsed=result.files_parsed, r2_dir=self.r2_dir, policy_d=self.policy_d,
        )
        return result
