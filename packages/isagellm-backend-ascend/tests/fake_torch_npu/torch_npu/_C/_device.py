"""The emulated NPUs: logical devices backed by CPU memory, streams that run lazily, memory.

``npu:i`` is a real torch device type (the PrivateUse1 backend renamed to "npu", as torch_npu
does). Its tensors are :class:`NPUTensor` wrappers: each holds a CPU tensor with the data and
the index of the logical device it lives on. Every aten op on them passes through
``__torch_dispatch__``, which

- refuses to mix devices as a real device does: a CPU tensor (other than a 0-dim scalar) or a
  tensor of another NPU in one op raises torch's "Expected all tensors to be on the same
  device" error;
- queues the op on the current stream of the tensor's device instead of running it. Queued work
  runs only when something waits for it: ``synchronize`` (stream, event, device), ``query``,
  an event or stream wait, a copy to the host, or reading a value (``item``). So a read that
  does not wait for the stream that wrote the data sees the old bytes, as it would on the
  device;
- allocates outputs against the device's memory, raising NPU out-of-memory beyond it;
- while a graph captures a stream (``torch_npu.npu.graphs``), records the work pushed to it
  instead of queueing it, and refuses every wait for it with torch_npu's "stream is captured"
  error (ACL 107027), which also invalidates the capture. A blocking copy from pageable host
  memory is a synchronous ``aclrtMemcpy`` in torch_npu, not a stream task: it writes the device
  memory at once and is not recorded.

Views are made at once (they move no data), so they alias their base as on the device.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

LOCK = threading.RLock()
"""Guards every stream queue and memory counter; queued work runs under it."""

_MIB = 1 << 20


def pta_error(code: str, what: str) -> str:
    """The suffix torch_npu appends to its errors (``pta_error(ErrCode.X)``)."""
    stamp = time.strftime("%Y-%m-%d-%H:%M:%S")
    device = current_index() if DEVICES else -1
    return f"\n[ERROR] {stamp} (PID:{os.getpid()}, Device:{device}, RankID:-1) {code} PTA {what}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", _MIB), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} bytes"


CAPTURED_STREAM = 107027
"""ACL_ERROR_RT_STREAM_CAPTURED: a wait for a stream that is being captured."""


def captured_error(call: str, stream: FakeStream) -> RuntimeError:
    """torch_npu's error for ``call`` waiting on a stream under capture; it invalidates the
    capture, as the runtime does."""
    stream.invalidated = True
    return RuntimeError(
        f"NPU function error: {call}, error code is {CAPTURED_STREAM}"
        + pta_error("ERR00100", "call acl api failed")
        + "\nEE9999: Inner Error!\nEE9999: Not allow to synchronize captured-stream, "
        f"stream_id={id(stream) % 4096}.[FUNC:StreamSynchronize][FILE:api_error.cc]\n"
        "        TraceBack (most recent call last):\n"
        "        rtStreamSynchronizeWithTimeout execution failed, reason=stream is captured"
        "[FUNC:FuncErrorReason][FILE:error_message_manage.cc]"
    )


class FakeStream:
    """An ordered queue of work on one device; items run when something waits for them.

    While a graph captures the stream, work pushed to it is appended to ``recording`` instead
    of queued, and waiting for the stream raises torch_npu's "stream is captured" error.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.pending: deque[tuple[int, Callable[[], object]]] = deque()
        self.issued = 0
        self.done = 0
        self.recording: list[Callable[[], object]] | None = None
        self.invalidated = False
        DEVICES[index].streams.add(self)

    def push(self, item: Callable[[], object]) -> int:
        with LOCK:
            if self.recording is not None:
                self.recording.append(item)
                return self.issued
            self.issued += 1
            self.pending.append((self.issued, item))
            return self.issued

    def run_until(
        self, seq: int, call: str = "c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream())"
    ) -> None:
        with LOCK:
            if self.recording is not None:
                raise captured_error(call, self)
            while self.pending and self.pending[0][0] <= seq:
                number, item = self.pending.popleft()
                item()
                self.done = number

    def drain(
        self, call: str = "c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream())"
    ) -> None:
        self.run_until(self.issued, call)


