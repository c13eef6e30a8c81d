"""Selection rules on in-process registrations: specs, fallback, auto, options, env var, logs."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pytest

from sagellm_backend import (
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstalledError,
    BackendProvider,
    BackendUnavailableError,
    ErrorCode,
    IncompatiblePluginError,
    InvalidArgumentError,
    InvalidSpecError,
    UnknownOptionError,
    cli,
)
from sagellm_backend.factory import BackendFactory, DeviceSelection, Option
from sagellm_backend.mock import MockBackendProvider, create_mock_backend
from sagellm_backend.registry import (
    ENV_VAR,
    GROUP,
    BackendConfig,
    BackendRegistry,
    KnownKind,
    RecordStatus,
)


def mock_factory(
    kind: str,
    *,
    reason: str | None = None,
    priority: int = 10,
    aliases: tuple[str, ...] = (),
    probe: Callable[[], str | None] | None = None,
    create: Callable[..., object] | None = None,
    install_hint: str = "",
) -> BackendFactory[object]:
    """A real backend of ``kind`` (a mock device) whose probe reports ``reason``."""

    def make(*, device: DeviceSelection, memory_mb: int) -> MockBackendProvider:
        return MockBackendProvider(max_memory_mb=memory_mb, device_index=device.index or 0)

    return BackendFactory(
        kind,
        create or make,
        options=[Option("memory_mb", int, 64, "memory in MiB")],
        probe=probe or (lambda: reason),
        priority=priority,
        aliases=aliases,
        install_hint=install_hint,
    )


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> BackendRegistry:
    monkeypatch.delenv(ENV_VAR, raising=False)
    return BackendRegistry(
        known={"zpu": KnownKind("zpu", "isagellm-backend-zpu", "pip install isagellm-backend-zpu")}
    )


@pytest.fixture
def isolated() -> BackendRegistry:
    """A registry that sees no installed plugin: only the mock and what a test registers."""
    registry = BackendRegistry(group="sagellm.backends.isolated", known={})
    registry.register_backend("mock", create_mock_backend)
    return registry


def capability_memory(provider: BackendProvider[Any]) -> int | None:
    try:
        return provider.capability().max_memory_mb
    finally:
        provider.close()


# The spec: default, env var, index, options.


def test_no_spec_and_no_env_var_gives_the_mock(registry: BackendRegistry) -> None:
    provider = registry.get_backend()
    assert provider.kind == "mock"
    provider.close()


def test_env_var_supplies_the_spec_and_an_explicit_spec_wins(
    registry: BackendRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register_backend("npu_a", mock_factory("npu_a"))
    monkeypatch.setenv(ENV_VAR, " npu_a?memory_mb=32 ")
    assert capability_memory(registry.get_backend()) == 32
    assert registry.record("npu_a").chosen
    assert capability_memory(registry.get_backend("mock?max_memory_mb=8")) == 8


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_env_var_is_refused_like_a_blank_spec(
    registry: BackendRegistry, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    with pytest.raises(InvalidSpecError, match="empty") as direct:
        registry.get_backend(blank)
    monkeypatch.setenv(ENV_VAR, blank)
    with pytest.raises(InvalidSpecError, match=ENV_VAR) as info:
        registry.get_backend()
    assert info.value.code is direct.value.code is ErrorCode.INVALID_SPEC
    assert "backend spec is empty" in info.value.message
    assert info.value.hint is not None and "unset it to use 'mock'" in info.value.hint
    with pytest.raises(InvalidSpecError):
        registry.resolve_spec()
    assert str(registry.resolve_spec("cuda:1")) == "cuda:1"


def test_a_blank_env_var_is_a_user_error_in_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, "  ")
    assert cli.main(["info"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "[invalid_spec]" in err and ENV_VAR in err


def test_a_malformed_env_var_is_named_in_the_error(
    registry: BackendRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "cuda:one")
    with pytest.raises(InvalidSpecError, match=ENV_VAR) as info:
        registry.get_backend()
    assert "'one'" in info.value.message


def test_device_index_and_keyword_options_override_spec_options(registry: BackendRegistry) -> None:
    provider = registry.get_backend("mock:1?max_memory_mb=64", max_memory_mb=128)
    assert provider.device == "mock:1"
    assert capability_memory(provider) == 128


def test_an_unknown_kind_lists_the_known_ones_and_suggests_the_nearest(
    registry: BackendRegistry,
) -> None:
    with pytest.raises(BackendNotFoundError) as info:
        registry.get_backend("mokc")
    error = info.value
    assert error.code is ErrorCode.BACKEND_NOT_FOUND and isinstance(error, LookupError)
    assert "mock" in error.message and "zpu" in error.message
    assert error.hint == "did you mean 'mock'?"


def test_a_known_kind_that_is_not_installed_names_the_pip_install(
    registry: BackendRegistry,
) -> None:
    with pytest.raises(BackendNotInstalledError) as info:
        registry.get_backend("zpu:0")
    assert info.value.code is ErrorCode.BACKEND_NOT_INSTALLED
    assert info.value.hint == "pip install isagellm-backend-zpu"
    assert "isagellm-backend-zpu" in info.value.message


def test_an_unknown_option_is_refused_even_where_the_backend_is_unavailable(
    registry: BackendRegistry,
) -> None:
    registry.register_backend("npu_off", mock_factory("npu_off", reason="no NPU"))
    with pytest.raises(UnknownOptionError) as info:
        registry.get_backend("npu_off?memory_gb=1,mock")
    assert "memory_gb" in info.value.message and "memory_mb" in info.value.hint  # type: ignore[operator]
    with pytest.raises(UnknownOptionError):
        registry.get_backend("mock", memory_gb=1)


def test_a_bad_option_value_is_an_invalid_argument(registry: BackendRegistry) -> None:
    with pytest.raises(InvalidArgumentError, match="max_memory_mb"):
        registry.get_backend("mock?max_memory_mb=lots")


def float_options() -> list[tuple[str, str]]:
    """(kind, option) for every float option of every installed backend."""
    found = []
    for entry in metadata.entry_points(group=GROUP):
        factory = entry.load()
        if isinstance(factory, BackendFactory):
            found += [(entry.name, o.name) for o in factory.options.values() if o.type is float]
    return sorted(found)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "NaN"])
def test_a_non_finite_option_value_is_a_user_error_on_every_backend(
    registry: BackendRegistry, value: str
) -> None:
    options = float_options()
    assert ("cpu", "collective_timeout") in options and ("mock", "collective_timeout") in options
    for kind, option in options:
        for spec, keywords in ((f"{kind}?{option}={value}", {}), (kind, {option: float(value)})):
            with pytest.raises(InvalidArgumentError) as info:
                registry.get_backend(spec, **keywords)
            error = info.value
            assert error.code is ErrorCode.INVALID_ARGUMENT, (kind, option, error)
            assert not isinstance(error, BackendLoadError)
            assert "finite" in error.message and option in (error.hint or "")


def test_a_non_finite_option_value_exits_2_in_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["info", "cpu?collective_timeout=1e309"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "[invalid_argument]" in err and "collective_timeout" in err


# Fallback lists: move on only when unavailable.


def test_a_fallback_list_moves_past_unavailable_and_not_installed_backends(
    registry: BackendRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registry.register_backend("npu_off", mock_factory("npu_off", reason="no NPU in this host"))
    registry.register_backend("npu_on", mock_factory("npu_on"))
    with caplog.at_level(logging.INFO, logger="sagellm_backend.registry"):
        provider = registry.get_backend("zpu,npu_off,npu_on,mock")
    provider.close()
    assert registry.record("npu_on").chosen
    assert not registry.record("mock").chosen
    message = caplog.records[-1].getMessage()
    assert "'npu_on'" in message and "chosen" in message
    assert "npu_off: no NPU in this host" in message
    assert "zpu: not installed (pip install isagellm-backend-zpu)" in message
    assert registry.record("npu_off").status is RecordStatus.UNAVAILABLE


def test_a_factory_that_finds_its_device_missing_counts_as_unavailable(
    registry: BackendRegistry,
) -> None:
    def create(**_: object) -> object:
        raise BackendUnavailableError("device 0 was taken by another process")

    registry.register_backend("npu_busy", mock_factory("npu_busy", create=create))
    registry.get_backend("npu_busy,mock").close()
    record = registry.record("npu_busy")
    assert record.status is RecordStatus.UNAVAILABLE
    assert record.reason == "device 0 was taken by another process"
    with pytest.raises(BackendUnavailableError, match="taken by another process"):
        registry.get_backend("npu_busy")


@pytest.mark.parametrize(
    ("fault", "cause"),
    [("factory raises", RuntimeError), ("probe raises", OSError), ("returns junk", None)],
)
def test_a_broken_backend_raises_and_never_falls_through(
    registry: BackendRegistry, fault: str, cause: type[BaseException] | None
) -> None:
    def failing_create(**_: object) -> object:
        raise RuntimeError("driver returned CUDA_ERROR_UNKNOWN")

    def failing_probe() -> str | None:
        raise OSError("cannot open /dev/npu0")

    factory = {
        "factory raises": mock_factory("npu_bad", create=failing_create),
        "probe raises": mock_factory("npu_bad", probe=failing_probe),
        "returns junk": mock_factory("npu_bad", create=lambda **_: object()),
    }[fault]
    registry.register_backend("npu_bad", factory)
    with pytest.raises(BackendLoadError) as info:
        registry.get_backend("npu_bad,mock")
    error = info.value
    assert error.code is ErrorCode.BACKEND_LOAD_FAILED
    assert "'npu_bad'" in error.message
    if cause is None:
        assert "not a BackendProvider" in error.message and "kv_block_alloc" in error.message
    else:
        assert isinstance(error.__cause__, cause)
    assert not registry.record("mock").chosen


class WithoutBlockInfo:
    """A provider of the API before ``kv_block_info``: everything of the mock but that."""

    def __init__(self, inner: MockBackendProvider) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name == "kv_block_info":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_a_provider_without_kv_block_info_is_not_a_backend_provider(
    registry: BackendRegistry,
) -> None:
    def create(**_: object) -> object:
        return WithoutBlockInfo(MockBackendProvider())

    registry.register_backend("npu_old", mock_factory("npu_old", create=create))
    with pytest.raises(BackendLoadError) as info:
        registry.get_backend("npu_old,mock")
    assert info.value.code is ErrorCode.BACKEND_LOAD_FAILED
    assert "not a BackendProvider (missing: kv_block_info)" in info.value.message


def test_a_hanging_probe_is_bounded_by_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    registry = BackendRegistry(probe_timeout=0.2)

    def hanging_probe() -> str | None:
        release.wait(30)
        return None

    registry.register_backend("npu_hang", mock_factory("npu_hang", probe=hanging_probe))
    started = time.monotonic()
    try:
        with pytest.raises(BackendLoadError, match=r"did not return within 0\.2 s"):
            registry.get_backend("npu_hang,mock")
    finally:
        release.set()
    assert time.monotonic() - started < 5
    assert registry.record("npu_hang").status is RecordStatus.BROKEN


def test_a_probe_runs_once_isolated_and_its_output_is_kept(
    registry: BackendRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    threads: list[str] = []

    def noisy_probe() -> str | None:
        threads.append(threading.current_thread().name)
        print("probing the NPU")
        return None

    registry.register_backend("npu_noisy", mock_factory("npu_noisy", probe=noisy_probe))
    registry.get_backend("npu_noisy").close()
    registry.get_backend("npu_noisy").close()
    assert threads == ["sagellm-probe-npu_noisy"], "probed once, on the isolated probe thread"
    assert registry.record("npu_noisy").output == "probing the NPU\n"
    assert "probing" not in capsys.readouterr().out


def test_when_every_candidate_is_unavailable_each_reason_is_given(
    registry: BackendRegistry,
) -> None:
    registry.register_backend(
        "npu_off", mock_factory("npu_off", reason="no NPU", install_hint="install the NPU driver")
    )
    with pytest.raises(BackendUnavailableError) as info:
        registry.get_backend("npu_off,zpu")
    assert "npu_off: no NPU" in info.value.message
    assert "zpu: not installed" in info.value.message
    with pytest.raises(BackendUnavailableError) as single:
        registry.get_backend("npu_off")
    assert single.value.message.endswith("is unavailable: no NPU")
    assert single.value.hint == "install the NPU driver"


# auto.


def test_auto_picks_the_highest_priority_available_backend(isolated: BackendRegistry) -> None:
    isolated.register_backend("npu_low", mock_factory("npu_low", priority=5))
    isolated.register_backend("npu_high", mock_factory("npu_high", priority=50))
    isolated.register_backend("npu_off", mock_factory("npu_off", priority=99, reason="no NPU"))
    isolated.get_backend("auto", memory_mb=16).close()
    assert isolated.record("npu_high").chosen
    assert not isolated.record("npu_low").chosen


def test_auto_never_chooses_the_mock(isolated: BackendRegistry) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        isolated.get_backend("auto")
    assert "never chooses a simulated backend" in info.value.message
    assert not isolated.record("mock").chosen


def test_auto_names_installs_only_for_kinds_that_are_not_installed() -> None:
    known = {
        kind: KnownKind(kind, f"isagellm-backend-{kind}", f"pip install ./packages/{kind}")
        for kind in ("zpu", "npu_off", "mock")
    }
    registry = BackendRegistry(group="sagellm.backends.isolated", known=known)
    registry.register_backend("mock", create_mock_backend)
    registry.register_backend("npu_off", mock_factory("npu_off", reason="no NPU; plug one in"))
    with pytest.raises(BackendUnavailableError) as info:
        registry.get_backend("auto")
    assert "npu_off: no NPU; plug one in" in info.value.message
    assert info.value.hint == (
        "fix a reason above, or install a backend (pip install ./packages/zpu), "
        "or ask for 'mock' explicitly"
    )
    nothing = BackendRegistry(group="sagellm.backends.isolated", known={})
    nothing.register_backend("mock", create_mock_backend)
    with pytest.raises(BackendUnavailableError) as bare:
        nothing.get_backend("auto")
    assert bare.value.hint == "ask for 'mock' explicitly"


def test_auto_refuses_to_settle_below_a_broken_plugin_that_may_outrank_it(
    isolated: BackendRegistry,
) -> None:
    def failing_probe() -> str | None:
        raise RuntimeError("NPU runtime crashed")

    isolated.register_backend("npu_ok", mock_factory("npu_ok", priority=10))
    isolated.register_backend("npu_bad", mock_factory("npu_bad", priority=20, probe=failing_probe))
    with pytest.raises(BackendLoadError, match="NPU runtime crashed"):
        isolated.get_backend("auto")
    assert not isolated.record("npu_ok").chosen


def test_auto_passes_over_a_broken_plugin_of_lower_priority_and_logs_it(
    isolated: BackendRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_probe() -> str | None:
        raise RuntimeError("NPU runtime crashed")

    isolated.register_backend("npu_ok", mock_factory("npu_ok", priority=30))
    isolated.register_backend("npu_bad", mock_factory("npu_bad", priority=20, probe=failing_probe))
    with caplog.at_level(logging.INFO, logger="sagellm_backend.registry"):
        isolated.get_backend("auto").close()
    assert isolated.record("npu_ok").chosen
    assert "npu_bad: broken" in caplog.text and "NPU runtime crashed" in caplog.text


def test_aliases_resolve_to_their_kind_and_count_once_for_auto(isolated: BackendRegistry) -> None:
    record = isolated.register_backend("npu_x", mock_factory("npu_x", aliases=("nx", "npux")))
    assert record.aliases == ("nx", "npux")
    alias = isolated.record("nx")
    assert alias.alias_of == "npu_x"
    isolated.get_backend("nx:1").close()
    assert isolated.record("nx").chosen
    isolated.get_backend("auto").close()
    assert isolated.record("npu_x").chosen


# The factory contract: config objects and device_ids.


def test_a_plain_factory_receives_the_config_object_and_typed_options(
    registry: BackendRegistry,
) -> None:
    seen: list[tuple[object, dict[str, object]]] = []

    def create_npu_backend(
        config: object = None, memory_mb: int = 64, label: str = "x"
    ) -> MockBackendProvider:
        seen.append((config, {"memory_mb": memory_mb, "label": label}))
        return MockBackendProvider(max_memory_mb=memory_mb)

    registry.register_backend("npu_plain", create_npu_backend)
    registry.get_backend("npu_plain:1?memory_mb=32&device_ids=1+2", label="y").close()
    config, options = seen[-1]
    assert config == BackendConfig("npu_plain", "1", (1, 2))
    assert options == {"memory_mb": 32, "label": "y"}
    with pytest.raises(UnknownOptionError, match="colour"):
        registry.get_backend("npu_plain?colour=red")
    with pytest.raises(InvalidArgumentError, match="memory_mb"):
        registry.get_backend("npu_plain?memory_mb=big")


def test_auto_moves_device_ids_into_the_config_of_the_backend_it_chooses(
    isolated: BackendRegistry,
) -> None:
    seen: list[object] = []

    def create_npu_backend(config: object = None, memory_mb: int = 64) -> MockBackendProvider:
        seen.append(config)
        return MockBackendProvider(max_memory_mb=memory_mb)

    isolated.register_backend("npu_auto", create_npu_backend)
    isolated.get_backend("auto", device_ids=[0, 1], memory_mb=16).close()
    assert seen == [BackendConfig("npu_auto", None, (0, 1))]


def test_device_ids_are_refused_clearly_by_a_single_device_backend(
    registry: BackendRegistry,
) -> None:
    with pytest.raises(InvalidArgumentError, match="one device per provider"):
        registry.get_backend("mock?device_ids=0+1")
    with pytest.raises(InvalidArgumentError, match="device_ids"):
        registry.get_backend("mock?device_ids=a+b")


# register_backend.


def test_register_backend_refuses_a_taken_kind_unless_replacing(registry: BackendRegistry) -> None:
    before = registry.list_backends(probe=False)
    with pytest.raises(InvalidArgumentError, match="already provided") as info:
        registry.register_backend("mock", mock_factory("mock"))
    assert info.value.hint is not None and "replace=True" in info.value.hint
    assert registry.list_backends(probe=False) == before, "a refused call changed the records"
    registry.register_backend("mock", mock_factory("mock", priority=1), replace=True)
    records = {(r.kind, r.source.value): r for r in registry.list_backends(probe=False)}
    shadowed = [
        r for (kind, _), r in records.items() if kind == "mock" and r.source != "registered"
    ]
    assert shadowed and shadowed[0].status is RecordStatus.SHADOWED
    assert "register_backend()" in (shadowed[0].reason or "")
    assert registry.record("mock").priority == 1


@pytest.mark.parametrize(
    ("kind", "factory", "error"),
    [
        ("Bad Kind", mock_factory("x"), InvalidArgumentError),
        ("auto", mock_factory("auto"), InvalidArgumentError),
        ("npu_y", "not callable", InvalidArgumentError),
        ("npu_y", lambda cfg=None: None, InvalidArgumentError),
        ("npu_y", mock_factory("npu_z"), InvalidArgumentError),
    ],
)
def test_register_backend_validates_its_arguments(
    registry: BackendRegistry, kind: str, factory: Callable[..., object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        registry.register_backend(kind, factory)
    with pytest.raises(BackendNotFoundError):
        registry.record(kind.lower().replace(" ", "_"))


def test_register_backend_refuses_a_factory_built_for_another_api(
    registry: BackendRegistry,
) -> None:
    factory = BackendFactory("npu_v2", MockBackendProvider, api_version="2")
    with pytest.raises(IncompatiblePluginError, match="backend API 2") as info:
        registry.register_backend("npu_v2", factory)
    assert "backend API 1" in info.value.message


@pytest.mark.parametrize("timeout", [0, -1, True, "1", math.nan, math.inf])
def test_registry_options_are_validated(timeout: object) -> None:
    with pytest.raises(InvalidArgumentError, match="probe_timeout") as info:
        BackendRegistry(probe_timeout=timeout)  # type: ignore[arg-type]
    assert info.value.hint is not None and "probe_timeout" in info.value.hint


# Threads.


def run_threads(n: int, body: Callable[[int], None]) -> list[BaseException]:
    """Run ``body(i)`` on ``n`` threads released together; returns what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def main(i: int) -> None:
        start.wait()
        try:
            body(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_concurrent_lookups_and_registrations_are_consistent(registry: BackendRegistry) -> None:
    devices: list[str] = []

    def body(i: int) -> None:
        registry.register_backend(f"npu_{i}", mock_factory(f"npu_{i}"))
        provider = registry.get_backend(f"npu_{i}:{i % 2},mock")
        devices.append(provider.device)
        provider.close()
        registry.get_backend("mock").close()

    assert run_threads(8, body) == []
    assert sorted(devices) == sorted(f"mock:{i % 2}" for i in range(8))
    chosen = {r.kind for r in registry.list_backends() if r.chosen}
    assert chosen == {"mock", *(f"npu_{i}" for i in range(8))}


def test_options_of_a_kind_are_the_declared_ones_then_device_ids(
    isolated: BackendRegistry,
) -> None:
    isolated.register_backend("zz", mock_factory("zz", aliases=("zz_alias",)))
    names = [(o.name, o.type, o.default) for o in isolated.options("zz")]
    assert names == [("memory_mb", int, 64), ("device_ids", tuple, None)]
    assert [o.name for o in isolated.options("zz_alias")] == ["memory_mb", "device_ids"]

    def plain(
        config: object = None, *, blocks: int = 8, label: str = "x", spare: object = None
    ) -> object:
        return MockBackendProvider()

    isolated.register_backend("plain", plain)
    typed = [(o.name, o.type, o.default) for o in isolated.options("plain")]
    assert typed == [("blocks", int, 8), ("label", str, "x"), ("device_ids", tuple, None)]
    with pytest.raises(BackendNotFoundError):
        isolated.options("nothing_here")
