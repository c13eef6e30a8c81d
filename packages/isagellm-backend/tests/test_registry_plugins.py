"""Plugins as real installed distributions: ``*.dist-info`` directories (METADATA and
entry_points.txt) and their modules, written to a directory on sys.path, where
importlib.metadata finds them exactly as it finds wheels installed by pip."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sagellm_backend import (
    BackendLoadError,
    BackendNotFoundError,
    BackendProvider,
    ErrorCode,
    IncompatiblePluginError,
    InvalidArgumentError,
    __version__,
)
from sagellm_backend.registry import (
    GROUP,
    IMPORT_TIMEOUT_ENV_VAR,
    BackendRegistry,
    RecordSource,
    RecordStatus,
)
from sagellm_backend.registry.compat import requirement_mismatch
from sagellm_backend.registry.known import CORE_ENTRY_POINTS

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
PLUGINS = TESTS / "plugins"
FAULTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_fault_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            total = sum(FAULTS.values())
            detail = ", ".join(f"{n} {kind}" for kind, n in sorted(FAULTS.items()))
            reporter.write_line(f"plugin faults injected: {total} ({detail})")


def injected(fault: str) -> None:
    FAULTS[fault] = FAULTS.get(fault, 0) + 1


@dataclass
class Site:
    """A directory on sys.path that distributions are installed into."""

    root: Path

    def install(
        self,
        name: str,
        version: str,
        entry_points: Mapping[str, str],
        *,
        modules: Mapping[str, str] | None = None,
        requires: Sequence[str] = (),
    ) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        metadata += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(metadata) + "\n")
        lines = [f"[{GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield Site(root)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if origin.startswith((str(root), str(PLUGINS))):
            del sys.modules[name]


WORKING = """
    from sagellm_backend.factory import BackendFactory, DeviceSelection

    PROBED = []

    def _create(*, device: DeviceSelection):
        from sagellm_backend.mock import MockBackendProvider
        return MockBackendProvider(device_index=device.index or 0)

    def _probe():
        PROBED.append(True)
        return None

    factory = BackendFactory({kind!r}, _create, probe=_probe, priority=10, api_version={api!r})
