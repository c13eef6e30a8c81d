"""The mock backend: a faithful, pure-Python fake device for engine tests and CI.

    >>> from sagellm_backend import MockBackendProvider, DType
    >>> backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16])
    >>> block = backend.kv_block_alloc(128, DType.FP16)
    >>> block.num_pages
    8

:func:`create_mock_world` gives one provider per rank of a simulated world; drive each rank
from its own thread. :data:`create_mock_backend` is the ``mock`` entry point.
"""

from __future__ import annotations

from sagellm_backend.mock.collectives import MockWorld
from sagellm_backend.mock.factory import create_mock_backend
from sagellm_backend.mock.graph import MockGraph
from sagellm_backend.mock.options import MockOptions
from sagellm_backend.mock.provider import MockBackendProvider, create_mock_world
from sagellm_backend.mock.streams import MockEvent, MockStream
from sagellm_backend.mock.tensor import MockTensor

__all__ = [
    "MockBackendProvider",
    "MockEvent",
    "MockGraph",
    "MockOptions",
    "MockStream",
    "MockTensor",
    "MockWorld",
    "create_mock_backend",
    "create_mock_world",
]
