"""Kinds this project ships, and the distribution and ``pip install`` that provide each.

The wheels are built from a checkout of this project, so each install names the package folders
(a plugin next to the core, which it pins exactly), run in that checkout.

The table lets "a kind of ours whose wheel is not installed" be told apart from "a kind nobody
provides", and lets the registry rank a distribution of this project above a foreign one that
claims the same kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from sagellm_backend.frozen import Frozen

__all__ = [
    "CORE_DISTRIBUTION",
    "CORE_ENTRY_POINTS",
    "KNOWN_KINDS",
    "OUR_DISTRIBUTIONS",
    "KnownKind",
    "is_ours",
    "known_aliases",
    "normalize_dist_name",
]

CORE_DISTRIBUTION = "isagellm-backend"

CORE_ENTRY_POINTS: Mapping[str, str] = MappingProxyType(
    {
        "mock": "sagellm_backend.mock:create_mock_backend",
        "cpu": "sagellm_backend.torch_backend.cpu:create_cpu_backend",
    }
)
"""The core's own entry points, as its pyproject declares them. Used when the core runs from a
source tree without installed metadata, so its built-in kinds are found all the same."""


class KnownKind(Frozen):
    """A kind this project provides: the distribution that registers it and how to install it."""

    kind: str
    distribution: str
    install: str
    alias_of: str | None = None


_IN_CHECKOUT = "in a sagellm-backend checkout: "
_CUDA = f"{_IN_CHECKOUT}pip install ./packages/isagellm-backend ./packages/isagellm-backend-cuda"
_ASCEND = (
    f"{_IN_CHECKOUT}pip install ./packages/isagellm-backend ./packages/isagellm-backend-ascend"
)

_ENTRIES = (
    KnownKind("mock", CORE_DISTRIBUTION, f"{_IN_CHECKOUT}pip install ./packages/isagellm-backend"),
    KnownKind(
        "cpu", CORE_DISTRIBUTION, f"{_IN_CHECKOUT}pip install './packages/isagellm-backend[torch]'"
    ),
    KnownKind("cuda", "isagellm-backend-cuda", _CUDA),
    KnownKind("ascend", "isagellm-backend-ascend", _ASCEND),
    KnownKind("ascend_cann", "isagellm-backend-ascend", _ASCEND, "ascend"),
    KnownKind("npu", "isagellm-backend-ascend", _ASCEND, "ascend"),
)

KNOWN_KINDS: Mapping[str, KnownKind] = MappingProxyType({k.kind: k for k in _ENTRIES})
"""kind -> the distribution of this project that provides it."""

OUR_DISTRIBUTIONS = frozenset(k.distribution for k in _ENTRIES)
"""Distributions of this project; one of them wins a kind claimed by a foreign one too."""


def normalize_dist_name(name: str) -> str:
    """Distribution name in its normalised form (PEP 503): lower case, runs of -_. as '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def known_aliases(kind: str) -> tuple[str, ...]:
    """The aliases of one of our kinds, as its wheel declares them, known without loading it."""
    return tuple(k.kind for k in _ENTRIES if k.alias_of == kind)


def is_ours(distribution: str | None) -> bool:
    return distribution is not None and normalize_dist_name(distribution) in OUR_DISTRIBUTIONS