"""


def working(kind: str, api: str = "1") -> str:
    return WORKING.format(kind=kind, api=api)


# Discovery imports nothing.


def test_discovery_reads_metadata_and_imports_no_plugin(site: Site) -> None:
    site.install(
        "zz-npu",
        "1.0",
        {"zz_npu": "zz_npu_plugin:factory"},
        modules={"zz_npu_plugin": working("zz_npu")},
    )
    registry = BackendRegistry()
    record = registry.record("zz_npu")
    assert (record.status, record.loaded, record.source) == (
        RecordStatus.FOUND,
        False,
        RecordSource.ENTRY_POINT,
    )
    assert (record.distribution, record.version, record.target) == (
        "zz-npu",
        "1.0",
        "zz_npu_plugin:factory",
    )
    registry.get_backend("mock").close()
    assert "zz_npu_plugin" not in sys.modules, "another backend's lookup imported the plugin"
    registry.get_backend("zz_npu").close()
    assert "zz_npu_plugin" in sys.modules
    record = registry.record("zz_npu")
    assert (record.status, record.loaded, record.chosen, record.priority) == (
        RecordStatus.AVAILABLE,
        True,
        True,
        10,
    )


def test_list_without_probing_imports_nothing(site: Site) -> None:
    site.install(
        "zz-npu",
        "1.0",
        {"zz_npu": "zz_npu_plugin:factory"},
        modules={"zz_npu_plugin": working("zz_npu")},
    )
    records = {r.kind: r for r in BackendRegistry().list_backends(probe=False)}
    assert records["zz_npu"].status is RecordStatus.FOUND
    assert "zz_npu_plugin" not in sys.modules


# Broken plugins never break the others and are never skipped silently.

BROKEN = {
    "import error": (
        "raise ImportError('libnpu_runtime.so: cannot open shared object file')",
        ImportError,
        "libnpu_runtime.so",
    ),
    "missing target": ("x = 1", AttributeError, "factory"),
    "syntax error": ("def broken(:\n", SyntaxError, "SyntaxError"),
}


@pytest.mark.parametrize("fault", sorted(BROKEN))
def test_a_plugin_that_fails_to_load_is_reported_and_the_others_still_work(
    site: Site, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    injected(fault)
    source, cause, words = BROKEN[fault]
    site.install(
        "zz-bad", "0.1", {"zz_bad": "zz_bad_plugin:factory"}, modules={"zz_bad_plugin": source}
    )
    registry = BackendRegistry()
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.registry"):
        records = {r.kind: r for r in registry.list_backends()}
    assert records["zz_bad"].status is RecordStatus.BROKEN
    assert words in (records["zz_bad"].reason or "")
    assert records["mock"].status is RecordStatus.AVAILABLE
    assert "zz_bad" in caplog.text
    with pytest.raises(BackendLoadError) as info:
        registry.get_backend("zz_bad,mock")
    assert isinstance(info.value.__cause__, cause)
    assert "zz-bad 0.1" in info.value.message
    registry.get_backend("mock").close()


def test_a_target_that_is_not_callable_is_broken(site: Site) -> None:
    injected("target not callable")
    site.install(
        "zz-bad",
        "0.1",
        {"zz_bad": "zz_bad_plugin:factory"},
        modules={"zz_bad_plugin": "factory = 42"},
    )
    with pytest.raises(BackendLoadError, match="is a int, not a factory"):
        BackendRegistry().get_backend("zz_bad")


def test_a_factory_that_raises_is_chained_and_a_junk_result_refused(site: Site) -> None:
    injected("factory raises")
    injected("factory returns a non-provider")
    site.install(
        "zz-bad",
        "0.1",
        {"zz_raise": "zz_bad_plugin:raising", "zz_junk": "zz_bad_plugin:junk"},
        modules={
            "zz_bad_plugin": """
                def raising(config=None):
                    raise RuntimeError("NPU firmware mismatch")

                def junk(config=None):
                    return {"kind": "not a provider"}
            """
        },
    )
    registry = BackendRegistry()
    with pytest.raises(BackendLoadError) as info:
        registry.get_backend("zz_raise,mock")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "NPU firmware mismatch" in info.value.message
    with pytest.raises(BackendLoadError, match="not a BackendProvider"):
        registry.get_backend("zz_junk")


def test_a_probe_that_hangs_or_raises_is_broken_without_blocking_the_others(site: Site) -> None:
    injected("probe hangs")
    injected("probe raises")
    site.install(
        "zz-bad",
        "0.1",
        {"zz_hang": "zz_bad_plugin:hang", "zz_oops": "zz_bad_plugin:oops"},
        modules={
            "zz_bad_plugin": """
                import threading
                from sagellm_backend.factory import BackendFactory

                RELEASE = threading.Event()

                def _hang():
                    RELEASE.wait(30)

                def _oops():
                    raise PermissionError("/dev/npu0")

                hang = BackendFactory("zz_hang", dict, probe=_hang, priority=5)
                oops = BackendFactory("zz_oops", dict, probe=_oops, priority=5)
            """
        },
    )
    registry = BackendRegistry(probe_timeout=0.2)
    try:
        records = {r.kind: r for r in registry.list_backends()}
    finally:
        sys.modules["zz_bad_plugin"].RELEASE.set()
    assert records["zz_hang"].status is RecordStatus.BROKEN
    assert "did not return within 0.2 s" in (records["zz_hang"].reason or "")
    assert records["zz_oops"].status is RecordStatus.BROKEN
    assert "PermissionError" in (records["zz_oops"].reason or "")
    assert records["mock"].status is RecordStatus.AVAILABLE


# Incompatible plugins are refused before their code runs.


def test_a_requires_dist_pin_on_another_core_is_refused_before_import(site: Site) -> None:
    injected("incompatible pin")
    site.install(
        "isagellm-backend-cuda",
        "0.5.4",
        {"cuda": "zz_old_cuda:factory"},
        modules={"zz_old_cuda": working("cuda")},
        requires=["isagellm-backend==0.5.4", "torch>=2.4", "triton; extra == 'fast'"],
    )
    registry = BackendRegistry()
    with pytest.raises(IncompatiblePluginError) as info:
        registry.get_backend("cuda,mock")
    error = info.value
    assert error.code is ErrorCode.PLUGIN_INCOMPATIBLE
    assert "isagellm-backend-cuda 0.5.4" in error.message
    assert f"isagellm-backend {__version__}" in error.message
    assert "requires isagellm-backend==0.5.4" in error.message
    assert error.hint == (
        f"reinstall it from the sagellm-backend checkout of version {__version__}: "
        "pip install ./packages/isagellm-backend-cuda"
    )
    assert "zz_old_cuda" not in sys.modules
    assert registry.record("cuda").status is RecordStatus.INCOMPATIBLE


def test_a_factory_built_for_another_api_version_is_refused_before_it_runs(site: Site) -> None:
    injected("incompatible api_version")
    site.install(
        "zz-future",
        "3.0",
        {"zz_future": "zz_future_plugin:factory"},
        modules={"zz_future_plugin": working("zz_future", api="2")},
    )
    registry = BackendRegistry()
    with pytest.raises(IncompatiblePluginError) as info:
        registry.get_backend("zz_future")
    assert "backend API 1" in info.value.message and "backend API 2" in info.value.message
    assert sys.modules["zz_future_plugin"].PROBED == [], "the probe ran"


@pytest.mark.parametrize(
    ("specifier", "refused"),
    [
        ("==0.6.0", False),
        (">=0.6.0,<1", False),
        ("~=0.6", False),
        ("==0.6.*", False),
        ("!=0.6.0", True),
        ("==0.5.*", True),
        ("<0.6", True),
        (">0.6.0", True),
        ("==0.6.0rc1", False),
        ("", False),
    ],
)
def test_requirement_pins_are_judged_only_where_exact(specifier: str, refused: bool) -> None:
    assert (requirement_mismatch(specifier, "0.6.0") is not None) is refused


# Two distributions claiming one kind.


def test_a_distribution_of_this_project_wins_a_kind_claimed_by_a_foreign_one(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    injected("duplicate kind")
    site.install(
        "isagellm-core",
        "0.5.0",
        {"mock": "zz_core_mock:factory"},
        modules={"zz_core_mock": working("mock")},
    )
    registry = BackendRegistry()
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.registry"):
        provider = registry.get_backend("mock")
    provider.close()
    assert "zz_core_mock" not in sys.modules, "the losing plugin was imported"
    assert "isagellm-core 0.5.0" in caplog.text and "isagellm-backend" in caplog.text
    records = [r for r in registry.list_backends() if r.kind == "mock"]
    assert [r.distribution for r in records] == ["isagellm-backend", "isagellm-core"]
    winner, loser = records
    assert winner.chosen and winner.status is RecordStatus.AVAILABLE
    assert loser.status is RecordStatus.SHADOWED and not loser.loaded
    assert "isagellm-backend" in (loser.reason or "")
    assert "a distribution of this project wins" in (loser.reason or "")


def test_between_foreign_distributions_the_first_name_wins(site: Site) -> None:
    injected("duplicate kind")
    for dist in ("zz-beta", "zz-alpha"):
        module = f"zz_dup_{dist[3:]}"
        site.install(
            dist, "1.0", {"zz_dup": f"{module}:factory"}, modules={module: working("zz_dup")}
        )
    registry = BackendRegistry()
    assert registry.record("zz_dup").distribution == "zz-alpha"
    shadowed = [r for r in registry.list_backends(probe=False) if r.kind == "zz_dup"][1]
    assert shadowed.distribution == "zz-beta" and shadowed.status is RecordStatus.SHADOWED
    assert "zz-alpha" in (shadowed.reason or "")


# The seed's extension example as a third-party distribution.


def test_a_third_party_provider_package_is_found_loaded_and_used(site: Site) -> None:
    site.install(
        "acme-npu-backend",
        "2.1.0",
        {"acme_npu": "acme_npu:create_acme_npu_backend"},
        requires=["isagellm-backend>=0.6"],
    )
    registry = BackendRegistry()
    record = registry.record("acme_npu")
    assert (record.distribution, record.version, record.status) == (
        "acme-npu-backend",
        "2.1.0",
        RecordStatus.FOUND,
    )
    provider = registry.get_backend("acme_npu:1?max_memory_mb=64")
    from acme_npu.provider import AcmeNpuProvider, conforms

    assert isinstance(provider, AcmeNpuProvider) and isinstance(provider, BackendProvider)
    assert conforms(provider) is provider
    assert provider.kind == "acme_npu" and provider.device == "mock:1"
    capability = provider.capability()
    assert capability.device_name == "Acme NPU 1" and capability.max_memory_mb == 64
    block = provider.kv_block_alloc(128, "int8")
    info = provider.kv_block_info(block)
    assert (info.block, info.device, info.dtype.value) == (block, "mock:1", "int8")
    assert info.num_pages == provider.kv_layout.pages_for(128)
    provider.kv_block_free(block)
    provider.close()
    with pytest.raises(InvalidArgumentError, match="one device per provider"):
        registry.get_backend("acme_npu?device_ids=0+1")
    assert registry.record("acme_npu").chosen


# What existing sageLLM callers do with the group.

CALLER = """
import json
import sys
from importlib import metadata
from types import SimpleNamespace

