"""Acme NPU: a third-party backend plugin in its own package, as the seed's extension example
describes one. The tests install it as the distribution ``acme-npu-backend`` whose entry point
``acme_npu = "acme_npu:create_acme_npu_backend"`` is found, loaded and used by the registry."""

from __future__ import annotations

from acme_npu.provider import AcmeNpuProvider, create_acme_npu_backend

__all__ = ["AcmeNpuProvider", "create_acme_npu_backend"]
