"""Development sessions. Tests run against the built wheels, never the source tree.

nox                  # every default session
nox -s tests-3.12    # core tests on one Python
nox -s torch         # torch layer and cpu backend (Python 3.11, pinned CPU torch)
nox -s protocol      # the bridge to isagellm-protocol, with the real package (Python 3.11)
nox -s install       # the documented install commands, from this checkout (Python 3.11)

Locally, a session whose Python is not installed is skipped, and the ``interpreters`` session
(first of the defaults) says which; it fails when the torch session cannot run. In CI (``CI``
set, as ``.ci/run`` sets it) a missing interpreter fails the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
import nox.virtualenv

CI = bool(os.environ.get("CI"))
"""In CI every session must run; locally those whose Python is missing are skipped."""
nox.options.error_on_missing_interpreters = CI
nox.options.sessions = ["interpreters", "lint", "mypy", "tests", "torch", "protocol", "install"]

ROOT = Path(__file__).parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
TORCH_CONSTRAINTS = str(ROOT / "constraints" / "torch.txt")
PACKAGES = {
    "isagellm-backend": ROOT / "packages" / "isagellm-backend",
    "isagellm-backend-cuda": ROOT / "packages" / "isagellm-backend-cuda",
    "isagellm-backend-ascend": ROOT / "packages" / "isagellm-backend-ascend",
}
PLUGINS = ["isagellm-backend-cuda", "isagellm-backend-ascend"]
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]
TRITON = "triton==3.6.0"
TRANSFORMERS = "transformers==5.17.0"
"""The oracle of examples/tiny_llama.py's test (the version on the GPU machine)."""
"""For the CUDA kernels' tests in Triton's interpreter mode on the CPU."""
TEST_RUNS = [
    ["packages/isagellm-backend/tests", "packages/isagellm-backend-cuda/tests", "tests"],
    ["packages/isagellm-backend-ascend/tests"],
]
"""Separate pytest runs: the Ascend tests put their fake torch_npu on sys.path for their run."""
PROTOCOL_PYTHON = "3.11"
"""isagellm-protocol is published for Python 3.11 only."""
PROTOCOL_TESTS = [
    "packages/isagellm-backend/tests/test_interop_protocol.py",
    "packages/isagellm-backend/tests/test_interop_without_protocol.py",
    "tests/test_factory_contract.py",
]


def _add_pyenv_interpreters() -> None:
    """Put every pyenv-installed CPython on PATH so that nox finds python3.10 to python3.13."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    bins = [str(p / "bin") for p in sorted(versions.glob("3.1*")) if (p / "bin").is_dir()]
    if bins:
        os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_add_pyenv_interpreters()


def _interpreter(version: str) -> str | None:
    """The interpreter nox uses for ``version``, or None: found by nox's own discovery where
    this nox has it (PATH, version managers), else as ``pythonX.Y`` on PATH."""
    find = getattr(nox.virtualenv, "_find_python", None)
    found = find(version) if callable(find) else shutil.which(f"python{version}")
    return str(found) if found else None


TORCH_PYTHONS = ["3.11", "3.12", "3.13", "3.10"]
"""Where the torch, mypy and lint sessions run: 3.11 in CI; locally the first one installed."""
TORCH_PYTHON = (
    TORCH_PYTHONS[0] if CI else next((v for v in TORCH_PYTHONS if _interpreter(v)), "3.11")
)


@nox.session(python=False)
def interpreters(session: nox.Session) -> None:
    """Which Pythons are installed and which sessions are skipped for want of one; fails when
    no torch session can run (in CI: when any Python is missing)."""
    missing = []
    for version in PYTHONS:
        found = _interpreter(version)
        session.log(f"Python {version}: {found or 'not found'}")
        if found is None:
            missing.append(version)
    skipped = [f"tests-{v}" for v in missing]
    if TORCH_PYTHON in missing:
        skipped += ["lint", "mypy", "torch"]
    if PROTOCOL_PYTHON in missing:
        skipped += ["protocol", "install"]
    session.log(f"torch, mypy and lint run on Python {TORCH_PYTHON}")
    if skipped:
        session.log(f"skipped for want of their Python: {', '.join(skipped)}")
    if CI and missing:
        session.error(f"CI needs every Python of {PYTHONS}; missing: {', '.join(missing)}")
    if TORCH_PYTHON in missing:
        session.error(
            f"no torch session can run: none of Python {', '.join(TORCH_PYTHONS)} is installed; "
            "install one (such as pyenv install 3.11) and run nox again"
        )


def build_wheels(session: nox.Session) -> dict[str, str]:
    """Build every wheel of the repo into the session's tmp dir; return name -> path."""
    outdir = Path(session.create_tmp()) / "dist"
    session.install("build>=1.2", "hatchling>=1.21")
    wheels: dict[str, str] = {}
    for name, path in PACKAGES.items():
        session.run(
            "python",
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(outdir),
            str(path),
            silent=True,
        )
        stem = name.replace("-", "_")
        (wheel,) = sorted(outdir.glob(f"{stem}-*.whl"))
        wheels[name] = str(wheel)
    return wheels