from sagellm_backend import BackendUnavailableError
from sagellm_backend.registry.known import CORE_ENTRY_POINTS

group = metadata.entry_points(group="sagellm.backends")
if not any(ep.name in CORE_ENTRY_POINTS for ep in group):
    group = [metadata.EntryPoint(k, v, "sagellm.backends") for k, v in CORE_ENTRY_POINTS.items()]
factories = {ep.name: ep.load() for ep in group}
heavy = sorted(m for m in ("torch", "torch_npu", "numpy", "triton") if m in sys.modules)
made = {}
for kind, factory in factories.items():
    for config in (None, SimpleNamespace(kind=kind, device="0", device_ids=None),
                   SimpleNamespace(kind=kind, device=f"{kind}:0", device_ids=[0])):
        try:
            provider = factory(config)
        except BackendUnavailableError as exc:
            made[kind] = exc.code.value
            continue
        made[kind] = provider.device
        provider.close()
print(json.dumps({"heavy": heavy, "kinds": sorted(factories), "made": made}))
"""


def test_every_core_entry_point_loads_light_and_accepts_config_objects() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CALLER],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["heavy"] == [], "loading the entry points imported heavy modules"
    assert set(CORE_ENTRY_POINTS) <= set(report["kinds"])
    outcomes = report["made"]
    assert outcomes["mock"] == "mock:0"
    assert all(v == "unavailable" or v.endswith(":0") for v in outcomes.values()), outcomes


def test_the_builtin_table_matches_the_core_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][GROUP]
    assert declared == dict(CORE_ENTRY_POINTS)


# The command line shows the records.


def cli_environ(site: Site, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "SAGELLM_BACKEND"}
    environ["PYTHONPATH"] = os.pathsep.join([str(site.root), str(SRC)])
    return {**environ, **(extra or {})}


def run_cli(
    site: Site, *args: str, environ: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sagellm_backend", *args],
        env=cli_environ(site, environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_unavailable_backend_is_a_backend_failure_with_the_plugins_reason(site: Site) -> None:
    site.install(
        "zz-off",
        "1.0",
        {"zz_off": "zz_off_plugin:factory"},
        modules={
            "zz_off_plugin": """
                from sagellm_backend.factory import BackendFactory

                factory = BackendFactory(
                    "zz_off",
                    dict,
                    probe=lambda: "no ZZ device on this host",
                    install_hint="plug in a ZZ card",
                )
            """
        },
    )
    result = run_cli(site, "info", "zz_off")
    assert result.returncode == 1
    assert "[unavailable]" in result.stderr and "no ZZ device on this host" in result.stderr
    assert "fix: plug in a ZZ card" in result.stderr and "Traceback" not in result.stderr
    traced = run_cli(site, "--traceback", "info", "zz_off")
    assert traced.returncode == 1 and "Traceback" in traced.stderr
    listed = run_cli(site, "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("zz_off "))
    assert row.split()[1:4] == ["unavailable", "zz-off", "1.0"]
    assert row.endswith("no ZZ device on this host")


def test_list_and_doctor_show_broken_and_shadowed_plugins(site: Site) -> None:
    injected("import error")
    site.install(
        "zz-bad",
        "0.1",
        {"zz_bad": "zz_bad_plugin:factory"},
        modules={"zz_bad_plugin": "raise ImportError('no NPU runtime')"},
    )
    site.install(
        "isagellm-core",
        "0.5.0",
        {"mock": "zz_core_mock:factory"},
        modules={"zz_core_mock": working("mock")},
    )
    listed = run_cli(site, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = {(r["kind"], r["distribution"]): r for r in json.loads(listed.stdout)}
    assert records[("zz_bad", "zz-bad")]["status"] == "broken"
    assert "no NPU runtime" in records[("zz_bad", "zz-bad")]["reason"]
    assert records[("mock", "isagellm-core")]["status"] == "shadowed"
    assert records[("mock", "isagellm-backend")]["available"] is True
    doctor = run_cli(site, "doctor")
    assert doctor.returncode == 1
    assert "1 problem(s)" in doctor.stdout and "zz_bad (zz-bad): " in doctor.stdout
    assert "Traceback" not in doctor.stderr
    info = run_cli(site, "info", "zz_bad,mock")
    assert info.returncode == 1, "a broken plugin is a backend failure, not a fallback"
    assert "[backend_load_failed]" in info.stderr
    assert "caused by: ImportError: no NPU runtime" in info.stderr
    assert "Traceback" not in info.stderr


# Whatever a plugin raises, prints or blocks on, the caller's process and output survive.

BASE_EXCEPTIONS = {
    "SystemExit": "raise SystemExit(0)",
    "sys.exit": "import sys\nsys.exit(3)",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "GeneratorExit": "raise GeneratorExit",
    "BaseException subclass": "class Stop(BaseException):\n    pass\nraise Stop('halt')",
}


@pytest.mark.parametrize("fault", sorted(BASE_EXCEPTIONS))
def test_a_plugin_raising_a_base_exception_at_import_is_recorded_as_broken(
    site: Site, fault: str
) -> None:
    injected(f"{fault} at import")
    site.install(
        "zz-quit",
        "0.1",
        {"zz_quit": "zz_quit_plugin:factory"},
        modules={"zz_quit_plugin": BASE_EXCEPTIONS[fault]},
    )
    registry = BackendRegistry()
    records = {r.kind: r for r in registry.list_backends()}
    assert records["zz_quit"].status is RecordStatus.BROKEN
    assert "failed to import" in (records["zz_quit"].reason or "")
    assert records["mock"].status is RecordStatus.AVAILABLE
    with pytest.raises(BackendLoadError) as info:
        registry.get_backend("auto")
    assert "zz_quit" in info.value.message
    assert isinstance(info.value.__cause__, BaseException)
    assert not isinstance(info.value.__cause__, Exception)
    registry.get_backend("mock").close()


QUITTING_FACTORIES = """
    import threading
    from sagellm_backend.factory import BackendFactory

    class Stop(BaseException):
        pass

    def _exit(**_):
        raise SystemExit(0)

    def _stop(**_):
        raise Stop("halt")

    def _interrupt(**_):
        raise KeyboardInterrupt

    exits = BackendFactory("zz_exit", _exit)
    stops = BackendFactory("zz_stop", _stop)
    interrupts = BackendFactory("zz_intr", _interrupt)
