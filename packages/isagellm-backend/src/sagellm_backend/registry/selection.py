"""The backend registry: finds candidates, resolves config strings, and creates providers.

Selection rules (docs/selection.md):

- A fallback list ``a,b`` tries each candidate in order and moves on only when one is
  unavailable here (its probe gives a reason, its factory raises BackendUnavailableError, or it
  is a kind of this project whose wheel is not installed). A candidate that is broken (fails to
  import, its probe or factory raises, it returns something that is not a provider), that is
  incompatible, or that is given an unknown option raises at once.
- ``auto`` creates the highest-priority available backend other than the mock. If a broken or
  incompatible plugin could have outranked it, auto raises that plugin's error instead of
  quietly settling for less.
- Two distributions claiming one kind: a distribution of this project wins over a foreign one;
  otherwise the distribution whose normalised name sorts first. The other stays listed as
  shadowed, and a warning names both. A kind registered in this process with
  ``register_backend(..., replace=True)`` shadows the entry point of that kind.
- With no spec, ``SAGELLM_BACKEND`` supplies one; with neither, the mock is used. A
  ``SAGELLM_BACKEND`` that is set but blank is refused like a blank spec.
- Each plugin's import has a deadline (``import_timeout``, else
  ``$SAGELLM_PLUGIN_IMPORT_TIMEOUT``, else 10 s); one that runs past it is reported as hung.
- An entry point whose name is not a valid kind (upper case, ``auto``) is listed as
  ``invalid_name`` and never loaded or chosen.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sagellm_backend.errors import (
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstalledError,
    BackendUnavailableError,
    IncompatiblePluginError,
    InvalidArgumentError,
    InvalidSpecError,
    close_match,
)
from sagellm_backend.factory import BackendFactory, Option
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry.discovery import GROUP, builtin_entry_points, discover
from sagellm_backend.registry.known import (
    CORE_DISTRIBUTION,
    KNOWN_KINDS,
    KnownKind,
    normalize_dist_name,
)
from sagellm_backend.registry.plugins import DEFAULT_IMPORT_TIMEOUT, KIND_RULE, Plugin
from sagellm_backend.registry.records import BackendRecord, RecordSource, RecordStatus
from sagellm_backend.registry.spec import (
    AUTO,
    BackendConfig,
    BackendSpec,
    Candidate,
    is_valid_kind,
    parse_spec,
)

if TYPE_CHECKING:
    import logging

__all__ = [
    "DEFAULT_IMPORT_TIMEOUT",
    "DEFAULT_SPEC",
    "ENV_VAR",
    "IMPORT_TIMEOUT_ENV_VAR",
    "SIMULATED_KINDS",
    "BackendRegistry",
]

ENV_VAR = "SAGELLM_BACKEND"
"""Environment variable that supplies the spec when a caller gives none."""

IMPORT_TIMEOUT_ENV_VAR = "SAGELLM_PLUGIN_IMPORT_TIMEOUT"
"""Environment variable: seconds a plugin's import may take (default DEFAULT_IMPORT_TIMEOUT)."""

DEFAULT_SPEC = "mock"
"""Spec used when neither the caller nor SAGELLM_BACKEND gives one: a fresh install works."""

SIMULATED_KINDS = frozenset({"mock"})
"""Kinds ``auto`` never chooses."""

DEVICE_IDS = Option("device_ids", tuple, None, "device indices, joined with '+'")
"""Option every spec accepts: it travels in the config object, not as a keyword option."""


class _Logger:
    """The ``sagellm_backend.registry`` logger, importing ``logging`` on first use that can show.

    An INFO record is dropped while ``logging`` is not imported: nothing can have configured a
    handler or a level that would show it, so a start-up need not import ``logging`` for it.
    """

    name = "sagellm_backend.registry"

    def info(self, message: str, *args: object) -> None:
        if "logging" in sys.modules:
            self._get().info(message, *args)

    def warning(self, message: str, *args: object) -> None:
        self._get().warning(message, *args)

    def error(self, message: str, *args: object) -> None:
        self._get().error(message, *args)

    def _get(self) -> logging.Logger:
        import logging

        return logging.getLogger(self.name)


