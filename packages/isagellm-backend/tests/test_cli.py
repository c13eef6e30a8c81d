"""The ``sagellm-backend`` command, run as ``python -m sagellm_backend`` in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm_backend import CapabilityDescriptor, __version__, cli
from sagellm_backend.cli import EXIT_OK, EXIT_USER_ERROR, CommandInfo
from sagellm_backend.registry import BackendRecord, RecordSource, RecordStatus

SRC = Path(__file__).parent.parent / "src"


def sagellm_backend(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SAGELLM_BACKEND"}
    environ.update({"PYTHONPATH": str(SRC), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "sagellm_backend", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version_and_help_import_no_backend() -> None:
    result = sagellm_backend("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"sagellm-backend {__version__}")
    usage = sagellm_backend("--help")
    assert usage.returncode == 0
    for name in ("list", "info", "doctor", "demo", "check", "bench"):
        assert name in usage.stdout
    bare = sagellm_backend()
    assert bare.returncode == EXIT_USER_ERROR and "COMMAND" in bare.stderr


def test_list_shows_every_kind_with_its_status() -> None:
    result = sagellm_backend("list")
    assert result.returncode == EXIT_OK, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["KIND", "STATUS", "DISTRIBUTION", "VERSION", "ALIASES", "PRIORITY",
                              "DETAIL"]  # fmt: skip
    by_kind = {row.split()[0]: row for row in rows}
    assert by_kind["mock"].split()[1:4] == ["available", "isagellm-backend", __version__]
    assert "alias of ascend" in by_kind["npu"]
    if "not_installed" in by_kind["cuda"]:
        assert (
            "pip install ./packages/isagellm-backend ./packages/isagellm-backend-cuda"
            in (by_kind["cuda"])
        )


@pytest.mark.parametrize("probe", [False, True])
def test_list_shows_aliases_alike_with_and_without_the_ascend_wheel(probe: bool) -> None:
    """The kind's row lists its aliases; an alias's row lists none (its detail names the kind)."""
    from sagellm_backend.cli.listing import record_rows
    from sagellm_backend.registry import BackendRegistry

    installed = BackendRegistry().list_backends(probe=probe)
    if not any(r.kind == "ascend" and r.distribution == "isagellm-backend-ascend"
               and r.status != "not_installed" for r in installed):  # fmt: skip
        pytest.skip("the ascend wheel is not installed here")
    absent = BackendRegistry(group="sagellm.backends.absent").list_backends(probe=probe)
    for records in (installed, absent):
        rows = {row[0]: row for row in record_rows(records)}
        assert rows["ascend"][4] == ("ascend_cann", "npu")
        for alias in ("ascend_cann", "npu"):
            assert rows[alias][4] == ()
            assert str(rows[alias][6]).startswith("alias of ascend")


def test_list_json_and_no_probe() -> None:
    probed = json.loads(sagellm_backend("list", "--json").stdout)
    unprobed = json.loads(sagellm_backend("list", "--json", "--no-probe").stdout)
    mock = next(r for r in probed if r["kind"] == "mock")
    assert mock["status"] == "available" and mock["available"] is True and mock["loaded"]
    mock = next(r for r in unprobed if r["kind"] == "mock")
    assert mock["status"] == "found" and mock["available"] is None and not mock["loaded"]


def test_info_prints_the_capability_matrix_as_a_table_and_as_json() -> None:
    table = sagellm_backend("info", "mock?supported_dtypes=fp32+int8&max_memory_mb=64")
    assert table.returncode == EXIT_OK, table.stderr
    assert "backend 'mock' on mock:0" in table.stdout
    matrix = table.stdout.split("KV LAYOUT")[0]
    rows = {line.split()[0]: line.split(None, 1)[-1] for line in matrix.splitlines() if line}
    assert rows["supported_dtypes"] == "fp32, int8"
    assert rows["max_memory_mb"] == "64"
    assert rows["has_graph_exec"] == "no"
    data = json.loads(sagellm_backend("info", "mock:1", "--json").stdout)
    assert data["device"] == "mock:1" and data["kind"] == "mock"
    assert data["kv_layout"]["tokens_per_block"] > 0
    capability = CapabilityDescriptor.from_dict(data["capability"])
    assert capability.device_type == "mock"


def test_info_lists_every_option_with_type_default_and_help() -> None:
    from sagellm_backend.mock import create_mock_backend

    declared = [*create_mock_backend.options.values()]
    data = json.loads(sagellm_backend("info", "mock", "--json").stdout)
    assert data["options"] == [
        *(o.to_dict() for o in declared),
        {"name": "device_ids", "type": "list of ints (joined with '+')", "default": None,
         "help": "device indices, joined with '+'"},
    ]  # fmt: skip
    assert {"name": "max_memory_mb", "type": "int", "default": 16384,
            "help": "KV memory of each mock device, in MiB"} in data["options"]  # fmt: skip
    table = sagellm_backend("info", "mock").stdout
    header = next(line for line in table.splitlines() if line.startswith("OPTION"))
    assert header.split() == ["OPTION", "TYPE", "DEFAULT", "HELP"]
    rows = {line.split()[0]: line for line in table.split(header, 1)[1].splitlines() if line}
    assert set(rows) == {o.name for o in declared} | {"device_ids"}
    for option in declared:
        assert option.help in rows[option.name]
        assert str(option.to_dict()["type"]) in rows[option.name]


def test_info_shows_the_kv_dtypes_of_a_pool_without_one_dtype() -> None:
    table = sagellm_backend("info", "mock?supported_dtypes=fp32+bf16").stdout
    layout = table.split("KV LAYOUT")[1].split("OPTION")[0]
    assert "dtype             per block: fp32, bf16" in layout.splitlines()
    data = json.loads(sagellm_backend("info", "mock", "--json").stdout)
    assert data["kv_layout"]["dtype"] is None and data["kv_dtypes"] == ["fp16", "bf16"]


def test_info_reads_the_env_var_when_no_spec_is_given() -> None:
    result = sagellm_backend("info", "--json", env={"SAGELLM_BACKEND": "mock?max_memory_mb=32"})
    assert json.loads(result.stdout)["capability"]["max_memory_mb"] == 32


def test_demo_on_the_mock_runs_every_step_and_checks_it() -> None:
    result = sagellm_backend("demo", "mock")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    steps = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    names = [s[3] for s in steps]
    assert names == ["create", "capability", "allocate", "copy", "migrate", "free", "streams",
                     "collective", "kernel"]  # fmt: skip
    assert all(s[0] == "ok" and s[2] == "ms" and float(s[1]) >= 0 for s in steps)
    assert "simulated world of 4 ranks" in result.stdout
    assert result.stdout.rstrip().endswith("9 steps: 9 ok, 0 failed, 0 skipped")


def test_demo_skips_what_the_capability_matrix_does_not_claim() -> None:
    result = sagellm_backend("demo", "mock?has_collective=false&has_kv_block_migrate=false")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "skip" in result.stdout and "capability has_collective is off" in result.stdout
    assert "capability has_kv_block_migrate is off" in result.stdout
    assert "7 ok, 0 failed, 2 skipped" in result.stdout


def test_doctor_reports_the_environment_without_importing_torch() -> None:
    result = sagellm_backend("doctor", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    report = json.loads(result.stdout)
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["core"]["version"] == __version__ and report["core"]["api_version"] == "1"
    assert set(report["libraries"]) == {"torch", "torch_npu", "triton"}
    assert {"drivers", "devices", "platform"} <= set(report)
    assert any(r["kind"] == "mock" and r["available"] for r in report["backends"])
    text = sagellm_backend("doctor")
    assert text.returncode == EXIT_OK and "LIBRARIES" in text.stdout and "mock" in text.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("info", "cuda:x"), "device index 'x'"),
        (("info", "mokc"), "did you mean 'mock'?"),
        (("demo", "mock?bogus=1"), "has no option bogus"),
        (("info", "mock?max_memory_mb=lots"), "max_memory_mb"),
        (("info", "zz_unknown,mock"), "unknown backend kind 'zz_unknown'"),
    ],
)
def test_user_errors_print_a_message_and_exit_2(args: tuple[str, ...], words: str) -> None:
    result = sagellm_backend(*args)
    assert result.returncode == EXIT_USER_ERROR
    assert words in result.stderr
    assert "fix:" in result.stderr or "did you mean" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_command_whose_module_is_missing_exits_2_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table = {**cli.COMMANDS, "check": CommandInfo("sagellm_backend.cli.zz_absent", "absent")}
    monkeypatch.setattr(cli, "COMMANDS", table)
    assert cli.main(["check", "mock"]) == EXIT_USER_ERROR
    assert "the 'check' command is not available in this installation" in capsys.readouterr().err


def test_the_command_table_reserves_check_and_bench() -> None:
    assert cli.COMMANDS["check"].module == "sagellm_backend.cli.check"
    assert cli.COMMANDS["bench"].module == "sagellm_backend.cli.bench"


def _record(
    kind: str,
    status: str,
    *,
    priority: int | None = None,
    reason: str | None = None,
    distribution: str | None = None,
    alias_of: str | None = None,
) -> BackendRecord:
    return BackendRecord(
        kind,
        RecordStatus(status),
        RecordSource.ENTRY_POINT,
        distribution=distribution,
        alias_of=alias_of,
        priority=priority,
        reason=reason,
    )


NO_DEVICES: dict[str, dict[str, object]] = {
    "devices": {"nvidia": [], "ascend": []},
    "libraries": {"torch": "2.13.0+cpu"},
}
MOCK = _record("mock", "available", priority=-100)
CPU = _record("cpu", "available", priority=10)


@pytest.mark.parametrize(
    ("env", "records", "step"),
    [
        (NO_DEVICES, [MOCK, CPU, _record("zz", "broken", distribution="zz-dist", reason="boom")],
         "repair backend 'zz' (zz-dist): boom"),
        (NO_DEVICES, [MOCK, CPU, _record("cuda", "available", priority=100),
                      _record("npu", "available", priority=100, alias_of="ascend")],
         "try it: sagellm-backend demo cuda"),
        ({**NO_DEVICES, "devices": {"nvidia": ["/dev/nvidia0"]}},
         [MOCK, CPU, _record("cuda", "unavailable", reason="torch is a CPU build; reinstall")],
         "this machine has nvidia devices, but backend 'cuda' cannot use them: torch is a CPU "
         "build; reinstall"),
        ({**NO_DEVICES, "devices": {"nvidia": ["/dev/nvidia0"]}},
         [MOCK, CPU, _record("cuda", "not_installed")],
         "this machine has nvidia devices; install the cuda backend, in a sagellm-backend "
         "checkout: pip install ./packages/isagellm-backend ./packages/isagellm-backend-cuda"),
        (NO_DEVICES, [MOCK, CPU, _record("cuda", "unavailable", reason="no driver")],
         "no accelerator backend runs here; try the cpu backend: sagellm-backend demo cpu"),
        ({**NO_DEVICES, "libraries": {"torch": None}},
         [MOCK, _record("cpu", "unavailable", reason="torch is not installed")],
         "only the mock runs here, as torch is not installed; for the cpu backend install the "
         "core's [torch] extra, in a sagellm-backend checkout: "
         "pip install './packages/isagellm-backend[torch]'"),
    ],
)  # fmt: skip
def test_doctor_names_the_one_next_step_for_the_machine(
    env: dict[str, dict[str, object]], records: list[BackendRecord], step: str
) -> None:
    from sagellm_backend.cli.doctor import next_step

    assert next_step(env, records) == step


def test_doctor_ends_with_the_next_step_also_without_torch(tmp_path: Path) -> None:
    report = json.loads(sagellm_backend("doctor", "--json").stdout)
    text = sagellm_backend("doctor").stdout.rstrip().splitlines()
    assert text[-1] == f"next step: {report['next_step']}"
    site = tmp_path / "site"
    site.mkdir()
    for name in ("sagellm_backend", "typing_extensions"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        origin = Path(spec.origin)
        (site / (origin.parent if origin.name == "__init__.py" else origin).name).symlink_to(
            origin.parent if origin.name == "__init__.py" else origin
        )
    bare = subprocess.run(
        [sys.executable, "-S", "-m", "sagellm_backend", "doctor"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == EXIT_OK, bare.stderr
    assert bare.stdout.rstrip().splitlines()[-1] == (
        "next step: only the mock runs here, as torch is not installed; for the cpu backend "
        "install the core's [torch] extra, in a sagellm-backend checkout: "
        "pip install './packages/isagellm-backend[torch]'"
    )
