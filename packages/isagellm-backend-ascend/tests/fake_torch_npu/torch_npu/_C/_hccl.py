"""The "hccl" torch.distributed backend: NPU tensors reduced for real over gloo.

Like ProcessGroupHCCL it reduces only with sum, prod, min and max (its ``hcclOp`` table) and
only the dtypes of its ``kScalarTypeToHcclDataType`` table. It refuses to start before the
process chose its device with ``torch.npu.set_device``. Before each op the device's current
stream is drained, so the collective reads what earlier queued work wrote.
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store, Work

from torch_npu._C import _device

_REDUCE_OPS = {
    dist.ReduceOp.SUM: "SUM",
    dist.ReduceOp.PRODUCT: "PRODUCT",
    dist.ReduceOp.MIN: "MIN",
    dist.ReduceOp.MAX: "MAX",
}
_DTYPES = frozenset(
    {
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.bool,
        torch.bfloat16,
    }
)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, _device.NPUTensor):
        raise RuntimeError(
            f"ProcessGroupHCCL only supports npu tensors, got a tensor on {tensor.device}"
        )
    if tensor.dtype not in _DTYPES:
        raise RuntimeError(
            f"HCCL backend does not support {tensor.dtype}"
            + _device.pta_error("ERR02002", "invalid type")
        )
    _device.current_stream(tensor.npu_index).drain()
    return tensor.data_


def _reduce_op(op: Any) -> Any:
    kind = op.op
    if kind not in _REDUCE_OPS:
        raise RuntimeError(
            f"Cannot use ReduceOp.{kind.name} with HCCL"
            + _device.pta_error("ERR02001", "invalid param")
        )
    return kind


class _Gloo(Protocol):
    """The ProcessGroupGloo calls used here (torch's stub for the class lists none of them)."""

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Work: ...

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor) -> Work: ...

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Work: ...

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Work: ...

    def barrier(self, opts: Any) -> Work: ...


class ProcessGroupHCCL(dist.ProcessGroup):
    """One rank of an HCCL world; every op runs on a gloo group over the same store."""

    def __init__(self, store: Store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        if not _device.DEVICE_SET.is_set():
            raise RuntimeError(
                "HCCL function error: the current device is not set; call "
                "torch.npu.set_device(local_rank) before init_process_group('hccl')"
                + _device.pta_error("ERR02200", "dist call hccl api failed")
            )
        super().__init__(rank, size)  # type: ignore[call-arg]  # the stub lists the store form only
        self._gloo = cast(_Gloo, dist.ProcessGroupGloo(store, rank, size, timeout))

    def getBackendName(self) -> str:
        return "hccl"

    def allreduce(  # type: ignore[override]  # the form torch calls; the stub differs
        self, tensors: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        options = dist.AllreduceOptions()
        options.reduceOp = _reduce_op(opts.reduceOp)
        return self._gloo.allreduce([_host(t) for t in tensors], options)

    def all_gather_single(  # type: ignore[override]  # the form torch calls; the stub differs
        self, output: torch.Tensor, input: torch.Tensor, opts: Any
    ) -> dist.Work:
        return self._gloo._allgather_base(_host(output), _host(input))

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any
    ) -> dist.Work:
        result = _host(output)
        whole = _host(input).clone()
        options = dist.AllreduceOptions()
        options.reduceOp = _reduce_op(opts.reduceOp)
        work = self._gloo.allreduce([whole], options)
        work.wait()
        result.copy_(whole.chunk(self.size())[self.rank()])
        return work

    def broadcast(  # type: ignore[override]  # the form torch calls; the stub differs
        self, tensors: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        options = dist.BroadcastOptions()
        options.rootRank = opts.rootRank
        return self._gloo.broadcast([_host(t) for t in tensors], options)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        return self._gloo.send([_host(t) for t in tensors], dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        return self._gloo.recv([_host(t) for t in tensors], src, tag)

    def barrier(self, opts: Any = None) -> dist.Work:
        return self._gloo.barrier(dist.BarrierOptions())


def create(store: Store, rank: int, size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    return ProcessGroupHCCL(store, rank, size, timeout)