"""


def test_a_factory_raising_a_base_exception_is_broken_but_a_main_thread_interrupt_propagates(
    site: Site,
) -> None:
    injected("SystemExit in factory")
    injected("BaseException in factory")
    injected("KeyboardInterrupt in factory")
    site.install(
        "zz-quit",
        "0.1",
        {
            "zz_exit": "zz_quit_plugin:exits",
            "zz_stop": "zz_quit_plugin:stops",
            "zz_intr": "zz_quit_plugin:interrupts",
        },
        modules={"zz_quit_plugin": QUITTING_FACTORIES},
    )
    registry = BackendRegistry()
    for kind, cause in (("zz_exit", "SystemExit"), ("zz_stop", "Stop")):
        with pytest.raises(BackendLoadError) as info:
            registry.get_backend(kind)
        assert type(info.value.__cause__).__name__ == cause
        record = registry.record(kind)
        assert record.status is RecordStatus.BROKEN and "factory" in (record.reason or "")
    # In the main thread a KeyboardInterrupt may be the user's Ctrl-C: it must interrupt.
    with pytest.raises(KeyboardInterrupt):
        registry.get_backend("zz_intr")
    # In any other thread no signal can have raised it: it is the plugin's.
    caught: list[BaseException] = []

    def create_in_a_thread() -> None:
        try:
            registry.get_backend("zz_intr")
        except BaseException as exc:
            caught.append(exc)

    worker = threading.Thread(target=create_in_a_thread)
    worker.start()
    worker.join(10)
    assert len(caught) == 1 and isinstance(caught[0], BackendLoadError), caught
    assert isinstance(caught[0].__cause__, KeyboardInterrupt)
    registry.get_backend("mock").close()


HANGING = """
    import os
    import time

    RELEASE = {release!r}
    for _ in range(3000):
        if os.path.exists(RELEASE):
            break
        time.sleep(0.01)

    from sagellm_backend.factory import BackendFactory

    factory = BackendFactory("zz_hang", dict, priority=50)
