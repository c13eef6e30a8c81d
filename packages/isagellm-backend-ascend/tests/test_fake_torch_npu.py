"""The torch_npu stand-in is strict: it refuses what a real NPU refuses and shows what a missing
synchronisation does. If these fail, the plugin's other tests prove nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")
torch_npu = pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]
"""The ``run_python`` fixture (conftest.py): a snippet in a fresh interpreter."""


def test_only_names_the_real_module_has() -> None:
    with pytest.raises(AttributeError):
        torch_npu.npu_no_such_operator  # noqa: B018
    with pytest.raises(AttributeError):
        torch.npu.no_such_function  # noqa: B018
    assert torch.npu is torch_npu.npu
    assert torch.device("npu:1").type == "npu"


def test_a_cpu_tensor_is_refused() -> None:
    on_npu = torch.ones(4, device="npu:0")
    with pytest.raises(RuntimeError, match="found at least two devices, npu:0 and cpu"):
        on_npu.add_(torch.ones(4))
    assert torch.equal(on_npu.cpu(), torch.ones(4))


def test_a_tensor_of_another_npu_is_refused() -> None:
    with pytest.raises(RuntimeError, match="npu:0 and npu:1"):
        torch.ones(4, device="npu:0") + torch.ones(4, device="npu:1")


def test_a_missing_synchronize_yields_stale_data() -> None:
    data = torch.zeros(1024, device="npu:0")
    torch.npu.synchronize(0)
    side = torch.npu.Stream(0)
    with torch.npu.stream(side):
        data.fill_(7.0)
    assert torch.count_nonzero(data.cpu()).item() == 0  # the default stream did not wait
    side.synchronize()
    assert torch.equal(data.cpu(), torch.full((1024,), 7.0))


def test_an_event_wait_orders_streams() -> None:
    data = torch.zeros(8, device="npu:0")
    torch.npu.synchronize(0)
    side = torch.npu.Stream(0)
    with torch.npu.stream(side):
        data.fill_(3.0)
        done = side.record_event()
    assert not done.query()
    torch.npu.current_stream(0).wait_event(done)
    assert torch.equal(data.cpu(), torch.full((8,), 3.0))


def test_event_misuse_raises_torch_npus_messages() -> None:
    start, end = torch.npu.Event(enable_timing=True), torch.npu.Event(enable_timing=True)
    start.record()
    with pytest.raises(RuntimeError, match="Both events must be recorded before calculating"):
        start.elapsed_time(end)
    untimed = torch.npu.Event()
    untimed.record()
    end.record()
    with pytest.raises(RuntimeError, match="aclrtEventElapsedTime"):
        untimed.elapsed_time(end)
    assert start.elapsed_time(end) >= 0.0


def test_memory_is_tracked_and_runs_out() -> None:
    free, total = torch.npu.mem_get_info(1)
    block = torch.empty(64 << 20, dtype=torch.uint8, device="npu:1")
    assert torch.npu.mem_get_info(1)[0] == free - (64 << 20)
    with pytest.raises(torch.OutOfMemoryError, match=r"NPU out of memory\. Tried to allocate"):
        torch.empty(total, dtype=torch.uint8, device="npu:1")
    del block
    assert torch.npu.mem_get_info(1) == (free, total)


def test_bf16_by_soc_family(monkeypatch: pytest.MonkeyPatch) -> None:
    for soc, bf16 in (("Ascend310P3", False), ("Ascend910B3", True), ("Ascend910_9391", True)):
        monkeypatch.setenv("FAKE_TORCH_NPU_SOC", soc)
        assert torch.npu.is_bf16_supported() is bf16
        assert torch.npu.get_device_name(0) == soc


def test_import_without_cann_fails_with_torch_npus_text(run_python: RunPython) -> None:
    result = run_python("import torch_npu", FAKE_TORCH_NPU_IMPORT="no_cann")
    assert "ImportError: libhccl.so: cannot open shared object file" in result.stderr
    assert "Please run 'source set_env.sh' in the CANN installation path." in result.stderr


def test_hccl_needs_set_device_first(run_python: RunPython) -> None:
    code = (
        "import torch, torch_npu, torch.distributed as dist\n"
        "from torch._C._distributed_c10d import HashStore\n"
        "def init():\n"
        "    dist.init_process_group('hccl', store=HashStore(), rank=0, world_size=1)\n"
        "try:\n"
        "    init()\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', 'set_device' in str(exc))\n"
        "torch.npu.set_device(1)\n"
        "init()\n"
        "t = torch.ones(3, device='npu:1')\n"
        "dist.all_reduce(t)\n"
        "print(dist.get_backend(), t.cpu().tolist())\n"
        "dist.destroy_process_group()\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["refused: True", "hccl [1.0, 1.0, 1.0]"]


def test_a_graph_records_work_and_replays_it() -> None:
    data = torch.zeros(8, device="npu:0")
    side = torch.npu.Stream(0)
    graph = torch.npu.NPUGraph()
    with torch.npu.graph(graph, stream=side):
        assert torch.npu.is_current_stream_capturing()
        data.add_(1.0)
    torch.npu.synchronize(0)
    assert torch.equal(data.cpu(), torch.zeros(8))  # captured, not run
    graph.replay()
    graph.replay()
    assert torch.equal(data.cpu(), torch.full((8,), 2.0))


def test_graph_misuse_raises_torch_npus_messages() -> None:
    with pytest.raises(RuntimeError, match="must be captured on a non-default stream"):
        torch.npu.NPUGraph().capture_begin()
    with pytest.raises(RuntimeError, match="replay without a preceding successful capture"):
        torch.npu.NPUGraph().replay()


@pytest.mark.parametrize(
    ("wait", "call"),
    [
        ("stream", r"AclrtSynchronizeStreamWithTimeout\(stream\(\)\)"),
        ("device", r"aclrtSynchronizeDevice\(\)"),
        ("host read", r"AclrtSynchronizeStreamWithTimeout\(copy_stream\)"),
    ],
)
def test_a_wait_during_capture_fails_and_invalidates_it(wait: str, call: str) -> None:
    data = torch.zeros(8, device="npu:0")
    side = torch.npu.Stream(0)
    waits = {"stream": side.synchronize, "device": torch.npu.synchronize, "host read": data.cpu}
    graph = torch.npu.NPUGraph()
    capture = torch.npu.graph(graph, stream=side)
    capture.__enter__()
    data.add_(1.0)
    with pytest.raises(RuntimeError, match=f"{call}, error code is 107027") as err:
        waits[wait]()
    assert "reason=stream is captured" in str(err.value)
    with pytest.raises(RuntimeError, match=r"AclmdlRICaptureEnd.*error code is 507903"):
        capture.__exit__(None, None, None)
    assert not torch.npu.is_current_stream_capturing()
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        graph.replay()


def test_the_fused_operators_refuse_what_torch_npu_refuses() -> None:
    x = torch.ones(4, 8, dtype=torch.float16, device="npu:0")
    weight = torch.ones(8, dtype=torch.float16, device="npu:0")
    with pytest.raises(TypeError):
        torch_npu.npu_rms_norm(x, weight, eps=1e-6)  # the argument is named epsilon
    with pytest.raises(RuntimeError, match="gamma must have the dtype of x"):
        torch_npu.npu_rms_norm(x, weight.float())
    with pytest.raises(RuntimeError, match=r"dtype torch\.float64 is not supported"):
        torch_npu.npu_swiglu(x.double())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch_npu.npu_swiglu(x.t())
    with pytest.raises(RuntimeError, match="rotary_mode 'neox'"):
        torch_npu.npu_rotary_mul(x.view(1, 4, 1, 8), x.view(1, 4, 1, 8), x.view(1, 4, 1, 8), "neox")
    with pytest.raises(RuntimeError, match="must be 4-D"):
        torch_npu.npu_rotary_mul(x, x, x)
    cache = torch.zeros(4, 2, 2, 1, 8, dtype=torch.float16, device="npu:0")
    slots = torch.zeros(1, dtype=torch.int32, device="npu:0")
    new = torch.ones(1, 1, 8, dtype=torch.float16, device="npu:0")
    with pytest.raises(RuntimeError, match="key_cache must be contiguous"):
        torch_npu._npu_reshape_and_cache(new, new, cache[:, 0], cache[:, 1], slots)
    with pytest.raises(RuntimeError, match="slot_indices must be int32"):
        torch_npu._npu_reshape_and_cache(new, new, cache[0], cache[1], slots.long())


def test_the_a2_operators_refuse_other_socs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(4, 8, dtype=torch.float16, device="npu:0")
    monkeypatch.setenv("FAKE_TORCH_NPU_SOC", "Ascend310P3")
    with pytest.raises(RuntimeError, match="not supported on Ascend310P3"):
        torch_npu.npu_swiglu(x)
    with pytest.raises(RuntimeError, match="not supported on Ascend310P3"):
        torch_npu.npu_add_rms_norm(x, x, x[0])
    assert torch_npu.npu_rms_norm(x, x[0])[0].shape == (4, 8)  # every SoC has it


def test_reshape_and_cache_skips_negative_slots() -> None:
    cache = torch.zeros(2, 2, 1, 4, dtype=torch.float16, device="npu:0")
    new = torch.arange(1, 13, dtype=torch.float16, device="npu:0").view(3, 1, 4)
    slots = torch.tensor([3, -1, 0], dtype=torch.int32, device="npu:0")
    torch_npu._npu_reshape_and_cache(new, -new, cache, cache.clone(), slots)
    host = cache.cpu().view(4, 4)
    assert host[3].tolist() == [1, 2, 3, 4] and host[0].tolist() == [9, 10, 11, 12]
    assert host[1:3].abs().sum().item() == 0