def run_pytest(session: nox.Session, *paths: str) -> None:
    """Run pytest from a tmp dir so that the source tree is never imported."""
    args = [str(ROOT / p) for p in paths]
    with session.chdir(session.create_tmp()):
        session.run(
            "python",
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
            *args,
            *session.posargs,
        )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Every test on the installed wheels, without torch (plugins installed without their deps).

    Tests that need torch skip with the reason; the torch session runs them.
    """
    wheels = build_wheels(session)
    session.install(wheels["isagellm-backend"], *TEST_DEPS)
    session.install("--no-deps", *(wheels[name] for name in PLUGINS))
    for paths in TEST_RUNS:
        run_pytest(session, *paths)


@nox.session(python=TORCH_PYTHON, venv_backend="venv")
def torch(session: nox.Session) -> None:
    """Every test with the pinned CPU build of torch: the torch layer, cpu, and the plugins'
    CPU-side tests (the Ascend plugin against its strict fake of torch_npu; GPU tests skip)."""
    wheels = build_wheels(session)
    session.install(
        "-c",
        TORCH_CONSTRAINTS,
        f"{wheels['isagellm-backend']}[torch]",
        *(wheels[name] for name in PLUGINS),
        TRITON,
        TRANSFORMERS,
        *TEST_DEPS,
    )
    for paths in TEST_RUNS:
        run_pytest(session, *paths)


@nox.session(python=PROTOCOL_PYTHON, venv_backend="venv")
def protocol(session: nox.Session) -> None:
    """The isagellm-protocol bridge and the caller factory contract, with the real package."""
    wheels = build_wheels(session)
    session.install(f"{wheels['isagellm-backend']}[protocol]", "pydantic>=2", *TEST_DEPS)
    session.run("python", "-c", "import sagellm_protocol")  # the extra must have installed it
    run_pytest(session, *PROTOCOL_TESTS)


@nox.session(python=PROTOCOL_PYTHON, venv_backend="venv")
def install(session: nox.Session) -> None:
    """Every install command of README.md and docs/, run from this checkout into fresh
    environments with torch pinned (tests/test_docs.py); Python 3.11 for the [protocol] extra."""
    wheels = build_wheels(session)
    session.install(wheels["isagellm-backend"], *TEST_DEPS)
    session.env["SAGELLM_TEST_INSTALLS"] = "1"
    run_pytest(session, "tests/test_docs.py")


@nox.session(python=TORCH_PYTHON, venv_backend="venv")
def mypy(session: nox.Session) -> None:
    """mypy --strict over every package, the tests and this file."""
    session.install(
        "-c",
        TORCH_CONSTRAINTS,
        "mypy>=1.10",
        "torch",
        "nox",
        "hatchling>=1.21",
        "matplotlib",
        *TEST_DEPS,
        "typing-extensions>=4.6",
    )
    config = str(ROOT / "pyproject.toml")
    session.run("mypy", "--config-file", config)
    ascend = ROOT / "packages" / "isagellm-backend-ascend"
    session.run("mypy", "--config-file", config, str(ascend / "src"), str(ascend / "tests"))


@nox.session(python=TORCH_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