logger = _Logger()


class BackendRegistry:
    """Backend candidates of one entry-point group plus in-process registrations. Thread-safe.

    Nothing is discovered before the first lookup, and no plugin module is imported before a
    backend of its kind is asked for (or listed with probing).
    """

    def __init__(
        self,
        *,
        group: str = GROUP,
        probe_timeout: float = 10.0,
        import_timeout: float | None = None,
        known: Mapping[str, KnownKind] = KNOWN_KINDS,
    ) -> None:
        self._group = group
        self._probe_timeout = _seconds("probe_timeout", probe_timeout)
        self._import_timeout = (
            None if import_timeout is None else _seconds("import_timeout", import_timeout)
        )
        self._known = dict(known)
        self._lock = threading.RLock()
        self._entries: list[Plugin] | None = None
        self._registered: dict[str, Plugin] = {}
        self._table: dict[str, Plugin] = {}

    # Public API.

    def get_backend(self, spec: str | None = None, **options: object) -> BackendProvider[Any]:
        """Create a provider for ``spec`` (see docs/config-strings.md); keywords override the
        options written in the spec."""
        text = self._spec_text(spec)
        parsed = self.resolve_spec(spec)
        if parsed.is_auto:
            return self._create_auto(text, options)
        return self._create_first(text, parsed.candidates, options)

    def resolve_spec(self, spec: str | None = None) -> BackendSpec:
        """The parsed spec that ``get_backend(spec)`` uses: ``spec``, else ``$SAGELLM_BACKEND``
        (refused when set but blank or malformed), else the mock."""
        text = self._spec_text(spec)
        return parse_spec(text) if spec is not None else self._parse_default(text)

    def list_backends(self, *, probe: bool = True) -> list[BackendRecord]:
        """A record per candidate; with ``probe``, each installed backend is loaded and probed."""
        with self._lock:
            table = self._ensure_table()
            if probe:
                for plugin in table.values():
                    if plugin.source is not RecordSource.KNOWN:
                        try:
                            plugin.probe(self._probe_timeout)
                        except BackendLoadError as exc:
                            logger.warning("backend %s cannot be used: %s", plugin.label, exc)
            plugins = [*self._all_plugins(), *self._not_installed()]
            records = [p.record() for p in plugins]
        return sorted(
            records, key=lambda r: (r.kind, r.status is RecordStatus.SHADOWED, r.distribution or "")
        )

    def options(self, kind: str) -> tuple[Option, ...]:
        """Every option a spec of ``kind`` accepts: the backend's own, then ``device_ids``."""
        with self._lock:
            declared = self._lookup(kind).options()
        if any(option.name == DEVICE_IDS.name for option in declared):
            return declared
        return (*declared, DEVICE_IDS)

    def record(self, kind: str) -> BackendRecord:
        """The record of the candidate that ``kind`` resolves to."""
        with self._lock:
            return self._lookup(kind).record()

    def register_backend(
        self,
        kind: str,
        factory: Callable[..., object],
        *,
        replace: bool = False,
    ) -> BackendRecord:
        """Register ``factory`` for ``kind`` in this process (and for the aliases of a
        BackendFactory registered under its own kind). An existing kind is only shadowed with
        ``replace=True``."""
        if not is_valid_kind(kind):
            raise InvalidArgumentError(
                f"{kind!r} is not a valid backend kind", hint=f"name it with {KIND_RULE}"
            )
        if not callable(factory):
            raise InvalidArgumentError(
                f"the factory of {kind!r} must be callable, got {type(factory).__name__}",
                hint="pass a BackendFactory or a function factory(config=None, **options)",
            )
        try:
            plugin = Plugin(kind, RecordSource.REGISTERED, factory=factory)
        except IncompatiblePluginError:
            raise
        except BackendLoadError as exc:
            raise InvalidArgumentError(exc.message, hint=exc.hint) from None
        names = (kind, *_aliases(factory, kind))
        with self._lock:
            table = self._ensure_table()
            taken = [
                table[n] for n in names if n in table and table[n].source is not RecordSource.KNOWN
            ]
            if taken and not replace:
                raise InvalidArgumentError(
                    f"backend kind {taken[0].kind!r} is already provided by {taken[0].label}",
                    hint="pass replace=True to use yours instead in this process",
                )
            for name in names:
                self._registered[name] = (
                    plugin
                    if name == kind
                    else Plugin(name, RecordSource.REGISTERED, factory=factory)
                )
            self._rebuild()
            return plugin.record()

    def refresh(self) -> None:
        """Forget discovery, load and probe results; the next lookup reads metadata again."""
        with self._lock:
            self._entries = None
            self._registered = {
                name: Plugin(name, RecordSource.REGISTERED, factory=p.load())
                for name, p in self._registered.items()
            }
            self._table = {}

    # Selection.

    def _create_first(
        self, text: str, candidates: tuple[Candidate, ...], options: Mapping[str, object]
    ) -> BackendProvider[Any]:
        with self._lock:
            plugins = [self._lookup(c.kind) for c in candidates]
        single = len(candidates) == 1
        passed: list[tuple[str, str]] = []
        for candidate, plugin in zip(candidates, plugins, strict=True):
            if plugin.source is RecordSource.KNOWN:
                known = plugin.known
                assert known is not None
                if single:
                    raise BackendNotInstalledError(
                        f"backend {plugin.kind!r} is provided by {known.distribution}, "
                        "which is not installed",
                        hint=known.install,
                    )
                passed.append((str(candidate), f"not installed ({known.install})"))
                continue
            with self._lock:
                plugin.load()
                config, merged = _config_for(plugin, candidate, options)
                values = plugin.validate_options(merged)
                reason = plugin.probe(self._probe_timeout)
            if reason is None:
                try:
                    return self._create(plugin, config, values, text, passed)
                except BackendUnavailableError as exc:
                    if single:
                        raise
                    reason = exc.message
            elif single:
                raise BackendUnavailableError(
                    f"backend {plugin.label} is unavailable: {reason}",
                    hint=_install_hint(plugin, reason),
                )
            passed.append((str(candidate), reason))
        raise BackendUnavailableError(
            f"no backend of {text!r} can run here: " + "; ".join(f"{k}: {r}" for k, r in passed),
            hint="install or enable one of them, or add a fallback such as ',mock' for testing",
        )

    def _create_auto(self, text: str, options: Mapping[str, object]) -> BackendProvider[Any]:
        passed: list[tuple[str, str]] = []
        usable: list[Plugin] = []
        broken: list[tuple[Plugin, BackendLoadError]] = []
        with self._lock:
            table = self._ensure_table()
            for name, plugin in sorted(table.items()):
                if plugin.source is RecordSource.KNOWN:
                    continue
                if name in SIMULATED_KINDS:
                    passed.append((name, "auto never chooses a simulated backend"))
                    continue
                try:
                    reason = plugin.probe(self._probe_timeout)
                except BackendLoadError as exc:
                    broken.append((plugin, exc))
                    continue
                if plugin.alias_of is not None and plugin.alias_of in table:
                    continue
                if plugin.target_kind in SIMULATED_KINDS:
                    passed.append((name, "auto never chooses a simulated backend"))
                elif reason is not None:
                    passed.append((name, reason))
                else:
                    usable.append(plugin)
        usable.sort(key=lambda p: (-(p.priority or 0), p.kind))
        for position, plugin in enumerate(usable):
            priority = plugin.priority or 0
            for other, error in broken:
                if other.priority is None or other.priority >= priority:
                    logger.error(
                        "auto cannot choose: backend %s may outrank %s and is broken",
                        other.label,
                        plugin.label,
                    )
                    raise error
            config, merged = _config_for(plugin, Candidate(plugin.target_kind), options)
            with self._lock:
                values = plugin.validate_options(merged)
            others = [
                *passed,
                *((p.kind, f"lower priority than {plugin.kind!r}") for p in usable[position + 1 :]),
                *((p.kind, f"broken: {e.message}") for p, e in broken),
            ]
            try:
                return self._create(plugin, config, values, text, others)
            except BackendUnavailableError as exc:
                passed.append((plugin.kind, exc.message))
        if broken:
            raise broken[0][1]
        with self._lock:
            missing = sorted(
                {p.known.install for p in self._not_installed() if p.known and not p.alias_of}
                - {self._known[k].install for k in SIMULATED_KINDS if k in self._known}
            )
        steps = [
            *(["fix a reason above"] if any(k not in SIMULATED_KINDS for k, _ in passed) else []),
            *([f"install a backend ({'; '.join(missing)})"] if missing else []),
            "ask for 'mock' explicitly",
        ]
        raise BackendUnavailableError(
            "auto found no available backend other than the mock"
            + (": " + "; ".join(f"{k}: {r}" for k, r in passed) if passed else ""),
            hint=", or ".join(steps),
        )

    def _create(
        self,
        plugin: Plugin,
        config: BackendConfig,
        values: Mapping[str, object],
        text: str,
        passed: list[tuple[str, str]],
    ) -> BackendProvider[Any]:
        try:
            provider = plugin.create(config, values)
        except BackendUnavailableError as exc:
            with self._lock:
                plugin.mark_unavailable(exc.message)
            raise
        with self._lock:
            plugin.chosen = True
        if passed:
            logger.info(
                "backend %s chosen for %r; passed over: %s",
                plugin.label,
                text,
                "; ".join(f"{k}: {r}" for k, r in passed),
            )
        else:
            logger.info("backend %s chosen for %r", plugin.label, text)
        return provider

    # Lookup.

    def _lookup(self, kind: str) -> Plugin:
        table = self._ensure_table()
        plugin = table.get(kind)
        if plugin is not None:
            return plugin
        kinds = sorted(table)
        misnamed = [p for p in self._entries or () if p.invalid_name and p.kind.lower() == kind]
        near = close_match(kind, [*kinds, AUTO])
        if misnamed:
            hint = (
                f"the entry point {misnamed[0].kind!r} of {misnamed[0].distribution} has an "
                f"invalid name; its distribution must rename it to {kind!r}"
            )
        elif near:
            hint = f"did you mean {near[0]!r}?"
        else:
            hint = (
                "install the plugin that provides it (see `sagellm-backend list`); a plugin "
                f"provides a kind through an entry point in the {self._group!r} group"
            )
        raise BackendNotFoundError(
            f"unknown backend kind {kind!r}; known kinds: {', '.join(kinds) or '(none)'}",
            hint=hint,
        )

    def _ensure_table(self) -> dict[str, Plugin]:
        if self._entries is None:
            deadline = self._import_deadline()
            found = discover(self._group)
            entries = [(d, RecordSource.ENTRY_POINT) for d in found]
            if self._group == GROUP and not any(
                normalize_dist_name(d.distribution or "") == CORE_DISTRIBUTION for d in found
            ):
                entries += [(d, RecordSource.BUILTIN) for d in builtin_entry_points(self._group)]
            plugins = [
                Plugin(
                    d.kind,
                    source,
                    entry=d,
                    known=self._known.get(d.kind),
                    import_timeout=deadline,
                )
                for d, source in entries
            ]
            self._entries = plugins
            self._rebuild(warn=True)
        return self._table

    def _rebuild(self, *, warn: bool = False) -> None:
        """Recompute which candidate serves each kind and why the others are shadowed."""
        table: dict[str, Plugin] = {
            k: Plugin(k, RecordSource.KNOWN, known=known) for k, known in self._known.items()
        }
        by_kind: dict[str, list[Plugin]] = {}
        for plugin in self._entries or ():
            plugin.shadowed_by = None
            if plugin.invalid_name:
                if warn:
                    logger.warning(
                        "backend entry point %r of %s %s has an invalid name; it is never chosen",
                        plugin.kind,
                        plugin.distribution,
                        plugin.version,
                    )
                continue
            by_kind.setdefault(plugin.kind, []).append(plugin)
        for kind, claimants in by_kind.items():
            claimants.sort(key=lambda p: (not p.is_ours, normalize_dist_name(p.distribution or "")))
            winner = claimants[0]
            for loser in claimants[1:]:
                rule = (
                    "a distribution of this project wins over another one"
                    if winner.is_ours and not loser.is_ours
                    else "of equal standing, the first distribution name in sort order wins"
                )
                loser.shadowed_by = (
                    f"kind {kind!r} is also provided by {winner.distribution} {winner.version}, "
                    f"which is used ({rule})"
                )
                if warn:
                    logger.warning(
                        "backend kind %r is registered by both %s %s and %s %s; using %s (%s)",
                        kind,
                        winner.distribution,
                        winner.version,
                        loser.distribution,
                        loser.version,
                        winner.distribution,
                        rule,
                    )
            table[kind] = winner
        for kind, plugin in self._registered.items():
            shadowed = table.get(kind)
            if shadowed is not None and shadowed.source is not RecordSource.KNOWN:
                shadowed.shadowed_by = (
                    f"kind {kind!r} is registered in this process with register_backend(), "
                    "which is used instead"
                )
            table[kind] = plugin
        self._table = table

    def _all_plugins(self) -> list[Plugin]:
        return [*(self._entries or ()), *self._registered.values()]

    def _not_installed(self) -> list[Plugin]:
        return [p for p in self._table.values() if p.source is RecordSource.KNOWN]

    # Spec text.

    def _import_deadline(self) -> float:
        if self._import_timeout is not None:
            return self._import_timeout
        text = os.environ.get(IMPORT_TIMEOUT_ENV_VAR)
        if text is None:
            return DEFAULT_IMPORT_TIMEOUT
        try:
            return _seconds(IMPORT_TIMEOUT_ENV_VAR, float(text))
        except (InvalidArgumentError, ValueError):
            raise InvalidArgumentError(
                f"{IMPORT_TIMEOUT_ENV_VAR}={text!r} is not a positive number of seconds",
                hint=f"set {IMPORT_TIMEOUT_ENV_VAR} to seconds such as 30, or unset it for "
                f"{DEFAULT_IMPORT_TIMEOUT:g} s",
            ) from None

    def _spec_text(self, spec: str | None) -> str:
        if spec is not None:
            return spec
        from_env = os.environ.get(ENV_VAR)
        if from_env is not None:
            return from_env
        logger.info("no backend spec given and %s is not set; using %r", ENV_VAR, DEFAULT_SPEC)
        return DEFAULT_SPEC

    def _parse_default(self, text: str) -> BackendSpec:
        try:
            return parse_spec(text)
        except InvalidSpecError as exc:
            raise InvalidSpecError(
                f"{exc.message} (read from {ENV_VAR})",
                hint=f"set {ENV_VAR} to a valid spec, or unset it to use {DEFAULT_SPEC!r}; "
                f"{exc.hint}",
            ) from None


