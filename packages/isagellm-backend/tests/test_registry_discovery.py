"""Discovery's scan of sys.path finds what importlib.metadata finds, without importing it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from sagellm_backend.registry.discovery import GROUP, _from_metadata, _scan, discover

Found = list[tuple[str, str | None, str | None, str | None, str]]


def summary(entries: object) -> Found:
    assert isinstance(entries, list)
    rows = [(d.kind, d.distribution, d.version, d.requires_core, d.target) for d in entries]
    return sorted(rows)


def install(root: Path, name: str, version: str, text: str, metadata_lines: str = "") -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{metadata_lines}\nBody text.\n"
    )
    (info / "entry_points.txt").write_text(text)


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    return first, second


def test_the_scan_finds_what_importlib_metadata_finds(paths: tuple[Path, Path]) -> None:
    first, second = paths
    install(
        first,
        "zz-alpha",
        "1.2",
        f"# a comment\n[console_scripts]\nzz = zz_alpha:main\n\n[{GROUP}]\n"
        "zz_alpha = zz_alpha.plugin : factory\n# another comment\nzz_beta=zz_alpha:beta\n",
        "Requires-Dist: isagellm-backend==0.6.0\nRequires-Dist: numpy; extra == 'fast'",
    )
    install(first, "zz-other", "3", "[other.group]\nzz_gamma = nope:nope\n")
    install(second, "zz-alpha", "0.9", f"[{GROUP}]\nzz_shadowed = old:factory\n")
    install(second, "zz.delta", "2.0", f"[{GROUP}]\nzz_delta = zz_delta:factory\n")
    scanned = _scan(GROUP)
    assert scanned is not None
    assert summary(scanned) == summary(_from_metadata(GROUP)), "the same entry points"
    mine = [row for row in summary(scanned) if row[0].startswith("zz")]
    assert mine == [
        ("zz_alpha", "zz-alpha", "1.2", "==0.6.0", "zz_alpha.plugin : factory"),
        ("zz_beta", "zz-alpha", "1.2", "==0.6.0", "zz_alpha:beta"),
        ("zz_delta", "zz.delta", "2.0", None, "zz_delta:factory"),
    ], "the first distribution of a name on sys.path wins"
    assert [d.kind for d in discover()] == sorted(d.kind for d in discover())


def test_a_scanned_entry_point_loads_its_target(paths: tuple[Path, Path]) -> None:
    first, _ = paths
    (first / "zz_target.py").write_text("class Holder:\n    class factory:\n        pass\n")
    install(first, "zz-target", "1", f"[{GROUP}]\nzz_target = zz_target:Holder.factory\n")
    [entry] = [d for d in discover() if d.kind == "zz_target"]
    try:
        assert entry.entry_point.load().__qualname__ == "Holder.factory"
    finally:
        sys.modules.pop("zz_target", None)


def test_what_the_scan_cannot_read_is_left_to_importlib_metadata(
    paths: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = paths
    egg = first / "zz_egg.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: zz-egg\nVersion: 1\n")
    (egg / "entry_points.txt").write_text(f"[{GROUP}]\nzz_egg = zz_egg:factory\n")
    assert _scan(GROUP) is None, "an egg-info declaring the group"
    assert ("zz_egg", "zz-egg") in {(d.kind, d.distribution) for d in discover()}
    egg_free = tmp_path / "plain"
    egg_free.mkdir()
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zz_zip-1.dist-info/METADATA", "Name: zz-zip\nVersion: 1\n")
        zf.writestr("zz_zip-1.dist-info/entry_points.txt", f"[{GROUP}]\nzz_zip = zz_zip:f\n")
    monkeypatch.setattr(sys, "path", [str(archive), str(egg_free)])
    assert _scan(GROUP) is None, "a zip on sys.path"
    assert [d.kind for d in discover()] == [e.name for e in metadata.entry_points(group=GROUP)]


def test_get_backend_mock_imports_no_importlib_metadata() -> None:
    code = (
        "import sys\nfrom sagellm_backend import get_backend\nget_backend('mock').close()\n"
        "print(sorted(m for m in ('importlib.metadata', 'email', 'zipfile') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