class Device:
    """One logical NPU: its memory counters and its streams."""

    def __init__(self, index: int, total_bytes: int) -> None:
        self.index = index
        self.total_bytes = total_bytes
        self.allocated = 0
        self.peak = 0
        self.streams: weakref.WeakSet[FakeStream] = weakref.WeakSet()
        self.default: FakeStream | None = None

    def default_stream(self) -> FakeStream:
        if self.default is None:
            self.default = FakeStream(self.index)
        return self.default

    def synchronize(self) -> None:
        with LOCK:
            for stream in list(self.streams):
                stream.drain("aclrtSynchronizeDevice()")


DEVICES: list[Device] = []
"""The visible devices, configured when torch_npu is imported."""

DEVICE_SET = threading.Event()
"""Set once this process called set_device (HCCL needs it before init)."""

_local = threading.local()


def configure(count: int, memory_mb: int) -> None:
    DEVICES[:] = [Device(i, memory_mb * _MIB) for i in range(count)]


def check_index(index: int) -> int:
    if not 0 <= index < len(DEVICES):
        raise RuntimeError(
            "Initialize:torch_npu/csrc/core/npu/sys_ctrl/npu_sys_ctrl.cpp:146 NPU function "
            "error: c10_npu::SetDevice(device_id_), error code is 507033"
            + pta_error("ERR00100", "call acl api failed")
        )
    return index


def current_index() -> int:
    index: int = getattr(_local, "device", 0)
    return index


def set_current_index(index: int) -> None:
    _local.device = check_index(index)
    DEVICE_SET.set()


def current_stream(index: int) -> FakeStream:
    streams: dict[int, FakeStream] = _local.__dict__.setdefault("streams", {})
    return streams.get(index) or DEVICES[check_index(index)].default_stream()


def set_current_stream(stream: FakeStream) -> None:
    _local.__dict__.setdefault("streams", {})[stream.index] = stream


@contextmanager
def using_stream(stream: FakeStream) -> Iterator[None]:
    streams: dict[int, FakeStream] = _local.__dict__.setdefault("streams", {})
    before_stream, before_device = streams.get(stream.index), current_index()
    streams[stream.index] = stream
    _local.device = stream.index
    try:
        yield
    finally:
        if before_stream is None:
            del streams[stream.index]
        else:
            streams[stream.index] = before_stream
        _local.device = before_device


# Memory.


class Allocation:
    """Bytes one NPU tensor (and every view of it) holds on its device."""

    def __init__(self, index: int, nbytes: int) -> None:
        device = DEVICES[index]
        with LOCK:
            free = device.total_bytes - device.allocated
            if nbytes > free:
                raise torch.OutOfMemoryError(
                    f"NPU out of memory. Tried to allocate {_size(nbytes)} (NPU {index}; "
                    f"{_size(device.total_bytes)} total capacity; {_size(device.allocated)} "
                    f"already allocated; {_size(device.allocated)} current active; "
                    f"{_size(free)} free; {_size(device.allocated)} reserved in total by "
                    "PyTorch)"
                )
            device.allocated += nbytes
            device.peak = max(device.peak, device.allocated)
        weakref.finalize(self, _release, index, nbytes)


def _release(index: int, nbytes: int) -> None:
    with LOCK:
        DEVICES[index].allocated -= nbytes


def allocate(
    shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype, index: int
) -> NPUTensor:
    check_index(index)
    data = torch.empty_strided(shape, stride, dtype=dtype)
    nbytes = data.untyped_storage().nbytes()
    return NPUTensor(data, index, Allocation(index, nbytes))


# Tensors.


class NPUTensor(torch.Tensor):
    """A tensor on ``npu:index`` whose bytes live in the CPU tensor ``data``."""

    data_: torch.Tensor
    npu_index: int
    allocation: Allocation

    @staticmethod
    def __new__(cls, data: torch.Tensor, index: int, allocation: Allocation) -> NPUTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=torch.device("npu", index),
            requires_grad=False,
            dispatch_sizes_strides_policy="sizes",
        )
        wrapper.data_ = data
        wrapper.npu_index = index
        wrapper.allocation = allocation
        return wrapper

    def __init__(self, data: torch.Tensor, index: int, allocation: Allocation) -> None:
        super().__init__()

    def __repr__(self) -> str:  # type: ignore[override]  # a keyword-only stub signature
        return f"tensor({self.tolist()!r}, device='npu:{self.npu_index}', dtype={self.dtype})"

    def tolist(self) -> Any:
        return self.cpu().tolist()

    def data_ptr(self) -> int:
        return self.data_.data_ptr()  # addresses alias as on the device, for aliasing checks

    def untyped_storage(self) -> torch.UntypedStorage:
        return self.data_.untyped_storage()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(
            f"can't convert npu:{self.npu_index} device type tensor to numpy. Use Tensor.cpu() to "
            "copy the tensor to host memory first."
        )

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch's stub leaves out ``func``
        cls,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _dispatch(func, args, kwargs or {})


