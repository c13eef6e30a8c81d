"""One backend candidate: where it comes from, and its load and probe results, cached.

Loading imports the entry point's target, which by contract imports nothing heavy; probing asks
the factory whether it can run here without creating a device context. Neither is done before a
caller needs it. Both run isolated (:mod:`sagellm_backend.registry.isolation`): each has a
deadline, whatever they raise is recorded as the plugin's fault, and what they print is kept in
the load record instead of reaching the caller's output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sagellm_backend._version import __version__
from sagellm_backend.errors import (
    BackendError,
    BackendLoadError,
    IncompatiblePluginError,
    UnknownOptionError,
)
from sagellm_backend.factory import API_VERSION, BackendFactory, Option
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry.compat import api_mismatch, requirement_mismatch
from sagellm_backend.registry.isolation import Outcome, is_plugins_own, isolated_call
from sagellm_backend.registry.known import (
    KnownKind,
    is_ours,
    known_aliases,
    normalize_dist_name,
)
from sagellm_backend.registry.records import BackendRecord, RecordSource, RecordStatus
from sagellm_backend.registry.spec import BackendConfig, is_valid_kind

if TYPE_CHECKING:
    from sagellm_backend.registry.discovery import DiscoveredEntryPoint

__all__ = ["DEFAULT_IMPORT_TIMEOUT", "KIND_RULE", "Plugin"]

KIND_RULE = "lower case letters, digits and '_', starting with a letter; not 'auto'"
"""What a backend kind may be, for messages."""

DEFAULT_IMPORT_TIMEOUT = 10.0
"""Seconds a plugin's module may take to import before it is reported as hung."""

T = TypeVar("T")
FactoryCallable = Callable[..., object]
_PLAIN_OPTION_TYPES = (bool, int, float, str)