"""


def release_hung_imports(release: Path) -> None:
    release.touch()
    for thread in threading.enumerate():
        if thread.name.startswith("sagellm-import-"):
            thread.join(10)


@pytest.mark.parametrize("configured_by", ["parameter", "environment"])
def test_a_plugin_whose_import_hangs_is_reported_as_hung_and_discovery_goes_on(
    site: Site, monkeypatch: pytest.MonkeyPatch, configured_by: str
) -> None:
    injected("import hangs")
    release = site.root / "release"
    site.install(
        "zz-hang",
        "0.1",
        {"zz_hang": "zz_hang_plugin:factory"},
        modules={"zz_hang_plugin": HANGING.format(release=str(release))},
    )
    if configured_by == "parameter":
        registry = BackendRegistry(import_timeout=0.3)
    else:
        monkeypatch.setenv(IMPORT_TIMEOUT_ENV_VAR, "0.3")
        registry = BackendRegistry()
    try:
        started = time.monotonic()
        records = {r.kind: r for r in registry.list_backends()}
        listed = time.monotonic() - started
        with pytest.raises(BackendLoadError, match="hung") as info:
            registry.get_backend("auto")
        after_auto = time.monotonic() - started
    finally:
        release_hung_imports(release)
    assert records["zz_hang"].status is RecordStatus.BROKEN
    assert "hung: it did not finish within 0.3 s" in (records["zz_hang"].reason or "")
    assert records["mock"].status is RecordStatus.AVAILABLE
    assert IMPORT_TIMEOUT_ENV_VAR in (info.value.hint or "")
    assert listed < 3 and after_auto < 3, (listed, after_auto)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_import_timeout_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(IMPORT_TIMEOUT_ENV_VAR, value)
    with pytest.raises(InvalidArgumentError, match=IMPORT_TIMEOUT_ENV_VAR) as info:
        BackendRegistry().list_backends(probe=False)
    assert info.value.hint is not None and "unset it" in info.value.hint
    with pytest.raises(InvalidArgumentError, match="import_timeout"):
        BackendRegistry(import_timeout=float(value) if value != "soon" else 0)


NOISY = """
    import sys
    print("hello from the plugin's import")
    print("a warning on stderr", file=sys.stderr)
    from sagellm_backend.factory import BackendFactory

    def _probe():
        print("probing the ZZ card")
        return "no ZZ card"

    factory = BackendFactory("zz_noisy", dict, probe=_probe)
