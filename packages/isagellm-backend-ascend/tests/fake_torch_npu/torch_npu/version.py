"""The stand-in is built for the torch it runs with, as a matching torch_npu release is."""

from __future__ import annotations

import torch

__version__ = torch.__version__.split("+")[0]
