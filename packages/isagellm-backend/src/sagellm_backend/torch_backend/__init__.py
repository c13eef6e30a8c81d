"""The shared torch layer: one implementation of the protocols for every torch device.

A device wheel supplies a :class:`~sagellm_backend.torch_backend.adapter.DeviceAdapter` (streams,
events, memory, placement, the torch.distributed backend) and its kernels; this package supplies
the KV page pool, batched block movement, collectives, reference kernels and the provider.

Importing this package imports no torch: :mod:`sagellm_backend.torch_backend.cpu` (the ``cpu``
entry point) and :mod:`sagellm_backend.torch_backend.options` are torch-free; every other module
imports torch and is loaded only when a backend is created.
"""
