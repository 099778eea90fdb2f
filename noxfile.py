"""
The test matrix: C{nox} (the README's test command runs it from a venv).

- C{lint}: C{ruff check} and C{ruff format --check} (ruff.toml), with a pinned ruff.
- C{package}: builds the sdist, then the wheel from it (C{python -m build}),
  checks what each carries, installs the wheel into a clean venv and checks
  that C{twistd --help} lists both plugins and C{natbypass mediator --help}
  shows the plugin's options.
- C{tests-3.11}, C{tests-3.12}, C{tests-3.13} (the versions setup.cfg's
  classifiers name): the suite, with trial from the source tree, in a venv
  with the wheel and the C{test} extra.  The NAT-lab tests (root only) run in
  one of them: the one on the Python that runs nox, i.e. the C{python3} that
  made C{.venv}; the others skip those modules.  A version with no interpreter
  on PATH or under C{$PYENV_ROOT/versions} is skipped (an error when C{CI} is
  set, as nox does by default).
- C{summary}: one line per version, then C{tests: N passed, N failed, N skipped}
  over all of them.

Interpreters are never downloaded (C{download_python = "never"}).
"""

from __future__ import annotations

import atexit
import configparser
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

HERE = Path(__file__).resolve().parent
nox.options.sessions = ["lint", "package", "tests", "summary"]
#: The ruff the tree is formatted and linted with (a newer one may format differently).
RUFF = "ruff==0.17.6"
nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"
nox.options.reuse_existing_virtualenvs = False


def supported_versions() -> list[str]:
    """C{3.X} for each C{Programming Language :: Python :: 3.X} classifier in setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(HERE / "setup.cfg")
    return re.findall(r"Programming Language :: Python :: (3\.\d+)\s*$", cfg["metadata"]["classifiers"], re.M)


SUPPORTED = supported_versions()
#: this nox's base interpreter: the python3 the README's command made .venv with
BASE_PREFIX = os.path.realpath(sys.base_prefix)
LAB_MODULES = ("test_lab_", "test_punch_lab")
#: version -> (passed, failed, skipped, status) of the sessions run by this nox process
RESULTS: dict[str, tuple[int, int, int, int]] = {}
_built: dict[str, Path] = {}


def _scratch(prefix: str) -> Path:
    """A temporary directory, removed when nox exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _runs(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "pass"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _offer_pyenv_versions() -> None:
    """
    Put C{pythonX.Y} of pyenv's installed versions on PATH (through a directory
    of links, so nothing else of pyenv's comes first) for each supported version
    that PATH does not already run: pyenv's shims only run the selected version.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    links = HERE / ".nox" / ".pythons"
    for version in SUPPORTED:
        found = shutil.which(f"python{version}")
        if found and _runs(found):
            continue
        candidates = sorted(
            glob.glob(str(root / f"{version}.*" / "bin" / f"python{version}")),
            key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parent.parent.name)],
        )
        if candidates and _runs(candidates[-1]):
            links.mkdir(parents=True, exist_ok=True)
            link = links / f"python{version}"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(candidates[-1])
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_offer_pyenv_versions()


def _wheel(session: nox.Session) -> Path:
    """The wheel, built once per nox run from the sdist (so MANIFEST.in is tested too)."""
    if "wheel" not in _built:
        out = _scratch("natbypass-dist-")
        session.install("build")
        session.run("python", "-m", "build", "--outdir", str(out), str(HERE))
        (_built["sdist"],) = out.glob("natbypass-*.tar.gz")
        (_built["wheel"],) = out.glob("natbypass-*.whl")
    return _built["wheel"]


@nox.session
def lint(session: nox.Session) -> None:
    """The linter and the formatter's check over the whole tree."""
    session.install(RUFF)
    session.run("ruff", "check", str(HERE))
    session.run("ruff", "format", "--check", str(HERE))


@nox.session(python=False)
def package(session: nox.Session) -> None:
    """Build sdist and wheel; install the wheel into a clean venv; twistd must see both plugins."""
    venv = _scratch("natbypass-build-")
    session.run(sys.executable, "-m", "venv", str(venv / "build"))
    build_env = {
        "PATH": f"{venv / 'build' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv / "build"),
    }
    out = venv / "dist"
    session.run("python", "-m", "pip", "install", "-q", "build", env=build_env, external=True)
    session.run("python", "-m", "build", "--outdir", str(out), str(HERE), env=build_env, external=True)
    (sdist,) = out.glob("natbypass-*.tar.gz")
    (wheel,) = out.glob("natbypass-*.whl")
    _built.update(sdist=sdist, wheel=wheel)
    session.run(sys.executable, str(HERE / ".ci" / "check_dist.py"), str(sdist), str(wheel), str(venv / "clean"))


def _lab_here(session: nox.Session) -> bool:
    prefix = session.run("python", "-c", "import sys; print(sys.base_prefix)", silent=True)
    return os.path.realpath(str(prefix).strip()) == BASE_PREFIX


def _unit_modules() -> list[str]:
    return sorted(f"tests.{p.stem}" for p in (HERE / "tests").glob("test_*.py") if not p.stem.startswith(LAB_MODULES))


@nox.session(python=SUPPORTED)
def tests(session: nox.Session) -> None:
    """The suite on one Python version (the NAT lab only on the Python running nox)."""
    version = str(session.python)
    session.install(f"{_wheel(session)}[test]")
    lab = _lab_here(session)
    names = ["tests"] if lab else _unit_modules()
    session.log(
        "NAT-lab tests: " + ("included (the Python running nox)" if lab else "skipped (run on the Python running nox)")
    )
    summary = Path(tempfile.mkstemp(prefix="natbypass-summary-")[1])
    session.run(
        "bash",
        str(HERE / ".ci" / "test"),
        *names,
        env={"NATBYPASS_TEST_SUMMARY": str(summary)},
        external=True,
        success_codes=range(256),
    )
    text = summary.read_text().split()
    summary.unlink()
    passed, failed, skipped, status = (int(n) for n in text) if len(text) == 4 else (0, 1, 0, 1)
    RESULTS[version] = (passed, failed, skipped, status)
    if status != 0 or failed:
        session.error(f"Python {version}: {failed} failed (trial exit status {status})")


@nox.session(python=False)
def summary(session: nox.Session) -> None:
    """One line per version, then the totals; fails when a version failed or none ran."""
    for version in SUPPORTED:
        if version in RESULTS:
            p, f, s, status = RESULTS[version]
            print(f"Python {version}: {p} passed, {f} failed, {s} skipped" + (f" (exit {status})" if status else ""))
        else:
            print(f"Python {version}: not run (no interpreter found, or not selected)")
    totals = [sum(r[i] for r in RESULTS.values()) for i in range(3)]
    print(f"tests: {totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    if not RESULTS:
        session.error("no test session ran")
    if any(r[1] or r[3] for r in RESULTS.values()):
        session.error("a version failed")
