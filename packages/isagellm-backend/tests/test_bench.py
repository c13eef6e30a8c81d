"""``sagellm-backend bench``: every case runs on the mock and reports ratios of the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sagellm_backend import InvalidArgumentError
from sagellm_backend.bench import baselines_for, register_baselines, run_benchmarks
from sagellm_backend.bench.host_cost import interleaved
from sagellm_backend.bench.mock_baselines import MockBaselines
from sagellm_backend.mock import MockBackendProvider

BATCH_METADATA = ("batch metadata per decode step, 4 seqs x 4 pages", "new tensors from lists")


def host_cost(batch: int) -> list[tuple[str, str]]:
    return [
        ("alloc+free per block, batch 1", "list as a free list: free.append(free.pop())"),
        (
            f"alloc+free per block, batch {batch}",
            "list as a free list: t = free[-n:]; del free[-n:]; free.extend(t)",
        ),
        (f"kv_blocks_copy, {batch} blocks", "plain indexed copy of the same pages"),
        (
            f"kv_blocks_migrate out and in, {batch} blocks",
            "plain indexed copies between the pools",
        ),
    ]


DEVICE = [("kv copy", "per-block loop"), ("kv swap", "per-block loop")]
"""The mock's device rows: it moves page references, not bytes, and has no raw events, so it
has no copy floors and no events row."""
MOCK_SKIPPED = [
    "kv copy and swap floors: mock moves no bytes to move a page",
    "events: mock has no events beside its own",
]
CASES = [*DEVICE, BATCH_METADATA, *host_cost(8)]
QUICK_CASES = [
    *DEVICE,
    ("batch metadata per decode step, 8 seqs x 16 pages", BATCH_METADATA[1]),
    *host_cost(64),
    ("start-up", "python -c pass"),
]


def test_every_case_runs_and_leaves_the_pool_as_it_was() -> None:
    provider = MockBackendProvider()
    steps: list[str] = []
    try:
        report = run_benchmarks(
            provider, blocks=8, repeats=2, batch=(4, 4), host_batch=8, progress=steps.append
        )
        assert provider.memory_stats().kv_blocks_in_use == 0
    finally:
        provider.close()
    assert [(r.case, r.baseline) for r in report.rows] == CASES
    assert all(r.ours_s > 0 and r.baseline_s > 0 and r.ratio > 0 for r in report.rows)
    assert steps[0] == "kv copy: batched" and len(steps) == 7
    assert report.skipped == MOCK_SKIPPED
    assert all(r.measures for r in report.rows), "every baseline says what it shows"
    assert len({r.measures for r in report.rows}) == len(CASES) - 1  # both loops: batching
    table = report.format_table()
    assert table.count("\n| ") == len(CASES) + 1
    assert "| kv copy | batched | per-block loop | what batching saves" in table
    alloc = next(line for line in table.splitlines() if line.startswith("| alloc+free"))
    assert "over the plainest free list, on the single-block path" in alloc
    assert " us per block |" in alloc
    step = next(line for line in table.splitlines() if line.startswith("| batch metadata"))
    assert " us per decode step |" in step


def test_a_device_registers_its_own_baselines() -> None:
    class Faster(MockBackendProvider):
        """A provider type of a device wheel, subclassing another."""

    plain = MockBackendProvider()
    faster = Faster()
    try:
        inherited = baselines_for(faster)
        assert type(inherited) is type(baselines_for(plain))
        register_baselines(Faster, lambda _: MockBaselines(faster))
        assert isinstance(baselines_for(faster), MockBaselines)
        report = run_benchmarks(faster, blocks=4, repeats=1, batch=(4, 4), host_batch=8)
        assert len(report.rows) == len(CASES)
    finally:
        plain.close()
        faster.close()


def test_bad_sizes_are_refused() -> None:
    provider = MockBackendProvider(max_memory_mb=1)
    try:
        with pytest.raises(InvalidArgumentError, match="smaller --blocks"):
            run_benchmarks(provider, blocks=4096, repeats=1)
        with pytest.raises(InvalidArgumentError):
            run_benchmarks(provider, blocks=0)
        with pytest.raises(InvalidArgumentError):
            run_benchmarks(provider, batch=(4, 0))
        with pytest.raises(InvalidArgumentError, match="startup must be"):
            run_benchmarks(provider, blocks=4, repeats=1, startup=-1)
        with pytest.raises(InvalidArgumentError, match="smaller --batch-seqs"):
            run_benchmarks(provider, blocks=4, repeats=1, batch=(64, 128))
        assert provider.memory_stats().kv_blocks_in_use == 0
    finally:
        provider.close()


def test_batch_metadata_is_skipped_where_it_is_not_claimed() -> None:
    provider = MockBackendProvider(supported_ops=["sample"])
    try:
        report = run_benchmarks(provider, blocks=4, repeats=1, host_batch=8)
        assert [(r.case, r.baseline) for r in report.rows] == [*DEVICE, *host_cost(8)]
        assert report.skipped == [
            *MOCK_SKIPPED,
            "batch metadata: the backend does not claim batch_metadata",
        ]
    finally:
        provider.close()


def test_the_command_prints_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sagellm_backend", "bench", "mock", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=True,
    )
    report = json.loads(out.stdout)
    assert [[r["case"], r["baseline"]] for r in report["rows"]] == [list(c) for c in QUICK_CASES]
    assert "bench: kv swap: batched" in out.stderr


def test_host_cost_rows_are_per_block_and_say_what_the_baseline_shows() -> None:
    provider, other = MockBackendProvider(), MockBackendProvider(max_memory_mb=64)
    try:
        report = run_benchmarks(
            provider, blocks=4, repeats=3, batch=(4, 4), host_batch=16, against=other, startup=2
        )
        assert provider.memory_stats().kv_blocks_in_use == 0
        assert other.memory_stats().kv_blocks_in_use == 0
    finally:
        provider.close()
        other.close()
    rows = {(r.case, r.baseline): r for r in report.rows}
    against = [r for r in report.rows if r.baseline == "mock: the same calls"]
    assert [r.case for r in against] == [
        "alloc+free per block, batch 1",
        "alloc+free per block, batch 16",
    ]
    for case, baseline in [*host_cost(16), ("start-up", "python -c pass")]:
        row = rows[case, baseline]
        assert row.measures and row.count == 1
        assert row.ours_s > row.baseline_s > 0, "the plain baseline is the faster one"
    startup = rows["start-up", "python -c pass"]
    assert startup.item == "process" and 0.001 < startup.baseline_s < startup.ours_s < 30
    table = report.format_table()
    assert "us per block" in table and "us per process" in table


def test_interleaved_times_the_host_and_waits_for_the_device_off_the_clock() -> None:
    waits: list[str] = []
    calls = {"cheap": 0}

    def slow_sync() -> None:
        waits.append("sync")
        time.sleep(0.003)  # the device finishing: longer than a whole timed run

    def cheap() -> None:
        calls["cheap"] += 1

    def sleeper() -> None:
        time.sleep(0.0002)

    times = interleaved(
        {"cheap": (cheap, {}, 4), "sleeper": (sleeper, {}, 2)}, rounds=3, sync=slow_sync
    )
    assert set(times) == {"cheap", "sleeper"}
    assert len(waits) == 2 + 2 * 3, "after the calibration of each contender and every run"
    assert times["cheap"] < 20e-6, "a cheap call per item, with none of the 3 ms waits"
    assert 0.0002 / 2 <= times["sleeper"] < 0.003 / 2, "per item (2 a call), without the wait"
    assert calls["cheap"] > 3, "the cheap call runs many times a round"
