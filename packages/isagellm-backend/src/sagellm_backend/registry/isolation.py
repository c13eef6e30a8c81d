"""Running a plugin's code (its import, its probe) so that nothing it does escapes the registry.

The code runs in a daemon worker thread that the caller waits on for at most a deadline.
Whatever it raises, ``BaseException`` included (``SystemExit``, ``KeyboardInterrupt``,
``GeneratorExit``), comes back as a value; what it writes to ``sys.stdout`` or ``sys.stderr``
is kept rather than printed. When the deadline passes the caller stops waiting and the thread is
left to finish, or not, on its own.

Signals are delivered to the main thread only, so a ``KeyboardInterrupt`` raised in a worker is
the plugin's own, while a Ctrl-C of the user interrupts the caller's wait and propagates.

A thread that is itself in the middle of an import holds that module's import lock, which the
plugin may need; such a caller runs the plugin code in its own thread, without a deadline,
rather than deadlock on its own lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Generic, TextIO, TypeVar, cast

from sagellm_backend.frozen import Frozen

__all__ = ["MAX_OUTPUT", "Outcome", "is_plugins_own", "isolated_call"]

T = TypeVar("T")

MAX_OUTPUT = 4096
"""Characters of a plugin's output kept; the rest is counted and dropped."""

_IMPORT_MACHINERY = "<frozen importlib._bootstrap>"


class Outcome(Frozen, Generic[T]):
    """How a call of plugin code ended: a value, an exception, or still running at the deadline."""

    value: T | None = None
    error: BaseException | None = None
    hung: bool = False
    output: str = ""
    """What the code wrote to sys.stdout and sys.stderr (at most MAX_OUTPUT characters)."""


def isolated_call(fn: Callable[[], T], *, deadline: float, name: str) -> Outcome[T]:
    """Run ``fn`` in a daemon thread named ``name`` and wait at most ``deadline`` seconds."""
    captured = _Captured()
    if _importing_in_this_thread():
        return _inline_call(fn, captured)
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        ident = threading.get_ident()
        _CAPTURES[ident] = captured
        try:
            result.append(fn())
        except BaseException as exc:  # the plugin's, whatever it is: reported, never raised
            failure.append(exc)
        finally:
            _CAPTURES.pop(ident, None)

    _enter()
    worker = threading.Thread(target=run, name=name, daemon=True)
    try:
        worker.start()
        worker.join(deadline)
    finally:
        if worker.ident is not None and worker.is_alive():
            _CAPTURES.pop(worker.ident, None)
        _leave()
    if worker.is_alive():
        return Outcome(hung=True, output=captured.text())
    if failure:
        return Outcome(error=failure[0], output=captured.text())
    return Outcome(value=result[0], output=captured.text())


def is_plugins_own(error: BaseException) -> bool:
    """Whether ``error``, raised by plugin code in the current thread, is the plugin's fault.

    Only a KeyboardInterrupt in the main thread may be the user's Ctrl-C (a signal), which must
    interrupt the user's command; everything else that plugin code raises is its own.
    """
    return not (
        isinstance(error, KeyboardInterrupt)
        and threading.current_thread() is threading.main_thread()
    )


def _inline_call(fn: Callable[[], T], captured: _Captured) -> Outcome[T]:
    ident = threading.get_ident()
    _enter()
    _CAPTURES[ident] = captured
    try:
        return Outcome(value=fn(), output=captured.text())
    except BaseException as exc:
        if not is_plugins_own(exc):
            raise
        return Outcome(error=exc, output=captured.text())
    finally:
        _CAPTURES.pop(ident, None)
        _leave()


def _importing_in_this_thread() -> bool:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


class _Captured:
    """Output of one call, bounded."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._kept = 0
        self._dropped = 0

    def add(self, text: str) -> None:
        room = MAX_OUTPUT - self._kept
        if room > 0:
            self._parts.append(text[:room])
            self._kept += min(room, len(text))
        self._dropped += max(0, len(text) - room)

    def text(self) -> str:
        text = "".join(self._parts)
        return f"{text}[... {self._dropped} more characters]" if self._dropped else text


_CAPTURES: dict[int, _Captured] = {}
"""Thread ident -> the output of the plugin code that thread runs."""

_STATE_LOCK = threading.Lock()
_active = 0
_installed: list[tuple[str, _Router]] = []
_ROUTERS: dict[tuple[str, int], _Router] = {}
"""Every router made, by stream and original, kept for the life of the process: print() holds a
borrowed reference to sys.stdout, so a router swapped out while another thread prints through
it must never be freed."""


class _Router:
    """Stands in for sys.stdout or sys.stderr while plugin code runs: what a thread running
    plugin code writes is captured, what any other thread writes passes through."""

    def __init__(self, original: TextIO) -> None:
        self.original = original

    def write(self, text: str) -> int:
        captured = _CAPTURES.get(threading.get_ident())
        if captured is None:
            return self.original.write(text)
        captured.add(str(text))
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _CAPTURES.get(threading.get_ident()) is None:
            self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _enter() -> None:
    global _active
    with _STATE_LOCK:
        if _active == 0:
            for stream in ("stdout", "stderr"):
                original = getattr(sys, stream)
                if original is None or isinstance(original, _Router):
                    continue
                router = _ROUTERS.setdefault((stream, id(original)), _Router(original))
                _installed.append((stream, router))
                setattr(sys, stream, cast(TextIO, router))
        _active += 1


def _leave() -> None:
    global _active
    with _STATE_LOCK:
        _active -= 1
        if _active == 0:
            for stream, router in _installed:
                if getattr(sys, stream) is router:
                    setattr(sys, stream, router.original)
            _installed.clear()
