"""Collective timeouts: validated once, the same way on every backend, and capped.

A timeout is a positive, finite number of seconds (an int or a float, never a bool or a string).
A larger one than :data:`MAX_TIMEOUT_S` (24 hours) is clamped to it: clocks and communication
libraries overflow on very long waits (gloo and NCCL count nanoseconds in 64 bits), so a value
such as 9.3e9 waits up to the cap rather than failing at once and breaking the group.
"""

from __future__ import annotations

import math

from sagellm_backend.errors import InvalidArgumentError

__all__ = ["MAX_TIMEOUT_S", "check_timeout"]

MAX_TIMEOUT_S = 24 * 3600.0
"""The longest a collective waits, in seconds; larger timeouts are clamped to it."""


def check_timeout(timeout: object, what: str = "timeout") -> float:
    """``timeout`` as seconds in (0, MAX_TIMEOUT_S]; anything else is invalid_argument."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds, got {type(timeout).__name__} {timeout!r}",
            hint="pass seconds as an int or float, such as 30.0",
        )
    if isinstance(timeout, float) and not math.isfinite(timeout):
        raise InvalidArgumentError(
            f"{what} must be finite, got {timeout!r}",
            hint=f"pass a finite number of seconds; waits are capped at {MAX_TIMEOUT_S:g} s",
        )
    if timeout <= 0:
        raise InvalidArgumentError(
            f"{what} must be positive, got {timeout!r}",
            hint="pass a positive number of seconds, such as 30.0",
        )
    return MAX_TIMEOUT_S if timeout >= MAX_TIMEOUT_S else float(timeout)