def _config_for(
    plugin: Plugin, candidate: Candidate, options: Mapping[str, object]
) -> tuple[BackendConfig, dict[str, object]]:
    """The config object for ``candidate`` and the options left for keywords.

    Keyword options override those written in the spec; ``device_ids`` moves into the config.
    """
    merged: dict[str, object] = {**candidate.option_dict, **options}
    raw_ids = merged.pop(DEVICE_IDS.name, None)
    ids = None
    if raw_ids is not None:
        converted = DEVICE_IDS.convert(raw_ids)
        assert isinstance(converted, tuple)
        ids = converted
    device = None if candidate.index is None else str(candidate.index)
    return BackendConfig(plugin.target_kind, device, ids), merged


def _install_hint(plugin: Plugin, reason: str) -> str:
    factory = plugin.load()
    if isinstance(factory, BackendFactory):
        return factory.hint_for(reason)
    return "pick a backend that can run here (`sagellm-backend list`), or add a fallback"


def _seconds(name: str, value: object) -> float:
    """A positive finite number of seconds, else InvalidArgumentError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds, got {value!r}",
            hint=f"pass {name} as an int or float, such as 10.0",
        )
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(
            f"{name} must be a positive finite number of seconds, got {value!r}",
            hint=f"pass {name} greater than 0, such as 10.0",
        )
    return float(value)


def _aliases(factory: Callable[..., object], kind: str) -> tuple[str, ...]:
    if isinstance(factory, BackendFactory) and factory.kind == kind:
        return factory.aliases
    return ()
