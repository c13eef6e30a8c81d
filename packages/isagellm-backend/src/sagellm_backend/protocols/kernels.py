"""The kernel registry: named kernels with their references."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from sagellm_backend.dtypes import DType, KernelKind
from sagellm_backend.kernels import Comparator, InputMaker, KernelSpec

__all__ = ["KernelRegistry"]


@runtime_checkable
class KernelRegistry(Protocol):
    """Named kernels; an existing name is replaced only with ``override=True``."""

    def register_kernel(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        reference: Callable[..., Any] | None = None,
        make_inputs: InputMaker | None = None,
        compare: Comparator | None = None,
        override: bool = False,
    ) -> KernelSpec: ...

    def get_kernel(self, name: str) -> Callable[..., Any]: ...

    def kernel_spec(self, name: str) -> KernelSpec: ...

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]: ...
