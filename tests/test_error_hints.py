"""Every error we raise says how to fix it: each construction of a BackendError carries a hint.

The scan reads the source (ast), so it finds every raise site, also those no test reaches: a
call of an error class of ours (``raise X(...)``, ``error = X(...)``, ``return X(...)``), also
through a name bound to one (``error = A if timed_out else B``), must pass ``hint=`` with
something other than None. Re-raising an error object (``raise error``) and rebuilding one built
elsewhere (``type(error)(...)``, ``CLASS_FOR_CODE[code](...)``) construct no new refusal: the
hint is the original's, so those are not sites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sagellm_backend.errors as errors

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "packages/isagellm-backend/src/sagellm_backend"
SOURCE_TREES = (
    CORE,
    ROOT / "packages/isagellm-backend-cuda/src",
    ROOT / "packages/isagellm-backend-ascend/src",
)
"""Everything the wheels ship; every raise site in them must carry a hint."""


def python_files(paths: tuple[Path, ...]) -> list[Path]:
    files: set[Path] = set()
    for path in paths:
        files.update([path] if path.is_file() else path.rglob("*.py"))
    return sorted(files)


def error_classes(trees: list[ast.Module]) -> set[str]:
    """Names of BackendError and every subclass, ours and those the scanned files define."""
    names = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type)
        and issubclass(getattr(errors, name), errors.BackendError)
    }
    classes = [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    grown = True
    while grown:
        grown = False
        for node in classes:
            bases = {_name(base) for base in node.bases}
            if node.name not in names and bases & names:
                names.add(node.name)
                grown = True
    return names


def sites_without_hint(files: list[Path]) -> list[tuple[Path, int, str]]:
    """(file, line, error class) of each error constructed without a hint."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files}
    classes = error_classes(list(trees.values()))
    return [
        (path, node.lineno, _name(node.func))
        for path, tree in trees.items()
        for names in [classes | _aliases(tree, classes)]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _name(node.func) in names and not _has_hint(node)
    ]


def _aliases(tree: ast.Module, classes: set[str]) -> set[str]:
    """Names the module binds to one of ``classes`` (``error = A if timed_out else B``)."""
    return {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _class_leaves(node.value) <= classes
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _class_leaves(node: ast.expr) -> set[str]:
    """The names an expression picks between; an empty name where it is not a plain choice."""
    if isinstance(node, ast.IfExp):
        return _class_leaves(node.body) | _class_leaves(node.orelse)
    if isinstance(node, ast.BoolOp):
        return set().union(*map(_class_leaves, node.values))
    return {_name(node)}


def _has_hint(node: ast.Call) -> bool:
    hint = next((k.value for k in node.keywords if k.arg == "hint"), None)
    return hint is not None and not (isinstance(hint, ast.Constant) and not hint.value)


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def test_every_error_raised_in_the_shipped_trees_has_a_hint() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path, line, name in sites_without_hint(python_files(SOURCE_TREES))
    ]
    assert missing == [], "errors constructed without hint=...:\n" + "\n".join(missing)


def test_the_scan_reads_every_wheel() -> None:
    files = python_files(SOURCE_TREES)
    assert all(any(f.is_relative_to(tree) for f in files) for tree in SOURCE_TREES)


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("raise InvalidArgumentError('bad')", True),
        ("raise errors.BackendLoadError('bad', hint=None)", True),
        ("raise InvalidArgumentError('bad', hint='')", True),
        ("error = CommTimeoutError('late')", True),
        ("class MyError(CapabilityError): ...\nraise MyError('no')", True),
        ("raise InvalidArgumentError('bad', hint='pass a positive int')", False),
        ("raise InvalidArgumentError('bad', hint=exc.hint)", False),
        ("raise ValueError('a builtin, translated at the boundary')", False),
        ("error = CommTimeoutError if late else CommError\nraise error('failed')", True),
        (
            "error = CommTimeoutError if late else CommError\nraise error('failed', hint='retry')",
            False,
        ),
        ("error = make()\nraise error('not one of ours')", False),
        ("raise error", False),
        ("raise type(error)(error.message, hint=error.hint, code=error.code)", False),
        ("raise CLASS_FOR_CODE[code](text, code=code)", False),
    ],
)
def test_the_scan_finds_what_it_should(tmp_path: Path, source: str, flagged: bool) -> None:
    module = tmp_path / "module.py"
    module.write_text(source + "\n")
    assert bool(sites_without_hint([module])) is flagged
