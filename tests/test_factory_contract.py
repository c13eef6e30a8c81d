"""The factory contract existing sageLLM callers rely on, for every kind our wheels register.

Those callers load a ``sagellm.backends`` entry point by kind and call ``factory(config)``, with
config None or an object carrying ``kind``, ``device`` (None, "N" or "kind:N") and
``device_ids``, usually a pydantic model. Each kind must then give a provider, or, where its
hardware is absent, our BackendUnavailableError with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import pytest

from sagellm_backend import BackendProvider, BackendUnavailableError, DeviceRef, ErrorCode
from sagellm_backend.factory import BackendFactory

GROUP = "sagellm.backends"
OURS = re.compile(r"^isagellm[-_.]backend([-_.].*)?$", re.IGNORECASE)

ConfigFactory = Callable[[str, str | None, list[int] | None], object]


@dataclass
class DataclassConfig:
    """A caller's config as a plain dataclass."""

    kind: str
    device: str | None = None
    device_ids: list[int] | None = None


def _config_types() -> dict[str, ConfigFactory]:
    types: dict[str, ConfigFactory] = {
        "dataclass": lambda kind, device, ids: DataclassConfig(kind, device, ids)
    }
    if importlib.util.find_spec("pydantic") is not None:
        pydantic = importlib.import_module("pydantic")
        model = pydantic.create_model(
            "BackendConfig",
            kind=(str, ...),
            device=(str | None, None),
            device_ids=(list[int] | None, None),
        )
        types["pydantic"] = lambda kind, device, ids: model(
            kind=kind, device=device, device_ids=ids
        )
    return types


def _our_entry_points() -> list[metadata.EntryPoint]:
    found = [
        ep
        for ep in metadata.entry_points(group=GROUP)
        if ep.dist is not None and OURS.match(ep.dist.metadata["Name"])
    ]
    return sorted(found, key=lambda ep: ep.name)


CONFIG_TYPES = _config_types()
ENTRY_POINTS = _our_entry_points()
DEVICES: list[tuple[str, Callable[[str], str | None], list[int] | None]] = [
    ("no-device", lambda kind: None, None),
    ("index", lambda kind: "0", None),
    ("kind-index", lambda kind: f"{kind}:0", None),
    ("device-ids", lambda kind: None, [0]),
]


def _core_is_installed() -> bool:
    try:
        metadata.distribution("isagellm-backend")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_installed_core = pytest.mark.skipif(
    not _core_is_installed(),
    reason="isagellm-backend is not installed, so its entry points cannot be discovered "
    "(nox installs the built wheel)",
)


@needs_installed_core
def test_the_core_registers_the_mock() -> None:
    assert "mock" in {ep.name for ep in ENTRY_POINTS}


@needs_installed_core
@pytest.mark.parametrize("entry_point", ENTRY_POINTS, ids=lambda ep: ep.name)
def test_factory_with_no_config(entry_point: metadata.EntryPoint) -> None:
    check_factory(entry_point.load(), None, expect_index=None)


@needs_installed_core
@pytest.mark.parametrize("config_type", sorted(CONFIG_TYPES))
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d[0])
@pytest.mark.parametrize("entry_point", ENTRY_POINTS, ids=lambda ep: ep.name)
def test_factory_with_a_caller_config(
    entry_point: metadata.EntryPoint,
    device: tuple[str, Callable[[str], str | None], list[int] | None],
    config_type: str,
) -> None:
    _, device_for, device_ids = device
    config = CONFIG_TYPES[config_type](entry_point.name, device_for(entry_point.name), device_ids)
    expect_index = None if device_for(entry_point.name) is None and device_ids is None else 0
    check_factory(entry_point.load(), config, expect_index=expect_index)


@pytest.mark.parametrize("config_type", sorted(CONFIG_TYPES))
def test_absent_hardware_gives_the_unavailable_error(config_type: str) -> None:
    def never(**_: object) -> object:
        raise AssertionError("an unavailable backend must not be created")

    factory = BackendFactory(
        "cuda",
        never,
        probe=lambda: "no CUDA device is visible",
        install_hint="run on a machine with an NVIDIA GPU",
    )
    config = CONFIG_TYPES[config_type]("cuda", "cuda:0", None)
    with pytest.raises(BackendUnavailableError) as info:
        check_factory(factory, config, expect_index=0, raise_unavailable=True)
    assert info.value.message == "backend 'cuda' is unavailable: no CUDA device is visible"
    assert info.value.hint == "run on a machine with an NVIDIA GPU"


def check_factory(
    factory: object, config: object, *, expect_index: int | None, raise_unavailable: bool = False
) -> None:
    """Call ``factory(config)`` as a caller does; accept a provider or a well-formed refusal."""
    assert callable(factory)
    outcome = create(factory, config)
    if isinstance(outcome, BackendUnavailableError):
        assert outcome.code is ErrorCode.UNAVAILABLE
        match = re.match(r"backend '[a-z_]+' is unavailable: (?P<reason>.+)", outcome.message)
        assert match is not None, outcome.message
        assert match["reason"].strip()
        if raise_unavailable:
            raise outcome
        return
    assert isinstance(outcome, BackendProvider)
    try:
        device = DeviceRef.parse(outcome.device)
        assert device.kind == outcome.kind
        if expect_index is not None:
            assert device.index == expect_index
        outcome.capability()
    finally:
        outcome.close()


def create(factory: Callable[[object], object], config: object) -> object:
    """What ``factory(config)`` returns, or the unavailable error it raises."""
    try:
        return factory(config)
    except BackendUnavailableError as exc:
        return exc
