"""Plain-text tables and JSON for the command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

__all__ = ["format_table", "format_value", "print_json", "stdout_for_json"]

_JSON_STREAMS: list[TextIO] = []
"""Where print_json writes while a stdout_for_json block runs (innermost last)."""


def format_value(value: object) -> str:
    """A cell: None as '-', sequences joined with ', ', booleans as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[format_value(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *cells]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def print_json(data: object) -> None:
    stream = _JSON_STREAMS[-1] if _JSON_STREAMS else sys.stdout
    print(json.dumps(data, indent=2, sort_keys=True, default=str), file=stream, flush=True)


@contextlib.contextmanager
def stdout_for_json() -> Iterator[None]:
    """Keep stdout for :func:`print_json` alone while the block runs.

    Anything else written to stdout meanwhile, by Python code or by a library writing to file
    descriptor 1 (a plugin being imported, say), goes to stderr, so the JSON stays parseable.
    """
    fds = _file_descriptors()
    if fds is None:
        # Not backed by files (output captured in-process): swap the Python streams only.
        _JSON_STREAMS.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _JSON_STREAMS.pop()
        return
    out_fd, err_fd = fds
    sys.stdout.flush()
    saved = os.dup(out_fd)
    os.dup2(err_fd, out_fd)
    json_stream = os.fdopen(os.dup(saved), "w", encoding=sys.stdout.encoding or "utf-8")
    _JSON_STREAMS.append(json_stream)
    try:
        yield
    finally:
        _JSON_STREAMS.pop()
        json_stream.close()
        sys.stdout.flush()
        os.dup2(saved, out_fd)
        os.close(saved)


def _file_descriptors() -> tuple[int, int] | None:
    try:
        return sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
