"""Providers are unique: copying or pickling one is refused.

A provider owns device memory, streams, a live-block table and a rank of a process group. A
shallow copy would share all of them (closing the copy would close the original) and a pickle
could not carry them to another process, so both are refused with a typed error. Handles
(``KVBlock``), capabilities and errors are plain values and do pickle.
"""

from __future__ import annotations

from typing import Any, NoReturn

from sagellm_backend.errors import InvalidArgumentError

__all__ = ["Unique"]


class Unique:
    """Mixin of the providers: ``copy.copy``, ``copy.deepcopy`` and pickling raise
    InvalidArgumentError."""

    def __copy__(self) -> NoReturn:
        raise _refusal(self, "copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoReturn:
        raise _refusal(self, "copied")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise _refusal(self, "pickled")


def _refusal(provider: object, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"a {type(provider).__name__} cannot be {what}: it owns device memory, streams and a "
        "rank of its process group",
        hint="share the provider itself between threads, or create another one with "
        "get_backend(); pass KV block handles (which pickle) between processes",
    )