"""


def test_what_a_plugin_prints_is_kept_in_its_record_not_printed(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    injected("prints at import")
    site.install(
        "zz-noisy",
        "0.1",
        {"zz_noisy": "zz_noisy_plugin:factory"},
        modules={"zz_noisy_plugin": NOISY},
    )
    records = {r.kind: r for r in BackendRegistry().list_backends()}
    out, err = capsys.readouterr()
    assert "plugin" not in out + err and "ZZ" not in out + err
    record = records["zz_noisy"]
    assert record.status is RecordStatus.UNAVAILABLE
    assert record.output == (
        "hello from the plugin's import\na warning on stderr\nprobing the ZZ card\n"
    )
    assert record.to_dict()["output"] == record.output
    assert records["mock"].output is None


# Entry-point names that no spec can name.


def test_entry_points_with_invalid_names_are_listed_as_such_and_never_loaded(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    injected("invalid entry-point name")
    site.install(
        "zz-named",
        "0.1",
        {"Zz_Upper": "zz_named_plugin:upper", "auto": "zz_named_plugin:auto"},
        modules={
            "zz_named_plugin": """
                from sagellm_backend.factory import BackendFactory

                upper = BackendFactory("Zz_Upper", dict, priority=1000)
                auto = BackendFactory("auto", dict, priority=1000)
            """
        },
    )
    registry = BackendRegistry()
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.registry"):
        records = {r.kind: r for r in registry.list_backends()}
    for name in ("Zz_Upper", "auto"):
        record = records[name]
        assert record.status is RecordStatus.INVALID_NAME and not record.loaded
        assert record.available is False
        assert "no spec can select it" in (record.reason or "")
        assert "zz-named must rename it" in (record.reason or "")
        assert repr(name) in caplog.text
    assert "zz_named_plugin" not in sys.modules
    with pytest.raises(BackendNotFoundError) as info:
        registry.get_backend("zz_upper")
    assert "'Zz_Upper' of zz-named has an invalid name" in (info.value.hint or "")
    doctor = run_cli(site, "doctor")
    assert doctor.returncode == 1 and "2 problem(s)" in doctor.stdout, doctor.stdout
    assert "Zz_Upper (zz-named): entry point name 'Zz_Upper' is not a backend kind" in doctor.stdout


MISBEHAVING = {
    "zz_exit": "import sys\nsys.exit(0)",
    "zz_intr": "raise KeyboardInterrupt",
    "zz_gen": "raise GeneratorExit",
    "zz_noisy": """
        import os
        import sys
        import threading
        print("plugin says hello")
        sys.stdout.flush()
        os.write(1, b"written to file descriptor 1 ")
        threading.Thread(target=print, args=("from a plugin thread",)).start()
        from sagellm_backend.factory import BackendFactory

        def _probe():
            print("probe output")
            return None

        factory = BackendFactory("zz_noisy", dict, probe=_probe)
    """,
}


def install_misbehaving(site: Site, *, hang_release: Path) -> None:
    for kind, source in MISBEHAVING.items():
        module = f"{kind}_plugin"
        site.install(
            kind.replace("_", "-"), "0.1", {kind: f"{module}:factory"}, modules={module: source}
        )
    site.install(
        "zz-hang",
        "0.1",
        {"zz_hang": "zz_hang_plugin:factory"},
        modules={"zz_hang_plugin": HANGING.format(release=str(hang_release))},
    )


def test_list_and_doctor_json_survive_plugins_that_exit_interrupt_print_and_hang(
    site: Site,
) -> None:
    for fault in ("sys.exit", "KeyboardInterrupt", "GeneratorExit", "prints", "hangs"):
        injected(f"{fault} at import (command)")
    install_misbehaving(site, hang_release=site.root / "never")
    environ = {IMPORT_TIMEOUT_ENV_VAR: "0.5"}
    started = time.monotonic()
    listed = run_cli(site, "list", "--json", environ=environ, timeout=15)
    elapsed = time.monotonic() - started
    assert listed.returncode == 0, listed.stderr
    records = {r["kind"]: r for r in json.loads(listed.stdout)}
    for kind in ("zz_exit", "zz_intr", "zz_gen", "zz_hang"):
        assert records[kind]["status"] == "broken", records[kind]
    assert "SystemExit" in records["zz_exit"]["reason"]
    assert "KeyboardInterrupt" in records["zz_intr"]["reason"]
    assert "hung" in records["zz_hang"]["reason"]
    assert records["zz_noisy"]["status"] == "available"
    assert records["zz_noisy"]["output"] == "plugin says hello\nprobe output\n"
    assert "written to file descriptor 1" in listed.stderr
    assert records["mock"]["available"] is True
    assert elapsed < 10, f"list took {elapsed:.1f} s"
    doctor = run_cli(site, "doctor", "--json", environ=environ, timeout=15)
    assert doctor.returncode == 1, doctor.stderr
    report = json.loads(doctor.stdout)
    problems = {r["kind"] for r in report["backends"] if r["status"] == "broken"}
    assert problems == {"zz_exit", "zz_intr", "zz_gen", "zz_hang"}
    auto = run_cli(site, "info", "auto", environ=environ, timeout=15)
    assert auto.returncode == 1 and "[backend_load_failed]" in auto.stderr, auto.stderr
    assert "Traceback" not in auto.stderr


def test_a_ctrl_c_of_the_user_still_interrupts_a_plugin_import(site: Site) -> None:
    started = site.root / "started"
    site.install(
        "zz-slow",
        "0.1",
        {"zz_slow": "zz_slow_plugin:factory"},
        modules={
            "zz_slow_plugin": f"""
                import pathlib
                import time
                pathlib.Path({str(started)!r}).touch()
                time.sleep(60)
            """
        },
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "sagellm_backend", "list", "--json"],
        env=cli_environ(site, {IMPORT_TIMEOUT_ENV_VAR: "60"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the plugin import never started"
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert time.monotonic() - interrupted < 10
    assert out == "" and "Traceback" not in err


CHATTER = """
import sys
import threading
from sagellm_backend.registry.isolation import isolated_call

stop = threading.Event()
lines = 0

def chatter():
    global lines
    while not stop.is_set():
        print("line from another thread")
        lines += 1

thread = threading.Thread(target=chatter)
thread.start()
calls = [isolated_call(lambda: print("captured"), deadline=5, name="t") for _ in range(300)]
outputs = {call.output for call in calls}
stop.set()
thread.join()
print(sorted(outputs), lines > 0, sys.stdout is sys.__stdout__, file=sys.stderr)
"""


def test_threads_printing_while_plugin_output_is_captured_keep_output_and_process() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHATTER],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip() == "['captured\\n'] True True"
    assert "captured" not in result.stdout and "line from another thread" in result.stdout
