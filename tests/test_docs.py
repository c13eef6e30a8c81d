"""The documentation keeps up with the code.

Every error code is in the catalogue, the wheels never send a user to a page of docs/ (which
they do not ship), and every command that README.md, docs/ and the wheels' READMEs name either
runs here or is skipped with its reason, so ``pytest -rs`` counts the skips per reason. The
install commands run in a fresh environment when ``SAGELLM_TEST_INSTALLS=1`` (the nox ``install``
session sets it), with torch pinned by ``constraints/torch.txt``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sagellm_backend import ErrorCode
from sagellm_backend.ops import STANDARD_OPS, StandardOp

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [
    ROOT / "README.md",
    *sorted(DOCS.glob("*.md")),
    *sorted((ROOT / "packages").glob("*/README.md")),
]
SHIPPED = sorted((ROOT / "packages").glob("*/src"))
INSTALLS = "SAGELLM_TEST_INSTALLS"
TORCH_CONSTRAINTS = ROOT / "constraints" / "torch.txt"

PROGRAMS = re.compile(
    r"(sagellm-backend|pip|python3?|nox|torchrun|source|benchmarks/\S+|\.venv/bin/\S+"
    r"|PYTHONPATH=\S+)(\s|$)"
)
"""What a documented command starts with."""
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
INLINE = re.compile(r"`([^`\n]+)`")
PLACEHOLDERS = {"SPEC": "mock", "KIND": "mock", "COMMAND": "list"}
"""Words a documented command stands for, and what the test runs in their place. A ``bench``
command runs once (``--repeats 1``, the last ``--repeats`` wins): its sizes and pools are what
is checked here, not its figures."""

GPU = "needs an NVIDIA GPU: runs on the GPU machine (benchmarks/cuda_device_run.sh)"
ASCEND = "needs Ascend NPUs with torch-npu and CANN (the fake of torch_npu runs in the tests)"
NOX = "runs nox sessions: CI runs every one of them (.ci/run)"
ACME = "the fictional plugin of writing-a-backend.md (its twin tests/plugins/acme_npu is tested)"
SYNOPSIS = "a synopsis with placeholders; its forms are run from the other documented commands"
ENGINE = "an engine's own script under a launcher"
BENCHMARK = "a benchmark of repeated fresh interpreters; tests/test_import_cost.py tests it"
PLOT = "needs matplotlib and the JSON of a GPU run"
MODEL_BENCH = (
    "rounds of a model against transformers; tests/test_tiny_llama.py checks the same model "
    "against transformers in the torch session"
)
REFERENCE = "names the install an error message gives, not a command of its own"
INSTALL = f"installs into a fresh environment: runs in `nox -s install` ({INSTALLS}=1)"

RULES: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"(^|&& )(python3 -m )?nox\b|pip install \"nox"), NOX),
    (re.compile(r"\[--\w+ [A-Z]\]"), SYNOPSIS),
    (re.compile(r"acme|yourkind|pip install -e \."), ACME),
    (re.compile(r"torch-npu|torch_npu|Ascend/|set_env\.sh|check '?ascend"), ASCEND),
    (re.compile(r"^PYTHONPATH=.* -m pytest "), NOX),
    (re.compile(r"\./packages/|^python3 -m venv|--find-links dist"), INSTALL),
    (re.compile(r"^pip install$"), REFERENCE),
    (re.compile(r"benchmarks/plot_cuda_kv\.py"), PLOT),
    (re.compile(r"\bcuda\b|cuda_device_run|tune_cuda_attention|cuda_model_kernels"), GPU),
    (re.compile(r"my_engine\.py|^torchrun --nproc-per-node N$"), ENGINE),
    (re.compile(r"benchmarks/import_cost\.py"), BENCHMARK),
    (re.compile(r"benchmarks/tiny_llama_bench\.py --spec cpu"), MODEL_BENCH),
    (re.compile(r"^(sagellm-backend|python3? -m sagellm_backend|python3? -c pass$)"), None),
]
"""First match wins: a skip reason, or None for a command that runs here."""


@dataclass(frozen=True)
class DocCommand:
    where: str
    """``file:line`` of its first mention."""
    text: str


def doc_commands() -> list[DocCommand]:
    """Every distinct command the documents name, in fenced shell blocks or inline code."""
    found: dict[str, str] = {}
    for path in DOC_FILES:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        for match in FENCE.finditer(text):
            if match.group(1) not in SHELL_BLOCKS:
                continue
            first = text[: match.start(2)].count("\n") + 1
            for offset, line in _block_lines(match.group(2)):
                found.setdefault(line, f"{name}:{first + offset}")
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for number, line in enumerate(prose.splitlines(), 1):
            for span in INLINE.findall(line):
                if " " in span and PROGRAMS.match(span):
                    found.setdefault(span, f"{name}:{number}")
    return [DocCommand(where, text) for text, where in found.items()]


def _block_lines(block: str) -> Iterator[tuple[int, str]]:
    """(line offset, command) of a shell block: its ``$`` lines if it has any, else every
    line that starts with a program; comments dropped, continued lines joined."""
    lines = block.replace("\\\n", " \x00").splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    offset = 0
    for line in lines:
        here, offset = offset, offset + 1 + line.count("\x00")
        text = line.replace(" \x00", " ")
        if prompted:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        text = re.split(r"\s+#\s", text, maxsplit=1)[0]
        text = re.sub(r"\s+", " ", text).strip()
        if text and PROGRAMS.match(text):
            yield here, text


def rule_for(command: str) -> tuple[bool, str | None]:
    """(matched, skip reason or None to run it)."""
    for pattern, reason in RULES:
        if pattern.search(command):
            return True, reason
    return False, None


COMMANDS = doc_commands()


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_in_the_catalogue(code: ErrorCode) -> None:
    assert f"`{code.value}`" in (DOCS / "errors.md").read_text()


def test_the_wheels_send_no_one_to_a_docs_page_they_do_not_ship() -> None:
    """Messages and hints are string constants other than docstrings."""
    found = []
    for path in (p for tree in SHIPPED for p in sorted(tree.rglob("*.py"))):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        }
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and re.search(r"docs/|\w\.md\b", node.value)
        ]
    assert found == []


def test_the_documents_name_commands_and_each_has_a_rule() -> None:
    texts = {c.text for c in COMMANDS}
    assert "sagellm-backend list" in texts
    assert "pip install ./packages/isagellm-backend ./packages/isagellm-backend-cuda" in texts
    unmatched = [f"{c.where}: {c.text}" for c in COMMANDS if not rule_for(c.text)[0]]
    assert unmatched == [], "add a rule to RULES for each of these"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_every_documented_command_runs_or_is_skipped_with_its_reason(
    command: DocCommand, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _, reason = rule_for(command.text)
    if reason == INSTALL and os.environ.get(INSTALLS) == "1":
        request.getfixturevalue("install_env").run(command.text, tmp_path)
        return
    if reason is not None:
        pytest.skip(reason)
    program, *args = [PLACEHOLDERS.get(arg, arg) for arg in shlex.split(command.text)]
    if any("cpu" in arg for arg in args) and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch: the torch session runs it")
    if program == "sagellm-backend":
        args = ["-m", "sagellm_backend", *args, *(["--repeats", "1"] if args[0] == "bench" else [])]
    environ = {k: v for k, v in os.environ.items() if k != "SAGELLM_BACKEND"}
    if environ.get("PYTHONPATH"):  # it runs elsewhere: the same path, made absolute
        paths = environ["PYTHONPATH"].split(os.pathsep)
        environ["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in paths)
    result = subprocess.run(
        [sys.executable, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{command.where}: {command.text}\n{result.stderr}"


class InstallEnv:
    """A machine with torch installed (the pinned CPU build) where the install commands run one
    after another, each from a clean slate of our wheels; ``dist`` lands in ``work``."""

    def __init__(self, root: Path) -> None:
        self.work = root / "work"
        self.work.mkdir()
        (self.work / "packages").symlink_to(ROOT / "packages")
        self.env = root / "env"
        venv.create(self.env, with_pip=True)
        self.python = str(self.env / "bin" / "python")
        self._shell(f"{self.python} -m pip install -q torch numpy", root)

    def run(self, command: str, scratch: Path) -> None:
        self._shell(f"{self.python} -m pip uninstall -y -q {' '.join(_OURS)}", scratch)
        shell = re.sub(r"(^|&& )pip ", rf"\g<1>{self.python} -m pip ", command)
        shell = re.sub(r"(^|&& )python3 -m venv ", rf"\g<1>{sys.executable} -m venv ", shell)
        self._shell(shell, scratch)
        if "pip wheel" in command:
            return
        wanted = set(re.findall(r"\./packages/([\w-]+)", command)) | set(
            re.findall(r"\b(isagellm-backend(?:-\w+)?)\s*$", command)
        )
        python = str(scratch / ".venv/bin/python") if ".venv/" in command else self.python
        versions = self._shell(
            f"{python} -c 'import importlib.metadata as m, sys; "
            f"print(*(m.version(d) for d in sys.argv[1:]))' {' '.join(sorted(wanted))}",
            scratch,
        )
        assert set(versions.split()) == {_core_version()}, f"{command}: {versions}"

    def _shell(self, command: str, scratch: Path) -> str:
        environ = {**os.environ, "PIP_CONSTRAINT": str(TORCH_CONSTRAINTS), "PYTHONPATH": ""}
        cwd = scratch if ".venv" in command else self.work
        if cwd == scratch and not (scratch / "packages").exists():
            (scratch / "packages").symlink_to(ROOT / "packages")
        result = subprocess.run(
            ["bash", "-c", f"set -e; {command}"],
            env=environ,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout


_OURS = ("isagellm-backend", "isagellm-backend-cuda", "isagellm-backend-ascend")


def _core_version() -> str:
    text = (ROOT / "packages/isagellm-backend/src/sagellm_backend/_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="session")
def install_env(tmp_path_factory: pytest.TempPathFactory) -> InstallEnv:
    return InstallEnv(tmp_path_factory.mktemp("installs"))


@pytest.mark.parametrize("op", list(STANDARD_OPS.values()), ids=lambda op: op.name)
def test_every_standard_op_is_in_the_kernel_catalogue(op: StandardOp) -> None:
    kind = op.kind.value if op.kind is not None else "provider"
    row = f"| `{op.name}` | {kind} | `{op.signature}` | {op.summary} |"
    assert row in (DOCS / "data-path.md").read_text()