class Plugin:
    """A candidate backend of one kind: an entry point, an in-process registration, or a kind
    of this project that is not installed. Not thread-safe; the registry serialises access."""

    def __init__(
        self,
        kind: str,
        source: RecordSource,
        *,
        entry: DiscoveredEntryPoint | None = None,
        factory: FactoryCallable | None = None,
        known: KnownKind | None = None,
        import_timeout: float = DEFAULT_IMPORT_TIMEOUT,
    ) -> None:
        self.kind = kind
        self.source = source
        self.entry = entry
        self.known = known
        self.shadowed_by: str | None = None
        self.chosen = False
        self.import_timeout = import_timeout
        self._factory = factory
        self._error: BackendLoadError | None = None
        self._create_error: BackendLoadError | None = None
        self._output = ""
        self._probed = False
        self._reason: str | None = None
        self.invalid_name = entry is not None and not is_valid_kind(kind)
        """An entry point whose name no spec can name: listed, never loaded or chosen."""
        if factory is not None:
            self._check_factory(factory)

    # Identity.

    @property
    def distribution(self) -> str | None:
        return self.entry.distribution if self.entry is not None else None

    @property
    def version(self) -> str | None:
        return self.entry.version if self.entry is not None else None

    @property
    def is_ours(self) -> bool:
        return is_ours(self.distribution)

    @property
    def label(self) -> str:
        """The kind and where it comes from, for messages: 'cuda' (isagellm-backend-cuda 0.6.0)."""
        if self.source is RecordSource.REGISTERED:
            return f"{self.kind!r} (registered in this process)"
        if self.distribution is None:
            return repr(self.kind)
        return f"{self.kind!r} ({self.distribution} {self.version})"

    @property
    def loaded(self) -> bool:
        return self._factory is not None

    @property
    def priority(self) -> int | None:
        if isinstance(self._factory, BackendFactory):
            return self._factory.priority
        return 0 if self._factory is not None else None

    @property
    def alias_of(self) -> str | None:
        """The kind this entry stands for when its name is an alias of another kind."""
        if isinstance(self._factory, BackendFactory) and self._factory.kind != self.kind:
            return self._factory.kind
        if self.known is not None and (self.entry is None or self.is_ours):
            return self.known.alias_of
        return None

    @property
    def target_kind(self) -> str:
        return self.alias_of or self.kind

    # Loading and probing.

    def load(self) -> FactoryCallable:
        """The factory, imported on first use; a failure is cached and raised again."""
        if self._error is not None:
            raise self._error
        if self._factory is not None:
            return self._factory
        if self.entry is None:
            raise AssertionError(f"{self.kind!r} has neither an entry point nor a factory")
        reason = requirement_mismatch(self.entry.requires_core)
        if reason is not None:
            raise self._fail(self._incompatible(reason))
        outcome = self._isolated(
            self.entry.entry_point.load, self.import_timeout, f"sagellm-import-{self.kind}"
        )
        dist = self.distribution or "the plugin"
        if outcome.hung:
            raise self._fail(
                BackendLoadError(
                    f"importing the entry point {self.entry.target!r} of backend {self.label} "
                    f"hung: it did not finish within {self.import_timeout:g} s",
                    hint=f"fix or uninstall {dist}; to wait longer, set "
                    f"SAGELLM_PLUGIN_IMPORT_TIMEOUT to more seconds",
                )
            )
        if outcome.error is not None:
            exc = outcome.error
            error = BackendLoadError(
                f"backend {self.label} failed to import its entry point "
                f"{self.entry.target!r}: {type(exc).__name__}: {exc}",
                hint=f"fix or reinstall {dist}; the original error is chained below",
            )
            raise self._fail(error) from exc
        loaded: object = outcome.value
        if not callable(loaded):
            raise self._fail(
                BackendLoadError(
                    f"entry point {self.entry.target!r} of backend {self.label} is a "
                    f"{type(loaded).__name__}, not a factory",
                    hint="point the entry point at a BackendFactory or a factory(config) function",
                )
            )
        problem = _contract_problem(self.kind, loaded)
        if problem is not None:
            raise self._fail(problem)
        self._factory = loaded
        return loaded

    def probe(self, timeout: float) -> str | None:
        """None if the backend can run here, else why not; cached. Raises if the probe fails."""
        factory = self.load()
        if self._probed:
            return self._reason
        if not isinstance(factory, BackendFactory):
            self._set_reason(None)
            return None
        outcome = self._isolated(factory.unavailable_reason, timeout, f"sagellm-probe-{self.kind}")
        if outcome.hung:
            raise self._fail(
                BackendLoadError(
                    f"the availability probe of backend {self.label} did not return within "
                    f"{timeout:g} s",
                    hint="a probe must be cheap (no device context); report this to the plugin",
                )
            )
        if outcome.error is not None:
            exc = outcome.error
            error = BackendLoadError(
                f"the availability probe of backend {self.label} raised "
                f"{type(exc).__name__}: {exc}",
                hint="this is a fault in the plugin; the original error is chained below",
            )
            raise self._fail(error) from exc
        reason = outcome.value
        if reason is not None and not isinstance(reason, str):
            raise self._fail(
                BackendLoadError(
                    f"the availability probe of backend {self.label} returned "
                    f"{type(reason).__name__}, not a reason string or None",
                    hint="this is a fault in the plugin",
                )
            )
        self._set_reason(reason)
        return reason

    def mark_unavailable(self, reason: str) -> None:
        """Record that creation found the backend unavailable after its probe said otherwise."""
        self._set_reason(reason)

    # Options and creation.

    def options(self) -> tuple[Option, ...]:
        """The options the factory declares; a plain factory's are those its defaults type."""
        factory = self.load()
        if isinstance(factory, BackendFactory):
            return tuple(factory.options.values())
        declared, _ = _signature_options(factory)
        return tuple(option for option in declared.values() if option is not None)

    def validate_options(self, options: Mapping[str, object]) -> dict[str, object]:
        """Options converted to their declared types; an undeclared name is refused."""
        factory = self.load()
        if isinstance(factory, BackendFactory):
            return dict(factory.validate_options(options))
        declared, open_ended = _signature_options(factory)
        unknown = sorted(set(options) - set(declared))
        if unknown and not open_ended:
            raise UnknownOptionError(
                f"backend {self.kind!r} has no option {', '.join(unknown)}",
                hint=f"use one of its options: {', '.join(sorted(declared)) or '(none)'}",
            )
        values: dict[str, object] = {}
        for name, value in options.items():
            option = declared.get(name)
            values[name] = option.convert(value) if option is not None else value
        return values

    def create(self, config: BackendConfig, options: Mapping[str, object]) -> BackendProvider[Any]:
        """Call the factory as ``factory(config, **options)`` (a BackendFactory without its
        probe, which :meth:`probe` ran) and check what it returns."""
        factory = self.load()
        try:
            if isinstance(factory, BackendFactory):
                provider = factory.create_probed(config, **options)
            else:
                provider = factory(config, **options)
        except BackendLoadError as exc:
            self._create_error = exc
            raise
        except BackendError:
            raise
        except BaseException as exc:
            if not is_plugins_own(exc):
                raise
            error = BackendLoadError(
                f"the factory of backend {self.label} raised {type(exc).__name__}: {exc}",
                hint="this is a fault in the plugin or its environment; "
                "the original error is chained below",
            )
            self._create_error = error
            raise error from exc
        if not isinstance(provider, BackendProvider):
            missing = [name for name in _provider_members() if not hasattr(provider, name)]
            self._create_error = BackendLoadError(
                f"the factory of backend {self.label} returned a {type(provider).__name__}, "
                f"which is not a BackendProvider (missing: {', '.join(missing)})",
                hint="a factory must return an object satisfying sagellm_backend.BackendProvider",
            )
            raise self._create_error
        self._create_error = None
        return provider

    # Records.

    def record(self) -> BackendRecord:
        factory = self._factory
        return BackendRecord(
            kind=self.kind,
            status=self._status(),
            source=self.source,
            distribution=self.distribution or (self.known.distribution if self.known else None),
            version=self.version,
            target=self.entry.target if self.entry is not None else _qualname(factory),
            aliases=self._aliases(),
            alias_of=self.alias_of,
            priority=self.priority,
            api_version=factory.api_version if isinstance(factory, BackendFactory) else None,
            loaded=self.loaded,
            reason=self._status_reason(),
            install=self.known.install
            if self.known is not None and self.source is RecordSource.KNOWN
            else None,
            chosen=self.chosen,
            output=self._output or None,
        )

    def _aliases(self) -> tuple[str, ...]:
        """The other names of this kind, on its own record only: an alias's names its kind."""
        if self.alias_of is not None:
            return ()
        if isinstance(self._factory, BackendFactory):
            return self._factory.aliases
        if self.known is not None and (self.entry is None or self.is_ours):
            return known_aliases(self.kind)
        return ()

    def _status(self) -> RecordStatus:
        if self.source is RecordSource.KNOWN:
            return RecordStatus.NOT_INSTALLED
        if self.invalid_name:
            return RecordStatus.INVALID_NAME
        if self.shadowed_by is not None:
            return RecordStatus.SHADOWED
        if isinstance(self._error, IncompatiblePluginError):
            return RecordStatus.INCOMPATIBLE
        if self._error is not None or self._create_error is not None:
            return RecordStatus.BROKEN
        if not self._probed:
            return RecordStatus.FOUND
        return RecordStatus.AVAILABLE if self._reason is None else RecordStatus.UNAVAILABLE

    def _status_reason(self) -> str | None:
        if self.source is RecordSource.KNOWN and self.known is not None:
            return f"not installed; {self.known.install}"
        if self.invalid_name:
            return (
                f"entry point name {self.kind!r} is not a backend kind, so no spec can select "
                f"it; {self.distribution or 'its distribution'} must rename it ({KIND_RULE})"
            )
        if self.shadowed_by is not None:
            return self.shadowed_by
        if self._error is not None:
            return self._error.message
        if self._create_error is not None:
            return self._create_error.message
        return self._reason

    # Internals.

    def _set_reason(self, reason: str | None) -> None:
        self._probed = True
        self._reason = reason

    def _isolated(self, fn: Callable[[], T], deadline: float, name: str) -> Outcome[T]:
        outcome = isolated_call(fn, deadline=deadline, name=name)
        self._output += outcome.output
        return outcome

    def _fail(self, error: BackendLoadError) -> BackendLoadError:
        self._error = error
        return error

    def _incompatible(self, reason: str) -> IncompatiblePluginError:
        dist = self.distribution or "the plugin"
        fix = (
            f"reinstall it from the sagellm-backend checkout of version {__version__}: "
            f"pip install ./packages/{normalize_dist_name(dist)}"
            if self.is_ours
            else f"install a release of {dist} built for isagellm-backend {__version__} "
            f"(backend API {API_VERSION})"
        )
        return IncompatiblePluginError(
            f"backend {self.label} is incompatible with isagellm-backend {__version__} "
            f"(backend API {API_VERSION}): {reason}",
            hint=fix,
        )

    def _check_factory(self, factory: FactoryCallable) -> None:
        problem = _contract_problem(self.kind, factory)
        if problem is not None:
            raise problem