def _npu_tensors(args: Any) -> list[NPUTensor]:
    leaves, _ = tree_flatten(args)
    return [x for x in leaves if isinstance(x, NPUTensor)]


def _check_same_device(func: torch._ops.OpOverload, args: Any) -> int:
    """The device every tensor argument is on, or torch's error for a mix."""
    leaves, _ = tree_flatten(args)
    devices: list[str] = []
    for x in leaves:
        if isinstance(x, NPUTensor):
            devices.append(f"npu:{x.npu_index}")
        elif isinstance(x, torch.Tensor) and x.dim() > 0:
            devices.append(str(x.device))
    distinct = list(dict.fromkeys(devices))
    if len(distinct) > 1:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{distinct[0]} and {distinct[1]}! (when checking argument for {func})"
        )
    return int(distinct[0].split(":")[1])


def _unwrap(x: Any) -> Any:
    if isinstance(x, NPUTensor):
        return x.data_
    if isinstance(x, torch.device) and x.type == "npu":
        return torch.device("cpu")
    return x


def _to_meta(x: Any) -> Any:
    if isinstance(x, NPUTensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, torch.device) and x.type == "npu":
        return torch.device("meta")
    return x


_METADATA: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.sym_size.default: lambda t: t.data_.size(),
    torch.ops.aten.sym_stride.default: lambda t: t.data_.stride(),
    torch.ops.aten.sym_numel.default: lambda t: t.data_.numel(),
    torch.ops.aten.sym_storage_offset.default: lambda t: t.data_.storage_offset(),
    torch.ops.aten.dim.default: lambda t: t.data_.dim(),
    torch.ops.aten.is_contiguous.default: lambda t: t.data_.is_contiguous(),
    torch.ops.aten.is_contiguous.memory_format: lambda t, f: t.data_.is_contiguous(memory_format=f),
}
"""Shape queries read the host tensor, whose shape an out= op may have resized."""

_INPLACE_VIEWS = {
    torch.ops.aten.squeeze_,
    torch.ops.aten.unsqueeze_,
    torch.ops.aten.transpose_,
    torch.ops.aten.t_,
    torch.ops.aten.as_strided_,
    torch.ops.aten.detach_,
    torch.ops.aten.swapdims_,
    torch.ops.aten.swapaxes_,
}
"""In-place ops that change only a tensor's shape and strides: they run when issued."""


def _dispatch(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if func in _METADATA:
        return _METADATA[func](*args)
    if func is torch.ops.aten.copy_.default:
        return _copy(args[0], args[1])
    if func is torch.ops.aten._to_copy.default:
        return _to_copy(args[0], kwargs)
    index = _check_same_device(func, (args, kwargs))
    if func.is_view or func is torch.ops.aten.detach.default:
        return _view(func, args, kwargs, index)
    if func.overloadpacket in _INPLACE_VIEWS:
        target: NPUTensor = args[0]
        alias = target.data_.view(target.data_.shape)  # queued work keeps the old shape
        func(alias, *tree_map(_unwrap, args[1:]), **tree_map(_unwrap, kwargs))
        target.data_ = alias
        return target
    stream = current_stream(index)
    schema = func._schema
    if schema.is_mutable:
        return _mutate(func, args, kwargs, stream)
    try:
        meta = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
    except (NotImplementedError, RuntimeError):
        meta = None  # data-dependent output: the host must wait for the stream
    leaves, _ = tree_flatten(meta)
    if meta is None or not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        stream.drain(_HOST_READ)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(lambda x: _adopt(x, index) if isinstance(x, torch.Tensor) else x, out)
    outs = tree_map(lambda m: allocate(tuple(m.shape), tuple(m.stride()), m.dtype, index), meta)
    cpu_args, cpu_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)

    targets = [t.data_ for t in tree_flatten(outs)[0]]

    def run() -> None:
        result = func(*cpu_args, **cpu_kwargs)
        for target, value in zip(targets, tree_flatten(result)[0], strict=True):
            target.copy_(value)

    stream.push(run)
    return outs


_HOST_READ = "c10_npu::acl::AclrtSynchronizeStreamWithTimeout(copy_stream)"
"""The wait of a read by the host (a copy to the host, ``item``, a data-dependent shape)."""


