"""Frozen value classes that behave as frozen dataclasses without importing ``dataclasses``.

Importing ``dataclasses`` (which imports ``inspect``, ``ast``, ``dis`` and ``tokenize``) and
compiling each value class's generated methods cost about a third of a fresh interpreter's
start with this package. A subclass of :class:`Frozen` is written as a frozen dataclass is:
annotated fields with optional defaults and an optional ``__post_init__``. Unless the class
writes its own ``__init__``, it gets one that binds positional and keyword arguments to the
fields in order, fills in the defaults and then calls ``__post_init__`` (no ``default_factory``:
a default is shared by every instance, so, as in a dataclass, an unhashable one is refused).
The base gives the field-wise ``repr``, ``==``, ``hash`` and ``__match_args__`` of a frozen
dataclass and refuses assignment and deletion with ``dataclasses.FrozenInstanceError``.
``__dataclass_fields__`` is built on first use, so ``dataclasses.fields``, ``replace``,
``asdict`` and ``is_dataclass`` treat the class as the frozen dataclass it stands for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import pairwise
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

            spec = [
                (
                    name,
                    next(_notes(c)[name] for c in owner.__mro__ if name in _notes(c)),
                    dataclasses.field(default=owner._defaults.get(name, dataclasses.MISSING)),
                )
                for name in owner._fields
            ]
            mirror = dataclasses.make_dataclass(owner.__name__, spec, frozen=True)
            type.__setattr__(owner, "_dataclass_mirror", mirror)
        return getattr(mirror, self._name)


def _notes(cls: type) -> dict[str, Any]:
    """The annotations ``cls`` itself declares (strings, as this package writes them)."""
    notes: dict[str, Any] = vars(cls).get("__annotations__", {})
    return notes


def _quoted(names: list[str]) -> str:
    """``'a'``, ``'a' and 'b'`` or ``'a', 'b', and 'c'``, as Python's own call errors list them."""
    quoted = [repr(name) for name in names]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return f"{', '.join(quoted[:-1])}, and {quoted[-1]}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _make_init(cls: type[Frozen]) -> Callable[..., None]:
    """The ``__init__`` a frozen dataclass with ``cls``'s fields, defaults and ``__post_init__``
    would have; wrong calls raise the TypeError Python raises for that signature."""
    fields = cls._fields
    defaults = cls._defaults
    count = len(fields)
    required = count - len(defaults)
    known = frozenset(fields)
    needed = frozenset(fields[:required])
    template = {name: defaults.get(name) for name in fields}
    post_init = getattr(cls, "__post_init__", None)
    where = f"{cls.__qualname__}.__init__()"
    takes = str(count + 1) if required == count else f"from {required + 1} to {count + 1}"
    # fills[n]: the defaults completing n positional arguments (None where n is too few).
    fills = tuple(
        None if given < required else {name: defaults[name] for name in fields[given:]}
        for given in range(count + 1)
    )

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > count:
            raise TypeError(
                f"{where} takes {takes} positional argument{'s' if count else ''} "
                f"but {len(args) + 1} were given"
            )
        values = dict(zip(fields, args, strict=False))
        for name in kwargs:
            if name in values:
                raise TypeError(f"{where} got multiple values for argument {name!r}")
            if name not in known:
                raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        values.update(kwargs)
        missing = [name for name in fields[:required] if name not in values]
        if missing:
            raise TypeError(
                f"{where} missing {_plural(len(missing), 'required positional argument')}: "
                f"{_quoted(missing)}"
            )
        return {name: values[name] if name in values else defaults[name] for name in fields}

    def __init__(self: Frozen, *args: Any, **kwargs: Any) -> None:
        stored = self.__dict__
        if not kwargs and len(args) <= count and (fill := fills[len(args)]) is not None:
            for index, value in enumerate(args):  # not zip(): its strict= costs a third
                stored[fields[index]] = value
            if fill:
                stored.update(fill)
        elif not args and kwargs.keys() <= known and kwargs.keys() >= needed:
            stored.update(template)
            stored.update(kwargs)
        else:
            stored.update(bind(args, kwargs))
        if post_init is not None:
            post_init(self)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    return __init__


@dataclass_transform(frozen_default=True)
class Frozen:
    """Base of the package's immutable value classes (see the module's docstring)."""

    _fields: ClassVar[tuple[str, ...]] = ()
    """The fields, in declaration order (annotations other than ``ClassVar``)."""
    _defaults: ClassVar[dict[str, Any]] = {}
    """The fields' defaults, by name."""
    _key: ClassVar[Any]

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    else:
        __dataclass_fields__ = _DataclassAttribute("__dataclass_fields__")
        __dataclass_params__ = _DataclassAttribute("__dataclass_params__")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [n for n, t in _notes(cls).items() if "ClassVar" not in str(t)]
        fields = (*cls._fields, *(n for n in own if n not in cls._fields))
        defaults = {**cls._defaults, **{n: vars(cls)[n] for n in own if n in vars(cls)}}
        for name, value in defaults.items():
            if type(value).__hash__ is None:
                raise ValueError(
                    f"mutable default {type(value)} for field {name} is not allowed: "
                    "use an immutable value (a tuple, a frozenset, None)"
                )
        cls._fields = fields
        cls._defaults = defaults
        type.__setattr__(cls, "__match_args__", fields)
        getter = attrgetter(*fields)
        cls._key = staticmethod(getter if len(fields) > 1 else lambda value: (getter(value),))
        if "__init__" not in vars(cls):
            for before, name in pairwise(fields):
                if before in defaults and name not in defaults:
                    raise TypeError(f"non-default argument {name!r} follows default argument")
            type.__setattr__(cls, "__init__", _make_init(cls))

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