def _contract_problem(kind: str, factory: FactoryCallable) -> BackendLoadError | None:
    """What is wrong with ``factory`` as the factory of ``kind``, judged without calling it."""
    if isinstance(factory, BackendFactory):
        mismatch = api_mismatch(factory.api_version)
        if mismatch is not None:
            return IncompatiblePluginError(
                f"backend {kind!r} is incompatible with isagellm-backend {__version__} "
                f"(backend API {API_VERSION}): {mismatch}",
                hint=f"install a release of the plugin built for backend API {API_VERSION}",
            )
        if kind not in (factory.kind, *factory.aliases):
            return BackendLoadError(
                f"entry point {kind!r} points to the factory of kind {factory.kind!r}, "
                f"whose aliases are {list(factory.aliases)}",
                hint="name the entry point after the factory's kind or one of its aliases",
            )
        return None
    import inspect  # deferred: only a plain function factory needs it, not the built-in kinds

    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError) as exc:
        return BackendLoadError(
            f"the factory of backend {kind!r} has no inspectable signature ({exc})",
            hint="use a BackendFactory or a Python function factory(config=None, **options)",
        )
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].name != "config" or params[0].kind not in positional:
        return BackendLoadError(
            f"the factory of backend {kind!r} does not take 'config' as its first parameter",
            hint="sageLLM calls factory(config); declare it as factory(config=None, **options)",
        )
    return None


def _signature_options(factory: FactoryCallable) -> tuple[dict[str, Option | None], bool]:
    """Options a plain factory accepts (typed by its defaults), and whether it takes **kwargs."""
    import inspect

    declared: dict[str, Option | None] = {}
    open_ended = False
    for param in list(inspect.signature(factory).parameters.values())[1:]:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
        elif param.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            default = param.default
            if type(default) in _PLAIN_OPTION_TYPES:
                declared[param.name] = Option(param.name, type(default), default, "")
            else:
                declared[param.name] = None
    return declared, open_ended


@functools.cache
def _provider_members() -> tuple[str, ...]:
    return tuple(sorted(n for n in dir(BackendProvider) if not n.startswith("_")))


def _qualname(factory: object) -> str | None:
    if factory is None:
        return None
    if isinstance(factory, BackendFactory):
        return repr(factory)
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", type(factory).__qualname__)
    return f"{module}:{name}" if module else str(name)
