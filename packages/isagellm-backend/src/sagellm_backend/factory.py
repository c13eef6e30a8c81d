"""The factory contract: what a ``sagellm.backends`` entry point points to.

An entry point's target is a :class:`BackendFactory`. Loading it imports nothing heavy: the
provider module is named as a string and imported only when a backend is created. Callers use
it as ``factory(config)`` (config None, or an object with ``kind``, ``device`` and
``device_ids``) or ``factory(config, **options)``; both validate every option up front.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from sagellm_backend.device import DeviceRef
from sagellm_backend.errors import (
    BackendLoadError,
    BackendUnavailableError,
    InvalidArgumentError,
    UnknownOptionError,
)
from sagellm_backend.frozen import Frozen

__all__ = ["API_VERSION", "BackendFactory", "DeviceSelection", "Option"]

API_VERSION = "1"
"""Version of the plugin API; a plugin built for another one is refused before its code runs."""

P = TypeVar("P")
OptionValue = int | float | bool | str | tuple[int, ...]
OptionType = type[int] | type[float] | type[bool] | type[str] | type[tuple[int, ...]]

LIST_SEPARATOR = "+"
"""Separator of list-valued options in a config string (``device_ids=0+1``); never ``,``."""

INT_OPTION_RANGE = (-(2**63), 2**63 - 1)
"""Integer option values must fit in 64 bits, as every device library takes them."""


class Option(Frozen):
    """A declared backend option: its type, default and one-line help."""

    name: str
    type: OptionType
    default: OptionValue | None
    help: str

    def convert(self, value: object) -> OptionValue:
        """Convert a config-string text or a Python value to this option's type.

        Refused with InvalidArgumentError: a value that does not convert, a float that is not
        finite (nan, inf, 1e309) and an int outside 64 bits. A bad value is the caller's to fix,
        on every backend.
        """
        try:
            converted = self._convert(value)
        except (TypeError, ValueError):
            converted = None
        problem = _out_of_range(converted)
        if converted is not None and problem is None:
            return converted
        what = problem or f"not a valid {self._type_name}"
        about = f" ({self.help})" if self.help else ""
        raise InvalidArgumentError(
            f"option {self.name}={value!r} is {what}",
            hint=f"pass {self.name} as a {self._type_name}{about}",
        )

    @property
    def _type_name(self) -> str:
        if self.type is tuple:
            return f"list of ints (joined with {LIST_SEPARATOR!r})"
        if self.type is float:
            return "finite float"
        return self.type.__name__

    def to_dict(self) -> dict[str, object]:
        """Name, type, default and help as JSON types (a list default as a list)."""
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        return {"name": self.name, "type": self._type_name, "default": default, "help": self.help}

    def _convert(self, value: object) -> OptionValue:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _BOOLS:
                return _BOOLS[value.lower()]
            raise ValueError(value)
        if self.type is tuple:
            items: Sequence[object]
            if isinstance(value, str):
                items = value.split(LIST_SEPARATOR) if value else []
            elif isinstance(value, (list, tuple)):
                items = value
            else:
                raise TypeError(value)
            return tuple(_to_int(item) for item in items)
        if self.type is int:
            return _to_int(value)
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(value)
            if isinstance(value, str) and not value.isascii():
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str):
            raise TypeError(value)
        return value


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(value)


def _out_of_range(value: OptionValue | None) -> str | None:
    """Why a converted value cannot be used, or None."""
    numbers = value if isinstance(value, tuple) else (value,)
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            return "not a finite number"
        if isinstance(number, int) and not isinstance(number, bool):
            low, high = INT_OPTION_RANGE
            if not low <= number <= high:
                return "outside the 64-bit integer range"
    return None


class DeviceSelection(Frozen):
    """Which device(s) a factory was asked for: an index and, for multi-device, the ids."""

    index: int | None = None
    device_ids: tuple[int, ...] | None = None


class BackendFactory(Generic[P]):
    """Callable entry-point target that validates options and creates a provider lazily.

    ``create`` is ``"module:function"``, imported on the first call; the function receives the
    device selection and the validated options as keywords. ``probe`` (also ``"module:function"``
    or a callable) returns None when the backend can run here, else the reason it cannot; it
    must be cheap and must not create a device context.
    """

    def __init__(
        self,
        kind: str,
        create: str | Callable[..., P],
        *,
        options: Sequence[Option] = (),
        probe: str | Callable[[], str | None] | None = None,
        priority: int = 0,
        aliases: Sequence[str] = (),
        description: str = "",
        install_hint: str = "",
        api_version: str = API_VERSION,
        multi_device: bool = False,
    ) -> None:
        self.kind = kind
        self.options: Mapping[str, Option] = {o.name: o for o in options}
        self.priority = priority
        self.aliases = tuple(aliases)
        self.description = description
        self.install_hint = install_hint
        self.api_version = api_version
        self.multi_device = multi_device
        self._create = create
        self._probe = probe

    def __repr__(self) -> str:
        return f"BackendFactory({self.kind!r})"

    def __call__(self, config: object = None, **options: object) -> P:
        """A provider, after the probe: BackendUnavailableError where it gives a reason."""
        return self._build(config, options, probe=True)

    def create_probed(self, config: object = None, **options: object) -> P:
        """A provider, without running the probe again: for a caller that has just probed (the
        registry probes each backend once, isolated, and keeps the result)."""
        return self._build(config, options, probe=False)

    def _build(self, config: object, options: Mapping[str, object], *, probe: bool) -> P:
        selection = self.select_device(config)
        values = self.validate_options(options)
        reason = self.unavailable_reason() if probe else None
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {self.kind!r} is unavailable: {reason}",
                hint=self.hint_for(reason),
            )
        create = _resolve(self._create)
        return create(device=selection, **values)  # type: ignore[no-any-return]

    def unavailable_reason(self) -> str | None:
        """None if the backend can run here, else why not. Cheap; creates no device context."""
        if self._probe is None:
            return None
        probe = _resolve(self._probe)
        return probe()  # type: ignore[no-any-return]

    def hint_for(self, reason: str) -> str:
        """What to do about an unavailability ``reason``: the install hint unless the reason
        already says it, else the general step."""
        if self.install_hint and self.install_hint not in reason:
            return self.install_hint
        return (
            "do what the reason says, or pick a backend that can run here "
            "(`sagellm-backend list`), for example with a fallback list such as 'cuda,cpu'"
        )

    def validate_options(self, options: Mapping[str, object]) -> dict[str, OptionValue]:
        """Typed option values with defaults filled in; unknown names are refused."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "(none)"
            raise UnknownOptionError(
                f"backend {self.kind!r} has no option {', '.join(unknown)}",
                hint=f"use one of its options: {known}",
            )
        values: dict[str, OptionValue] = {}
        for name, spec in self.options.items():
            if name in options:
                values[name] = spec.convert(options[name])
            elif spec.default is not None:
                values[name] = spec.default
        return values

    def select_device(self, config: object) -> DeviceSelection:
        """Read ``device`` and ``device_ids`` from a caller's config object (or None)."""
        if config is None:
            return DeviceSelection()
        device = getattr(config, "device", None)
        index: int | None = None
        if device is not None and device != "":
            text = str(device)
            if text.isascii() and text.isdigit():
                index = int(text)
            else:
                ref = DeviceRef.parse(text)
                if ref.kind not in (self.kind, *self.aliases):
                    raise InvalidArgumentError(
                        f"config.device {text!r} names another kind than {self.kind!r}",
                        hint=f"write '{self.kind}:N' or just 'N'",
                    )
                index = ref.index
        raw_ids = getattr(config, "device_ids", None)
        if raw_ids is None or (isinstance(raw_ids, (list, tuple)) and not raw_ids):
            return DeviceSelection(index)
        ids = Option("device_ids", tuple, None, "a list of device indices").convert(raw_ids)
        assert isinstance(ids, tuple)
        if len(ids) > 1 and not self.multi_device:
            raise InvalidArgumentError(
                f"backend {self.kind!r} drives one device per provider; got device_ids={list(ids)}",
                hint="create one provider per device (one process per device under torchrun)",
            )
        if index is not None and ids and index not in ids:
            raise InvalidArgumentError(
                f"config.device {index} is not among device_ids {list(ids)}",
                hint="set config.device to one of device_ids, or leave it unset",
            )
        return DeviceSelection(index if index is not None else ids[0], ids)


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BackendLoadError(
            f"{target!r} names no callable ({type(fn).__name__} found)",
            hint="point the factory's create or probe at an existing 'module:function'",
        )
    return fn  # type: ignore[no-any-return]
