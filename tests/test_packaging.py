"""One version for every wheel, and never one the package registry already holds."""

from __future__ import annotations

import re
from importlib.metadata import distribution, requires, version

import pytest

import sagellm_backend

REGISTRY_HIGHEST = (0, 5, 4, 17)


def test_installed_distribution_carries_the_package_version() -> None:
    assert version("isagellm-backend") == sagellm_backend.__version__


def test_version_is_newer_than_every_registry_release() -> None:
    parts = tuple(int(p) for p in re.findall(r"\d+", sagellm_backend.__version__))
    assert parts > REGISTRY_HIGHEST


def test_wheel_ships_type_information() -> None:
    files = {str(f) for f in distribution("isagellm-backend").files or ()}
    assert "sagellm_backend/py.typed" in files


@pytest.mark.parametrize(
    ("dist", "extra"),
    [
        ("isagellm-backend", "torch"),
        ("isagellm-backend-cuda", None),
        ("isagellm-backend-ascend", None),
    ],
)
def test_whatever_brings_torch_brings_numpy(dist: str, extra: str | None) -> None:
    """torch warns at import ("Failed to initialize NumPy") when numpy is missing."""
    wanted = {"torch", "numpy"}
    found = set()
    for requirement in requires(dist) or ():
        name, _, marker = requirement.partition(";")
        marker = marker.replace("'", '"')
        in_extra = f'extra == "{extra}"' in marker if extra else "extra ==" not in marker
        if in_extra:
            found.add(re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0].lower())
    assert wanted <= found, f"{dist}{f'[{extra}]' if extra else ''} requires {sorted(found)}"