def _adopt(data: torch.Tensor, index: int) -> NPUTensor:
    """A host-computed result, placed on ``npu:index``."""
    return NPUTensor(data, index, Allocation(index, data.untyped_storage().nbytes()))


def _view(
    func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], index: int
) -> Any:
    base = _npu_tensors(args)[0]
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    return tree_map(
        lambda x: NPUTensor(x, index, base.allocation) if isinstance(x, torch.Tensor) else x, out
    )


def _mutate(
    func: torch._ops.OpOverload,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stream: FakeStream,
) -> Any:
    schema = func._schema
    written: list[Any] = []
    for position, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if argument.kwarg_only or position >= len(args):
            written.append(kwargs.get(argument.name))
        else:
            written.append(args[position])
    try:
        meta = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
    except (NotImplementedError, RuntimeError):
        meta = None
    outs = [a for a in schema.arguments if a.kwarg_only and a.alias_info and a.alias_info.is_write]
    for argument, shaped in zip(outs, tree_flatten(meta)[0], strict=False):
        target = kwargs.get(argument.name)
        if isinstance(target, NPUTensor) and target.data_.shape != shaped.shape:
            target.data_.resize_(shaped.shape)  # an out= op sizes its output when issued
    cpu_args, cpu_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
    stream.push(lambda: func(*cpu_args, **cpu_kwargs))
    if len(schema.returns) == 1:
        return written[0]
    return tuple(written[: len(schema.returns)])


def _copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if isinstance(dst, NPUTensor):
        stream = current_stream(dst.npu_index)
        if isinstance(src, NPUTensor):
            if src.npu_index != dst.npu_index:
                current_stream(src.npu_index).drain()
            source = src.data_
            stream.push(lambda: dst.data_.copy_(source))
        else:
            if src.dim() > 0 and src.device.type != "cpu":
                raise RuntimeError(f"copy from {src.device} to npu is not supported")
            if stream.recording is not None:
                # A blocking copy is a synchronous aclrtMemcpy, not a task of the stream: it
                # writes the device memory now and is not part of the graph.
                dst.data_.copy_(src)
                return dst
            snapshot = src.clone()  # pageable host memory is read when the call is made
            stream.push(lambda: dst.data_.copy_(snapshot))
        return dst
    assert isinstance(src, NPUTensor)
    current_stream(src.npu_index).drain(_HOST_READ)  # a copy to the host waits for the stream
    dst.copy_(src.data_)
    return dst


def _to_copy(src: NPUTensor, kwargs: dict[str, Any]) -> torch.Tensor:
    device = kwargs.get("device")
    dtype = kwargs.get("dtype") or src.dtype
    if device is not None and torch.device(device).type == "cpu":
        current_stream(src.npu_index).drain(_HOST_READ)
        return src.data_.to(dtype=dtype, copy=True)
    index = src.npu_index if device is None else torch.device(device).index or 0
    out = allocate(tuple(src.shape), tuple(src.contiguous().stride()), dtype, index)
    if index != src.npu_index:
        current_stream(src.npu_index).drain()
    source = src.data_
    current_stream(index).push(lambda: out.data_.copy_(source))
    return out


# The PrivateUse1 kernels torch calls before any NPU tensor exists (factories, host copies).


def _empty(
    size: list[int],
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
    memory_format: torch.memory_format | None = None,
) -> NPUTensor:
    shape = tuple(size)
    stride = torch.empty(shape, device="meta").stride()
    return allocate(shape, stride, dtype or torch.get_default_dtype(), _index_of(device))


def _empty_strided(
    size: list[int],
    stride: list[int],
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
) -> NPUTensor:
    return allocate(
        tuple(size), tuple(stride), dtype or torch.get_default_dtype(), _index_of(device)
    )


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    return _copy(dst, src)


def _index_of(device: torch.device | None) -> int:
    if device is None or device.index is None:
        return current_index()
    return device.index


_LIBRARIES: list[torch.library.Library] = []


def register_kernels() -> None:
    """Register the PrivateUse1 kernels (kept alive for the life of the process)."""
    # torch.library is unannotated.
    library = torch.library.Library("aten", "IMPL")  # type: ignore[no-untyped-call]
    _LIBRARIES.append(library)
    for name, kernel in (
        ("empty.memory_format", _empty),
        ("empty_strided", _empty_strided),
        ("_copy_from", _copy_from),
    ):
        library.impl(name, kernel, "PrivateUse1")  # type: ignore[no-untyped-call]
