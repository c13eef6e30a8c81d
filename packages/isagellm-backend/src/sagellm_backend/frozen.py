"""Frozen value classes that behave as frozen dataclasses without importing ``dataclasses``.

Importing ``dataclasses`` (which imports ``inspect``, ``ast``, ``dis`` and ``tokenize``) and
compiling each value class's generated methods cost about a third of a fresh interpreter's
start with this package. A subclass of :class:`Frozen` declares its fields as a dataclass does
and writes its ``__init__`` (storing the fields with :meth:`Frozen._set`); the base gives the
field-wise ``repr``, ``==``, ``hash`` and ``__match_args__`` of a frozen dataclass and refuses
assignment and deletion with ``dataclasses.FrozenInstanceError``. ``__dataclass_fields__`` is
built on first use, so ``dataclasses.fields``, ``replace``, ``asdict`` and ``is_dataclass``
treat the class as the frozen dataclass it stands for.
"""

from __future__ import annotations

import sys
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    from typing_extensions import dataclass_transform

if TYPE_CHECKING:
    from dataclasses import Field

__all__ = ["Frozen"]


class _DataclassAttribute:
    """``__dataclass_fields__`` or ``__dataclass_params__`` of a :class:`Frozen` subclass,
    taken from an equivalent frozen dataclass made on first access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __get__(self, instance: object, owner: type[Frozen]) -> Any:
        mirror = owner.__dict__.get("_dataclass_mirror")
        if mirror is None:
            import dataclasses

            spec: list[tuple[str, Any] | tuple[str, Any, Any]] = []
            for name in owner._fields:
                note = next(c.__annotations__[name] for c in owner.__mro__ if name in _notes(c))
                holders = [c for c in owner.__mro__ if name in vars(c)]
                if holders:
                    spec.append((name, note, dataclasses.field(default=vars(holders[0])[name])))
                else:
                    spec.append((name, note))
            mirror = dataclasses.make_dataclass(owner.__name__, spec, frozen=True)
            type.__setattr__(owner, "_dataclass_mirror", mirror)
        return getattr(mirror, self._name)


def _notes(cls: type) -> dict[str, Any]:
    """The annotations ``cls`` itself declares (strings, as this package writes them)."""
    notes: dict[str, Any] = vars(cls).get("__annotations__", {})
    return notes


@dataclass_transform(frozen_default=True)
class Frozen:
    """Base of the package's immutable value classes (see the module's docstring)."""

    _fields: ClassVar[tuple[str, ...]] = ()
    """The fields, in declaration order (annotations other than ``ClassVar``)."""
    _key: ClassVar[Any]

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    else:
        __dataclass_fields__ = _DataclassAttribute("__dataclass_fields__")
        __dataclass_params__ = _DataclassAttribute("__dataclass_params__")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = (n for n, t in _notes(cls).items() if "ClassVar" not in str(t))
        fields = (*cls._fields, *own)
        cls._fields = fields
        type.__setattr__(cls, "__match_args__", fields)
        getter = attrgetter(*fields)
        cls._key = staticmethod(getter if len(fields) > 1 else lambda value: (getter(value),))

    def _set(self, **fields: Any) -> None:
        """Store field values; only ``__init__`` calls this."""
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return bool(self._key(self) == self._key(other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._key(self))

    def __setattr__(self, name: str, value: object) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")
