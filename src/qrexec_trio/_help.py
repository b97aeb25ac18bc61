"""``--version`` and an ``examples:`` epilog for the argparse-based programs.

Every program answers ``--version`` with ``PROG VERSION`` and ends its
``--help`` with examples; :func:`finish_parser` adds both to a parser built
the usual way. (The short-lived clients use :mod:`._options` instead, which
has its own ``--version`` row: argparse is too slow for them to import.)
"""

from __future__ import annotations

import argparse

from ._options import version_line


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, except that a paragraph with indented lines (the
    examples) is kept as written instead of being refilled."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def finish_parser(parser: argparse.ArgumentParser, *examples: str) -> argparse.ArgumentParser:
    """Add ``--version`` and an ``examples:`` section (one command line each) to ``parser``."""
    parser.add_argument("--version", action="version", version=version_line(parser.prog),
                        help="print the version and exit")
    section = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    parser.epilog = f"{parser.epilog}\n\n{section}" if parser.epilog else section
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = _Formatter
    return parser
